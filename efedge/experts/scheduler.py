"""Cache policies: which slot to evict, and what to load ahead of need.

A policy is a small object with four hooks, all called on the compute thread:

* `attach(source)` — once, with the StreamingExperts it drives (for `source.prefetch`).
* `victim(cache, candidates) -> slot` — choose among unpinned READY slots (cond held).
* `on_request(layer, experts)` — the layer asked for these experts (cond held).
* `on_route(layer, hidden, ids)` — a layer has routed; a predictor may prefetch here.

`ondemand` is LRU with no prefetch (the behaviour of llama.cpp's --moe-cache-mib cache),
`lfu` evicts the least frequently requested expert. Policies register by name in
POLICIES; the ExpertFlow scheduler adds itself there.
"""

from __future__ import annotations

import numpy as np

from efedge.errors import EfedgeError


class Policy:
    name = "base"
    prefetches = False

    def attach(self, source) -> None:
        self.source = source
        store = source.store
        self.n_layer, self.n_expert = store.n_layer, store.n_expert

    def victim(self, cache, candidates: np.ndarray) -> int:
        raise NotImplementedError

    def on_request(self, layer: int, experts: list[int]) -> None:
        pass

    def on_route(self, layer: int, hidden: np.ndarray, ids: np.ndarray) -> None:
        pass


class OnDemandLRU(Policy):
    """Load on miss, evict the least recently used slot."""

    name = "ondemand"

    def victim(self, cache, candidates: np.ndarray) -> int:
        return int(candidates[np.argmin(cache.slot_last_use[candidates])])


class LFU(Policy):
    """Load on miss, evict the expert requested least often (decayed counts; ties → LRU)."""

    name = "lfu"
    decay = 0.999  # per request, so old popularity fades over a few thousand tokens

    def attach(self, source) -> None:
        super().attach(source)
        self.freq = np.zeros((self.n_layer, self.n_expert), dtype=np.float64)

    def on_request(self, layer: int, experts: list[int]) -> None:
        self.freq[layer] *= self.decay
        self.freq[layer, experts] += 1.0

    def victim(self, cache, candidates: np.ndarray) -> int:
        owners = cache.slot_owner[candidates]
        f = self.freq[owners // self.n_expert, owners % self.n_expert]
        order = np.lexsort((cache.slot_last_use[candidates], f))
        return int(candidates[order[0]])


POLICIES: dict[str, type[Policy]] = {"ondemand": OnDemandLRU, "lru": OnDemandLRU, "lfu": LFU}


def make_policy(name: str) -> Policy:
    cls = POLICIES.get(str(name).lower())
    if cls is None:
        raise EfedgeError(f"unknown cache policy {name!r} (available: "
                          f"{', '.join(sorted(POLICIES))})")
    return cls()
