"""Issuing a layer's planned prefetches in one kernel call (ExpertFlow's value eviction).

What `StreamingExperts.prefetch(layer, experts, priority)` does once per planned
prefetch — for each expert not resident: a slot of its size class (the first empty one,
else the policy's victim among the unpinned READY ones), the evicted expert accounted,
the slot assigned, the copy queued — and what `Policy._flush_plan` does after it (the
step each is due at, when it was fetched), for every group of a plan at once, with the
victim chosen by `value_victim` as ExpertFlow's `victim()` chooses it. Same decisions in
the same order; only the copies are queued by the caller, in the order returned.

Why: issuing one prefetch took ~13 µs of Python (two kernel calls, a dozen numpy
scalar reads and writes, all cold after the layer kernels) — about a third of the policy's
per-layer cost on the demo model (docs/scheduler.md §7).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba import njit

from efedge.experts.cache import EMPTY, LOADING, READY
from efedge.experts.horizon import value_victim
from efedge.experts.transfer import PREFETCH


class PrefetchPlan(NamedTuple):
    """Prefetches decided at a layer's route, issued behind its demand loads: group g
    brings experts[start[g]:start[g + 1]] of layer[g], needed at step prio[g] - 1,
    evicting only experts valued below limit[g] and less likely to be used than
    p_limit[g] (horizon.select_prefetch writes it into a PlanBuffers, `buffers`, which
    the policy takes back once the plan is issued; refine's plans own their arrays)."""
    n: int  # groups
    ints: np.ndarray  # int64 [≥ 3, ≥ n + 1]: start, layer, prio
    floats: np.ndarray  # float64 [≥ 2, ≥ n]: limit, p_limit
    experts: np.ndarray
    buffers: PlanBuffers | None = None

    start = property(lambda self: self.ints[0])
    layer = property(lambda self: self.ints[1])
    prio = property(lambda self: self.ints[2])
    limit = property(lambda self: self.floats[0])
    p_limit = property(lambda self: self.floats[1])


class PlanBuffers:
    """Where horizon.select_prefetch writes a plan of up to `cap` candidates: ints [6,
    cap + 1] — the groups' start, layer and priority, then the candidates' layer, expert
    and distance —, floats [3, cap] — the groups' limit and p_limit, then the candidates'
    probabilities. Reused plan after plan: each array a kernel returns costs the compute
    thread ~1 µs to box."""

    def __init__(self, cap: int):
        self.ints = np.zeros((6, cap + 1), dtype=np.int64)
        self.floats = np.zeros((3, max(cap, 1)), dtype=np.float64)
        self.experts = self.ints[4]

    def plan(self, groups: int) -> PrefetchPlan:
        return PrefetchPlan(groups, self.ints, self.floats, self.experts, self)


@njit(cache=True, fastmath=False)
def place_prefetches(n_g, ints, floats, experts, where, slot_owner, slot_state, slot_pins,
                     slot_last_use, slot_uses, slot_prefetched, slot_land_at, slot_gen,
                     layer_class, class_first, class_slots, p_next, cur, needed, tick0, due,
                     fetched_at, tick, out):
    """(cache lock held) Assign slots to a plan's prefetches as StreamingExperts.prefetch
    would, group by group, with ExpertFlow's value_victim; a group stops at its first
    expert that finds no slot (every slot busy, or no victim worth less). Updates the
    cache tables (ExpertCache.assign and begin_load), `due` and `fetched_at`
    (Policy._flush_plan). Returns (n, how many evicted experts had been prefetched and
    never used), the copies to queue in out[:, :n] (int64 [5, ≥ the plan's candidates]:
    layer, expert, slot, priority and load number, in order; written, not returned: an
    array a kernel returns costs the caller ~1 µs to box). (-1, 0), nothing done, where
    `out` is too small."""
    g_start, g_layer, g_prio = ints[0], ints[1], ints[2]
    g_limit, g_plimit = floats[0], floats[1]
    n_expert = where.shape[1]
    if out.shape[0] < 5 or out.shape[1] < g_start[n_g]:
        return -1, 0
    cands = np.empty(slot_state.shape[0], dtype=np.int64)
    n = 0
    wasted = 0
    for g in range(n_g):
        m = g_layer[g]
        c = layer_class[m]
        if c < 0:
            continue  # a dense layer: nothing to load
        lo = class_first[c]
        hi = lo + class_slots[c]
        issued = 0
        for i in range(g_start[g], g_start[g + 1]):
            e = experts[i]
            if where[m, e] >= 0:
                continue
            slot = -1  # ExpertCache.free_or_victim: the first empty slot, else a victim
            nc = 0
            for s in range(lo, hi):
                if slot_pins[s] == 0:
                    if slot_state[s] == EMPTY:
                        slot = s
                        break
                    if slot_state[s] == READY:
                        cands[nc] = s
                        nc += 1
            if slot < 0 and nc > 0:
                slot = value_victim(cands[:nc], slot_owner, slot_last_use, slot_uses, p_next,
                                    cur, needed, tick0, n_expert, g_limit[g], g_plimit[g])
            if slot < 0:
                break
            old = slot_owner[slot]
            if old >= 0:
                if slot_prefetched[slot]:
                    wasted += 1
                where[old // n_expert, old % n_expert] = -1
            slot_owner[slot] = m * n_expert + e
            slot_state[slot] = LOADING
            slot_uses[slot] = 0
            where[m, e] = slot
            slot_prefetched[slot] = True
            slot_land_at[slot] = np.inf  # ExpertCache.begin_load
            slot_gen[slot] += 1
            out[0, n], out[1, n], out[2, n], out[4, n] = m, e, slot, slot_gen[slot]
            out[3, n] = max(PREFETCH, g_prio[g])  # never ahead of a demand load
            n += 1
            issued += 1
        if issued:
            for i in range(g_start[g], g_start[g + 1]):
                s = where[m, experts[i]]
                if s >= 0:
                    due[m, experts[i]] = g_prio[g] - 1  # the step it is needed at
                    fetched_at[s] = tick
    return n, wasted


__all__ = ["PlanBuffers", "PrefetchPlan", "place_prefetches"]
