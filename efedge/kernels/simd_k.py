"""The super-block bodies of the integer row kernels (``simd``): Q2_K, Q3_K, Q4_K, Q5_K,
Q6_K and IQ4_XS, 256 elements each, against Q8_K activations (llama.cpp's vec_dot_type
for all six).

Every body unpacks its super-block into 8 vectors of 32 unsigned 8-bit weights (elements
32j .. 32j + 31 in order) and the integer scale of each vector lane (one per 32 elements,
or two per 32 for the 16-element sub-blocks of Q2_K / Q3_K / Q6_K: ``_halves``). Then,
per token (``_sum``),

    acc  += float(Σ_j scale_j · Σ_e w·xq) · (d · xd)          (8 int32 lanes)
    corr += float(Σ_g coef_g · bsum_g) · (c · xd) · -off     (one int32 sum)

where bsum_g = Σ xq over 16 elements (the xs of the Q8_K pack; one vector product with
the 16 coefficients). The correction carries what the unsigned form adds to ggml's
signed one: off × the sub-block sums for the offset types (Q3_K 4, Q6_K 32, IQ4_XS 128:
coef = scale, c = d), or the mins of Q2_K / Q4_K / Q5_K (coef = min, c = dmin, off = 1).
Up to the final float products this is ggml_vec_dot_*_q8_K's integer sum, exactly. The
scales are unpacked with vector operations where they can be: as scalars they cost
more than the block's dot products (Q3_K: 131 vs 85 ns per 2048-element row).

Super-block layouts: see quant_k.
"""

from __future__ import annotations

from ._ir import PMADD, _Fn, _splat, unsigned_table


def _band(f: _Fn, v: str, m: int) -> str:
    return f.v(f"and <32 x i8> {v}, {_splat('i8', 32, m)}")


def _shl(f: _Fn, v: str, k: int) -> str:
    return f.v(f"shl <32 x i8> {v}, {_splat('i8', 32, k)}") if k else v


def _shr(f: _Fn, v: str, k: int) -> str:
    return f.v(f"lshr <32 x i8> {v}, {_splat('i8', 32, k)}") if k else v


def _pk(f: _Fn, v: str, n: int, signed: bool) -> str:
    """The scale vector v (<n x i32>) as _sum's small-weight path multiplies with it: each
    lane's scale in both of its 16-bit halves (the i16 pair vpdpwssd / vpmaddwd read), on
    hosts with that path (PMADD); v itself elsewhere."""
    if not PMADD:
        return v
    lo = f.v(f"and <{n} x i32> {v}, {_splat('i32', n, 65535)}") if signed else v
    hi = f.v(f"shl <{n} x i32> {v}, {_splat('i32', n, 16)}")
    return f.v(f"or <{n} x i32> {lo}, {hi}")


def _sum(f: _Fn, tok, ws: list[str], svs: list[str], d: str, coef: str, c: str,
         off: int, small: bool = False) -> list:
    """The per-token step shared by every body (see the module docstring). coef: <16 x
    i32>, the correction's coefficient of each of the super-block's 16 Q8_K sums; returns
    the new (acc, corr) per token. small: every weight is at most 127 (all but IQ4_XS's
    shifted table), so the scaled sums take vpmaddubsw + vpdpwssd (``_Fn.dot32_scaled``,
    svs from ``_pk``) where the host has them: the same integers as vpdpbusd, vpmulld
    and vpaddd, so the same bits, at half the vector instructions (llama.cpp's AVX2
    K-quant dots multiply so too: maddubs, then madd with the scales)."""
    out = []
    for xq, xd, xs, acc, cor in tok:
        iacc = "zeroinitializer"
        for j in range(8):
            xv = f.load("<32 x i8>", f.gep(xq, str(32 * j)))
            if small and PMADD:
                iacc = f.dot32_scaled(iacc, ws[j], xv, svs[j])
                continue
            s = f.dot32(ws[j], xv)
            iacc = f.v(f"add <8 x i32> {iacc}, {f.v(f'mul <8 x i32> {s}, {svs[j]}')}")
        prod = f.v(f"mul <16 x i32> {f.load('<16 x i32>', xs, 4)}, {coef}")
        csum = f.v(f"call i32 @llvm.vector.reduce.add.v16i32(<16 x i32> {prod})")
        dx = f.load("float", xd, 4)
        fi = f.v(f"sitofp <8 x i32> {iacc} to <8 x float>")
        acc = f.fma(fi, f.splat_f(f.v(f"fmul float {d}, {dx}")), acc)
        cx = f.v(f"fmul float {c}, {dx}")
        # off is a power of two: c·xd·-off is exact whichever way it is grouped
        cm = f.v(f"fneg float {cx}") if off == 1 else f.v(f"fmul float {cx}, {-off:.1f}")
        cor = f.fma1(cm, f.i2f(csum), cor)
        out.append((acc, cor))
    return out


