"""Unpacking 8 rows of quant blocks into the tile layout of the tiled product (``gemm``):
one 32-byte vector per 4 elements, holding those 4 elements of the 8 rows as unsigned
bytes, plus each sub-block's float scale (and, for the types with mins, its offset) per
row. One function per type; ``unpack_fn`` wraps it in the loop over blocks.
"""

from __future__ import annotations

from ._ir import _Fn, _splat, unsigned_table
from .simd_k import iq4_xs_scales, k_scales, q3_scales

L = 8  # rows per tile: one lane each


def _transpose(f: _Fn, rows: list[str], k: int) -> list[str]:
    """rows: L vectors <k x i32> (one per weight row) → k vectors <L x i32>, vector m
    holding dword m of every row."""
    vecs, width = list(rows), k
    while len(vecs) > 1:  # concatenate pairwise: one <L·k x i32>
        nxt = []
        for a, b in zip(vecs[0::2], vecs[1::2], strict=True):
            idx = "<" + ", ".join(f"i32 {i}" for i in range(2 * width)) + ">"
            nxt.append(f.v(f"shufflevector <{width} x i32> {a}, <{width} x i32> {b}, "
                           f"<{2 * width} x i32> {idx}"))
        vecs, width = nxt, 2 * width
    out = []
    for m in range(k):
        idx = "<" + ", ".join(f"i32 {r * k + m}" for r in range(L)) + ">"
        out.append(f.v(f"shufflevector <{width} x i32> {vecs[0]}, <{width} x i32> poison, "
                       f"<{L} x i32> {idx}"))
    return out


def _lanes_f16(f: _Fn, ptrs: list[str]) -> str:
    """<8 x float> of the fp16 values at ptrs (one per row)."""
    v = "poison"
    for r, p in enumerate(ptrs):
        h = f.load("i16", p)
        v = f.v(f"insertelement <8 x i16> {v}, i16 {h}, i32 {r}")
    hv = f.v(f"bitcast <8 x i16> {v} to <8 x half>")
    return f.v(f"fpext <8 x half> {hv} to <8 x float>")


def _lanes_i32(f: _Fn, vals: list[str]) -> str:
    v = "poison"
    for r, x in enumerate(vals):
        v = f.v(f"insertelement <8 x i32> {v}, i32 {x}, i32 {r}")
    return v


def _and(f: _Fn, v: str, mask: int) -> str:
    return f.v(f"and <8 x i32> {v}, {_splat('i32', L, mask)}")


def _shr(f: _Fn, v: str, k: int) -> str:
    return f.v(f"lshr <8 x i32> {v}, {_splat('i32', L, k)}")


def _shl(f: _Fn, v: str, k: int) -> str:
    return f.v(f"shl <8 x i32> {v}, {_splat('i32', L, k)}")


def _or(f: _Fn, a: str, b: str) -> str:
    return f.v(f"or <8 x i32> {a}, {b}")


def _store_group(f: _Fn, v: str, elem: int) -> None:
    """Store the group vector of elements elem..elem+3 (of this block) into wt."""
    f.raw(f"  store <8 x i32> {v}, ptr {f.gep('%wtb', str(8 * elem))}, align 1")


def _store_f(f: _Fn, v: str, base: str, sub: int) -> None:
    f.raw(f"  store <8 x float> {v}, ptr {f.gep(base, str(L * sub), 'float')}, align 4")


def _rows_at(f: _Fn, off: str) -> list[str]:
    return [f.gep(f"%base{r}", off) for r in range(L)]


def _load_dwords(f: _Fn, ptrs: list[str], at: int, k: int) -> list[str]:
    return [f.load(f"<{k} x i32>", f.gep(p, str(at))) for p in ptrs]


def _unpack_q4_0(f: _Fn, ps: list[str]) -> None:
    _store_f(f, _lanes_f16(f, ps), "%wsb", 0)
    v = _transpose(f, _load_dwords(f, ps, 2, 4), 4)
    for m in range(4):  # low nibbles: elements 4m.., high: 16 + 4m..
        _store_group(f, _and(f, v[m], 0x0F0F0F0F), 4 * m)
        _store_group(f, _and(f, _shr(f, v[m], 4), 0x0F0F0F0F), 16 + 4 * m)


