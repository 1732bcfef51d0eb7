"""Prefetches through an emulated link, copied by the compute thread as the link comes free.

With an emulated link the engine copies a demand load on the compute thread and lets it
land when the link would have delivered it (TransferEngine.copy_inline): it stands for a
copy engine's DMA, which no thread has to wake up for. Prefetches went to the transfer
workers instead, and where the compute threads hold every core (two on the test VM) a
worker's wake-up cost the compute thread 27-55 µs per plan (15% of decode at 1.85 GB/s)
and started the copy late, so the predicted experts landed after their layer had asked
for them (docs/scheduler.md §6, thirtieth session).

Here a prefetch waits in a queue on the compute thread instead, most urgent first (the
plan's priority: the step it is needed at), and is copied and booked on the link when
the link is about to come free. The compute thread looks whenever it passes the cache (a
plan, a request, a wait, a pass start): as a copy engine takes its next copy when the
link frees, so a demand load queued meanwhile still goes first, and a prefetch found
still queued when its layer asks for it becomes a demand load at once. A demand load also
goes ahead of the booked prefetches that have not started on the link (`demand`): only
the copy on the wire runs to its end. Booked copies —
these prefetches and the compute thread's demand loads — land in booking order (the link
is serial); `sweep` marks them READY once their time has come, so that they count as hits
and can be evicted like any resident expert, even where no layer comes to take them.

Every method is called with the cache's condition held.
"""

from __future__ import annotations

import heapq
import logging
import time
from collections import deque

import numpy as np

from efedge.errors import TransferError
from efedge.experts.cache import LOADING, READY

log = logging.getLogger("efedge.transfer")


