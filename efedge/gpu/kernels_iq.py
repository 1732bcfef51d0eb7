"""torch decoders of the low-bit lattice and ternary quants (IQ2_XXS IQ2_XS IQ2_S IQ3_XXS
IQ3_S IQ1_S IQ1_M TQ1_0 TQ2_0), registered in ``efedge.gpu.kernels``.

Each is the float32 operation sequence of ``gguf.quants.dequantize`` — ``(d · scale) ·
grid`` then the ±1 sign, or ``dl · (grid + delta)`` for IQ1 — one torch op per numpy op,
so the result is bit-identical to it on any device. Block layouts: efedge/kernels/quant_iq.py;
the lattices are the same arrays (built from the installed gguf package), uploaded once per
device. Blocks arrive as uint8 [n, block_bytes] and leave as float32 [n, 256].
"""

from __future__ import annotations

import torch

from efedge.kernels import quant_iq as _np

_TABLES: dict[tuple[str, torch.device], torch.Tensor] = {}
_NP_TABLES = {"iq2xxs": _np.IQ2XXS_GRID, "iq2xs": _np.IQ2XS_GRID, "iq2s": _np.IQ2S_GRID,
              "iq3xxs": _np.IQ3XXS_GRID, "iq3s": _np.IQ3S_GRID, "iq1s": _np.IQ1S_GRID}
DELTA = float(_np._DELTA)


def _table(name: str, device: torch.device) -> torch.Tensor:
    """A lattice as float32 [points, width] (or ksigns as int64 [128]) on device, made once:
    a per-call upload would make the host wait for the queued kernels."""
    key = (name, device)
    t = _TABLES.get(key)
    if t is None:
        if name == "ksigns":
            t = torch.from_numpy(_np.KSIGNS.astype("int64")).to(device)
        else:
            t = torch.from_numpy(_NP_TABLES[name].astype("float32")).to(device)
        _TABLES[key] = t
    return t


def _shifts(values, device) -> torch.Tensor:
    key = ("shifts" + ",".join(map(str, values)), device)
    t = _TABLES.get(key)
    if t is None:
        t = _TABLES[key] = torch.tensor(values, dtype=torch.int64, device=device)
    return t


def _f16_at(b: torch.Tensor, off: int) -> torch.Tensor:
    """The fp16 at byte off of each block as float32 [n, 1]."""
    x = b[:, off:off + 2].contiguous()
    if x.storage_offset() % 2:  # one block: the slice is contiguous but oddly placed
        x = x.clone()
    return x.view(torch.float16).to(torch.float32)


def _u16(b: torch.Tensor, off: int, count: int) -> torch.Tensor:
    """count little-endian uint16 from byte off: int64 [n, count]."""
    w = b[:, off:off + 2 * count].to(torch.int64).reshape(b.shape[0], count, 2)
    return w[..., 0] | (w[..., 1] << 8)


def _u32(b: torch.Tensor, off: int, count: int) -> torch.Tensor:
    w = _u16(b, off, 2 * count).reshape(b.shape[0], count, 2)
    return w[..., 0] | (w[..., 1] << 16)


def _bits8(v: torch.Tensor) -> torch.Tensor:
    """v [...] (int64, 8 bits used) → ±1.0 [..., 8]: -1 where bit j is set."""
    bits = (v.unsqueeze(-1) >> _shifts(tuple(range(8)), v.device)) & 1
    return (1 - 2 * bits).to(torch.float32)


def _nibbles(v: torch.Tensor) -> torch.Tensor:
    """uint8 [n, k] → int64 [n, 2k]: low then high nibble of each byte."""
    n = v.shape[0]
    return ((v.to(torch.int64).unsqueeze(-1) >> _shifts((0, 4), v.device)) & 15).reshape(n, -1)


def _half_scale(d: torch.Tensor, s: torch.Tensor, f: float) -> torch.Tensor:
    """d · (0.5 + s) · f, the IQ2 / IQ3_XXS sub-block scale (f = 1/4 or 1/2)."""
    return d * (0.5 + s.to(torch.float32)) * f


def iq2_xxs(b):
    n = b.shape[0]
    d = _f16_at(b, 0)
    q = b[:, 2:].reshape(n, 8, 8)
    aux = _u32(b[:, 2:].reshape(n * 8, 8), 4, 1).reshape(n, 8)
    db = _half_scale(d, aux >> 28, 0.25)
    grid = _table("iq2xxs", b.device)[q[:, :, :4].to(torch.int64)]  # [n, 8, 4, 8]
    si = (aux.unsqueeze(-1) >> _shifts((0, 7, 14, 21), b.device)) & 127
    sign = _bits8(_table("ksigns", b.device)[si])
    return (db[:, :, None, None] * grid * sign).reshape(n, 256)


def _iq2_16(b, qs_idx, sign_bytes, scales_off):
    """IQ2_XS / IQ2_S after their index unpacking: 32 groups of 8, a scale per 16."""
    n = b.shape[0]
    d = _f16_at(b, 0)
    db = _half_scale(d, _nibbles(b[:, scales_off:scales_off + 8]), 0.25)  # [n, 16]
    grid = qs_idx.reshape(n, 16, 2, 8)
    sign = _bits8(sign_bytes).reshape(n, 16, 2, 8)
    return (db[:, :, None, None] * grid * sign).reshape(n, 256)