def _unpack_q8_0(f: _Fn, ps: list[str]) -> None:
    _store_f(f, _lanes_f16(f, ps), "%wsb", 0)
    v = _transpose(f, _load_dwords(f, ps, 2, 8), 8)
    for m in range(8):
        _store_group(f, f.v(f"xor <8 x i32> {v[m]}, {_splat('i32', L, 0x80808080 - 2**32)}"),
                     4 * m)


def _unpack_q4_k(f: _Fn, ps: list[str]) -> None:
    d = _lanes_f16(f, ps)
    dmin = _lanes_f16(f, [f.gep(p, "2") for p in ps])
    per_row = [k_scales(f, p) for p in ps]  # (sc[8], mn[8]) per row
    for j in range(8):
        sc = f.v(f"sitofp <8 x i32> {_lanes_i32(f, [s[0][j] for s in per_row])} to <8 x float>")
        mn = f.v(f"sitofp <8 x i32> {_lanes_i32(f, [s[1][j] for s in per_row])} to <8 x float>")
        _store_f(f, f.v(f"fmul <8 x float> {d}, {sc}"), "%wsb", j)
        _store_f(f, f.v(f"fmul <8 x float> {dmin}, {mn}"), "%wmb", j)
    for g in range(4):  # 64 elements per 32 bytes: low nibbles 64g.., high 64g + 32..
        v = _transpose(f, _load_dwords(f, ps, 16 + 32 * g, 8), 8)
        for m in range(8):
            _store_group(f, _and(f, v[m], 0x0F0F0F0F), 64 * g + 4 * m)
            _store_group(f, _and(f, _shr(f, v[m], 4), 0x0F0F0F0F), 64 * g + 32 + 4 * m)


def _unpack_q6_k(f: _Fn, ps: list[str]) -> None:
    d = _lanes_f16(f, [f.gep(p, "208") for p in ps])
    for s in range(16):
        vals = []
        for p in ps:
            b = f.load("i8", f.gep(p, str(192 + s)))
            vals.append(f.v(f"sext i8 {b} to i32"))
        sc = f.v(f"sitofp <8 x i32> {_lanes_i32(f, vals)} to <8 x float>")
        _store_f(f, f.v(f"fmul <8 x float> {d}, {sc}"), "%wsb", s)
    for h in range(2):  # 128 elements: ql[64h ..], ql[64h + 32 ..], qh[32h ..]
        a = _transpose(f, _load_dwords(f, ps, 64 * h, 8), 8)
        b = _transpose(f, _load_dwords(f, ps, 64 * h + 32, 8), 8)
        q = _transpose(f, _load_dwords(f, ps, 128 + 32 * h, 8), 8)
        for m in range(8):
            e0 = 128 * h + 4 * m
            lo_a, lo_b = _and(f, a[m], 0x0F0F0F0F), _and(f, b[m], 0x0F0F0F0F)
            hi_a, hi_b = _and(f, _shr(f, a[m], 4), 0x0F0F0F0F), _and(f, _shr(f, b[m], 4),
                                                                     0x0F0F0F0F)
            _store_group(f, _or(f, lo_a, _shl(f, _and(f, q[m], 0x03030303), 4)), e0)
            _store_group(f, _or(f, lo_b, _shl(f, _and(f, q[m], 0x0C0C0C0C), 2)), e0 + 32)
            _store_group(f, _or(f, hi_a, _and(f, q[m], 0x30303030)), e0 + 64)
            _store_group(f, _or(f, hi_b, _and(f, _shr(f, q[m], 2), 0x30303030)), e0 + 96)


