"""Quantized GGUF kernels: dequantize, matvec and matmul straight from the raw blocks.

Weights arrive as uint8 rows of GGUF blocks (zero-copy views of the mmap'd file, usually
read-only). Everything is validated here, in Python, before any numba kernel runs:
numba does not bounds-check.

    dequantize(raw [..., row_bytes], qtype)  -> float32 [..., row_len]
    matvec(w [rows, row_bytes], qtype, x [row_len])     -> float32 [rows]
    matmul(w [rows, row_bytes], qtype, x [T, row_len])  -> float32 [T, rows]
    qmatmul(w, qtype, x [T, row_len]) -> float32 [T, rows]: x rounded as llama.cpp rounds
        activations for qtype (activations.round_activations) — the model's product

Dequantization is bit-identical to ``gguf.quants.dequantize``. matvec uses a fused
decode-and-dot kernel for F32, F16, Q4_0, Q8_0, Q4_K and Q6_K, and a row buffer
(decode one row, then dot) for the other types. matmul decodes each weight row once per
call and reuses it for all T tokens; for a few tokens it runs the fused matvec per token.
"""

from __future__ import annotations

import logging
import os

import numba
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from efedge.errors import UnsupportedModelError

from . import generic as _mm
from . import quant_k as _k
from . import quant_legacy as _lg
from . import simd_f16 as _simd_f16
from ._cache import refresh_stale_cache
from ._compile_log import announce_compiles as _announce_compiles
from ._compile_log import compile_notice  # noqa: F401  (api.load's progress notice)
from ._malloc import keep_scratch_mapped

refresh_stale_cache(_mm.dequantize_rows)
# The shared dispatchers compile here, at import, when numba's cache has none for this
# CPU (a fresh install, changed sources): ~25 s on 2 cores before anything else runs.
# Said once through logging (WARNING: shown even where nobody configured logging, as the
# CLI has not yet when it imports efedge), so a first `efedge run` does not look hung.
with _announce_compiles(logging.getLogger("efedge.kernels")):
    from . import _callees  # noqa: E402,F401  (registers the shared dispatchers first)

__all__ = ["SUPPORTED_QTYPES", "check_qtype", "dequantize", "matvec", "matmul", "qmatmul",
           "block_size"]

_Q = GGMLQuantizationType

# How long numba's OpenMP threads spin after a parallel region before they sleep. A
# decode step opens ~30 regions a few µs to tens of µs apart. libgomp's default spin
# (300 000 rounds, milliseconds) is fine on idle cores but on a machine with fewer free
# cores than threads the spinning threads keep the one with work off its core: regions
# measured 10-30 ms instead of ~0.15 ms at load 4 on 2 cores. Sleeping at once
# (OMP_WAIT_POLICY=PASSIVE) costs a wake-up per region: decode ~25% slower at load 2.
# A short spin keeps back-to-back regions hot and gives the core away soon after.
# libgomp reads this when it loads, at numba's first parallel call (not at import);
# an explicit OMP_WAIT_POLICY or GOMP_SPINCOUNT wins.
INJECTED_ENV: dict[str, str] = {}  # what efedge set in os.environ (bench --vs-llama-cpp)
if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
    INJECTED_ENV["GOMP_SPINCOUNT"] = os.environ["GOMP_SPINCOUNT"] = "5000"

MALLOC_TUNED = keep_scratch_mapped()  # _malloc: scratch stays mapped between calls

SUPPORTED_QTYPES: frozenset[int] = frozenset(int(t) for t in (
    _Q.F32, _Q.F16, _Q.BF16, _Q.Q4_0, _Q.Q4_1, _Q.Q5_0, _Q.Q5_1, _Q.Q8_0,
    _Q.Q2_K, _Q.Q3_K, _Q.Q4_K, _Q.Q5_K, _Q.Q6_K, _Q.IQ4_NL, _Q.IQ4_XS, _Q.MXFP4,
    _Q.IQ2_XXS, _Q.IQ2_XS, _Q.IQ2_S, _Q.IQ3_XXS, _Q.IQ3_S, _Q.IQ1_S, _Q.IQ1_M,
    _Q.TQ1_0, _Q.TQ2_0,
))

# qtype -> (fused matvec kernel, dtype the raw row bytes are viewed as for it)
_FUSED_MATVEC = {
    int(_Q.F32): (_lg.matvec_f32, np.float32),
    int(_Q.F16): (_lg.matvec_f16, np.uint16),
    int(_Q.Q4_0): (_lg.matvec_q4_0, np.uint8),
    int(_Q.Q8_0): (_lg.matvec_q8_0, np.uint8),
    int(_Q.Q4_K): (_k.matvec_q4_k, np.uint8),
    int(_Q.Q6_K): (_k.matvec_q6_k, np.uint8),
}
if _simd_f16.AVAILABLE:  # F16 rows converted 8 at a time (F16C), not one half at a time
    _FUSED_MATVEC[int(_Q.F16)] = (_lg.matvec_f16_rows, np.uint8)

