"""Activation rounding as llama.cpp's CPU backend applies it before a matrix product.

ggml multiplies a quantized weight by activations converted to the weight type's
"vec_dot_type": Q8_0 blocks for the legacy 32-element quants and IQ4_NL, Q8_1 for Q4_1 /
Q5_1, Q8_K blocks for the K-quants, IQ4_XS, the IQ1 / IQ2 / IQ3 types and TQ1_0 / TQ2_0
(ggml-cpu.c's type_traits_cpu), F16 for F16 weights, BF16 for BF16. The
rounding moves logits by ~0.5% and, through near-tied routing, can flip which experts a
token uses; rounding our activations the same way keeps efedge on llama.cpp's side of
those ties. The functions return the rounded values as float32 (quantize, then
dequantize), so the products that follow are ordinary float dot products.

``act_scheme(qtype, row_len)`` names the rounding once per matrix; ``round_row`` (numba)
applies it to one row and is what the fused layer kernels call; ``round_activations`` is
the array-level entry point.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as Q
from numba import njit, prange

from ._fp import bits_to_f32, f32_to_bits, round_f16

# rounding schemes
ACT_NONE, ACT_F16, ACT_BF16, ACT_Q8_0, ACT_Q8_K = 0, 1, 2, 3, 4

# Q8_1 rounds as Q8_0 does; MXFP4's vec_dot_type is Q8_0 too
_Q8_0 = {Q.Q4_0, Q.Q5_0, Q.Q8_0, Q.IQ4_NL, Q.Q4_1, Q.Q5_1, Q.MXFP4}
_Q8_K = {Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.IQ4_XS, Q.IQ2_XXS, Q.IQ2_XS, Q.IQ2_S,
         Q.IQ3_XXS, Q.IQ3_S, Q.IQ1_S, Q.IQ1_M, Q.TQ1_0, Q.TQ2_0}


def act_scheme(qtype: int, row_len: int) -> int:
    """The rounding llama.cpp applies to activations multiplied by weights of qtype."""
    qtype = Q(int(qtype))
    if qtype == Q.F16:
        return ACT_F16
    if qtype == Q.BF16:
        return ACT_BF16
    if qtype in _Q8_0 and row_len % 32 == 0:
        return ACT_Q8_0
    if qtype in _Q8_K and row_len % 256 == 0:
        return ACT_Q8_K
    return ACT_NONE


_F127 = np.float32(127.0)
_FM127 = np.float32(-127.0)
_ONE = np.float32(1.0)
_ZERO = np.float32(0.0)


@njit(cache=True, nogil=True, error_model="numpy", fastmath=False)
def _round_q8_0(x, out):
    # blocks of 32: d = amax / 127 stored as fp16, q = round(x / d) (ties to even, as the
    # AVX path rounds)
    for b in range(x.shape[0] // 32):
        e = b * 32
        amax = _ZERO
        for j in range(32):
            amax = max(amax, abs(x[e + j]))
        d = amax / _F127
        inv = _ONE / d if d != _ZERO else _ZERO
        d16 = round_f16(d)
        for j in range(32):
            out[e + j] = np.float32(np.rint(x[e + j] * inv)) * d16


@njit(cache=True, nogil=True, error_model="numpy", fastmath=False)
def _round_q8_k(x, out):
    # blocks of 256: the signed value of largest magnitude sets iscale = -127 / max;
    # q = nearest(iscale · x) capped at 127; d = 1 / iscale kept as float32
    for b in range(x.shape[0] // 256):
        e = b * 256
        amax = _ZERO
        mx = _ZERO
        for j in range(256):
            a = abs(x[e + j])
            if a > amax:  # first occurrence of the largest magnitude
                amax = a
                mx = x[e + j]
        iscale = _FM127 / mx if mx != _ZERO else _ZERO
        d = _ONE / iscale if mx != _ZERO else _ZERO
        for j in range(256):
            out[e + j] = min(np.float32(np.rint(x[e + j] * iscale)), _F127) * d


@njit(cache=True, nogil=True, error_model="numpy", fastmath=False)
def round_row(scheme, x, out):
    """out = x rounded by ``scheme`` (x, out: float32 [n]; may be the same array)."""
    n = x.shape[0]
    if scheme == ACT_Q8_0:
        _round_q8_0(x, out)
    elif scheme == ACT_Q8_K:
        _round_q8_k(x, out)
    elif scheme == ACT_F16:
        for i in range(n):
            out[i] = round_f16(x[i])
    elif scheme == ACT_BF16:
        for i in range(n):
            b = np.int64(f32_to_bits(x[i]))
            out[i] = bits_to_f32((b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000)
    else:
        for i in range(n):
            out[i] = x[i]


@njit(cache=True, nogil=True, parallel=True, error_model="numpy", fastmath=False)
def round_rows(scheme, x, out):
    for t in prange(x.shape[0]):
        round_row(scheme, x[t], out[t])


def round_activations(x: np.ndarray, qtype: int) -> np.ndarray:
    """x [T, K] float32 rounded as llama.cpp rounds activations for weights of qtype."""
    scheme = act_scheme(qtype, x.shape[-1])
    if scheme == ACT_NONE:
        return x
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.empty_like(x)
    if x.size:
        round_rows(scheme, x.reshape(-1, x.shape[-1]), out.reshape(-1, x.shape[-1]))
    return out


# -- 8-bit activations for the integer kernels (efedge.kernels.simd) -------------------------


def q8_shapes(scheme: int, n: int) -> tuple[int, int]:
    """(scales, sums) per row of n activations quantized for ``scheme`` (the layouts the
    integer kernels read, see efedge.kernels.simd)."""
    if scheme == ACT_Q8_0:
        return n // 4, n // 32
    return n // 256, n // 16


@njit(cache=True, nogil=True, error_model="numpy", fastmath=False)
def quantize_row_q8_0(x, xq, xd, xs):
    """x [n] → int8 xq; xd [n/4]: each block's fp16 scale (as float) 8 times; xs [n/32]
    (int32 array): the float32 bits of scale · sum(block of xq). The values _round_q8_0
    rounds to are xq · scale."""
    xsf = xs.view(np.float32)
    for b in range(x.shape[0] // 32):
        e = b * 32
        amax = _ZERO
        for j in range(32):
            amax = max(amax, abs(x[e + j]))
        d = amax / _F127
        inv = _ONE / d if d != _ZERO else _ZERO
        s = 0
        for j in range(32):
            q = np.int32(np.rint(x[e + j] * inv))
            xq[e + j] = q
            s += q
        d16 = round_f16(d)
        for j in range(8):
            xd[8 * b + j] = d16
        xsf[b] = d16 * np.float32(s)  # exact: 11-bit scale × 13-bit sum


@njit(cache=True, nogil=True, error_model="numpy", fastmath=False)
def quantize_row_q8_k(x, xq, xd, xs):
    """x [n] → int8 xq, scale xd [n/256], sums xs [n/16]; xq · xd = _round_q8_k(x)."""
    for b in range(x.shape[0] // 256):
        e = b * 256
        amax = _ZERO
        mx = _ZERO
        for j in range(256):
            a = abs(x[e + j])
            if a > amax:
                amax = a
                mx = x[e + j]
        iscale = _FM127 / mx if mx != _ZERO else _ZERO
        xd[b] = _ONE / iscale if mx != _ZERO else _ZERO
        for g in range(16):
            s = 0
            for j in range(16):
                q = np.int32(min(np.float32(np.rint(x[e + 16 * g + j] * iscale)), _F127))
                xq[e + 16 * g + j] = q
                s += q
            xs[16 * b + g] = s


@njit(cache=True, nogil=True, error_model="numpy", fastmath=False)
def quantize_row(scheme, x, xq, xd, xs):
    if scheme == ACT_Q8_0:
        quantize_row_q8_0(x, xq, xd, xs)
    else:
        quantize_row_q8_k(x, xq, xd, xs)


@njit(cache=True, nogil=True, parallel=True, error_model="numpy", fastmath=False)
def quantize_rows(scheme, x, xq, xd, xs):
    for t in prange(x.shape[0]):
        quantize_row(scheme, x[t], xq[t], xd[t], xs[t])


def quantize_activations(x: np.ndarray, scheme: int):
    """x [T, n] → (xq int8 [T, n], xd float32, xs int32) for scheme Q8_0 or Q8_K."""
    t, n = x.shape
    nd, ns = q8_shapes(scheme, n)
    xq = np.empty((t, n), np.int8)
    xd = np.empty((t, nd), np.float32)
    xs = np.empty((t, ns), np.int32)
    if t:
        quantize_rows(scheme, np.ascontiguousarray(x, dtype=np.float32), xq, xd, xs)
    return xq, xd, xs