def _halves(f: _Fn, sc: str, j: int) -> str:
    """<8 x i32>: lanes 0-3 sc[2j], lanes 4-7 sc[2j + 1] (sc: <16 x i32>, one scale per
    16 elements; dot32's lanes 0-3 are elements 0-15 of 32)."""
    idx = "<" + ", ".join(f"i32 {2 * j + lane // 4}" for lane in range(8)) + ">"
    return f.v(f"shufflevector <16 x i32> {sc}, <16 x i32> poison, <8 x i32> {idx}")


def _bytes16(f: _Fn, v: str, op: str, k) -> str:
    """<16 x i8> op (lshr, and …) with a constant, or a per-byte list of constants."""
    ks = k if isinstance(k, list) else [k] * 16
    return f.v(f"{op} <16 x i8> {v}, <" + ", ".join(f"i8 {x}" for x in ks) + ">")


def k_scales(f: _Fn, p: str) -> tuple[list[str], list[str]]:
    """The 8 (scale, min) 6-bit pairs of a Q4_K / Q5_K super-block, as i32."""
    b = [f.byte_at(p, 4 + i) for i in range(12)]
    sc, mn = [], []
    for j in range(8):
        if j < 4:
            sc.append(f.v(f"and i32 {b[j]}, 63"))
            mn.append(f.v(f"and i32 {b[4 + j]}, 63"))
        else:
            lo = f.v(f"and i32 {b[4 + j]}, 15")
            hi = f.v(f"and i32 {f.v(f'lshr i32 {b[j - 4]}, 2')}, 48")
            sc.append(f.v(f"or i32 {lo}, {hi}"))
            lo = f.v(f"lshr i32 {b[4 + j]}, 4")
            hi = f.v(f"and i32 {f.v(f'lshr i32 {b[j]}, 2')}, 48")
            mn.append(f.v(f"or i32 {lo}, {hi}"))
    return sc, mn


def _consts(ty: str, vals) -> str:
    return "<" + ", ".join(f"{ty} {v}" for v in vals) + ">"


def k_scales16(f: _Fn, p: str) -> str:
    """k_scales as one <16 x i32> (the 8 scales, then the 8 mins), in vector operations:
    scale / min j < 4 are the low 6 bits of bytes j / 4 + j; j >= 4 take 4 bits from
    byte 4 + j and their top 2 from the top of bytes j - 4 / j."""
    b = f.load("<16 x i8>", f.gep(p, "4"))  # bytes 4 .. 19 (the 12 scale bytes first)
    lo_i = [0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 8, 9, 10, 11]
    hi_i = [0, 0, 0, 0, 0, 1, 2, 3, 0, 0, 0, 0, 4, 5, 6, 7]
    lo = f.v(f"shufflevector <16 x i8> {b}, <16 x i8> poison, <16 x i32> {_consts('i32', lo_i)}")
    lo = _bytes16(f, lo, "lshr", [0] * 12 + [4] * 4)
    lo = _bytes16(f, lo, "and", ([63] * 4 + [15] * 4) * 2)
    hi = f.v(f"shufflevector <16 x i8> {b}, <16 x i8> poison, <16 x i32> {_consts('i32', hi_i)}")
    hi = _bytes16(f, _bytes16(f, hi, "lshr", 2), "and", ([0] * 4 + [48] * 4) * 2)
    return f.v(f"zext <16 x i8> {f.v(f'or <16 x i8> {lo}, {hi}')} to <16 x i32>")


