"""ExpertCache: a byte budget of fixed expert slots, and the tables that say which expert
sits where. Tables are numpy arrays (readable from numba); every change happens under
one lock (`cache.cond`), so a slot is never handed out twice.

Slots come in size classes: a Q4_K_M file mixes Q4_K and Q6_K experts, so layers differ
in bytes per expert. Each class has its own pool [n_slots, slot_bytes]; a layer's experts
always use its class. Slot states: EMPTY → LOADING (a worker is copying into it) →
READY. A pinned slot is in use by the compute thread (or wanted by the current layer)
and is never evicted.
"""

from __future__ import annotations

import math
import re
import threading

import numpy as np
from numba import njit

from efedge.errors import CacheBudgetError
from efedge.experts.store import ExpertStore, ExpertWeights

EMPTY, LOADING, READY = 0, 1, 2
_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "kib": 2**10, "m": 1e6, "mb": 1e6,
          "mib": 2**20, "g": 1e9, "gb": 1e9, "gib": 2**30, "t": 1e12, "tb": 1e12, "tib": 2**40}


@njit(cache=True, fastmath=False)
def _evictable(lo, hi, state, pins, out):
    """(the first unpinned EMPTY slot in lo..hi, or -1 and the number of unpinned READY
    ones, written to out[:n]): one kernel call instead of six numpy calls on every load
    the cache places; written, not returned, as an array a kernel returns costs ~1 µs to
    box. (-2, 0) where `out` is shorter than hi - lo."""
    if out.shape[0] < hi - lo:
        return -2, 0
    n = 0
    for s in range(lo, hi):
        if pins[s] == 0:
            if state[s] == EMPTY:
                return s, 0
            if state[s] == READY:
                out[n] = s
                n += 1
    return -1, n


def parse_budget(spec: int | float | str, expert_bytes: int) -> int:
    """Bytes from 123456, "512MiB", "1.5GB" or "25%" (of all expert bytes)."""
    if isinstance(spec, bool):
        raise CacheBudgetError(f"invalid cache budget {spec!r}")
    if isinstance(spec, int | float):
        if not math.isfinite(spec) or spec <= 0:
            raise CacheBudgetError(f"cache budget must be a positive number of bytes, "
                                   f"got {spec!r}")
        return int(spec)
    text = str(spec).strip().lower().replace(" ", "")
    if text.endswith("%"):
        try:
            pct = float(text[:-1])
        except ValueError:
            raise CacheBudgetError(f"invalid cache budget {spec!r}") from None
        if not 0 < pct <= 100:
            raise CacheBudgetError(f"cache budget {spec!r} must be within (0%, 100%]")
        return int(expert_bytes * pct / 100)
    m = re.fullmatch(r"([0-9]*\.?[0-9]+)([a-z]*)", text)
    if not m or m.group(2) not in _UNITS:
        raise CacheBudgetError(f"invalid cache budget {spec!r} (use bytes, 512MiB, 2GB or 25%)")
    val = float(m.group(1)) * _UNITS[m.group(2)]
    if not math.isfinite(val) or val <= 0:
        raise CacheBudgetError(f"cache budget must be a positive, finite size, got {spec!r}")
    return int(val)


def minimum_budget(store, n_active: int) -> int:
    """The smallest budget ExpertCache takes: one layer's active experts per size class
    (the bytes of an expert's gate, up and down; layers of equal sizes share slots)."""
    sizes = {tuple(int(b) for b in store.nbytes[il, 0]) for il in range(store.n_layer)
             if store.expert_bytes(il)}
    return n_active * sum(sum(k) for k in sizes)



def _size(nbytes: int) -> str:
    """A budget in words: bytes below a KiB (a 1 KiB budget read "0.0 MiB"), else KiB or
    MiB to one decimal."""
    if nbytes < 1024:
        return f"{nbytes} bytes"
    if nbytes < 2**20:
        return f"{nbytes / 1024:.1f} KiB"
    return f"{nbytes / 2**20:.1f} MiB"

