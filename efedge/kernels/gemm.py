"""Tiled quantized mat-mul for prompt processing, in LLVM vector IR: 8 weight rows × NT
tokens per step, one vector lane per row.

The one-row kernels of ``simd`` keep one lane per group of 4 elements, so every block
of every (row, token) pair ends in a convert, a scale product and an FMA, and every
(row, token) pair in a horizontal sum. Here a tile of 8 rows is first unpacked
(``unpack_*``) into 8-bit values laid out so that one 32-byte vector holds the same 4
elements of the 8 rows; ``vpdpbusd`` against those 4 activation bytes broadcast then
adds 4 products to each row's lane. The float work per block is shared by the 8 rows,
the results come out as 8 adjacent floats of a token's output row, and the unpacked tile
is reused for every token (llama.cpp gets the same effect from repacking the weights at
load; here the weights stay in the mapped file and a tile is unpacked when it is used).

Unpacked tile of 8 rows, n elements each (``tile_shapes``):
    wt  uint8 [n · 8]:    element e of row r at wt[8·(e - e % 4) + 4·r + e % 4], as an
                          unsigned value (Q4_0 nibble, Q8_0 byte + 128, Q4_K nibble,
                          Q6_K 6-bit value, MXFP4 / IQ4_NL table entry + 12 / + 128)
    ws  float32 [n/S, 8]: scale of sub-block s of row r (S = 32 elements; Q6_K 16):
                          Q4_0 / Q8_0 / IQ4_NL d, MXFP4 E8M0 / 2, Q4_K d·sc, Q6_K d·sc
    wm  float32 [n/S, 8]: Q4_K dmin·m (the sub-block's offset); unused otherwise
Activations (``gemm_acts``): xq int8 [T, n]; xdb float32 [T, n/B]: the scale of each
activation block of B elements (32 for Q8_0, 256 for Q8_K); xsum int32 [T, n/S]: Σ xq
over each sub-block. Per (row, token):

    acc = Σ_B  xdb · Σ_s∈B ( float(Σ_e w·xq − off·xsum_s) · ws_s  − wm_s · xsum_s )

with off = 8 (Q4_0), 128 (Q8_0, IQ4_NL), 12 (MXFP4), 32 (Q6_K), 0 (Q4_K): the same
operations in the same order whatever the number of tokens in a call, so a product does
not depend on how tokens are batched. (The decode kernels sum in another order: prefill
and decode agree to float rounding, not bit for bit.)
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from ._ir import _VNNI_FN, LUT_DECL, _Fn, _splat, data_ptr, link, row_base

L = 8  # rows per tile: one lane each
NT = 8  # tokens per step (4 measured 5% slower)
TOKEN_STEPS = (8, 4, 2, 1)  # a call's last tokens go 4, 2, 1 at a time

# type → (block bytes, elements per block, sub-block elements, integer offset)
_TYPES = {
    "q4_0": (18, 32, 32, 8),
    "q8_0": (34, 32, 32, 128),
    "q4_k": (144, 256, 32, 0),
    "q6_k": (210, 256, 16, 32),
    "mxfp4": (17, 32, 32, 12),
    "iq4_nl": (18, 32, 32, 128),
}

_DECLS = """
declare <8 x float> @llvm.fma.v8f32(<8 x float>, <8 x float>, <8 x float>)
""" + (f"declare <8 x i32> @{_VNNI_FN}(<8 x i32>, <8 x i32>, <8 x i32>)\n" if _VNNI_FN
       else "") + LUT_DECL


def tile_shapes(name: str, n: int) -> tuple[int, int]:
    """(wt bytes, ws / wm floats) of an unpacked tile of rows of n elements."""
    sub = _TYPES[name][2]
    return 8 * n, n // sub * L


# -- unpacking ------------------------------------------------------------------------------

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
    from .simd import _k_scales

    d = _lanes_f16(f, ps)
    dmin = _lanes_f16(f, [f.gep(p, "2") for p in ps])
    per_row = [_k_scales(f, p) for p in ps]  # (sc[8], mn[8]) per row
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
    by its table entry + the table's offset (simd.unsigned_table)."""
    from .simd import unsigned_table

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


_UNPACK = {"q4_0": _unpack_q4_0, "q8_0": _unpack_q8_0, "q4_k": _unpack_q4_k,
           "q6_k": _unpack_q6_k, "mxfp4": _unpack_mxfp4, "iq4_nl": _unpack_iq4_nl}


def _unpack_fn(name: str) -> str:
    """void unpack(ptr row, i64 rs, i64 nb, ptr wt, ptr ws, ptr wm): 8 rows (row + r·rs)
    of nb blocks each → the tile layout above."""
    bb, el, sub, _ = _TYPES[name]
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


# -- the product ----------------------------------------------------------------------------

