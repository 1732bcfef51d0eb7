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
# Every kernel states fastmath explicitly, False where it is not FAST: numba compiles a
# callee that leaves it unset with its first caller's flags and caches that build under
# the same signature, so exp_f32 first reached from a FAST kernel became reassociated
# for the whole process and for later runs (inf near 88.7, 3 ulp near -87).

_TWO_M24 = np.float32(2.0**-24)
_TWO_112 = np.float32(2.0**112)
_TWO_16 = np.float32(2.0**16)


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


@intrinsic
def f32_to_bits(typingctx, f):
    """The bits of a float32, as a uint32 (a register bitcast)."""
    if f != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.uint32(f), codegen


_MAGIC = np.float32(2.0**23)


@njit(cache=True, nogil=True, fastmath=False)
def small_f32(v, offset):
    """float32(v - offset) for an int 0 <= v < 2**23, as an OR and a subtract.

    ``2**23 + v`` has the bits ``0x4B000000 | v``; this keeps the nibble unpacking in
    32-bit lanes, which is what lets LLVM vectorise the fused dots well.
    """
    return bits_to_f32(np.uint32(v) | np.uint32(0x4B000000)) - (_MAGIC + np.float32(offset))


@njit(cache=True, nogil=True, fastmath=False)
def half_to_f32(h):
    """IEEE half with bits ``h`` (an int) to float32, exactly, branch-free so it vectorises.

    ``(h & 0x7FFF) << 13`` read as a float32 is the half's magnitude times 2^-112, for
    normal and subnormal halves alike, so one exact multiply rescales it; inf/NaN (the
    only values that reach 2^16) get the all-ones exponent back; the sign is OR-ed in.
    """
    mag = (h & 0x7FFF) << 13
    f = bits_to_f32(mag) * _TWO_112
    f = bits_to_f32(mag | 0x7F800000) if f >= _TWO_16 else f
    return bits_to_f32(f32_to_bits(f) | ((h & 0x8000) << 16))


@njit(cache=True, nogil=True, fastmath=False)
def f16_to_f32(lo, hi):
    """IEEE half stored as little-endian bytes ``lo``, ``hi`` to float32, exactly.

    For scalar scale fields: the branches predict well and beat ``half_to_f32`` there.
    """
    h = (np.int64(hi) << 8) | np.int64(lo)
    sign = (h & 0x8000) << 16
    em = h & 0x7FFF
    if em >= 0x0400:
        if em >= 0x7C00:  # inf / NaN, payload kept as numpy does
            return bits_to_f32(sign | 0x7F800000 | ((em & 0x3FF) << 13))
        return bits_to_f32(sign | ((em + 0x1C000) << 13))
    v = np.float32(em) * _TWO_M24  # subnormal: m * 2^-24, exact in float32
    return -v if sign else v


@njit(cache=True, nogil=True, fastmath=FAST)
def dot(a, b):
    """float32 dot product of two equal-length 1-D arrays (vectorised by LLVM)."""
    s = np.float32(0.0)
    for i in range(a.shape[0]):
        s += a[i] * b[i]
    return s


_F16_MAX_AS_F32 = (127 + 16) << 23  # bits of 65536.0: from here on the half is inf
_F32_INF = 255 << 23
_DENORM_MAGIC = ((127 - 15) + (23 - 10) + 1) << 23  # bits of 0.5


@njit(cache=True, nogil=True, fastmath=False)
def f32_to_f16(f):
    """float32 → IEEE half bits (an int), round to nearest even, as numpy's astype and
    the F16C instruction do (NaN becomes a quiet NaN; overflow becomes inf).

    After F. Giesen's float_to_half_fast3_rtne: subnormal halves are rounded by one float
    add against a magic constant, normal ones by integer arithmetic on the bits.
    """
    u = np.int64(f32_to_bits(np.float32(f)))
    sign = u & 0x80000000
    u ^= sign
    if u >= _F16_MAX_AS_F32:
        o = 0x7E00 if u > _F32_INF else 0x7C00
    elif u < (113 << 23):  # the half is subnormal or zero
        s = bits_to_f32(u) + bits_to_f32(_DENORM_MAGIC)
        o = np.int64(f32_to_bits(s)) - _DENORM_MAGIC
    else:
        mant_odd = (u >> 13) & 1
        u += ((15 - 127) << 23) + 0xFFF + mant_odd
        o = u >> 13
    return o | (sign >> 16)


@njit(cache=True, nogil=True, fastmath=False)
def round_f16(f):
    """float32 f rounded to the nearest half, as a float32."""
    return half_to_f32(f32_to_f16(f))