# matmul of one token runs the fused matvec: reading the quantized rows once is cheaper
# than decoding them to float32 first. Two tokens or more go through the tiled product,
# whose result for a token does not depend on how many share the call (two tokens were
# two matvecs until 2026-11-30: a prompt's last two tokens then came out ~1e-6 off their
# rows in a longer batch, and a reused prompt prefix changed greedy text at near-ties).
_FUSED_MAX_TOKENS = 1
_TILE_BYTES = 256 * 1024  # float32 bytes of decoded weights one matmul task keeps in L2


def _type_name(qtype: int) -> str:
    try:
        return GGMLQuantizationType(qtype).name
    except ValueError:
        return f"#{qtype}"


def check_qtype(qtype: int, what: str) -> None:
    """Raise UnsupportedModelError naming the quant type if efedge has no kernel for it."""
    if int(qtype) not in SUPPORTED_QTYPES:
        names = ", ".join(sorted(_type_name(t) for t in SUPPORTED_QTYPES))
        raise UnsupportedModelError(
            f"{what}: quant type {_type_name(qtype)} is not supported "
            f"(efedge runs {names}); requantize the model to one of these")


def block_size(qtype: int) -> tuple[int, int]:
    """(elements, bytes) of one block of ``qtype``."""
    check_qtype(qtype, "block_size")
    return GGML_QUANT_SIZES[GGMLQuantizationType(int(qtype))]


def _readonly(a: np.ndarray) -> np.ndarray:
    # One view flavour for the kernels: plain ndarray, read-only. numba compiles separate
    # specialisations for writable and read-only arrays; this way only one is ever built.
    v = a.view(np.ndarray)
    v.flags.writeable = False
    return v


def _check_raw(raw: np.ndarray, qtype: int, what: str) -> tuple[int, int]:
    """Validate raw quant rows; return (row_len, row_bytes)."""
    check_qtype(qtype, what)
    if not isinstance(raw, np.ndarray) or raw.dtype != np.uint8:
        raise ValueError(f"{what}: raw weights must be a uint8 array, got "
                         f"{getattr(raw, 'dtype', type(raw).__name__)}")
    if raw.ndim < 1 or not raw.flags.c_contiguous:
        raise ValueError(f"{what}: raw weights must be a C-contiguous array of rows, "
                         f"got shape {raw.shape}")
    elems, nbytes = block_size(qtype)
    row_bytes = raw.shape[-1]
    if row_bytes % nbytes != 0:
        raise ValueError(f"{what}: row of {row_bytes} bytes is not a whole number of "
                         f"{_type_name(qtype)} blocks ({nbytes} bytes each)")
    return row_bytes // nbytes * elems, row_bytes


def _check_out(out: np.ndarray | None, shape: tuple[int, ...], what: str) -> np.ndarray:
    if out is None:
        return np.empty(shape, np.float32)
    if (not isinstance(out, np.ndarray) or out.dtype != np.float32 or out.shape != shape
            or not out.flags.c_contiguous or not out.flags.writeable):
        got = f"{getattr(out, 'dtype', type(out).__name__)} {getattr(out, 'shape', '')}"
        raise ValueError(f"{what}: out must be a writable C-contiguous float32 array of shape "
                         f"{shape}, got {got}")
    return out


def dequantize(raw: np.ndarray, qtype: int) -> np.ndarray:
    """Decode raw GGUF rows uint8 [..., row_bytes] into float32 [..., row_len].

    Bit-identical to ``gguf.quants.dequantize``; always returns a new array.
    """
    row_len, row_bytes = _check_raw(raw, qtype, "dequantize")
    lead = raw.shape[:-1]
    out = np.empty((*lead, row_len), np.float32)
    if out.size:
        _mm.dequantize_rows(int(qtype), _readonly(raw.reshape(-1, row_bytes)),
                            out.reshape(-1, row_len))
    return out


def _check_weights(w: np.ndarray, qtype: int, what: str) -> tuple[int, int]:
    row_len, _ = _check_raw(w, qtype, what)
    if w.ndim != 2:
        raise ValueError(f"{what}: weights must be 2-D [rows, row_bytes], got shape {w.shape}")
    return row_len, w.shape[0]


def _as_f32(x: np.ndarray, ndim: int, row_len: int, what: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != ndim or x.shape[-1] != row_len:
        want = "[row_len]" if ndim == 1 else "[T, row_len]"
        raise ValueError(f"{what}: x must have shape {want} with row_len={row_len}, "
                         f"got {x.shape}")
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"{what}: x must be floating point, got {x.dtype}")
    return _readonly(np.ascontiguousarray(x, dtype=np.float32))


def _matvec(w: np.ndarray, qtype: int, x: np.ndarray, out: np.ndarray) -> None:
    # w, x already validated and read-only
    fused = _FUSED_MATVEC.get(qtype)
    if fused is None:
        _mm.matvec_generic(qtype, w, x, out)
    else:
        kernel, view = fused
        kernel(w if view is np.uint8 else w.view(view), x, out)