def _dpbusd(f: _Fn, acc: str, w: str, x: str) -> str:
    """acc + lane sums of 4 products u8 w × s8 x."""
    if _VNNI_FN:
        return f.v(f"call <8 x i32> @{_VNNI_FN}(<8 x i32> {acc}, <8 x i32> {w}, <8 x i32> {x})")
    wb = f.v(f"bitcast <8 x i32> {w} to <32 x i8>")
    xb = f.v(f"bitcast <8 x i32> {x} to <32 x i8>")
    return f.v(f"add <8 x i32> {acc}, {f.dot32(wb, xb)}")


def _gemm_fn(name: str, nt: int) -> str:
    """void gemm(ptr wt, ptr ws, ptr wm, i64 nb, ptr xq, i64 ldq, ptr xd, i64 ldd, ptr xs,
    i64 lds, ptr out, i64 ldo): out[t·ldo + r] for 8 rows r of the tile and nt tokens t
    (token t's activations at xq + t·ldq, xd + t·ldd, xs + t·lds)."""
    bb, el, sub, off = _TYPES[name]
    nsub = el // sub
    f = _Fn()
    f.raw("entry:")
    phis_at = f.block_loop()
    xq_t = [f.gep("%xq", f.v(f"mul i64 %ldq, {t}")) for t in range(nt)]
    xs_t = [f.gep("%xs", f.v(f"mul i64 %lds, {t}"), "i32") for t in range(nt)]
    e0 = f.v(f"mul i64 %b, {el}")
    s0 = f.v(f"mul i64 %b, {nsub}")
    accb = ["zeroinitializer"] * nt
    for j in range(nsub):
        s = f.v(f"add i64 {s0}, {j}")
        xsum = [f.load("i32", f.gep(xs_t[t], s, "i32"), 4) for t in range(nt)]
        isum = []
        for t in range(nt):
            if off:
                isum.append(f.splat_i(f.v(f"mul i32 {xsum[t]}, {-off}")))
            else:
                isum.append("zeroinitializer")
        for g in range(sub // 4):
            e = f.v(f"add i64 {e0}, {j * sub + 4 * g}")
            w = f.load("<8 x i32>", f.gep("%wt", f.v(f"mul i64 {e}, 8")), 1)
            for t in range(nt):
                x = f.load("i32", f.gep(xq_t[t], e), 1)
                isum[t] = _dpbusd(f, isum[t], w, f.splat_i(x))
        wsv = f.load("<8 x float>", f.gep("%ws", f.v(f"mul i64 {s}, {L}"), "float"), 4)
        wmv = (f.load("<8 x float>", f.gep("%wm", f.v(f"mul i64 {s}, {L}"), "float"), 4)
               if name == "q4_k" else None)
        for t in range(nt):
            fi = f.v(f"sitofp <8 x i32> {isum[t]} to <8 x float>")
            accb[t] = f.fma(fi, wsv, accb[t])
            if wmv is not None:
                ms = f.v(f"fneg float {f.v(f'sitofp i32 {xsum[t]} to float')}")
                accb[t] = f.fma(wmv, f.splat_f(ms), accb[t])
    new = []
    for t in range(nt):
        dx = f.load("float", f.gep("%xd", f.v(f"add i64 %b, {f.v(f'mul i64 %ldd, {t}')}"),
                                   "float"), 4)
        new.append(f.fma(accb[t], f.splat_f(dx), f"%acc{t}"))
    f.lines[phis_at:phis_at] = [
        f"  %acc{t} = phi <8 x float> [zeroinitializer, %entry], [{new[t]}, %loop]"
        for t in range(nt)]
    f.end_block_loop()
    for t in range(nt):
        o = f.gep("%out", f.v(f"mul i64 %ldo, {t}"), "float")
        f.raw(f"  store <8 x float> {new[t]}, ptr {o}, align 4")
    f.raw("  ret void")
    head = (f"define weak_odr void @efedge_gemm_{name}_{nt}(ptr %wt, ptr %ws, ptr %wm, "
            "i64 %nb, ptr %xq, i64 %ldq, ptr %xd, i64 %ldd, ptr %xs, i64 %lds, ptr %out, "
            "i64 %ldo) nounwind {")
    return "\n".join([head, *f.lines, "}"])


_TEXT = None


def _ir_text() -> str:
    global _TEXT
    if _TEXT is None:
        parts = [_DECLS]
        for name in _TYPES:
            parts.append(_unpack_fn(name))
            for nt in TOKEN_STEPS:
                parts.append(_gemm_fn(name, nt))
        _TEXT = "\n".join(parts)
    return _TEXT


# -- numba entry points ------------------------------------------------------------------

_P8 = ir.IntType(8).as_pointer()
_I64 = ir.IntType(64)


def _make_unpack(name: str):
    """unpack_<name>(w, r0, wt, ws, wm): rows r0 .. r0+7 of the raw 2-D uint8 w."""
    bb = _TYPES[name][0]
    sym = f"efedge_unpack_{name}"

    def impl(typingctx, w, r0, wt, ws, wm):
        if not (all(isinstance(a, types.Array) for a in (w, wt, ws, wm)) and w.ndim == 2
                and isinstance(r0, types.Integer)):
            return None
        sig = types.void(w, r0, wt, ws, wm)

        def codegen(context, builder, sig, args):
            link(context, _ir_text())
            fnty = ir.FunctionType(ir.VoidType(), [_P8, _I64, _I64, _P8, _P8, _P8])
            fn = cgutils.get_or_insert_function(builder.module, fnty, sym)
            base, stride, nb = row_base(context, builder, sig.args[0], args[0], sig.args[1],
                                        args[1], bb)
            ptrs = [data_ptr(context, builder, sig.args[i], args[i]) for i in (2, 3, 4)]
            builder.call(fn, [base, stride, nb, *ptrs])
            return context.get_dummy_value()

        return sig, codegen

    impl.__name__ = f"unpack_{name}"
    return intrinsic(impl)


def _make_gemm(name: str, nt: int):
    """gemm_<name>_<nt>(wt, ws, wm, nb, xq, ldq, xd, ldd, xs, lds, out, ldo): arrays whose
    data start at the tile (wt, ws, wm), at the first token (xq, xd, xs) and at out[t0,
    r0]; ld*: elements from one token to the next."""
    sym = f"efedge_gemm_{name}_{nt}"

    def impl(typingctx, wt, ws, wm, nb, xq, ldq, xd, ldd, xs, lds, out, ldo):
        arrs = (wt, ws, wm, xq, xd, xs, out)
        ints = (nb, ldq, ldd, lds, ldo)
        if not (all(isinstance(a, types.Array) for a in arrs)
                and all(isinstance(i, types.Integer) for i in ints)):
            return None
        sig = types.void(wt, ws, wm, nb, xq, ldq, xd, ldd, xs, lds, out, ldo)

        def codegen(context, builder, sig, args):
            link(context, _ir_text())
            fnty = ir.FunctionType(ir.VoidType(), [_P8, _P8, _P8, _I64, _P8, _I64, _P8, _I64,
                                                   _P8, _I64, _P8, _I64])
            fn = cgutils.get_or_insert_function(builder.module, fnty, sym)
            vals = []
            for i, (ty, v) in enumerate(zip(sig.args, args, strict=True)):
                if isinstance(ty, types.Array):
                    vals.append(data_ptr(context, builder, ty, v))
                else:
                    vals.append(context.cast(builder, v, sig.args[i], types.int64))
            builder.call(fn, vals)
            return context.get_dummy_value()

        return sig, codegen

    impl.__name__ = f"gemm_{name}_{nt}"
    return intrinsic(impl)


unpack_q4_0 = _make_unpack("q4_0")
unpack_q8_0 = _make_unpack("q8_0")
unpack_q4_k = _make_unpack("q4_k")
unpack_q6_k = _make_unpack("q6_k")
gemm_q4_0_8, gemm_q4_0_4, gemm_q4_0_2, gemm_q4_0_1 = (
    _make_gemm("q4_0", 8), _make_gemm("q4_0", 4), _make_gemm("q4_0", 2), _make_gemm("q4_0", 1))
gemm_q8_0_8, gemm_q8_0_4, gemm_q8_0_2, gemm_q8_0_1 = (
    _make_gemm("q8_0", 8), _make_gemm("q8_0", 4), _make_gemm("q8_0", 2), _make_gemm("q8_0", 1))
gemm_q4_k_8, gemm_q4_k_4, gemm_q4_k_2, gemm_q4_k_1 = (
    _make_gemm("q4_k", 8), _make_gemm("q4_k", 4), _make_gemm("q4_k", 2), _make_gemm("q4_k", 1))
gemm_q6_k_8, gemm_q6_k_4, gemm_q6_k_2, gemm_q6_k_1 = (
    _make_gemm("q6_k", 8), _make_gemm("q6_k", 4), _make_gemm("q6_k", 2), _make_gemm("q6_k", 1))
unpack_mxfp4 = _make_unpack("mxfp4")
unpack_iq4_nl = _make_unpack("iq4_nl")
gemm_mxfp4_8, gemm_mxfp4_4, gemm_mxfp4_2, gemm_mxfp4_1 = (
    _make_gemm("mxfp4", 8), _make_gemm("mxfp4", 4), _make_gemm("mxfp4", 2),
    _make_gemm("mxfp4", 1))
gemm_iq4_nl_8, gemm_iq4_nl_4, gemm_iq4_nl_2, gemm_iq4_nl_1 = (
    _make_gemm("iq4_nl", 8), _make_gemm("iq4_nl", 4), _make_gemm("iq4_nl", 2),
    _make_gemm("iq4_nl", 1))