def _unpack_lut(f: _Fn, ps: list[str], name: str, scale: str, at: int) -> None:
    """MXFP4 / IQ4_NL: the Q4_0 nibble layout (qs at byte ``at``), each nibble replaced
    by its table entry + the table's offset (_ir.unsigned_table)."""
    _store_f(f, scale, "%wsb", 0)
    table = unsigned_table(name)
    v = _transpose(f, _load_dwords(f, ps, at, 4), 4)
    for m in range(4):
        for half, e in ((_and(f, v[m], 0x0F0F0F0F), 4 * m),
                        (_and(f, _shr(f, v[m], 4), 0x0F0F0F0F), 16 + 4 * m)):
            b = f.v(f"bitcast <8 x i32> {half} to <32 x i8>")
            u = f.lookup16(b, table)
            _store_group(f, f.v(f"bitcast <32 x i8> {u} to <8 x i32>"), e)


def _unpack_mxfp4(f: _Fn, ps: list[str]) -> None:
    e = []
    for p in ps:
        e.append(f.v(f"zext i8 {f.load('i8', p)} to i32"))
    _unpack_lut(f, ps, "mxfp4", f.e8m0_half(_lanes_i32(f, e), L), 1)


def _unpack_iq4_nl(f: _Fn, ps: list[str]) -> None:
    _unpack_lut(f, ps, "iq4_nl", _lanes_f16(f, ps), 2)


def _scaled(f: _Fn, scale: str, per_row: list[str]) -> str:
    """<8 x float>: scale (one lane per row) × the rows' integers per_row."""
    v = f.v(f"sitofp <8 x i32> {_lanes_i32(f, per_row)} to <8 x float>")
    return f.v(f"fmul <8 x float> {scale}, {v}")


def _unpack_q5_k(f: _Fn, ps: list[str]) -> None:
    # Q4_K's scales and nibbles (at 48), bit j of qh[l] (at 16) as the 5th bit
    d = _lanes_f16(f, ps)
    dmin = _lanes_f16(f, [f.gep(p, "2") for p in ps])
    per_row = [k_scales(f, p) for p in ps]
    for j in range(8):
        _store_f(f, _scaled(f, d, [s[0][j] for s in per_row]), "%wsb", j)
        _store_f(f, _scaled(f, dmin, [s[1][j] for s in per_row]), "%wmb", j)
    qh = _transpose(f, _load_dwords(f, ps, 16, 8), 8)
    for g in range(4):
        v = _transpose(f, _load_dwords(f, ps, 48 + 32 * g, 8), 8)
        for m in range(8):
            for j, lo in ((2 * g, _and(f, v[m], 0x0F0F0F0F)),
                          (2 * g + 1, _and(f, _shr(f, v[m], 4), 0x0F0F0F0F))):
                hb = _shl(f, _and(f, _shr(f, qh[m], j), 0x01010101), 4)
                _store_group(f, _or(f, lo, hb), 32 * j + 4 * m)


def _unpack_iq4_xs(f: _Fn, ps: list[str]) -> None:
    # per 32 elements: IQ4_NL's table (+ 128) on 16 bytes at 8 + 16j, scale d · (ls - 32)
    d = _lanes_f16(f, ps)
    per_row = [iq4_xs_scales(f, p) for p in ps]
    table = unsigned_table("iq4_nl")
    for j in range(8):
        _store_f(f, _scaled(f, d, [s[j] for s in per_row]), "%wsb", j)
        v = _transpose(f, _load_dwords(f, ps, 8 + 16 * j, 4), 4)
        for m in range(4):
            for half, e in ((_and(f, v[m], 0x0F0F0F0F), 32 * j + 4 * m),
                            (_and(f, _shr(f, v[m], 4), 0x0F0F0F0F), 32 * j + 16 + 4 * m)):
                u = f.lookup16(f.v(f"bitcast <8 x i32> {half} to <32 x i8>"), table)
                _store_group(f, f.v(f"bitcast <32 x i8> {u} to <8 x i32>"), e)


