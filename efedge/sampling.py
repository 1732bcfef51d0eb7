"""Token sampling: llama.cpp's default sampler chain, in numpy.

The chain, in llama.cpp's default order (common/common.h `samplers`, and
llama-cpp-python's `_init_sampler`):

    logit bias → repetition penalty → top-k → top-p → min-p → temperature → draw

temperature == 0 is greedy: argmax of the penalised logits (first index on ties).

Note that llama.cpp applies the temperature *last*: top-p and min-p decide which
tokens survive from the distribution at temperature 1, and the temperature only
reshapes the probabilities among the survivors. We do the same, so that a seed-free
comparison with llama.cpp (same parameters → same candidate set, same probabilities)
holds. `Sampler.distribution` exposes that final set and its probabilities.

Speed: for n_vocab ~ 152k the only O(n_vocab) steps are a NaN check, an
argpartition (top-k) or a threshold mask (min-p), and one exp over the candidates;
only the min-p survivors are ever sorted.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from efedge.errors import SamplingError

__all__ = ["SamplingParams", "Sampler"]


def _is_int(v: object) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v: object) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _check_real(name: str, v: object, ok: bool, allowed: str) -> None:
    if not _is_real(v) or not math.isfinite(float(v)) or not ok:
        raise SamplingError(f"{name} must be {allowed}, got {v!r}")


# llama.cpp keeps the penalties as floats: what one cannot hold (1e308 overflows to inf,
# 1e-300 rounds to 0) is refused, not applied as inf or as a division by zero
_F32 = np.finfo(np.float32)
_F32_MAX, _F32_TINY = float(_F32.max), float(_F32.tiny)


def _saturated(x: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """`x` (float64) as `dtype`, values beyond its range ±inf (where float arithmetic in
    that type would have taken them), without numpy's overflow warning."""
    big = np.abs(x) > np.finfo(dtype).max
    return np.where(big, np.copysign(np.inf, x), x).astype(dtype)


@dataclass(frozen=True)
class SamplingParams:
    """Sampling settings; names and defaults match llama.cpp / llama-cpp-python."""

    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    seed: int | None = None
    # llama.cpp's --frequency-penalty / --presence-penalty (OpenAI's fields): subtracted
    # from the logit of each token seen in the last repeat_last_n, per occurrence / once
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    # llama.cpp's --logit-bias / OpenAI's logit_bias: {token id: added to its logit} before
    # everything else; -inf bans the token
    logit_bias: Mapping[int, float] | None = None

    @property
    def greedy(self) -> bool:
        """Whether the draw is the argmax: temperature 0, or one that llama.cpp's float
        holds as 0 (below ~1.4e-45), where it samples greedily too — the division by it
        would leave exactly tied top logits to chance instead of the first."""
        return float(np.float32(self.temperature)) == 0.0

    def validate(self) -> None:
        """Raise SamplingError naming the first out-of-range parameter and its range."""
        t, p, mp, rp = self.temperature, self.top_p, self.min_p, self.repeat_penalty
        _check_real("temperature", t, _is_real(t) and t >= 0,
                    "a finite number >= 0 (0 = greedy)")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise SamplingError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        _check_real("top_p", p, _is_real(p) and 0 < p <= 1, "a number in (0, 1] (1 = off)")
        _check_real("min_p", mp, _is_real(mp) and 0 <= mp <= 1, "a number in [0, 1] (0 = off)")
        _check_real("repeat_penalty", rp, _is_real(rp) and _F32_TINY <= rp <= _F32_MAX,
                    f"a number in [{_F32_TINY:.4g}, {_F32_MAX:.4g}] (what a float holds "
                    "above 0; 1 = off)")
        for name in ("frequency_penalty", "presence_penalty"):
            v = getattr(self, name)
            _check_real(name, v, _is_real(v) and abs(v) <= _F32_MAX,
                        f"a number in [-{_F32_MAX:.4g}, {_F32_MAX:.4g}] (what a float holds; "
                        "0 = off)")
        n = self.repeat_last_n
        if not _is_int(n) or n < -1:
            raise SamplingError(
                f"repeat_last_n must be an integer >= -1 (-1 = whole context, 0 = off), "
                f"got {n!r}")
        s = self.seed
        if s is not None and (not _is_int(s) or s < 0):
            raise SamplingError(f"seed must be None (random) or an integer >= 0, got {s!r}")
        check_logit_bias(self.logit_bias)