def iq2_xs(b):
    q = _u16(b, 2, 32)
    grid = _table("iq2xs", b.device)[q & 511]
    return _iq2_16(b, grid, _table("ksigns", b.device)[q >> 9], 66)


def iq2_s(b):
    n = b.shape[0]
    qh = (b[:, 66:74].to(torch.int64).unsqueeze(-1) >> _shifts((0, 2, 4, 6), b.device)) & 3
    idx = b[:, 2:34].to(torch.int64) | (qh.reshape(n, 32) << 8)
    grid = _table("iq2s", b.device)[idx]
    return _iq2_16(b, grid, b[:, 34:66].to(torch.int64), 74)


def iq3_xxs(b):
    n = b.shape[0]
    d = _f16_at(b, 0)
    aux = _u32(b, 66, 8)
    db = _half_scale(d, aux >> 28, 0.5)
    grid = _table("iq3xxs", b.device)[b[:, 2:66].to(torch.int64)].reshape(n, 8, 4, 8)
    si = (aux.unsqueeze(-1) >> _shifts((0, 7, 14, 21), b.device)) & 127
    sign = _bits8(_table("ksigns", b.device)[si])
    return (db[:, :, None, None] * grid * sign).reshape(n, 256)


def iq3_s(b):
    n = b.shape[0]
    d = _f16_at(b, 0)
    db = d * (1 + 2 * _nibbles(b[:, 106:110])).to(torch.float32)  # [n, 8]
    qh = (b[:, 66:74].to(torch.int64).unsqueeze(-1) >> _shifts(tuple(range(8)), b.device)) & 1
    idx = b[:, 2:66].to(torch.int64) | (qh.reshape(n, 64) << 8)
    grid = _table("iq3s", b.device)[idx].reshape(n, 8, 4, 8)
    sign = _bits8(b[:, 74:106].to(torch.int64)).reshape(n, 8, 4, 8)
    return (db[:, :, None, None] * grid * sign).reshape(n, 256)


def _delta(flag: torch.Tensor) -> torch.Tensor:
    return torch.where(flag != 0, torch.full_like(flag, 0, dtype=torch.float32) - DELTA,
                       torch.full_like(flag, 0, dtype=torch.float32) + DELTA)


def iq1_s(b):
    n = b.shape[0]
    d = _f16_at(b, 0)
    qh = _u16(b, 34, 8)  # [n, 8]
    dl = d * (2 * ((qh >> 12) & 7) + 1).to(torch.float32)
    delta = _delta(qh & 0x8000)
    hi = (qh.unsqueeze(-1) >> _shifts((0, 3, 6, 9), b.device)) & 7  # [n, 8, 4]
    idx = b[:, 2:34].to(torch.int64).reshape(n, 8, 4) | (hi << 8)
    grid = _table("iq1s", b.device)[idx]  # [n, 8, 4, 8]
    return (dl[:, :, None, None] * (grid + delta[:, :, None, None])).reshape(n, 256)


def iq1_m(b):
    n = b.shape[0]
    sc = _u16(b, 48, 4)  # [n, 4]
    h = ((sc[:, 0] >> 12) | ((sc[:, 1] >> 8) & 0xF0) | ((sc[:, 2] >> 4) & 0xF00)
         | (sc[:, 3] & 0xF000))
    hb = torch.stack([h & 0xFF, h >> 8], dim=-1).to(torch.uint8).contiguous()
    d = hb.view(torch.float16).to(torch.float32)  # [n, 1]
    s = ((sc.unsqueeze(-1) >> _shifts((0, 3, 6, 9), b.device)) & 7).reshape(n, 16)
    dl = d * (2 * s + 1).to(torch.float32)  # [n, 16]
    nib = _nibbles(b[:, 32:48])  # [n, 32]
    idx = b[:, 0:32].to(torch.int64) | ((nib & 7) << 8)
    delta = _delta(nib & 8)
    grid = _table("iq1s", b.device)[idx]  # [n, 32, 8]
    return (dl.reshape(n, 16, 1, 1) * (grid.reshape(n, 16, 2, 8)
                                       + delta.reshape(n, 16, 2, 1))).reshape(n, 256)


def tq1_0(b):
    n = b.shape[0]
    d = _f16_at(b, 52)
    p5 = _shifts((1, 3, 9, 27, 81), b.device).reshape(1, 5, 1)
    q0 = (b[:, 0:32].to(torch.int64).reshape(n, 1, 32) * p5) & 255  # [n, 5, 32]
    q1 = (b[:, 32:48].to(torch.int64).reshape(n, 1, 16) * p5) & 255  # [n, 5, 16]
    q2 = (b[:, 48:52].to(torch.int64).reshape(n, 1, 4) * p5[:, :4]) & 255  # [n, 4, 4]
    q = torch.cat([q0.reshape(n, -1), q1.reshape(n, -1), q2.reshape(n, -1)], dim=-1)
    return d * (((q * 3) >> 8) - 1).to(torch.float32)


def tq2_0(b):
    n = b.shape[0]
    d = _f16_at(b, 64)
    q = (b[:, 0:64].to(torch.int64).reshape(n, 2, 1, 32)
         >> _shifts((0, 2, 4, 6), b.device).reshape(1, 1, 4, 1)) & 3
    return d * (q.reshape(n, 256) - 1).to(torch.float32)
