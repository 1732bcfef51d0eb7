"""HostTier: the second expert-cache level of device="cuda", in pinned host memory.

When the model file does not fit in host RAM, the page cache thrashes and every VRAM
miss reads the disk. The host tier is a byte budget of host slots (page-locked on CUDA,
so the copy engine DMAs straight from them) between the file and the VRAM slots:

    file ──(disk link)──> host slot ──(PCIe)──> VRAM slot

Its slot tables are an ExpertCache built with ``allocate=False`` (size classes, owner,
EMPTY / LOADING / READY state, pins, last use); the bytes are one pinned tensor per size
class. It has its own lock: the GPU transfer workers call it without holding the VRAM
cache's lock. Lock order, where both are taken: the VRAM cache's, then this one — never
the other way round, and nobody waits on this lock's condition while holding a pin.

* A VRAM copy `acquire`s its expert: READY → a host hit, the slot pinned until the copy
  into VRAM has completed; LOADING (another worker is reading it) → wait for that read,
  never read it twice; absent → a host miss: a slot is claimed (LOADING, pinned) and the
  caller reads the file into it, then `mark_ready`.
* A staging load (disk → host only, from the predictions) `claim`s a slot without
  waiting, and only by evicting something worth less than what it brings.
* Eviction (`_host_victim`): never a pinned or LOADING slot. Among READY ones, first an
  expert that is resident in VRAM (its host copy is only needed again after VRAM has
  evicted it, so the two levels behave nearly exclusively and hold more distinct experts
  together), then the lowest predicted probability of use at its layer's next turn (the
  policy's `p_next`, when the policy has a predictor), then the least recently used.
* An optional emulated disk link (`parse_link`: "nvme", "2GB/s") makes disk → host
  reads as slow as that link: a token bucket shared by all reads (LinkEmulator.reserve).
"""

from __future__ import annotations

import threading
import time

import numpy as np
import torch
from numba import njit

from efedge.errors import TransferError
from efedge.experts.cache import EMPTY, LOADING, READY, ExpertCache
from efedge.experts.demand_wait import WAIT_TIMEOUT_S
from efedge.experts.store import ExpertStore
from efedge.gpu.emulate import LinkEmulator, wait_until

__all__ = ["HostTier", "EMPTY", "LOADING", "READY"]


@njit(cache=True, fastmath=False)
def _host_victim(cands, owner, last_use, vram_where, p_next, use_p, n_expert, limit):
    """The candidate (unpinned READY) slot to evict: VRAM-resident experts first, then the
    lowest p_next (when use_p), then least recently used. -1 when the best victim is not
    VRAM-resident and its p_next is not below `limit` (a staging load evicts only what is
    less likely to be needed than what it brings; demand passes inf)."""
    best, best_r, best_p, best_lu = -1, 2, np.inf, np.int64(0)
    for i in range(cands.shape[0]):
        s = cands[i]
        key = owner[s]
        if key < 0:
            continue
        m, e = key // n_expert, key % n_expert
        r = 0 if vram_where[m, e] >= 0 else 1
        p = float(p_next[m, e]) if use_p else 0.0
        lu = last_use[s]
        if (best < 0 or r < best_r or (r == best_r and (p < best_p or
                                                         (p == best_p and lu < best_lu)))):
            best, best_r, best_p, best_lu = s, r, p, lu
    if best >= 0 and best_r == 1 and not best_p < limit:
        return -1
    return best


