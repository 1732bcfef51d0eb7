"""The horizon controller and the eviction / prefetch-selection kernels of ExpertFlow.

The model (docs/scheduler.md has the derivation):

* c   = compute time of one layer (measured: time between routed layers minus stall)
* τ   = transfer time of one expert = bytes per expert / measured bandwidth
* n   = experts each layer needs that were not resident (measured: demand misses plus
        requests served by a prefetch — what on-demand loading would have had to load)
* ρ   = n·τ / c, the link time a layer's loads need per unit of compute (> 1: the link,
        not the compute, is the bottleneck)

A load issued d layers ahead has d·c of compute to hide behind, and the n loads of a
layer queue behind each other, so the look-ahead that hides them is (latency: the time
to the first load's landing, policies._latency — the link meter's service time, or a
slow read of the file where reads overlap in a drive's queue)

    H_need = ceil((latency + (n - 1)·τ) / c)          (clamped to 1 … max_horizon)

Which candidates are worth it: prefetching every needed expert with precision P moves
n·τ / P of link time per layer instead of n·τ, all of it overlapped with compute, so the
stall per layer goes from about n·τ (on demand) to max(0, n·τ/P - c). That is a gain
exactly when P > ρ / (1 + ρ). Applied per candidate with p its calibrated probability of
use: prefetch when p > p_min = ρ / (1 + ρ) (never below p_floor). An idle link (ρ → 0)
takes anything plausible; a saturated one (ρ ≫ 1) only near-certain experts. The slot a
prefetch takes is handled by the eviction rule: it may only evict an expert whose value
(use_value: the inverse of the expected number of layers until its next use) is lower
than its own, and, once ρ > 1, one whose reload its saving covers (victim_p_limit).
The horizon actually used is the furthest distance that still has a candidate above
p_min — where predictions become too uncertain to pay, looking further stops.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from efedge.experts.cache import EMPTY, LOADING, READY
from efedge.experts.meter import M_BANDWIDTH, M_LATENCY, M_READ, M_READ_DEV

# The kernels below run for microseconds on the compute thread, with the cache lock held
# by the caller or not needed: they keep the GIL (no nogil), which also means no transfer
# thread changes the cache tables while they read them.


# the controller's state vector (float64): EWMA compute per layer for single tokens and
# batches (and whether measured), loads per layer, the last layer's (time, stall), whether
# the last pass was batched, the outputs, then the constants
(_C_SINGLE, _C_BATCHED, _HAS_SINGLE, _HAS_BATCHED, _LOADS, _LAST_T, _LAST_STALL, _HAS_LAST,
 _BATCHED, _H_NEED, _P_MIN, _RHO, _ALPHA, _P_FLOOR, _H_MIN, _H_MAX) = range(16)


class HorizonController:
    """Chooses the look-ahead and the probability threshold from runtime measurements.
    Time comes from the caller (the source's clock), never from the wall clock here.

    The arithmetic is two small kernels over one state vector: called once per routed
    layer, in Python it cost ~8 µs with the caches as the layer kernels leave them (a
    dict, a tuple and a dozen attributes), one kernel call (`update`) about a third."""

    def __init__(self, max_horizon: int = 8, min_horizon: int = 1, alpha: float = 0.3,
                 p_floor: float = 0.2):
        self.max_horizon, self.min_horizon = int(max_horizon), int(min_horizon)
        self.alpha, self.p_floor = alpha, p_floor
        self.state = np.zeros(16, dtype=np.float64)
        self.state[[_H_NEED, _P_MIN, _ALPHA, _P_FLOOR, _H_MIN, _H_MAX]] = (
            1, p_floor, alpha, p_floor, self.min_horizon, self.max_horizon)

    def observe(self, now: float, stall_s: float, loads: float, batch: int = 1) -> None:
        """Once per routed layer: the time and cumulative stall now, and how many needed
        experts were not resident since the previous layer. `batch`: tokens in the pass."""
        _observe(self.state, float(now), float(stall_s), float(loads), int(batch))

    def plan(self, bytes_per_expert: float, bandwidth: float, latency: float) -> int:
        """Update h_need, p_min and rho for the next layers; returns h_need."""
        return int(_plan(self.state, float(bytes_per_expert), float(bandwidth),
                         float(latency)))

    def update(self, now: float, stall_s: float, loads: float, batch: int,
               bytes_per_expert: float, bandwidth: float, latency: float) -> int:
        """observe() then plan() in one kernel call (floats and an int, as given)."""
        return _update(self.state, now, stall_s, loads, batch, bytes_per_expert, bandwidth,
                       latency)

    def update_meter(self, now: float, stall_s: float, loads: float, batch: int,
                     bytes_per_expert: float, meter: np.ndarray) -> int:
        """update() with the link's bandwidth and latency read from a transfer engine's
        meter array (link.LinkTiming.meter: its bandwidth_ewma, and the larger of its
        latency_ewma and read_tail_s) in the same kernel call: per routed layer, the
        engine's properties cost the compute thread more than the arithmetic."""
        return _update_meter(self.state, now, stall_s, loads, batch, bytes_per_expert,
                             meter)

    def plan_meter(self, bytes_per_expert: float, meter: np.ndarray) -> int:
        """plan() with the link read from a transfer engine's meter (as update_meter)."""
        return _plan_meter(self.state, bytes_per_expert, meter)

    # -- the state, read as attributes ----------------------------------------------------
    h_need = property(lambda self: int(self.state[_H_NEED]))
    p_min = property(lambda self: float(self.state[_P_MIN]))
    rho = property(lambda self: float(self.state[_RHO]))
    loads = property(lambda self: float(self.state[_LOADS]),
                     doc="needed, non-resident experts per layer (EWMA)")

    @property
    def compute_s(self) -> dict[bool, float]:
        """Compute per layer, keyed by "batched pass" (measured ones only)."""
        st = self.state
        return {b: float(st[_C_SINGLE + b]) for b in (False, True) if st[_HAS_SINGLE + b]}

    @property
    def _last(self) -> tuple[float, float] | None:
        """(now, stall_s) at the last layer."""
        st = self.state
        return (float(st[_LAST_T]), float(st[_LAST_STALL])) if st[_HAS_LAST] else None


@njit(cache=True, fastmath=False)
def _observe(st, now, stall_s, loads, batch):
    a = st[_ALPHA]
    if st[_HAS_LAST] != 0.0:
        dt = (now - st[_LAST_T]) - max(0.0, stall_s - st[_LAST_STALL])
        b = int(st[_BATCHED])
        has = st[_HAS_SINGLE + b] != 0.0
        prev = st[_C_SINGLE + b]
        # a pause between requests is not compute: ignore wild outliers
        if dt > 0 and (not has or dt < 20 * prev + 0.05):
            st[_C_SINGLE + b] = prev + a * (dt - prev) if has else dt
            st[_HAS_SINGLE + b] = 1.0
    st[_LAST_T], st[_LAST_STALL], st[_HAS_LAST] = now, stall_s, 1.0
    st[_BATCHED] = 1.0 if batch > 1 else 0.0
    st[_LOADS] += a * (max(0.0, loads) - st[_LOADS])


@njit(cache=True, fastmath=False)
def _plan(st, bytes_per_expert, bandwidth, latency):
    b = int(st[_BATCHED])
    c = 0.0  # this kind of pass's compute, else the other kind's, else none yet
    if st[_HAS_SINGLE + b] != 0.0:
        c = st[_C_SINGLE + b]
    elif st[_HAS_SINGLE + 1 - b] != 0.0:
        c = st[_C_SINGLE + 1 - b]
    if c <= 0.0:
        st[_H_NEED], st[_P_MIN], st[_RHO] = st[_H_MIN], st[_P_FLOOR], 0.0
        return int(st[_H_MIN])
    tau = bytes_per_expert / bandwidth if bandwidth > 0 else latency
    first = max(tau, latency)
    n = max(1.0, st[_LOADS])
    rho = min(100.0, n * tau / c)
    st[_RHO] = rho
    st[_P_MIN] = max(st[_P_FLOOR], rho / (1.0 + rho))
    need = np.ceil((first + (n - 1.0) * tau) / c - 1e-9)
    st[_H_NEED] = min(st[_H_MAX], max(st[_H_MIN], need))
    return int(st[_H_NEED])


@njit(cache=True, fastmath=False)
def _update(st, now, stall_s, loads, batch, bytes_per_expert, bandwidth, latency):
    _observe(st, now, stall_s, loads, batch)
    return _plan(st, bytes_per_expert, bandwidth, latency)


@njit(cache=True, fastmath=False)
def _meter_latency(meter):
    """policies._latency on a link meter: its latency, or a slow read if longer."""
    return max(meter[M_LATENCY], meter[M_READ] + 2.0 * meter[M_READ_DEV])


@njit(cache=True, fastmath=False)
def _update_meter(st, now, stall_s, loads, batch, bytes_per_expert, meter):
    return _update(st, now, stall_s, loads, batch, bytes_per_expert, meter[M_BANDWIDTH],
                   _meter_latency(meter))


@njit(cache=True, fastmath=False)
def _plan_meter(st, bytes_per_expert, meter):
    return _plan(st, bytes_per_expert, meter[M_BANDWIDTH], _meter_latency(meter))


@njit(cache=True, fastmath=False)
def use_value(p, dist, n_layer):
    """How soon an expert is expected to be used, as a rate: 1 / E[layers until its next
    use], when it is used at its layer's next occurrence (dist layers away) with
    probability p and, failing that, about once every n_layer / p layers (geometric)."""
    if p <= 0.0:
        return 0.0
    return p / (p * dist + n_layer * (1.0 - p))


@njit(cache=True, fastmath=False)
def route_prologue(needed, ids, due, step, layer, out):
    """The layer being computed needs `ids` (any shape): set the `needed` mask. Queued
    prefetches that were due by this step (due[m, e] ≤ step) are forgotten; those whose
    layer came without needing them are written to `out` as keys m * E + e (to cancel):
    returns how many (-1, nothing done, where `out` is shorter than due.size). Written,
    not returned: an array a kernel returns costs the compute thread ~1 µs to box, cold
    after the layer kernels."""
    n_layer, e_n = due.shape
    if out.shape[0] < n_layer * e_n:
        return -1
    needed[:] = False
    flat = ids.ravel()
    for i in range(flat.shape[0]):
        needed[flat[i]] = True
    n = 0
    for m in range(n_layer):
        for e in range(e_n):
            d = due[m, e]
            if d >= 0 and d <= step:
                due[m, e] = -1
                if not (m == layer and needed[e]):
                    out[n] = m * e_n + e
                    n += 1
    return n


@njit(cache=True, fastmath=False)
def select_prefetch(layer, n_dist, p_min, p_use, order, where, needed, layer_class,
                    slot_state, slot_class, slot_pins, class_slots, max_per_layer, step, rho,
                    victim_aware, plan_i, plan_f):
    """Candidates (target layer, expert, probability, distance) for distances 1..n_dist with
    p ≥ p_min that are not resident or loading, best first per distance, within a
    per-class budget that keeps room for the current layer's own missing experts.
    Returns (horizon, groups): horizon is the furthest distance with any expert above
    p_min (resident or not); the candidates are written as prefetches into a plan's
    buffers (issue.PlanBuffers, read as an issue.PrefetchPlan): plan_i rows 0-2 the
    groups' start, layer and priority and plan_f rows 0-1 their limits (plan_groups),
    plan_i rows 3-5 and plan_f row 2 the candidates' layer, expert, distance and
    probability. Written, not returned: each array a kernel returns costs the compute
    thread ~1 µs to box, cold after the layer kernels. n_dist is clamped to the rows of
    p_use and to what the buffers hold."""
    n_layer, e_n = where.shape
    if plan_i.shape[0] < 6 or plan_f.shape[0] < 3 or plan_i.shape[1] < 1:
        return 0, 0  # (not a plan's buffers: nothing written)
    cap = min(plan_f.shape[1], plan_i.shape[1] - 1)
    n_dist = min(n_dist, p_use.shape[0], cap // max(e_n, 1))
    budget = np.zeros(class_slots.shape[0], dtype=np.int64)
    for s in range(slot_state.shape[0]):
        if slot_pins[s] == 0 and (slot_state[s] == READY or slot_state[s] == EMPTY):
            budget[slot_class[s]] += 1
    c_cur = layer_class[layer]
    for e in range(e_n):
        if needed[e] and where[layer, e] < 0:
            budget[c_cur] -= 1
    out_m, out_e, out_d, out_p = plan_i[3], plan_i[4], plan_i[5], plan_f[2]
    n = 0
    horizon = 0
    for d in range(1, n_dist + 1):
        m = (layer + d) % n_layer
        c = layer_class[m]
        if c < 0:
            continue  # a dense layer (deepseek2's leading layers): no experts to load
        taken = 0
        for r in range(e_n):
            e = order[d - 1, r]
            p = p_use[d - 1, e]
            if p < p_min or taken >= max_per_layer:
                break
            horizon = d
            taken += 1
            if where[m, e] >= 0 or (m == layer and needed[e]) or budget[c] <= 0:
                continue
            budget[c] -= 1
            out_m[n], out_e[n], out_p[n], out_d[n] = m, e, p, d
            n += 1
    return horizon, _plan_groups_into(n, out_m, out_p, out_d, step, n_layer, rho,
                                      victim_aware, plan_i, plan_f)


def plan_groups(n, ms, ps, ds, step, n_layer, rho, victim_aware):
    """The candidates as prefetches: one per run of equal target layers (nearest first),
    needed at step + d, each evicting only experts worth less than the least valuable one
    it brings (use_value) and, on an over-subscribed link, less likely to be used than its
    saving covers (victim_p_limit). Returns (groups, ints [3, groups + 1]: start, layer,
    priority; floats [2, groups]: limit, p_limit): group g is candidates start[g] …
    start[g + 1] - 1. (For a plan built in Python, refine's; select_prefetch groups its
    own in its kernel call: _plan_groups_into.)"""
    ints = np.empty((3, n + 1), dtype=np.int64)
    floats = np.empty((2, max(n, 1)), dtype=np.float64)
    return _plan_groups_into(n, ms, ps, ds, step, n_layer, rho, victim_aware, ints,
                             floats), ints, floats


@njit(cache=True, fastmath=False)
def _plan_groups_into(n, ms, ps, ds, step, n_layer, rho, victim_aware, ints, floats):
    """plan_groups into ints [≥ 3, ≥ n + 1] and floats [≥ 2, ≥ n] (its rows); returns
    the number of groups. (Here, not per group in Python: after the layer kernels every
    Python call costs µs.)"""
    g = 0
    i = 0
    while i < n:
        j = i
        while j < n and ms[j] == ms[i]:
            j += 1
        ints[0, g], ints[1, g], ints[2, g] = i, ms[i], step + ds[i] + 1
        floats[0, g] = use_value(ps[j - 1], ds[i], n_layer)
        floats[1, g] = victim_p_limit(ps[j - 1], rho) if victim_aware else np.inf
        g += 1
        i = j
    ints[0, g] = n
    return g


@njit(cache=True, fastmath=False)
def value_victim(cands, slot_owner, slot_last_use, slot_uses, p_next, cur, needed, tick0,
                 n_expert, limit, p_limit=np.inf):
    """The candidate slot with the lowest value (use_value of its predicted probability of
    use and the distance to its layer's next turn); ties: least recently, then least often
    used. Experts the current layer still
    needs are never chosen while any other candidate exists. -1 when the lowest value is
    not below `limit` (a prefetch never evicts what is worth more than it brings), or when
    the victim's probability of use at its next turn is not below `p_limit` (a prefetch
    whose expected saving does not cover reloading it: victim_p_limit)."""
    n_layer = p_next.shape[0]
    best, best_v, best_lu, best_u, best_p = -1, np.inf, 0, 0, 1.0
    for i in range(cands.shape[0]):
        s = cands[i]
        owner = slot_owner[s]
        m, e = owner // n_expert, owner % n_expert
        p = min(p_next[m, e], 1.0)
        if m == cur and needed[e] and slot_last_use[s] <= tick0:
            v, p = np.inf, 1.0  # still to be used by the layer being computed
        else:
            dist = (m - cur) % n_layer
            if dist == 0:
                dist = n_layer
            v = use_value(p, dist, n_layer)
        lu, u = slot_last_use[s], slot_uses[s]
        if best < 0 or v < best_v or (v == best_v and (lu < best_lu or
                                                       (lu == best_lu and u < best_u))):
            best, best_v, best_lu, best_u, best_p = s, v, lu, u, p
    if limit < np.inf and best_v >= limit:
        return -1
    if best_p >= p_limit:
        return -1
    return best


@njit(cache=True, fastmath=False)
def victim_p_limit(p: float, rho: float) -> float:
    """The most likely victim a prefetch of probability p may evict, given the link's
    load rho. Per layer the link has c of compute to hide n·τ of loads behind: a right
    prefetch hides τ/ρ of stall (at most τ), a wrong one costs (1 − p)·τ of link time, and
    reloading its victim (probability p_v of being needed at its next turn) costs stall
    only where the link is over-subscribed, a share 1 − 1/ρ of it (below ρ = 1 the idle
    link brings the victim back ahead of need). So with ρ > 1 it pays when
    p/ρ > 1 − p + p_v·(1 − 1/ρ), i.e. p_v < (p·(1 + ρ) − ρ) / (ρ − 1); no limit at ρ ≤ 1
    (there the p_min rule alone decides)."""
    if rho <= 1.0:
        return np.inf
    return (p * (1.0 + rho) - rho) / (rho - 1.0)


@njit(cache=True, fastmath=False)
def lru_victim(cands, slot_owner, slot_last_use, fetched_at, cur, needed, tick0, n_expert,
               tick):
    """LRU for the baseline prefetchers: a prefetched expert counts as used when it was
    fetched (it enters at the most recent end, as in mixtral-offloading), and the current
    layer's still-needed experts go last."""
    best, best_k = -1, np.inf
    for i in range(cands.shape[0]):
        s = cands[i]
        owner = slot_owner[s]
        m, e = owner // n_expert, owner % n_expert
        k = float(max(slot_last_use[s], fetched_at[s]))
        if m == cur and needed[e] and slot_last_use[s] <= tick0:
            k = float(tick) + 1.0
        if k < best_k:
            best, best_k = s, k
    return best


__all__ = ["HorizonController", "route_prologue", "select_prefetch", "use_value",
           "value_victim", "victim_p_limit", "lru_victim", "LOADING"]
