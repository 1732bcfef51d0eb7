"""What no cache policy can beat on a given routing trace: the fewest expert loads
(Belady's MIN) and the stall those loads force on a serial link.

Why: the scheduler's figure of merit is stall as a share of on-demand loading's, and
whether a share is good depends on how low it can go at all. When the bytes that must
cross the link take longer than the compute they can hide behind, no predictor removes
the stall; this module says by how much, so that benchmarks report the gap to the bound
rather than to zero.

The argument: every policy, prefetching or not, must load at least as many experts as
MIN does (evict the resident expert used furthest in the future; a prefetching schedule
can always be delayed into a demand schedule with no more loads). The link moves one
expert at a time, so the loads of the counted window take at least their transfer
time; compute overlaps with it at best entirely, and at most a full cache's worth can
have been loaded before the window starts. Hence

    stall ≥ max(0, Σ transfer time of MIN's loads in the window − slots · τ − compute).

It is a bound, not a schedule: no real policy knows the future.
"""

from __future__ import annotations

import heapq

import numpy as np

_NEVER = np.iinfo(np.int64).max


def min_loads(experts: np.ndarray, layer_class: np.ndarray, class_slots: np.ndarray,
              n_expert: int, warmup: int = 0) -> np.ndarray:
    """Loads of Belady's MIN per layer for the tokens from `warmup` on (earlier tokens
    run too, to warm the cache, but are not counted).

    experts [T, L, K] the experts each token used at each layer; layer_class [L] the size
    class of each layer's experts and class_slots [C] the slots of each class (as
    ExpertCache lays them out: one pool per class, shared by its layers). All K experts
    of a (token, layer) must be resident together. Returns loads [L] int64."""
    experts = np.asarray(experts, dtype=np.int64)
    T, L, _ = experts.shape
    steps = [(t, l) for t in range(T) for l in range(L)]
    wanted = [np.unique(experts[t, l]) + l * n_expert for t, l in steps]
    # for each step, the next step at which each of its keys is wanted again
    following: list[list[int]] = [[] for _ in steps]
    seen: dict[int, int] = {}
    for s in range(len(steps) - 1, -1, -1):
        keys = wanted[s].tolist()
        following[s] = [seen.get(k, _NEVER) for k in keys]
        for k in keys:
            seen[k] = s
    loads = np.zeros(L, dtype=np.int64)
    resident: list[dict[int, int]] = [{} for _ in class_slots]  # key -> its next use
    heaps: list[list[tuple[int, int]]] = [[] for _ in class_slots]  # (-next use, key), lazy
    for s, (t, l) in enumerate(steps):
        c = int(layer_class[l])
        res, heap, cap = resident[c], heaps[c], int(class_slots[c])
        keys = wanted[s].tolist()
        if len(keys) > cap:
            raise ValueError(f"layer {l} needs {len(keys)} experts at once but its size "
                             f"class has {cap} slots")
        current = set(keys)
        stash: list[tuple[int, int]] = []  # this step's experts: not evictable now
        for k, n in zip(keys, following[s], strict=True):
            if k in res:
                res[k] = n
                stash.append((-n, k))
                continue
            if t >= warmup:
                loads[l] += 1
            while len(res) >= cap:  # evict the furthest next use (one exists: see below)
                neg, v = heapq.heappop(heap)
                if res.get(v) == -neg and v not in current:
                    del res[v]
            res[k] = n
            stash.append((-n, k))
        for item in stash:
            heapq.heappush(heap, item)
    # (at most len(keys) - 1 < cap residents are current when one is evicted, so the heap
    # always holds a valid non-current entry; stale and current entries are dropped)
    return loads


def unique_requests(experts: np.ndarray, warmup: int = 0) -> int:
    """The expert requests of `experts` [T, L, K] from token `warmup` on, an expert
    counted once per (token, layer): what MIN's hit rate is a share of."""
    return sum(np.unique(experts[t, j]).size for t in range(warmup, experts.shape[0])
               for j in range(experts.shape[1]))


def stall_bound(loads: np.ndarray, bytes_per_expert, bytes_per_s: float,
                latency_s: float, slots: int, compute_s: float) -> float:
    """The stall (seconds) that MIN's `loads` [L] force over a window with `compute_s`
    of compute, on a serial link of bytes_per_s and latency_s per transfer; up to `slots`
    loads (the largest) may have happened before the window."""
    per = np.asarray([latency_s + b / bytes_per_s for b in bytes_per_expert], dtype=np.float64)
    transfer = float(np.dot(np.asarray(loads, dtype=np.float64), per))
    head = min(int(slots), int(np.sum(loads))) * float(per.max())
    return max(0.0, transfer - head - compute_s)
