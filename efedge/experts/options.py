"""Checks of the options a cache policy and its predictor take from the Python API
(`ExpertFlow(p_floor=0.3)`, `make_policy("expertflow", eta=0.5)`): a value out of range
is an ArgumentError naming the option, where it had been clamped or taken as it came — a
NaN threshold turned prefetching off without a word, a p_floor of 2 the same."""

from __future__ import annotations

import math
import numbers

import numpy as np

from efedge.errors import ArgumentError

# The furthest look-ahead a policy takes, in layers (fixed:H, ExpertFlow's max_horizon,
# the predictor's max_distance): the predictor's tables grow with it — its transitions
# [layers, H, E, E], its stored predictions [H + 1, H, 5, E] — and fixed:999999 asked
# numpy for 291 TiB. No prediction 32 layers ahead is worth a prefetch.
MAX_HORIZON = 32


def number(name: str, value, lo: float | None = None, hi: float | None = None, *,
           lo_open: bool = False, hi_open: bool = False, integer: bool = False,
           inf: bool = False):
    """`value` as an int (integer) or a float within [lo, hi] (an end open where said;
    `inf`: +inf allowed, an option that a huge value switches off), or an ArgumentError
    that names the option, the range and the value."""
    ok_type = isinstance(value, numbers.Integral if integer else numbers.Real)
    if isinstance(value, bool) or not ok_type:
        what = "an integer" if integer else "a number"
        raise ArgumentError(f"{name} must be {what}, got {value!r}")
    v = int(value) if integer else float(value)
    if not integer and (math.isnan(v) or (math.isinf(v) and not (inf and v > 0))):
        raise ArgumentError(f"{name} must be a finite number, got {value!r}")
    below = lo is not None and (v < lo or (lo_open and v == lo))
    above = hi is not None and (v > hi or (hi_open and v == hi))
    if below or above:
        if hi is None:
            span = f"{'>' if lo_open else '≥'} {lo:g}"
        elif lo is None:
            span = f"{'<' if hi_open else '≤'} {hi:g}"
        else:
            span = f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
        raise ArgumentError(f"{name} must be {span}, got {value!r}")
    return v


def probability(name: str, value, *, lo_open: bool = False):
    """A probability in [0, 1] ((0, 1] with lo_open)."""
    return number(name, value, 0.0, 1.0, lo_open=lo_open)


def expert_ids_problem(experts, n_expert: int) -> str | None:
    """Why `experts` is not an array of expert ids in 0..n_expert-1, or None. Numpy
    indexing wraps a negative id round to a real expert, and one too large fails deep
    in the cache; a float array truncates. (A trace's reader checks its ids so —
    trace.load_trace for the simulator, HybridPredictor.seed for --policy-trace.)"""
    ex = np.asarray(experts)
    if ex.dtype.kind not in "iu":
        return f"expert ids must be integers, got dtype {ex.dtype}"
    if ex.size and (ex.min() < 0 or ex.max() >= n_expert):
        return (f"expert ids must lie in 0..{n_expert - 1} (n_expert {n_expert}), got "
                f"ids from {ex.min()} to {ex.max()}")
    return None
