"""Trace-driven simulation: replay recorded routing through the live runtime's cache,
policies and acquire loop on a virtual clock, with compute and transfer times from
hardware / model profiles (or measured on this machine).

Routing (which experts, in which order, with what pre-gating scores) comes from the
trace; sizes and times come from the setup. When the profile's model has more layers
than the traced one, per-token figures are scaled by n_layer(profile) / n_layer(trace):
the traced layers stand in for the profile's layers at the same per-layer conditions.
"""

from __future__ import annotations

import math
import numbers
import time
from dataclasses import dataclass

import numpy as np

from efedge.errors import EfedgeError
from efedge.experts.bound import min_loads, stall_bound, unique_requests
from efedge.experts.cache import ExpertCache, parse_budget
from efedge.experts.scheduler import make_policy
from efedge.experts.stats import Counters
from efedge.experts.virtual import SimulatedExperts, VirtualClock, VirtualTransferEngine
from efedge.profiles import HardwareProfile, ModelProfile


class SimulationError(EfedgeError, ValueError):
    """The trace and the settings leave nothing meaningful to measure: a trace no longer
    than the warm-up, a negative time, a non-positive link rate."""


class TraceStore:
    """The ExpertStore interface the cache needs, without a model file."""

    def __init__(self, n_layer: int, n_expert: int, bytes_per_expert: list[float]):
        self.n_layer, self.n_expert = n_layer, n_expert
        per = np.asarray([int(b) for b in bytes_per_expert], dtype=np.int64)
        self.nbytes = np.zeros((n_layer, n_expert, 3), dtype=np.int64)
        thirds = np.stack([per // 3, per // 3, per - 2 * (per // 3)], axis=1)
        self.nbytes[:] = thirds[:, None, :]
        self.offsets = np.zeros_like(self.nbytes)

    def expert_bytes(self, layer: int, expert: int = 0) -> int:
        return int(self.nbytes[layer, expert].sum())

    def total_bytes(self) -> int:
        return int(self.nbytes.sum())

    def qtypes(self, layer: int):
        return (0, 0, 0)

    def part_shape(self, layer: int, part: str):
        return (0, 0)


class TraceHidden(np.ndarray):
    """A stand-in hidden state [1, 1] that tells trace routers which (token, layer) it is."""

    at: tuple[int, int] = (0, 0)


class TraceRouter:
    """Router of layer j for the simulator: returns the pre-gating logits recorded in the
    trace for (token t, layer l, distance j - l); zeros (no information) beyond them."""

    def __init__(self, pregate: np.ndarray | None, j: int, n_expert: int):
        self.pregate, self.j, self.n_expert = pregate, j, n_expert

    def __call__(self, h: np.ndarray) -> np.ndarray:
        t, l = getattr(h, "at", (0, 0))
        d = self.j - l
        if self.pregate is not None and 1 <= d <= self.pregate.shape[2]:
            row = self.pregate[t, l, d - 1].astype(np.float32)
            if np.isfinite(row).all():
                return row[None, :]
        return np.zeros((1, self.n_expert), dtype=np.float32)


@dataclass
class SimSetup:
    bytes_per_expert: list[float]  # per traced layer
    layer_compute_s: float  # attention, router, norms of one layer (one token)
    expert_compute_s: float  # one expert's FFN on one token
    link_bytes_per_s: float
    link_latency_s: float
    budget: str | int | float
    layer_scale: float = 1.0  # profile layers / traced layers
    label: str = ""
    wake_s: float = 0.0  # a blocked compute thread resumes this long after its load lands
    # real seconds the policy's own hooks take here, charged to the virtual clock × this:
    # 1 where the scheduler runs on the device that computes (a CPU), 0 where its work
    # overlaps the device's (a GPU running queued kernels)
    policy_time: float = 0.0
    # the compute thread's own time per demand load, where it copies them itself (the CPU
    # engine with an emulated link: TransferEngine.copy_inline); 0: queued as a DMA copy
    demand_copy_s: float = 0.0
    # the same per prefetch, where the compute thread copies those too as the link comes
    # free (the CPU engine with an emulated link: InlinePrefetches); 0: a DMA copy
    prefetch_copy_s: float = 0.0


def setup_from_profiles(meta: dict, hw: HardwareProfile, model: ModelProfile,
                        budget) -> SimSetup:
    L = meta["n_layer"]
    t_expert = model.bytes_per_expert / hw.mem_bytes_per_s + 3 * hw.kernel_overhead_s
    t_layer = model.non_expert_bytes_per_layer / hw.mem_bytes_per_s + 8 * hw.kernel_overhead_s
    return SimSetup([model.bytes_per_expert] * L, t_layer, t_expert, hw.link_bytes_per_s,
                    hw.link_latency_s, budget, model.n_layer / L,
                    f"{model.name} on {hw.name}")


def _measured_tokens(T: int, warmup, max_tokens) -> int:
    """The trace length to replay (warm-up plus measured tokens), or a SimulationError
    naming the trace length and the warm-up / limit when no token would be measured.
    (Counters reset at the first measured token: with none, the table would report the
    warm-up's cold misses as per-token figures of one token.)"""
    if not isinstance(warmup, numbers.Integral) or isinstance(warmup, bool) or warmup < 0:
        raise SimulationError(f"warmup must be an integer ≥ 0 (tokens before counting), got "
                              f"{warmup!r}")
    if max_tokens is not None:
        if (not isinstance(max_tokens, numbers.Integral) or isinstance(max_tokens, bool)
                or max_tokens < 1):
            raise SimulationError(f"max_tokens must be an integer ≥ 1 (tokens measured after "
                                  f"the warm-up), got {max_tokens!r}")
        T = min(T, warmup + max_tokens)
    if T <= warmup:
        raise SimulationError(f"the trace has {T} tokens and the warm-up takes {warmup}: no "
                              f"token is left to measure (record a longer trace, or lower "
                              f"the warm-up)")
    return T


def _check_setup(setup: SimSetup) -> None:
    """Negative times run the virtual clock backwards (negative tokens/s)."""
    for name in ("layer_compute_s", "expert_compute_s", "link_latency_s", "wake_s",
                 "policy_time", "demand_copy_s", "prefetch_copy_s"):
        v = getattr(setup, name)
        if not (isinstance(v, numbers.Real) and math.isfinite(v) and v >= 0):
            raise SimulationError(f"{name} must be a finite number ≥ 0, got {v!r}")
    v = setup.link_bytes_per_s
    if not (isinstance(v, numbers.Real) and v > 0):  # inf: an instant link, allowed
        raise SimulationError(f"link_bytes_per_s must be > 0, got {v!r}")


def _trace_cache(n_layer: int, n_expert: int, k: int, setup: SimSetup):
    """The traced model's expert sizes (the profile's bytes) and the cache tables the
    setup's budget gives them (no bytes allocated)."""
    store = TraceStore(n_layer, n_expert, setup.bytes_per_expert)
    budget = parse_budget(setup.budget, store.total_bytes())
    return store, ExpertCache(store, budget, k, allocate=False)


def _charged(fn, clock: VirtualClock, engine, setup: SimSetup):
    """fn, with the real time it takes added to the virtual clock (× setup.policy_time)."""
    def call(*a, **kw):
        t0 = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            clock.advance((time.perf_counter() - t0) * setup.policy_time)
            engine.advance_to(clock.t)
    return call


def simulate(arrays: dict, meta: dict, setup: SimSetup, policy: str, *,
             warmup: int = 16, max_tokens: int | None = None) -> dict:
    """Replay the trace; return DESIGN.md counters (per token scaled to the profile) plus
    tokens_per_s and stall_ms_per_token. A trace of routers on the layer's input
    (meta "router_input": "layer", smallthinker) asks for each layer's experts before
    its compute, as the live engine does; `policy` "NAME/late" asks only after it."""
    experts = arrays["experts"].astype(np.int64)
    pregate = arrays.get("pregate")
    T, L, K = experts.shape
    # "POLICY/late": a router on the layer's input asks for its experts only when the
    # layer's experts run, not before its attention (live: Transformer.early_requests)
    policy, _, late = policy.partition("/")
    if late not in ("", "late"):
        raise SimulationError(f"unknown policy variant {late!r} in {policy}/{late}: "
                              "the only one is /late")
    early = meta.get("router_input", "ffn") == "layer" and not late
    T = _measured_tokens(T, warmup, max_tokens)
    _check_setup(setup)
    n_expert = int(meta["n_expert"])
    store, cache = _trace_cache(L, n_expert, K, setup)
    counters = Counters()
    clock = VirtualClock()
    engine = VirtualTransferEngine(store, cache, counters, clock, setup.link_bytes_per_s,
                                   setup.link_latency_s,
                                   bytes_per_expert=[store.expert_bytes(i) for i in range(L)],
                                   demand_copy_s=setup.demand_copy_s,
                                   prefetch_copy_s=setup.prefetch_copy_s)
    routers = [TraceRouter(pregate, j, n_expert) for j in range(L)]
    pol = make_policy(policy)
    if setup.policy_time > 0:  # the flush of planned prefetches runs inside acquire
        pol.on_demand_issued = _charged(pol.on_demand_issued, clock, engine, setup)
    source = SimulatedExperts(store, cache, engine, pol, counters,
                              routers=routers, n_active=K, clock=clock,
                              expert_compute_s=setup.expert_compute_s,
                              wake_s=setup.wake_s)
    hidden = np.zeros((1, 1), dtype=np.float32).view(TraceHidden)
    tokens = arrays.get("tokens")
    on_pass, on_route = source.on_pass, source.on_route
    # the routers on each layer's input (traces that have them): a policy may refine
    # its plan for the layer before its attention runs
    pregate_in = arrays.get("pregate_in")
    on_input = (source.on_layer_input if pregate_in is not None and not early
                and pol.wants_layer_input else None)
    pol.layer_input_wired = on_input is not None
    input_all = pol.layer_inputs != "first"  # (as the model calls it)
    if setup.policy_time > 0:
        on_pass = _charged(on_pass, clock, engine, setup)
        on_route = _charged(on_route, clock, engine, setup)
        if on_input is not None:
            on_input = _charged(on_input, clock, engine, setup)
    t_start = 0.0
    for t in range(T):
        if t == warmup:
            counters.reset()
            t_start = clock.t
        if tokens is not None:  # as the model does before a pass's first layer
            on_pass(tokens[t:t + 1], t)
        engine.pay_copies()  # (prefetch copies the compute thread makes: prefetch_copy_s)
        for layer in range(L):
            ids = experts[t, layer]
            hidden.at = (t, layer)
            if early:  # as Transformer.route_early: asked for, then the attention runs
                source.prefetch(layer, np.unique(ids))
                on_route(layer, hidden, ids[None, :])
            elif on_input is not None and (input_all or layer == 0):
                on_input(layer, hidden, logits=pregate_in[t, layer][None, :])
            clock.advance(setup.layer_compute_s)
            engine.advance_to(clock.t)
            if not early:
                on_route(layer, hidden, ids[None, :])
            engine.pay_copies()  # (the request passes the cache, as live)
            for _e, _w in source.acquire(layer, np.unique(ids)):
                clock.advance(setup.expert_compute_s)
                engine.advance_to(clock.t)
    n = T - warmup
    wall = (clock.t - t_start) * setup.layer_scale
    s = counters.as_dict()
    s["stall_s"] *= setup.layer_scale
    s["bytes_loaded"] = int(s["bytes_loaded"] * setup.layer_scale)
    for k in ("expert_requests", "hits", "misses", "late", "prefetch_issued",
              "prefetch_used", "prefetch_wasted"):
        s[k] = int(round(s[k] * setup.layer_scale))
    s.update(tokens_generated=n, wall_s=wall, compute_s=wall - s["stall_s"],
             tokens_per_s=n / wall if wall else 0.0,
             stall_ms_per_token=1e3 * s["stall_s"] / n,
             hit_rate=counters.hits / max(counters.expert_requests, 1),
             cache_bytes=int(cache.nbytes * 1), cache_slots=int(cache.n_slots),
             bandwidth_gbps=setup.link_bytes_per_s / 1e9, setup=setup.label,
             policy=policy + ("/late" if late else ""), early_requests=early)
    return s


def lower_bound(arrays: dict, meta: dict, setup: SimSetup, *, warmup: int = 16,
                max_tokens: int | None = None) -> dict:
    """What no policy can beat on this trace and setup (efedge/experts/bound.py): the hit
    rate of Belady's MIN and the stall its loads force, per token, scaled like
    `simulate`'s figures."""
    experts = arrays["experts"].astype(np.int64)
    T, L, K = experts.shape
    T = _measured_tokens(T, warmup, max_tokens)
    _check_setup(setup)
    experts = experts[:T]
    n_expert = int(meta["n_expert"])
    store, cache = _trace_cache(L, n_expert, K, setup)
    loads = min_loads(experts, cache.layer_class, cache.class_slots, n_expert, warmup)
    n = T - warmup
    unique = unique_requests(experts, warmup)
    compute = n * L * setup.layer_compute_s + unique * setup.expert_compute_s
    stall = stall_bound(loads, [store.expert_bytes(i) for i in range(L)],
                        setup.link_bytes_per_s, setup.link_latency_s, cache.n_slots, compute)
    return {"min_hit_rate": 1.0 - float(loads.sum()) / max(unique, 1),
            "stall_bound_ms_per_token": 1e3 * stall * setup.layer_scale / n}
