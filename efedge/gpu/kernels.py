"""GGUF dequantization and quantized matrix products in torch, on any torch device.

Weights arrive as uint8 tensors of GGUF blocks [..., row_bytes] (a slice of a VRAM slot,
or a non-expert matrix uploaded as it is in the file). Each decoder below is the same
sequence of float32 operations as ``gguf.quants.dequantize`` — one torch op per numpy op,
never fused — so the result is bit-identical on the CPU and on CUDA (IEEE float32 multiply
and subtract round the same way everywhere; only a fused multiply-add would differ, and
eager torch never fuses).

    dequantize(raw [..., row_bytes] uint8, qtype)   -> float32 [..., row_len]
    matmul(x [T, K] float32, raw [rows, row_bytes], qtype, chunk_bytes) -> [T, rows]
    round_activations(x [T, K], qtype)              -> x rounded as llama.cpp rounds it

matmul dequantizes in row chunks (at most ``chunk_bytes`` of float32 at a time), so a
large output head never needs its whole float32 copy. Triton is not used: the expert
matrices of the models we target are small enough that the decode (a few dozen
elementwise kernels) is not where the time goes; see efedge/gpu/model.py.
"""

from __future__ import annotations

import functools

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from efedge.errors import UnsupportedModelError

from . import kernels_iq as _iq

Q = GGMLQuantizationType
QK_K = 256
KVALUES_IQ4 = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
KVALUES_MXFP4 = (0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12)  # e2m1, doubled

__all__ = ["SUPPORTED_QTYPES", "dequantize", "matmul", "round_activations", "block_size"]