def check_logit_bias(bias: object, n_vocab: int | None = None) -> None:
    """A logit_bias is None or {token id >= 0 (< n_vocab when given): a finite number or
    -inf}; SamplingError naming the first bad entry."""
    if bias is None:
        return
    if not isinstance(bias, Mapping):
        raise SamplingError(f"logit_bias must be a mapping of token id to bias, got "
                            f"{type(bias).__name__}")
    for tok, b in bias.items():
        if not _is_int(tok) or tok < 0 or (n_vocab is not None and tok >= n_vocab):
            where = f" (0..{n_vocab - 1})" if n_vocab is not None else ""
            raise SamplingError(f"logit_bias: token id {tok!r} is not a token of the "
                                f"vocabulary{where}")
        if not _is_real(b) or math.isnan(float(b)) or float(b) == math.inf:
            raise SamplingError(f"logit_bias: the bias of token {tok} must be a finite "
                                f"number or -inf (banned), got {b!r}")


def _top_mass(cand: np.ndarray, vals: np.ndarray, w: np.ndarray,
              target: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The largest-logit entries (all ties included) whose weight reaches `target`.

    Keeps a superset of the top-p prefix without sorting the whole vocabulary:
    grow k until the top k carry enough mass (usually a few hundred tokens).
    """
    k = 1024
    while k < cand.size:
        thr = vals[np.argpartition(vals, cand.size - k)[cand.size - k:]].min()
        sel = vals >= thr  # a mask keeps candidates in ascending-id order
        if w[sel].sum() >= target:
            return cand[sel], vals[sel], w[sel]
        k *= 4
    return cand, vals, w


class Sampler:
    """Picks the next token from a logits row; owns its random generator.

    The generator is seeded from `params.seed` (None → fresh OS entropy), so a
    Sampler with a fixed seed given the same logits and history yields the same
    token sequence on every run.
    """

    def __init__(self, params: SamplingParams):
        params.validate()
        self.params = params
        self.rng = np.random.default_rng(params.seed)
        bias = params.logit_bias or {}
        self._bias_ids = np.fromiter(bias.keys(), dtype=np.int64, count=len(bias))
        self._bias = np.fromiter(bias.values(), dtype=np.float64, count=len(bias))

    # -- the chain ------------------------------------------------------------------
    def _biased(self, logits: np.ndarray) -> np.ndarray:
        """Logits plus the logit bias (a copy when there is one)."""
        if not self._bias_ids.size:
            return logits
        if self._bias_ids.max() >= logits.shape[0]:
            raise SamplingError(f"logit_bias: token id {int(self._bias_ids.max())} is outside "
                                f"the vocabulary [0, {logits.shape[0]})")
        out = np.array(logits, dtype=np.result_type(logits.dtype, np.float32))
        out[self._bias_ids] += self._bias.astype(out.dtype)
        return out

    def _penalised(self, logits: np.ndarray, history: Sequence[int]) -> np.ndarray:
        """Logits after the logit bias and the repetition penalties (a copy when anything
        changes)."""
        logits = self._biased(logits)
        p = self.params
        n_last = p.repeat_last_n
        if (p.repeat_penalty == 1.0 and p.frequency_penalty == 0.0
                and p.presence_penalty == 0.0) or n_last == 0 or len(history) == 0:
            return logits
        hist = np.asarray(history, dtype=np.int64).reshape(-1)
        ids, counts = np.unique(hist if n_last == -1 else hist[-n_last:], return_counts=True)
        if ids.size and (ids[0] < 0 or ids[-1] >= logits.shape[0]):
            raise SamplingError(
                f"history holds token id {int(ids[0] if ids[0] < 0 else ids[-1])} outside "
                f"the vocabulary [0, {logits.shape[0]})")
        out = logits.copy()
        vals = out[ids].astype(np.float64)
        # llama.cpp: a positive logit is divided, a non-positive one multiplied; then the
        # frequency penalty per occurrence and the presence penalty once are subtracted.
        # Exact in float64 (the penalty as the logits' type holds it), rounded once to that
        # type: float arithmetic in it, the same bits; an extreme penalty takes a logit to
        # ±inf as that would, without an overflow warning
        rp = float(out.dtype.type(p.repeat_penalty))
        vals = _saturated(np.where(vals > 0, vals / rp, vals * rp), out.dtype)
        out[ids] = _saturated(vals - (counts * p.frequency_penalty + p.presence_penalty),
                              out.dtype)
        return out

    def distribution(self, logits: np.ndarray,
                     history: Sequence[int] = ()) -> tuple[np.ndarray, np.ndarray]:
        """The tokens that survive the chain and their probabilities.

        Returns (ids int64, probs float64), most likely first (ties: lower id first);
        probs sum to 1. Greedy (temperature 0) returns the argmax alone. `logits` is
        not modified.
        """
        return self._chain(logits, history, ordered=True)

    def _chain(self, logits: np.ndarray, history: Sequence[int],
               ordered: bool) -> tuple[np.ndarray, np.ndarray]:
        # ordered=False lets pure sampling (top-p off) skip the sort: ids come back
        # in ascending order, which is just as deterministic for the draw.
        x = np.asarray(logits)
        if x.ndim != 1 or x.shape[0] == 0:
            raise SamplingError(f"logits must be a non-empty 1-D array, got shape {x.shape}")
        if not np.issubdtype(x.dtype, np.floating):
            x = x.astype(np.float32)
        nan = np.isnan(x)
        if nan.any():
            bad = np.flatnonzero(nan)
            raise SamplingError(
                f"logits contain NaN ({bad.size} of {x.shape[0]}, first at token id "
                f"{int(bad[0])}); the model produced invalid values")
        x = self._penalised(x, history)
        p = self.params
        n = x.shape[0]

        posinf = np.isposinf(x)
        if posinf.any():
            # +inf dominates everything finite: share the mass among those tokens.
            ids = np.flatnonzero(posinf)
            if p.greedy:
                ids = ids[:1]
            return ids.astype(np.int64), np.full(ids.size, 1.0 / ids.size)

        top = int(np.argmax(x))
        x_max = float(x[top])
        if x_max == -math.inf:
            raise SamplingError("every logit is -inf: no token can be sampled")
        if p.greedy:
            return np.array([top], dtype=np.int64), np.ones(1)

        # top-k: argpartition keeps exactly k (boundary ties resolved by argpartition).
        if 0 < p.top_k < n:
            cand = np.sort(np.argpartition(x, n - p.top_k)[n - p.top_k:])
            cand = cand[x[cand] > -math.inf]
        else:
            cand = np.flatnonzero(x > -math.inf)
        vals = x[cand].astype(np.float64) - x_max  # <= 0, max exactly 0

        # top-p and min-p each keep a prefix of the candidates sorted by logit, and
        # neither changes the other's cut (top-p's probabilities are taken over all
        # top-k survivors; min-p's threshold depends only on the max). So the result
        # is the shorter prefix, and only min-p's survivors need sorting.
        w = np.exp(vals)
        z = float(w.sum())
        if p.min_p > 0:
            keep = vals >= math.log(p.min_p)  # p >= min_p * p_max, in logit space
            cand, vals, w = cand[keep], vals[keep], w[keep]
        if p.top_p < 1:
            cand, vals, w = _top_mass(cand, vals, w, p.top_p * z)
        if p.top_p < 1 or ordered:
            order = np.argsort(-vals, kind="stable")  # cand ascending → ties: lower id first
            cand, vals, w = cand[order], vals[order], w[order]
        if p.top_p < 1:
            cum = np.cumsum(w)
            # smallest prefix whose mass reaches top_p (llama.cpp: cum_sum >= p), >= 1
            cut = int(np.searchsorted(cum, p.top_p * z, side="left")) + 1
            cand, vals = cand[:cut], vals[:cut]

        # temperature last, as llama.cpp does; then renormalise over the survivors. (A
        # temperature near the smallest double takes the others' logits past -1.8e308:
        # -inf, probability 0, as intended, without numpy's overflow warning)
        with np.errstate(over="ignore"):
            probs = np.exp(vals / p.temperature)
        probs /= probs.sum()
        return cand.astype(np.int64), probs

    def sample_where(self, logits: np.ndarray, history: Sequence[int],
                     ok: Callable[[int], bool]) -> int:
        """A token for which ok(token) holds, drawn from the chain's distribution
        restricted to such tokens: draw as __call__ does and keep the token if it is
        allowed, else draw again among the allowed survivors of the chain (together that
        is exactly the restricted distribution, and one check when the model's choice is
        allowed anyway, as in llama.cpp's grammar sampling). When no survivor is allowed
        (greedy, a narrow top-k), the most probable allowed token of the whole vocabulary
        after the penalties; a SamplingError when no token is allowed at all."""
        tok = self(logits, history)
        if ok(tok):
            return tok
        ids, probs = self._chain(logits, history, ordered=True)
        keep = np.fromiter((ok(int(t)) for t in ids), dtype=bool, count=ids.size)
        if keep.any():
            return self._draw(ids[keep], probs[keep])
        x = self._penalised(np.asarray(logits), history)
        for t in np.argsort(-x, kind="stable"):
            if x[t] == -math.inf or np.isnan(x[t]):
                break
            if ok(int(t)):
                return int(t)
        raise SamplingError("no token of the vocabulary can continue the constrained output")

    def __call__(self, logits: np.ndarray, history: Sequence[int] = ()) -> int:
        """Sample one token id from `logits` [n_vocab] given the tokens so far."""
        return self._draw(*self._chain(logits, history, ordered=False))

    def _draw(self, ids: np.ndarray, probs: np.ndarray) -> int:
        """One of `ids`, drawn by `probs` (which need not sum to 1)."""
        if ids.size == 1:
            return int(ids[0])
        cdf = np.cumsum(probs)
        i = int(np.searchsorted(cdf, self.rng.random() * cdf[-1], side="right"))
        return int(ids[min(i, ids.size - 1)])
