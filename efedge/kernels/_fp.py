"""Bit-level float helpers shared by the quant kernels.

numba has no float16 on the CPU, so half-precision scales and weights are decoded from
their bits here. Every conversion is exact (the same bits numpy's ``astype`` gives), which
is what keeps the dequantizers bit-identical to gguf-py.
"""

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

# Fast-math flags for the dot products only: reassociation lets LLVM vectorise the float
# reductions. No nnan/ninf, so NaN and inf still propagate. Dequantizers never use them.
FAST = {"reassoc", "contract", "nsz"}

_TWO_M24 = np.float32(2.0**-24)


@intrinsic
def bits_to_f32(typingctx, bits):
    """Reinterpret the low 32 bits of an integer as a float32 (a register bitcast)."""
    if not isinstance(bits, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        v = args[0]
        width = v.type.width
        if width > 32:
            v = builder.trunc(v, ir.IntType(32))
        elif width < 32:
            v = builder.zext(v, ir.IntType(32))
        return builder.bitcast(v, ir.FloatType())

    return types.float32(bits), codegen


@njit(cache=True, nogil=True)
def f16_to_f32(lo, hi):
    """IEEE half (little-endian bytes ``lo``, ``hi``) to float32, exactly."""
    h = (np.int64(hi) << 8) | np.int64(lo)
    sign = (h & 0x8000) << 16
    em = h & 0x7FFF
    if em >= 0x7C00:  # inf / NaN: keep the payload, as numpy does
        return bits_to_f32(sign | 0x7F800000 | ((em & 0x3FF) << 13))
    if em >= 0x0400:  # normal: rebias the exponent (15 -> 127)
        return bits_to_f32(sign | ((em + 0x1C000) << 13))
    v = np.float32(em) * _TWO_M24  # subnormal: m * 2^-24, exact in float32
    if sign:
        v = -v
    return v


@njit(cache=True, nogil=True)
def bf16_to_f32(lo, hi):
    """bfloat16 (little-endian bytes) to float32: the top half of the float32 bits."""
    return bits_to_f32((np.int64(hi) << 24) | (np.int64(lo) << 16))


@njit(cache=True, nogil=True)
def f32_from_bytes(src, o):
    """The little-endian float32 stored at ``src[o:o+4]``."""
    b = (np.int64(src[o + 3]) << 24) | (np.int64(src[o + 2]) << 16)
    return bits_to_f32(b | (np.int64(src[o + 1]) << 8) | np.int64(src[o]))


@njit(cache=True, nogil=True, fastmath=FAST)
def dot(a, b):
    """float32 dot product of two equal-length 1-D arrays (vectorised by LLVM)."""
    s = np.float32(0.0)
    for i in range(a.shape[0]):
        s += a[i] * b[i]
    return s