class InlinePrefetches:
    """The prefetch queue of a StreamingExperts whose engine copies inline."""

    def __init__(self, cache, store, engine):
        self.cache, self.store, self.engine = cache, store, engine
        # key (layer · E + expert) → (priority, order of arrival, layer, expert, slot)
        self.pending: dict[int, tuple[int, int, int, int, int]] = {}
        # booked copies — these prefetches and the compute thread's demand loads (demand)
        # —, [landing time, slot, load number, time on the link, a prefetch not asked for
        # yet], in booking order (so by landing time: the link is serial)
        self.booked: deque[list] = deque()
        # (priority, order of arrival, key) of the pending ones, most urgent on top;
        # entries taken or cancelled meanwhile are skipped when they come up
        self._heap: list[tuple[int, int, int]] = []
        self._arrivals = 0
        rate = float(engine.link.bytes_per_s)
        self.displaced = 0  # booked prefetches a demand load went ahead of
        # one copy's time on the link, per layer, and the shortest (a quick look first);
        # with the link's latency, how long a copy holds the link
        self._lead = [store.expert_bytes(il) / rate for il in range(store.n_layer)]
        self._min_lead = min((t for t in self._lead if t > 0), default=0.0)
        self._hold = [float(engine.link.latency_s) + t for t in self._lead]
        self.copied = 0  # prefetches copied (the rest were cancelled or evicted first)
        self.copy_s = 0.0  # the time their copies took on the calling thread

    def add(self, layers, experts, slots, priorities) -> None:
        """Queue prefetches whose slots are assigned to them and LOADING, their loads begun
        (ExpertCache.begin_load: no landing time yet), then book what the link has room
        for."""
        n_e = self.store.n_expert
        for m, e, s, p in zip(layers, experts, slots, priorities, strict=True):
            self._arrivals += 1
            key = int(m) * n_e + int(e)
            self.pending[key] = (int(p), self._arrivals, int(m), int(e), int(s))
            heapq.heappush(self._heap, (int(p), self._arrivals, key))
        self.pump()

    def asked(self, layer: int, expert: int, slot: int) -> None:
        """A layer asks for the expert whose prefetch holds `slot`: still queued, it is
        copied now as a demand load (take); booked, it is a demand load from now on, which
        no later demand load goes ahead of."""
        if self.take(layer, expert):
            return
        gen = int(self.cache.slot_gen[slot])
        for entry in self.booked:  # (the copies not landed yet: a few)
            if entry[1] == slot and entry[2] == gen:
                entry[4] = False
                return

    def take(self, layer: int, expert: int) -> bool:
        """The layer asks for an expert whose prefetch is still queued: copy it now, as a
        demand load (first on the link after the copy under way: demand). False if none
        was."""
        entry = self.pending.pop(layer * self.store.n_expert + expert, None)
        if entry is None:
            return False
        self._copy(entry, demand=True)
        return True

    def cancel(self, key: int) -> bool:
        """Drop a queued prefetch (its layer came without needing it); its slot is freed
        if it is still the prefetch's and nobody holds it. False if none was queued."""
        entry = self.pending.pop(key, None)
        if entry is None:
            return False
        s = entry[4]
        if self.cache.slot_owner[s] == key and self.cache.slot_pins[s] == 0:
            self.cache.release(s)
        return True

    def pump(self) -> None:
        """Mark landed prefetches READY, then copy queued ones, most urgent first, while
        the link comes free within one copy's time: on an idle link two are booked (the
        one it starts and the next), so the link stays busy until the compute thread looks
        again (a demand load goes ahead of the one not started yet: demand)."""
        self.sweep()
        pending, heap, free_at = self.pending, self._heap, self.engine.link_free_at
        while pending:
            room = free_at() - time.perf_counter()
            if room >= self._min_lead:
                return  # (no copy fits yet: most looks end here)
            while heap[0][2] not in pending or pending[heap[0][2]][1] != heap[0][1]:
                heapq.heappop(heap)  # taken or cancelled since it was queued
            key = heapq.heappop(heap)[2]
            entry = pending[key]
            if room >= self._lead[entry[2]]:
                heapq.heappush(heap, (entry[0], entry[1], key))
                return
            del pending[key]
            self._copy(entry)
        heap.clear()  # (only stale entries were left)

    def demand(self, slot: int) -> None:
        """A demand load the compute thread has just copied into `slot`
        (TransferEngine.copy_inline, booked behind everything on the link) goes ahead of
        the booked prefetches that have not started on the link yet — as a copy engine
        takes a demand load before the copies still queued; only the one on the wire runs
        to its end —, and is booked here too: its layer marks it READY when it takes it
        (_landed), but a layer abandoned half way (an exception, Ctrl-C) never does, and a
        LOADING slot is never evicted — found by the cache-invariant test, which starved the
        cache that way."""
        cache, booked = self.cache, self.booked
        dur = self._hold[int(cache.slot_owner[slot]) // self.store.n_expert]
        land = float(cache.slot_land_at[slot])
        now = time.perf_counter()
        k = len(booked)
        while k and booked[k - 1][4] and booked[k - 1][0] - booked[k - 1][3] > now:
            k -= 1  # (a prefetch whose copy has not begun)
        tail = [booked.pop() for _ in range(len(booked) - k)][::-1]
        if tail:
            land = tail[0][0] - tail[0][3] + dur  # where the first of them would begin
            cache.slot_land_at[slot] = land
            for entry in tail:  # each starts one demand load later (the link's end stays)
                entry[0] += dur
                s = entry[1]
                if cache.slot_gen[s] == entry[2] and cache.slot_state[s] == LOADING:
                    cache.slot_land_at[s] = entry[0]
            self.displaced += len(tail)
        booked.append([land, slot, int(cache.slot_gen[slot]), dur, False])
        booked.extend(tail)

    def sweep(self) -> None:
        """Booked copies whose landing time has come are READY (if the slot is still
        theirs: the same load number)."""
        booked = self.booked
        if not booked:
            return
        now = time.perf_counter()
        cache = self.cache
        while booked and booked[0][0] <= now:
            _t, s, gen, _d, _prefetch = booked.popleft()
            if cache.slot_gen[s] == gen and cache.slot_state[s] == LOADING:
                cache.slot_state[s] = READY

    def _copy(self, entry, demand: bool = False) -> None:
        _p, _order, layer, expert, slot = entry
        cache = self.cache
        if (cache.slot_owner[slot] != layer * self.store.n_expert + expert
                or cache.slot_state[slot] != LOADING or cache.slot_land_at[slot] != np.inf):
            return  # its slot was released meanwhile (an orphan reaped, a failed load)
        t0 = time.perf_counter()
        try:
            self.engine.copy_inline(layer, expert, slot)
        except TransferError as exc:  # (its slot released) a prefetch is only a guess:
            log.warning("prefetch dropped: %s", exc)  # the layer loads it if it asks
            return
        finally:
            self.copy_s += time.perf_counter() - t0
        self.copied += 1
        if demand:
            self.demand(slot)
            return
        self.booked.append([float(cache.slot_land_at[slot]), slot, int(cache.slot_gen[slot]),
                            self._hold[layer], True])