@functools.lru_cache(maxsize=256)
def _const(values: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small constant tensor, made once per device: torch.tensor(..., device="cuda")
    copies from pageable memory, which would make the host wait for the queued kernels
    on every decode."""
    return torch.tensor(values, dtype=dtype, device=device)


def _u8(values, device) -> torch.Tensor:
    return _const(tuple(values), torch.uint8, device)


def _arange(n: int, dtype: torch.dtype, device, step: int = 1) -> torch.Tensor:
    return _const(tuple(range(0, n, step)), dtype, device)


def _f16(b: torch.Tensor, off: int) -> torch.Tensor:
    """The float16 stored at byte `off` of each block, as float32 [n, 1]."""
    return _aligned(b[:, off:off + 2], 2).view(torch.float16).to(torch.float32)


def _u32(b: torch.Tensor, off: int) -> torch.Tensor:
    """The little-endian uint32 at byte `off` of each block, as int64 [n, 1] (blocks are
    not 4-byte aligned, so the bytes are combined rather than viewed)."""
    w = b[:, off:off + 4].to(torch.int64)
    return (w[:, 0:1] | (w[:, 1:2] << 8) | (w[:, 2:3] << 16) | (w[:, 3:4] << 24))


def _nibbles(qs: torch.Tensor, half: int) -> torch.Tensor:
    """[n, g·half] packed bytes → [n, g, 2, half] (low nibbles first, then high)."""
    n = qs.shape[0]
    sh = _u8([0, 4], qs.device).reshape(1, 1, 2, 1)
    return (qs.reshape(n, -1, 1, half) >> sh) & 0x0F


# -- one decoder per type: blocks uint8 [n, block_bytes] → float32 [n, block_elems] -------

def _aligned(b: torch.Tensor, size: int) -> torch.Tensor:
    """b contiguous with a storage offset that allows a view as a `size`-byte type."""
    b = b.contiguous()
    return b if b.storage_offset() % size == 0 else b.clone()


def _f32(b):
    return _aligned(b, 4).view(torch.float32)


def _f16_rows(b):
    return _aligned(b, 2).view(torch.float16).to(torch.float32)


def _bf16(b):
    return (_aligned(b, 2).view(torch.int16).to(torch.int32) << 16).view(torch.float32)


def _q8_0(b):
    d = _f16(b, 0)
    x = b[:, 2:].to(torch.int8).to(torch.float32)  # uint8 → int8 wraps: the signed byte
    return x * d


def _q4_0(b):
    n = b.shape[0]
    d = _f16(b, 0)
    q = _nibbles(b[:, 2:], 16).reshape(n, -1).to(torch.int8) - 8
    return d * q.to(torch.float32)


def _q4_1(b):
    n = b.shape[0]
    d, m = _f16(b, 0), _f16(b, 2)
    q = _nibbles(b[:, 4:], 16).reshape(n, -1).to(torch.float32)
    return (d * q) + m


def _q5_bits(b, qh_off: int, qs_off: int):
    n = b.shape[0]
    shifts = _arange(32, torch.int64, b.device).reshape(1, 32)
    qh = ((_u32(b, qh_off) >> shifts) & 1).to(torch.uint8)
    ql = _nibbles(b[:, qs_off:], 16).reshape(n, -1)
    return ql | (qh << 4)


def _q5_0(b):
    d = _f16(b, 0)
    q = _q5_bits(b, 2, 6).to(torch.int8) - 16
    return d * q.to(torch.float32)


def _q5_1(b):
    d, m = _f16(b, 0), _f16(b, 2)
    q = _q5_bits(b, 4, 8).to(torch.float32)
    return (d * q) + m


def _q2_k(b):
    n = b.shape[0]
    scales, qs = b[:, :16], b[:, 16:80]
    d, dmin = _f16(b, 80), _f16(b, 82)
    dl = (d * (scales & 0xF).to(torch.float32)).reshape(n, 16, 1)
    ml = (dmin * (scales >> 4).to(torch.float32)).reshape(n, 16, 1)
    sh = _u8([0, 2, 4, 6], b.device).reshape(1, 1, 4, 1)
    q = ((qs.reshape(n, -1, 1, 32) >> sh) & 3).reshape(n, 16, 16).to(torch.float32)
    return (dl * q - ml).reshape(n, QK_K)


def _q3_k(b):
    n = b.shape[0]
    hmask, qs, scales = b[:, :32], b[:, 32:96], b[:, 96:108]
    d = _f16(b, 108)
    lo = (scales[:, :8].reshape(n, 1, 8) >> _u8([0, 4], b.device).reshape(1, 2, 1))
    lo = lo.reshape(n, 16)
    hi = (scales[:, 8:12].reshape(n, 1, 4) >> _u8([0, 2, 4, 6], b.device).reshape(1, 4, 1))
    hi = hi.reshape(n, 16)
    sc = ((lo & 0x0F) | ((hi & 0x03) << 4)).to(torch.int8) - 32
    dl = (d * sc.to(torch.float32)).reshape(n, 16, 1)
    ql = qs.reshape(n, -1, 1, 32) >> _u8([0, 2, 4, 6], b.device).reshape(1, 1, 4, 1)
    qh = hmask.reshape(n, -1, 1, 32) >> _arange(8, torch.uint8, b.device).reshape(1, 1, 8, 1)
    ql = ql.reshape(n, 16, 16) & 3
    qh = (qh.reshape(n, 16, 16) & 1) ^ 1  # the offset is zero when the mask bit is set
    q = (ql.to(torch.int8) - (qh << 2).to(torch.int8)).to(torch.float32)
    return (dl * q).reshape(n, QK_K)


def _scale_min_k4(scales: torch.Tensor):
    """The 8 six-bit scales and mins of a Q4_K / Q5_K block (12 packed bytes)."""
    n = scales.shape[0]
    s = scales.reshape(n, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc, mn


def _q4_k(b):
    n = b.shape[0]
    d, dmin = _f16(b, 0), _f16(b, 2)
    sc, m = _scale_min_k4(b[:, 4:16])
    d = (d * sc.to(torch.float32)).reshape(n, -1, 1)
    dm = (dmin * m.to(torch.float32)).reshape(n, -1, 1)
    q = _nibbles(b[:, 16:], 32).reshape(n, -1, 32).to(torch.float32)
    return (d * q - dm).reshape(n, QK_K)


def _q5_k(b):
    n = b.shape[0]
    d, dmin = _f16(b, 0), _f16(b, 2)
    sc, m = _scale_min_k4(b[:, 4:16])
    d = (d * sc.to(torch.float32)).reshape(n, -1, 1)
    dm = (dmin * m.to(torch.float32)).reshape(n, -1, 1)
    qh, qs = b[:, 16:48], b[:, 48:]
    ql = _nibbles(qs, 32).reshape(n, -1, 32)
    bits = _arange(8, torch.uint8, b.device).reshape(1, 1, 8, 1)
    qh = ((qh.reshape(n, -1, 1, 32) >> bits) & 1).reshape(n, -1, 32)
    q = (ql | (qh << 4)).to(torch.float32)
    return (d * q - dm).reshape(n, QK_K)


def _q6_k(b):
    n = b.shape[0]
    ql, qh, scales = b[:, :128], b[:, 128:192], b[:, 192:208]
    d = _f16(b, 208)
    sc = scales.to(torch.int8).to(torch.float32)
    d = (d * sc).reshape(n, 16, 1)
    ql = _nibbles(ql, 64).reshape(n, -1, 32)
    qh = (qh.reshape(n, -1, 1, 32) >> _u8([0, 2, 4, 6], b.device).reshape(1, 1, 4, 1)) & 3
    qh = qh.reshape(n, -1, 32)
    q = (ql | (qh << 4)).to(torch.int8) - 32
    return (d * q.reshape(n, 16, -1).to(torch.float32)).reshape(n, QK_K)


def _kvalues(device) -> torch.Tensor:
    return _const(KVALUES_IQ4, torch.float32, device)


def _iq4_nl(b):
    n = b.shape[0]
    d = _f16(b, 0)
    q = _nibbles(b[:, 2:], 16).reshape(n, -1).to(torch.int64)
    return d * _kvalues(b.device)[q]


def _iq4_xs(b):
    n = b.shape[0]
    d = _f16(b, 0)
    sh = (b[:, 2].to(torch.int64) | (b[:, 3].to(torch.int64) << 8)).reshape(n, 1)
    sh = (sh >> _arange(16, torch.int64, b.device, step=2).reshape(1, 8)) & 3
    sl = (b[:, 4:8].reshape(n, -1, 1) >> _u8([0, 4], b.device).reshape(1, 1, 2)).reshape(n, 8)
    sl = (sl & 0x0F).to(torch.int64)
    scales = (sl | (sh << 4)) - 32
    dl = (d * scales.to(torch.float32)).reshape(n, -1, 1)
    q = _nibbles(b[:, 8:], 16).reshape(n, 8, 32).to(torch.int64)
    return (dl * _kvalues(b.device)[q]).reshape(n, -1)


def _mxfp4(b):
    """gpt-oss's experts: an E8M0 exponent byte (as ggml_e8m0_to_fp32_half: half the
    power of two, subnormal below exponent 2), then 16 bytes of e2m1 nibbles."""
    n = b.shape[0]
    e = b[:, 0:1].to(torch.int32)
    bits = torch.where(e < 2, torch.full_like(e, 0x00200000) << e, (e - 1) << 23)
    d = bits.view(torch.float32)
    q = _nibbles(b[:, 1:], 16).reshape(n, -1).to(torch.int64)
    return d * _const(KVALUES_MXFP4, torch.float32, b.device)[q]


_DECODERS = {
    int(Q.F32): _f32, int(Q.F16): _f16_rows, int(Q.BF16): _bf16,
    int(Q.Q8_0): _q8_0, int(Q.Q4_0): _q4_0, int(Q.Q4_1): _q4_1,
    int(Q.Q5_0): _q5_0, int(Q.Q5_1): _q5_1,
    int(Q.Q2_K): _q2_k, int(Q.Q3_K): _q3_k, int(Q.Q4_K): _q4_k, int(Q.Q5_K): _q5_k,
    int(Q.Q6_K): _q6_k, int(Q.IQ4_NL): _iq4_nl, int(Q.IQ4_XS): _iq4_xs, int(Q.MXFP4): _mxfp4,
    int(Q.IQ2_XXS): _iq.iq2_xxs, int(Q.IQ2_XS): _iq.iq2_xs, int(Q.IQ2_S): _iq.iq2_s,
    int(Q.IQ3_XXS): _iq.iq3_xxs, int(Q.IQ3_S): _iq.iq3_s, int(Q.IQ1_S): _iq.iq1_s,
    int(Q.IQ1_M): _iq.iq1_m, int(Q.TQ1_0): _iq.tq1_0, int(Q.TQ2_0): _iq.tq2_0,
}
SUPPORTED_QTYPES: frozenset[int] = frozenset(_DECODERS)


def _name(qtype: int) -> str:
    try:
        return Q(int(qtype)).name
    except ValueError:
        return f"#{qtype}"


def block_size(qtype: int) -> tuple[int, int]:
    """(elements, bytes) of one block of ``qtype``; UnsupportedModelError if no decoder."""
    if int(qtype) not in _DECODERS:
        names = ", ".join(sorted(_name(t) for t in _DECODERS))
        raise UnsupportedModelError(f"the GPU kernels have no decoder for {_name(qtype)} "
                                    f"(they run {names})")
    return GGML_QUANT_SIZES[Q(int(qtype))]


def row_len(qtype: int, row_bytes: int) -> int:
    elems, nbytes = block_size(qtype)
    if row_bytes % nbytes:
        raise ValueError(f"a row of {row_bytes} bytes is not a whole number of "
                         f"{_name(qtype)} blocks ({nbytes} bytes each)")
    return row_bytes // nbytes * elems


def dequantize(raw: torch.Tensor, qtype: int) -> torch.Tensor:
    """uint8 [..., row_bytes] GGUF rows → float32 [..., row_len], on raw's device;
    bit-identical to ``gguf.quants.dequantize``."""
    if raw.dtype != torch.uint8:
        raise ValueError(f"raw weights must be uint8, got {raw.dtype}")
    elems, nbytes = block_size(qtype)
    n_el = row_len(qtype, raw.shape[-1])
    lead = raw.shape[:-1]
    if raw.numel() == 0:
        return torch.empty((*lead, n_el), dtype=torch.float32, device=raw.device)
    blocks = raw.reshape(-1, nbytes)
    out = _DECODERS[int(qtype)](blocks)
    return out.reshape(*lead, n_el)


def matmul(x: torch.Tensor, raw: torch.Tensor, qtype: int,
           chunk_bytes: int = 64 << 20) -> torch.Tensor:
    """x [T, K] float32 @ dequantize(raw [rows, row_bytes]).T → [T, rows]; the weights are
    decoded in chunks of at most `chunk_bytes` float32 (at least one row)."""
    rows, k = raw.shape[0], row_len(qtype, raw.shape[-1])
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} columns, the weights have rows of {k}")
    step = max(1, int(chunk_bytes) // (4 * max(k, 1)))
    if step >= rows:
        return x @ dequantize(raw, qtype).T
    out = torch.empty((x.shape[0], rows), dtype=torch.float32, device=x.device)
    for lo in range(0, rows, step):
        hi = min(rows, lo + step)
        out[:, lo:hi] = x @ dequantize(raw[lo:hi], qtype).T
    return out


# -- activation rounding (efedge/kernels/activations.py, op for op) ------------------------

# MXFP4's vec_dot_type is Q8_0 too
_Q8_0_ROUNDED = {int(t) for t in (Q.Q4_0, Q.Q5_0, Q.Q8_0, Q.IQ4_NL, Q.Q4_1, Q.Q5_1,
                                  Q.MXFP4)}
_Q8_K_ROUNDED = {int(t) for t in (Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.IQ4_XS,
                                  Q.IQ2_XXS, Q.IQ2_XS, Q.IQ2_S, Q.IQ3_XXS, Q.IQ3_S,
                                  Q.IQ1_S, Q.IQ1_M, Q.TQ1_0, Q.TQ2_0)}


def _round_q8_0(x: torch.Tensor) -> torch.Tensor:
    t, k = x.shape
    xb = x.reshape(t, k // 32, 32)
    d = xb.abs().amax(dim=-1) / 127.0
    # tensor / tensor: one rounding (a Python scalar numerator would go through reciprocal)
    inv = torch.where(d != 0, torch.ones_like(d) / d, torch.zeros_like(d))
    q = torch.round(xb * inv[..., None])  # half to even, as np.round
    d16 = d.to(torch.float16).to(torch.float32)
    return (q * d16[..., None]).reshape(t, k)


def _round_q8_k(x: torch.Tensor) -> torch.Tensor:
    t, k = x.shape
    xb = x.reshape(t, k // 256, 256)
    idx = xb.abs().argmax(dim=-1, keepdim=True)  # first maximum, as np.argmax
    mx = torch.gather(xb, -1, idx)[..., 0]
    nz = mx != 0
    iscale = torch.where(nz, torch.full_like(mx, -127.0) / mx, torch.zeros_like(mx))
    d = torch.where(nz, torch.ones_like(mx) / iscale, torch.zeros_like(mx))
    q = torch.clamp(torch.round(xb * iscale[..., None]), max=127.0)
    return (q * d[..., None]).reshape(t, k)


def round_activations(x: torch.Tensor, qtype: int) -> torch.Tensor:
    """x [T, K] float32 rounded as llama.cpp rounds activations for weights of qtype (the
    same values as efedge.kernels.activations.round_activations)."""
    qtype = int(qtype)
    if qtype == int(Q.F32):
        return x
    if qtype == int(Q.F16):
        return x.to(torch.float16).to(torch.float32)
    if qtype == int(Q.BF16):
        bits = x.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
        r = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return r.to(torch.int32).view(torch.float32)  # int64 → int32 wraps like uint32
    if qtype in _Q8_0_ROUNDED and x.shape[1] % 32 == 0:
        return _round_q8_0(x)
    if qtype in _Q8_K_ROUNDED and x.shape[1] % 256 == 0:
        return _round_q8_k(x)
    return x