def _unpack_q3_k(f: _Fn, ps: list[str]) -> None:
    # element 32p + l: 2 bits of qs[32(p // 4) + l] (at 32) | bit p of hmask[l] (at 0)
    # as the 3rd, unsigned 0..7 (ggml's value + 4); 16 scales d · (sc - 32)
    d = _lanes_f16(f, [f.gep(p, "108") for p in ps])
    per_row = [q3_scales(f, p) for p in ps]
    for s in range(16):
        _store_f(f, _scaled(f, d, [sc[s] for sc in per_row]), "%wsb", s)
    hm = _transpose(f, _load_dwords(f, ps, 0, 8), 8)
    for h in range(2):
        a = _transpose(f, _load_dwords(f, ps, 32 + 32 * h, 8), 8)
        for s in range(4):
            p = 4 * h + s
            for m in range(8):
                lo = _and(f, _shr(f, a[m], 2 * s), 0x03030303)
                hb = _shl(f, _and(f, _shr(f, hm[m], p), 0x01010101), 2)
                _store_group(f, _or(f, lo, hb), 32 * p + 4 * m)


def _unpack_q2_k(f: _Fn, ps: list[str]) -> None:
    # element 32p + l: 2 bits of qs[32(p // 4) + l] (at 16); per 16 elements a byte
    # (scale low nibble, min high) → d · sc, dmin · m
    d = _lanes_f16(f, [f.gep(p, "80") for p in ps])
    dmin = _lanes_f16(f, [f.gep(p, "82") for p in ps])
    for s in range(16):
        b = [f.byte_at(p, s) for p in ps]
        _store_f(f, _scaled(f, d, [f.v(f"and i32 {v}, 15") for v in b]), "%wsb", s)
        _store_f(f, _scaled(f, dmin, [f.v(f"lshr i32 {v}, 4") for v in b]), "%wmb", s)
    for h in range(2):
        a = _transpose(f, _load_dwords(f, ps, 16 + 32 * h, 8), 8)
        for s in range(4):
            for m in range(8):
                _store_group(f, _and(f, _shr(f, a[m], 2 * s), 0x03030303),
                             32 * (4 * h + s) + 4 * m)

_UNPACK = {"q4_0": _unpack_q4_0, "q8_0": _unpack_q8_0, "q4_k": _unpack_q4_k,
           "q6_k": _unpack_q6_k, "mxfp4": _unpack_mxfp4, "iq4_nl": _unpack_iq4_nl,
           "q5_k": _unpack_q5_k, "iq4_xs": _unpack_iq4_xs, "q3_k": _unpack_q3_k,
           "q2_k": _unpack_q2_k}


def unpack_fn(name: str, bb: int, el: int, sub: int) -> str:
    """void unpack(ptr row, i64 rs, i64 nb, ptr wt, ptr ws, ptr wm): 8 rows (row + r·rs)
    of nb blocks of bb bytes (el elements, sub-blocks of sub) each → the tile layout of
    ``gemm``."""
    f = _Fn()
    f.raw("entry:")
    for r in range(L):
        f.raw(f"  %ro{r} = mul i64 %rs, {r}")
        f.raw(f"  %base{r} = getelementptr inbounds i8, ptr %row, i64 %ro{r}")
    f.block_loop()
    off = f.v(f"mul i64 %b, {bb}")
    f.raw(f"  %wto = mul i64 %b, {8 * el}")
    f.raw("  %wtb = getelementptr inbounds i8, ptr %wt, i64 %wto")
    f.raw(f"  %wso = mul i64 %b, {el // sub * L}")
    f.raw("  %wsb = getelementptr inbounds float, ptr %ws, i64 %wso")
    f.raw("  %wmb = getelementptr inbounds float, ptr %wm, i64 %wso")
    _UNPACK[name](f, _rows_at(f, off))
    f.end_block_loop()
    f.raw("  ret void")
    head = (f"define weak_odr void @efedge_unpack_{name}(ptr %row, i64 %rs, i64 %nb, ptr %wt, "
            "ptr %ws, ptr %wm) nounwind {")
    return "\n".join([head, *f.lines, "}"])