def matvec(w: np.ndarray, qtype: int, x: np.ndarray,
           out: np.ndarray | None = None) -> np.ndarray:
    """out[rows] = dequantize(w) @ x, for raw rows w: uint8 [rows, row_bytes]."""
    row_len, rows = _check_weights(w, qtype, "matvec")
    x = _as_f32(x, 1, row_len, "matvec")
    out = _check_out(out, (rows,), "matvec")
    if rows:
        _matvec(_readonly(w), int(qtype), x, out)
    return out


def _tile_rows(rows: int, row_len: int) -> int:
    """Rows per matmul task: a multiple of 4 whose float32 copy fits _TILE_BYTES, and
    small enough that every thread gets at least two tasks."""
    by_cache = _TILE_BYTES // (4 * max(row_len, 1))
    by_threads = -(-rows // (2 * numba.get_num_threads()))
    return max(4, -(-min(by_cache, by_threads) // 4) * 4)


def matmul(w: np.ndarray, qtype: int, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """out[T, rows] = x @ dequantize(w).T, for raw rows w and x: float32 [T, row_len]."""
    row_len, rows = _check_weights(w, qtype, "matmul")
    x = _as_f32(x, 2, row_len, "matmul")
    n_tok = x.shape[0]
    out = _check_out(out, (n_tok, rows), "matmul")
    if rows == 0 or n_tok == 0:
        return out
    qtype = int(qtype)
    w = _readonly(w)
    if n_tok <= _FUSED_MAX_TOKENS and qtype in _FUSED_MATVEC:
        for t in range(n_tok):
            _matvec(w, qtype, x[t], out[t])
    elif n_tok == 1:
        _mm.matvec_generic(qtype, w, x[0], out[0])
    else:
        _mm.matmul_tiled(qtype, w, x, out, _tile_rows(rows, row_len))
    return out


# the types with integer kernels (rowdot.has_int): decode, prefill and the MoE kernels
INT_QTYPES: frozenset[int] = frozenset(int(t) for t in (
    _Q.Q4_0, _Q.Q8_0, _Q.Q4_K, _Q.Q6_K, _Q.MXFP4, _Q.IQ4_NL, _Q.Q5_K, _Q.IQ4_XS, _Q.Q3_K,
    _Q.Q2_K))


def _int_tile(rows: int) -> int:
    return max(4, min(64, -(-rows // (4 * numba.get_num_threads()))))


def qmatmul(w: np.ndarray, qtype: int, x: np.ndarray, acts: dict | None = None,
            out: np.ndarray | None = None) -> np.ndarray:
    """out[T, rows] = round_activations(x, qtype) @ dequantize(w).T (up to float
    summation order): the product as llama.cpp computes it.

    ``acts``: an optional dict shared by products of the same x; the 8-bit activations
    are made once per rounding scheme and reused (q / k / v, gate / up)."""
    from .activations import act_scheme, quantize_activations, round_activations
    from .prefill import matmul_q8

    row_len, rows = _check_weights(w, qtype, "qmatmul")
    x = _as_f32(x, 2, row_len, "qmatmul")
    n_tok = x.shape[0]
    out = _check_out(out, (n_tok, rows), "qmatmul")
    if rows == 0 or n_tok == 0:
        return out
    qtype = int(qtype)
    if qtype not in INT_QTYPES:
        return matmul(w, qtype, round_activations(x, qtype), out=out)
    scheme = act_scheme(qtype, row_len)
    q8 = None if acts is None else acts.get(scheme)
    if q8 is None:
        q8 = quantize_activations(x, scheme)
        if acts is not None:
            acts[scheme] = q8
    dynamic(matmul_q8, qtype, _readonly(w), *q8, out, _int_tile(rows))
    return out


def dynamic(kernel, *args):
    """kernel(*args) with its parallel loops handing iterations out in chunks of one as
    threads ask for them, instead of one equal share per thread (numba's default).

    For the prefill kernels, whose iterations are row tiles, expert tiles or attention
    blocks of uneven cost: on a machine whose cores other processes also use, a thread
    that loses its core would otherwise hold the whole region up (pp512, 2 threads on 2
    shared cores: 535-594 → 667-723 t/s). Set from here because a jitted function
    that sets it cannot be cached; not for the decode kernels, whose stages want one
    iteration per thread."""
    prev = numba.get_parallel_chunksize()
    try:
        # set inside the try: Ctrl-C lands right after set_parallel_chunksize's C call
        # (its result not yet returned), and every decode kernel ran in chunks of one after
        numba.set_parallel_chunksize(1)
        return kernel(*args)
    finally:
        numba.set_parallel_chunksize(prev)


def compile_stats() -> tuple[int, int]:
    """(compiled, loaded from cache): numba specialisations of efedge's kernels so far
    in this process — how a warm-up came by its kernels."""
    import sys

    compiled = cached = 0
    for name, mod in list(sys.modules.items()):
        if not name.startswith("efedge.kernels") or mod is None:
            continue
        for obj in vars(mod).values():
            st = getattr(obj, "stats", None)
            if st is None or not hasattr(st, "cache_misses") or obj.__module__ != name:
                continue
            compiled += sum(st.cache_misses.values())
            cached += sum(st.cache_hits.values())
    return compiled, cached