class ExpertCache:
    """Fixed slots within `budget` bytes, sized per class, at least `n_active` per class."""

    def __init__(self, store: ExpertStore, budget: int, n_active: int, allocate: bool = True):
        self.store = store
        self.virtual = not allocate  # the simulator keeps the tables but moves no bytes
        n_layer, n_expert = store.n_layer, store.n_expert
        # a size class: the bytes of gate, up and down of one expert (layers of one class
        # share slots); dense layers (0 bytes, deepseek2's leading layers) have none: -1
        layer_parts = [tuple(int(b) for b in store.nbytes[il, 0]) if store.expert_bytes(il)
                       else (0, 0, 0) for il in range(n_layer)]
        keys = sorted(set(layer_parts) - {(0, 0, 0)}, key=lambda k: (sum(k), k))
        sizes = [sum(k) for k in keys]
        self.layer_class = np.array([keys.index(k) if sum(k) else -1 for k in layer_parts],
                                    dtype=np.int32)
        self.class_parts = np.array(keys, dtype=np.int64).reshape(-1, 3)
        class_experts = np.array([(self.layer_class == c).sum() * n_expert
                                  for c in range(len(sizes))], dtype=np.int64)
        minimum = minimum_budget(store, n_active)  # (n_active × the sizes above)
        if budget < minimum:
            raise CacheBudgetError(
                f"cache budget {_size(budget)} cannot hold one layer's {n_active} "
                f"active experts per size class: the minimum is {minimum} bytes "
                f"({_size(minimum)})")
        # n_active slots per class first; the rest of the budget in proportion to each
        # class's share of all expert bytes; never more slots than the class has experts.
        slots = np.full(len(sizes), n_active, dtype=np.int64)
        spare = budget - minimum
        share = class_experts * np.array(sizes) / float(np.dot(class_experts, sizes))
        for c, b in enumerate(sizes):  # (capped in Python ints first: a budget of 10**30
            # bytes would not fit the int64 slot count)
            slots[c] += min(int(spare * share[c]) // b, int(class_experts[c]))
        slots = np.minimum(slots, class_experts)
        if budget >= int(np.dot(class_experts, sizes)):
            slots = class_experts.copy()  # everything fits: no rounding losses
        self.class_bytes = np.array(sizes, dtype=np.int64)
        self.class_slots = slots
        # one pool per class and part, [slots, part bytes]: the experts' gates (ups, downs)
        # of a class lie back to back, so a view [slots, rows, row_bytes] over them is
        # C-contiguous — numba compiles its plain-loop kernels (F16, …) for strided views
        # about 3× slower (decode_ffn 278 against 100 µs on the demo model)
        self.pools = [[np.zeros((int(n), int(pb) if allocate else 0), dtype=np.uint8)
                       for pb in self.class_parts[c]] for c, n in enumerate(slots)]
        # global slot ids: class c owns [first[c], first[c] + slots[c])
        self.class_first = np.concatenate([[0], np.cumsum(slots)[:-1]]).astype(np.int64)
        n_slots = int(slots.sum())
        self.n_slots = n_slots
        self.slot_class = np.repeat(np.arange(len(sizes)), slots).astype(np.int32)
        self.slot_owner = np.full(n_slots, -1, dtype=np.int64)  # layer * E + expert
        self.slot_state = np.zeros(n_slots, dtype=np.int8)
        self.slot_pins = np.zeros(n_slots, dtype=np.int32)
        self.slot_last_use = np.zeros(n_slots, dtype=np.int64)
        self.slot_uses = np.zeros(n_slots, dtype=np.int64)
        self.slot_prefetched = np.zeros(n_slots, dtype=np.bool_)  # loaded ahead, not yet used
        # a LOADING slot's bytes are all in, and usable, from this perf_counter() time on
        # (inf: not yet) — written by the copy's read kernel, so that the compute thread
        # can take a landed expert without waiting for its worker to get the GIL and mark
        # it READY (StreamingExperts._landed); and which load the slot is on (a copy
        # marks READY only its own load)
        self.slot_land_at = np.full(n_slots, np.inf, dtype=np.float64)
        self.slot_gen = np.zeros(n_slots, dtype=np.int64)
        self.where = np.full((n_layer, n_expert), -1, dtype=np.int64)
        self._candidates = np.empty(n_slots, dtype=np.int64)  # free_or_victim's candidates
        self.tick = 0
        # one lock; the compute thread waits on `cond` (a slot became READY), transfer
        # workers on their own condition of the same lock (a job was queued), so neither
        # kind of event wakes the other kind of thread for nothing
        self.lock = threading.RLock()
        self.cond = threading.Condition(self.lock)
        # the byte offsets of gate / up / down inside a slot of each layer
        self.part_bounds = np.zeros((n_layer, 4), dtype=np.int64)
        for il in range(n_layer):
            self.part_bounds[il, 1:] = np.cumsum(store.nbytes[il, 0])

    @property
    def nbytes(self) -> int:
        return int(np.dot(self.class_slots, self.class_bytes))

    # -- all methods below are called with self.cond held -------------------------------
    def free_or_victim(self, layer: int, victim_policy) -> int:
        """A slot of this layer's class to load into: an empty one, else the victim the
        policy picks among unpinned READY slots. -1 when every slot is busy."""
        c = int(self.layer_class[layer])
        lo, hi = int(self.class_first[c]), int(self.class_first[c] + self.class_slots[c])
        empty, n = _evictable(lo, hi, self.slot_state, self.slot_pins, self._candidates)
        if empty >= 0:
            return int(empty)
        if empty == -2:  # (it holds every slot: never)
            raise RuntimeError(f"slot scratch of {self._candidates.size} for {hi - lo} slots")
        if n == 0:
            return -1
        return int(victim_policy(self, self._candidates[:n]))

    def assign(self, slot: int, layer: int, expert: int) -> int:
        """Give `slot` to (layer, expert), evicting its owner. Returns the evicted key or -1
        and whether the evicted expert had been prefetched and never used."""
        old = int(self.slot_owner[slot])
        if old >= 0:
            self.where[old // self.store.n_expert, old % self.store.n_expert] = -1
        self.slot_owner[slot] = layer * self.store.n_expert + expert
        self.slot_state[slot] = LOADING
        self.slot_uses[slot] = 0
        self.where[layer, expert] = slot
        return old

    def begin_load(self, slot: int) -> int:
        """(cond held) A load of `slot` starts being queued: it has not landed. Returns
        the load's number (slot_gen), by which its copy later knows the slot is still
        its own."""
        self.slot_land_at[slot] = np.inf
        self.slot_gen[slot] += 1
        return int(self.slot_gen[slot])

    def release(self, slot: int) -> None:
        """Forget a slot's expert (a cancelled or failed load)."""
        old = int(self.slot_owner[slot])
        if old >= 0:
            self.where[old // self.store.n_expert, old % self.store.n_expert] = -1
        self.slot_owner[slot] = -1
        self.slot_state[slot] = EMPTY
        self.slot_prefetched[slot] = False

    def touch(self, slot: int) -> None:
        self.tick += 1
        self.slot_last_use[slot] = self.tick
        self.slot_uses[slot] += 1

    # -- views ----------------------------------------------------------------------------
    def slot_parts(self, slot: int) -> list[np.ndarray]:
        """The slot's gate, up and down bytes (three writable 1-D views)."""
        c = int(self.slot_class[slot])
        i = slot - int(self.class_first[c])
        return [pool[i] for pool in self.pools[c]]

    def slot_buffer(self, slot: int) -> np.ndarray:
        """The slot's bytes as the file stores an expert: gate, up, down (a copy)."""
        return np.concatenate(self.slot_parts(slot))

    def weights(self, slot: int, layer: int) -> ExpertWeights:
        """Views of gate / up / down inside the slot, shaped like the file's rows."""
        if self.virtual:
            return None
        parts = self.slot_parts(slot)
        qg, qu, qd = self.store.qtypes(layer)
        mats = []
        for i, part in enumerate(("gate", "up", "down")):
            rows, row_bytes = self.store.part_shape(layer, part)
            m = parts[i].reshape(rows, row_bytes)
            m.flags.writeable = False  # same kernel specialisation as the read-only mapping
            mats.append(m)
        return ExpertWeights(mats[0], mats[1], mats[2], qg, qu, qd)