def _lane(f: _Fn, v: str, n: int, i: int) -> str:
    """<8 x i32>: lane i of the <n x i32> v in every lane."""
    return f.v(f"shufflevector <{n} x i32> {v}, <{n} x i32> poison, <8 x i32> "
               f"{_consts('i32', [i] * 8)}")


def _pairs(f: _Fn, v: str, n: int, first: int) -> str:
    """<16 x i32>: lanes first .. first + 7 of the <n x i32> v, each twice."""
    idx = _consts("i32", [first + i // 2 for i in range(16)])
    return f.v(f"shufflevector <{n} x i32> {v}, <{n} x i32> poison, <16 x i32> {idx}")


def iq4_xs_scales8(f: _Fn, p: str) -> str:
    """iq4_xs_scales as one <8 x i32>, in vector operations."""
    sl = f.load("<4 x i8>", f.gep(p, "4"))
    lo = f.v(f"shufflevector <4 x i8> {sl}, <4 x i8> poison, <8 x i32> "
             f"{_consts('i32', [j // 2 for j in range(8)])}")
    lo = f.v(f"lshr <8 x i8> {lo}, {_consts('i8', [4 * (j % 2) for j in range(8)])}")
    lo = f.v(f"and <8 x i8> {lo}, {_splat('i8', 8, 15)}")
    sh = f.v(f"insertelement <8 x i16> poison, i16 {f.load('i16', f.gep(p, '2'))}, i32 0")
    sh = f.v(f"shufflevector <8 x i16> {sh}, <8 x i16> poison, <8 x i32> zeroinitializer")
    sh = f.v(f"lshr <8 x i16> {sh}, {_consts('i16', [2 * j for j in range(8)])}")
    hi = f.v(f"and <8 x i16> {sh}, {_splat('i16', 8, 3)}")
    hi = f.v(f"shl <8 x i8> {f.v(f'trunc <8 x i16> {hi} to <8 x i8>')}, {_splat('i8', 8, 4)}")
    u = f.v(f"or <8 x i8> {lo}, {hi}")
    u = f.v(f"sub <8 x i8> {u}, {_splat('i8', 8, 32)}")
    return f.v(f"sext <8 x i8> {u} to <8 x i32>")


def q3_scales(f: _Fn, p: str) -> list[str]:
    """The 16 signed 6-bit scales of a Q3_K super-block (12 bytes at 96, minus 32), i32."""
    b = [f.byte_at(p, 96 + i) for i in range(12)]
    out = []
    for i in range(16):
        lo = f.v(f"and i32 {f.v(f'lshr i32 {b[i % 8]}, {4 * (i // 8)}')}, 15")
        hi = f.v(f"and i32 {f.v(f'lshr i32 {b[8 + i % 4]}, {2 * (i // 4)}')}, 3")
        u = f.v(f"or i32 {lo}, {f.v(f'shl i32 {hi}, 4')}")
        out.append(f.v(f"sub i32 {u}, 32"))
    return out


def q3_scales16(f: _Fn, p: str) -> str:
    """q3_scales as one <16 x i32>, in vector operations (the decode kernels: the scalar
    form cost more than the block's dot products)."""
    b8 = f.load("<8 x i8>", f.gep(p, "96"))
    b4 = f.load("<4 x i8>", f.gep(p, "104"))
    idx = "<" + ", ".join(f"i32 {i % 8}" for i in range(16)) + ">"
    lo = f.v(f"shufflevector <8 x i8> {b8}, <8 x i8> poison, <16 x i32> {idx}")
    lo = _bytes16(f, _bytes16(f, lo, "lshr", [4 * (i // 8) for i in range(16)]), "and", 15)
    idx = "<" + ", ".join(f"i32 {i % 4}" for i in range(16)) + ">"
    hi = f.v(f"shufflevector <4 x i8> {b4}, <4 x i8> poison, <16 x i32> {idx}")
    hi = _bytes16(f, _bytes16(f, hi, "lshr", [2 * (i // 4) for i in range(16)]), "and", 3)
    u = f.v(f"or <16 x i8> {lo}, {_bytes16(f, hi, 'shl', 4)}")
    return f.v(f"sext <16 x i8> {_bytes16(f, u, 'sub', 32)} to <16 x i32>")


def iq4_xs_scales(f: _Fn, p: str) -> list[str]:
    """The 8 signed 6-bit scales of an IQ4_XS super-block (minus 32), i32: low 4 bits
    from scales_l (byte 4 + j/2), high 2 from the u16 scales_h at 2."""
    sh = f.v(f"or i32 {f.byte_at(p, 2)}, {f.v(f'shl i32 {f.byte_at(p, 3)}, 8')}")
    sl = [f.byte_at(p, 4 + i) for i in range(4)]
    out = []
    for j in range(8):
        lo = f.v(f"and i32 {f.v(f'lshr i32 {sl[j // 2]}, {4 * (j % 2)}')}, 15")
        hi = f.v(f"and i32 {f.v(f'lshr i32 {sh}, {2 * j}')}, 3")
        u = f.v(f"or i32 {lo}, {f.v(f'shl i32 {hi}, 4')}")
        out.append(f.v(f"sub i32 {u}, 32"))
    return out


def q4_k(f: _Fn, p: str, tok) -> list:
    # Σ_j d·sc_j·Σ(q x) − dmin·m_j·Σ x; sub-block j: nibble j % 2 of 32 bytes at 16 + 32(j//2)
    d, dmin = f.h2f(p), f.h2f(f.gep(p, "2"))
    sm = k_scales16(f, p)
    ws = []
    for g in range(4):
        q = f.load("<32 x i8>", f.gep(p, str(16 + 32 * g)))
        ws += [_band(f, q, 15), _shr(f, q, 4)]
    sp = _pk(f, sm, 16, False)
    return _sum(f, tok, ws, [_lane(f, sp, 16, j) for j in range(8)], d, _pairs(f, sm, 16, 8),
                dmin, 1, True)


def q5_k(f: _Fn, p: str, tok) -> list:
    # Q4_K's nibbles (at 48) plus bit j of qh[l] (32 bytes at 16) as the 5th bit: 0..31
    d, dmin = f.h2f(p), f.h2f(f.gep(p, "2"))
    sm = k_scales16(f, p)
    qh = f.load("<32 x i8>", f.gep(p, "16"))
    ws = []
    for g in range(4):
        q = f.load("<32 x i8>", f.gep(p, str(48 + 32 * g)))
        for j, lo in ((2 * g, _band(f, q, 15)), (2 * g + 1, _shr(f, q, 4))):
            hb = _shl(f, _band(f, _shr(f, qh, j), 1), 4)
            ws.append(f.v(f"or <32 x i8> {lo}, {hb}"))
    sp = _pk(f, sm, 16, False)
    return _sum(f, tok, ws, [_lane(f, sp, 16, j) for j in range(8)], d, _pairs(f, sm, 16, 8),
                dmin, 1, True)


def q6_k(f: _Fn, p: str, tok) -> list:
    # 6-bit q = ql nibble | 2 qh bits, minus 32; int8 scales per 16 elements
    d = f.h2f(f.gep(p, "208"))
    sc = f.v(f"sext <16 x i8> {f.load('<16 x i8>', f.gep(p, '192'))} to <16 x i32>")
    sp = _pk(f, sc, 16, True)
    ws, svs = [], []
    for h in range(2):
        qa = f.load("<32 x i8>", f.gep(p, str(64 * h)))
        qb = f.load("<32 x i8>", f.gep(p, str(64 * h + 32)))
        qh = f.load("<32 x i8>", f.gep(p, str(128 + 32 * h)))
        ws.append(f.v(f"or <32 x i8> {_band(f, qa, 15)}, {_shl(f, _band(f, qh, 3), 4)}"))
        ws.append(f.v(f"or <32 x i8> {_band(f, qb, 15)}, {_shl(f, _band(f, qh, 12), 2)}"))
        ws.append(f.v(f"or <32 x i8> {_shr(f, qa, 4)}, {_band(f, qh, 48)}"))
        ws.append(f.v(f"or <32 x i8> {_shr(f, qb, 4)}, {_band(f, _shr(f, qh, 2), 48)}"))
        svs += [_halves(f, sp, 4 * h + c) for c in range(4)]
    return _sum(f, tok, ws, svs, d, sc, d, 32, True)


def q3_k(f: _Fn, p: str, tok) -> list:
    # element 32p + l: 2 bits (2(p % 4) of qs[32(p // 4) + l], qs at 32) | bit p of
    # hmask[l] (at 0) as the 3rd; ggml's value is that minus 4 (the bit clear: minus 4)
    d = f.h2f(f.gep(p, "108"))
    sc = q3_scales16(f, p)
    hm = f.load("<32 x i8>", p)
    qs = [f.load("<32 x i8>", f.gep(p, str(32 + 32 * h))) for h in range(2)]
    ws = []
    for j in range(8):
        lo = _band(f, _shr(f, qs[j // 4], 2 * (j % 4)), 3)
        hb = _shl(f, _band(f, _shr(f, hm, j), 1), 2)
        ws.append(f.v(f"or <32 x i8> {lo}, {hb}"))
    sp = _pk(f, sc, 16, True)
    return _sum(f, tok, ws, [_halves(f, sp, j) for j in range(8)], d, sc, d, 4, True)


def q2_k(f: _Fn, p: str, tok) -> list:
    # element 32p + l: 2 bits (2(p % 4) of qs[32(p // 4) + l], qs at 16); per 16 elements
    # a byte at g: scale = low nibble, min = high nibble; d at 80, dmin at 82
    d, dmin = f.h2f(f.gep(p, "80")), f.h2f(f.gep(p, "82"))
    b = f.load("<16 x i8>", p)
    sc = f.v(f"zext <16 x i8> {_bytes16(f, b, 'and', 15)} to <16 x i32>")
    mn = f.v(f"zext <16 x i8> {_bytes16(f, b, 'lshr', 4)} to <16 x i32>")
    qs = [f.load("<32 x i8>", f.gep(p, str(16 + 32 * h))) for h in range(2)]
    ws = [_band(f, _shr(f, qs[j // 4], 2 * (j % 4)), 3) for j in range(8)]
    sp = _pk(f, sc, 16, False)
    return _sum(f, tok, ws, [_halves(f, sp, j) for j in range(8)], d, mn, dmin, 1, True)


def iq4_xs(f: _Fn, p: str, tok) -> list:
    # IQ4_NL's table (shifted by 128) per 32 elements (16 bytes at 8 + 16j), a signed
    # 6-bit scale each; ggml: d · xd · Σ_j (ls_j - 32) · Σ kvalue·xq
    d = f.h2f(p)
    sc = iq4_xs_scales8(f, p)
    table = unsigned_table("iq4_nl")
    ws = [f.lookup16(f.nibbles32(f.load("<16 x i8>", f.gep(p, str(8 + 16 * j)))), table)
          for j in range(8)]
    return _sum(f, tok, ws, [_lane(f, sc, 8, j) for j in range(8)], d, _pairs(f, sc, 8, 0),
                d, 128)