class HostTier:
    """Host slots within `budget` bytes (per size class, at least `n_active` per class), in
    pinned memory from `backend.host_buffer`. Thread-safe; see the module docstring."""

    def __init__(self, store: ExpertStore, budget: int, n_active: int, backend,
                 disk_link=None):
        self.store, self.backend = store, backend
        self.tables = t = ExpertCache(store, budget, n_active, allocate=False)
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)  # a slot became READY, EMPTY or unpinned
        # one pinned block per size class, [slots, slot_bytes]: gate, up, down back to back
        self.pools = [backend.host_buffer(int(n) * int(b)).view(int(n), int(b))
                      for n, b in zip(t.class_slots, t.class_bytes, strict=True)]
        self._np_pools = [p.numpy() for p in self.pools]
        self.disk = LinkEmulator(disk_link) if disk_link is not None else None
        # what eviction reads (both hints, read without their owners' locks)
        self._vram_where = np.full((store.n_layer, store.n_expert), -1, dtype=np.int64)
        self._predictor = None
        self._no_p = np.zeros((1, 1), dtype=np.float32)

    # -- set-up ----------------------------------------------------------------------------
    def watch(self, vram_where: np.ndarray, predictor=None) -> None:
        """The VRAM cache's `where` table and the policy's predictor (its `p_next` [L, E]),
        for eviction. Both are read as hints: a stale value only picks a worse victim."""
        L, E = self.store.n_layer, self.store.n_expert
        if vram_where.shape != (L, E):
            raise ValueError(f"vram_where must be [{L}, {E}], got {vram_where.shape}")
        p = getattr(predictor, "p_next", None)
        if p is not None and p.shape != (L, E):
            raise ValueError(f"the predictor's p_next must be [{L}, {E}], got {p.shape}")
        self._vram_where = vram_where
        self._predictor = predictor if p is not None else None

    @property
    def nbytes(self) -> int:
        return self.tables.nbytes

    @property
    def n_slots(self) -> int:
        return self.tables.n_slots

    def class_slots(self, layer: int) -> int:
        """Host slots of the layer's size class (0 for a dense layer)."""
        c = int(self.tables.layer_class[layer])
        return int(self.tables.class_slots[c]) if c >= 0 else 0

    # -- slots -----------------------------------------------------------------------------
    def slot_tensor(self, slot: int) -> torch.Tensor:
        """The slot's bytes (a pinned row on CUDA)."""
        c = int(self.tables.slot_class[slot])
        return self.pools[c][slot - int(self.tables.class_first[c])]

    def slot_parts(self, slot: int, layer: int) -> list[np.ndarray]:
        """Writable numpy views of the slot where the layer's gate, up and down go."""
        c = int(self.tables.slot_class[slot])
        row = self._np_pools[c][slot - int(self.tables.class_first[c])]
        b = self.tables.part_bounds[layer]
        return [row[b[i]:b[i + 1]] for i in range(3)]

    def contains(self, layer: int, expert: int) -> bool:
        """READY or being read (a hint without the lock)."""
        return bool(self.tables.where[layer, expert] >= 0)

    def _victim(self, limit: float):
        pred = self._predictor
        p = pred.p_next if pred is not None else self._no_p

        def pick(tables, candidates: np.ndarray) -> int:
            return int(_host_victim(candidates, tables.slot_owner, tables.slot_last_use,
                                    self._vram_where, p, pred is not None,
                                    self.store.n_expert, limit))
        return pick

    def acquire(self, layer: int, expert: int, timeout: float = WAIT_TIMEOUT_S):
        """(slot, hit), the slot pinned. hit: READY, copy from it. Not hit: the slot is
        LOADING for this caller, who reads the file into it and calls `mark_ready` (or
        `release` on failure), then `unpin`. Waits while another thread reads the expert
        or while every slot of its class is pinned or loading."""
        t = self.tables
        if t.layer_class[layer] < 0:
            raise ValueError(f"layer {layer} is dense: it has no experts to cache")
        t0 = time.perf_counter()
        with self.cond:
            while True:
                s = int(t.where[layer, expert])
                if s >= 0 and t.slot_state[s] == READY:
                    t.slot_pins[s] += 1
                    t.touch(s)
                    return s, True
                if s < 0:
                    s = t.free_or_victim(layer, self._victim(np.inf))
                    if s >= 0:
                        t.assign(s, layer, expert)  # LOADING
                        t.slot_pins[s] += 1
                        return s, False
                # being read by another thread, or no slot to take yet: wait for it
                if time.perf_counter() - t0 > timeout:
                    raise TransferError(f"host tier: no slot for expert {expert} of layer "
                                        f"{layer} after {timeout:.0f} s")
                self.cond.wait(timeout=1.0)

    def claim(self, layer: int, expert: int, value: float) -> int:
        """A slot for a staging load (LOADING, not pinned), or -1: already held or being
        read, or no slot whose expert is less likely to be needed than `value`."""
        t = self.tables
        if t.layer_class[layer] < 0:
            return -1
        with self.cond:
            if t.where[layer, expert] >= 0:
                return -1
            s = t.free_or_victim(layer, self._victim(float(value)))
            if s < 0:
                return -1
            t.assign(s, layer, expert)
            return s

    def mark_ready(self, slot: int) -> None:
        with self.cond:
            self.tables.slot_state[slot] = READY
            self.tables.touch(slot)
            self.cond.notify_all()

    def release(self, slot: int) -> None:
        """Forget a slot whose read failed (its waiters then try themselves)."""
        with self.cond:
            if self.tables.slot_state[slot] == LOADING:
                self.tables.release(slot)
            self.cond.notify_all()

    def unpin(self, slot: int) -> None:
        with self.cond:
            self.tables.slot_pins[slot] -= 1
            self.cond.notify_all()

    # -- the emulated disk -------------------------------------------------------------------
    def wait_disk(self, nbytes: int, started: float) -> None:
        """With an emulated disk link, return no earlier than that link would have
        delivered `nbytes` read from `started` on (reads queue behind each other)."""
        if self.disk is not None:
            wait_until(self.disk.reserve(nbytes, started))

    def stats(self) -> dict:
        t = self.tables
        with self.cond:
            return {"host_cache_bytes": self.nbytes, "host_cache_slots": self.n_slots,
                    "host_ready": int((t.slot_state == READY).sum()),
                    "host_pinned": int((t.slot_pins > 0).sum()),
                    "disk_link": str(self.disk.link) if self.disk is not None else None}
