"""Integer dot products of quantized weight rows with 8-bit activations, in LLVM vector IR.

llama.cpp multiplies a Q4_0 row by Q8_0 activations as integers: 32 products u8 × s8
summed into 8 int32 lanes (one ``vpdpbusd`` on AVX-512 VNNI), converted to float and
scaled once per block. numba's auto-vectoriser does not find that shape in scalar code,
so the row kernels below are written as LLVM IR text, linked into the numba functions
that call them (``row_q4_0`` …) and inlined there. With VNNI the block dot is the
target instruction; without it the same lanes come from portable vector IR (multiply in
16 bits, add pairs twice), so results are bitwise the same on every machine.

Activations (``activations.quantize_row``): int8 values ``xq [T, n]`` with their block
scales ``xd`` (float32) and block sums ``xs`` (int32 array) —

    Q8_0 (legacy quants,  xd [T, n/4]: each 32-block's fp16 scale as float, 8 copies
    MXFP4, IQ4_NL)        (one vector load per block); xs [T, n/32]: the float32 bits
                          of scale · Σ xq (the offset correction, one FMA per block)
    Q8_K (K-quants):      xd [T, n/256] = 1/iscale; xs [T, n/16]: Σ xq per 16

— exactly the values ``activations.round_activations`` rounds to (xq · scale), so an
integer dot equals dequant(w) · round_activations(x) up to float summation order.

Every kernel computes NR rows × NT tokens at once; NR = 1 (see SHAPES), NT = 1 for
decode (the 4-token shape is kept for experiments: prefill uses ``gemm``'s tiled product).

Row layouts: see quant_legacy / quant_k. Offsets of the weight nibbles are chosen so that
element i of a block meets x[i]: Q4_0 low nibbles are elements 0-15, high 16-31.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from ._ir import _VNNI_FN, LUT_DECL, _Fn, _seq, _splat, data_ptr, link, row_base

_DECLS = """
declare <8 x float> @llvm.fma.v8f32(<8 x float>, <8 x float>, <8 x float>)
declare float @llvm.vector.reduce.fadd.v8f32(float, <8 x float>)
""" + (f"declare <8 x i32> @{_VNNI_FN}(<8 x i32>, <8 x i32>, <8 x i32>)\n" if _VNNI_FN
       else "") + LUT_DECL

# 4-bit indices into a table of 16 int8 values, 32 per block (ggml's kvalues_mxfp4: the
# e2m1 values doubled, scaled by half the E8M0 power of two; kvalues_iq4nl with an fp16
# scale). The tables go in shifted by OFFSET so that every entry is an unsigned byte.
KVALUES = {
    "mxfp4": (0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12),
    "iq4_nl": (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113),
}
OFFSET = {"mxfp4": 12, "iq4_nl": 128}

# Every kernel: (ptr row, i64 row stride, i64 nblocks, ptr xq, ptr xd, ptr xs, i64 n,
# ptr out) -> void; row r starts at row + r·stride, token t's activations at xq + t·n,
# xd + t·(n / block), xs + t·(n / sum group).
_ARGS = "ptr %row, i64 %rs, i64 %nb, ptr %xq, ptr %xd, ptr %xs, i64 %n, ptr %out"


def _kernel(name: str, nr: int, nt: int, block_bytes: int, elems: int, xd_per: int,
            xs_per: int, body) -> str:
    """The block loop shared by every kernel: NR rows × NT tokens, each pair with a float
    accumulator and a scalar correction carried by phis. ``body(f, p, tok)`` emits one
    block of one row (p: its address) against NT tokens and returns the new (acc, corr)
    per token; every (row, token) pair gets the same operations whatever NR and NT are,
    so grouping never changes a result. out[r·NT + t] = sum(acc) + corr."""
    f = _Fn()
    f.raw("entry:")
    phis_at = f.block_loop()
    off = f.v(f"mul i64 %b, {block_bytes}")
    be = f.v(f"mul i64 %b, {elems}")
    xs_ptrs = []
    for t in range(nt):
        tn = f.v(f"mul i64 %n, {t}")
        xoff = f.v(f"add i64 {tn}, {be}")
        xdi = f.v(f"udiv i64 {xoff}, {xd_per}")
        xsi = f.v(f"udiv i64 {xoff}, {xs_per}")
        xs_ptrs.append((f.gep("%xq", xoff), f.gep("%xd", xdi, "float"),
                        f.gep("%xs", xsi, "i32")))
    new, names = [], []
    for r in range(nr):
        base = f.gep("%row", f.v(f"mul i64 %rs, {r}")) if r else "%row"
        p = f.gep(base, off)
        tok = []
        for t in range(nt):
            acc, cor = f"%acc{r}_{t}", f"%cor{r}_{t}"
            names.append((acc, cor))
            tok.append((*xs_ptrs[t], acc, cor))
        new.extend(body(f, p, tok))
    # Two accumulators per pair, taking turns (block b adds to the one block b-2 wrote):
    # a single chain of FMAs would wait out the FMA latency at every block.
    phis = []
    for (acc, cor), (an, cn) in zip(names, new, strict=True):
        phis.append(f"  {acc} = phi <8 x float> [zeroinitializer, %entry], [{acc}b, %loop]")
        phis.append(f"  {acc}b = phi <8 x float> [zeroinitializer, %entry], [{an}, %loop]")
        phis.append(f"  {cor} = phi float [0.0, %entry], [{cor}b, %loop]")
        phis.append(f"  {cor}b = phi float [0.0, %entry], [{cn}, %loop]")
    f.lines[phis_at:phis_at] = phis
    f.end_block_loop()
    for i, ((acc, cor), (an, cn)) in enumerate(zip(names, new, strict=True)):
        a = f.v(f"fadd <8 x float> {acc}b, {an}")
        r = f.v("call reassoc float @llvm.vector.reduce.fadd.v8f32(float -0.0, "
                f"<8 x float> {a})")
        c = f.v(f"fadd float {cor}b, {cn}")
        r = f.v(f"fadd float {r}, {c}")
        f.raw(f"  store float {r}, ptr {f.gep('%out', str(i), 'float')}, align 4")
    f.raw("  ret void")
    head = f"define weak_odr void @{name}({_ARGS}) alwaysinline nounwind {{"
    return "\n".join([head, *f.lines, "}"])


def _i2f(f: _Fn, v: str) -> str:
    return f.v(f"sitofp i32 {v} to float")


def _fma1(f: _Fn, a: str, b: str, c: str) -> str:
    return f.v(f"call float @llvm.fma.f32(float {a}, float {b}, float {c})")


def _i32_at(f: _Fn, base: str, i: int) -> str:
    return f.load("i32", f.gep(base, str(i), "i32"), 4)


def _legacy(f: _Fn, dwv: str, w: str, offset: float, tok) -> list:
    """The Q8_0-activation block step shared by Q4_0 and Q8_0: w holds the block as
    unsigned bytes equal to the weight + offset, so Σ w·x overcounts by offset·Σ x,
    which comes off through the precomputed xd·Σx (the xs slot, see quantize)."""
    dw = f.v(f"extractelement <8 x float> {dwv}, i32 0")
    dwc = f.v(f"fmul float {dw}, {-offset:.1f}")
    out = []
    for xq, xd, xs, acc, cor in tok:
        s = f.dot32(w, f.load("<32 x i8>", xq))
        scv = f.v(f"fmul <8 x float> {dwv}, {f.load('<8 x float>', xd, 4)}")
        acc = f.fma(f.v(f"sitofp <8 x i32> {s} to <8 x float>"), scv, acc)
        cor = _fma1(f, dwc, f.load("float", xs, 4), cor)
        out.append((acc, cor))
    return out


def _q4_0(f: _Fn, p: str, tok) -> list:
    # Σ (q - 8) x = Σ q x - 8 Σ x: the nibbles go in unsigned
    dw = f.h2f_splat(p)
    qs = f.load("<16 x i8>", f.gep(p, "2"))
    lo = f.v(f"and <16 x i8> {qs}, {_splat('i8', 16, 15)}")
    hi = f.v(f"lshr <16 x i8> {qs}, {_splat('i8', 16, 4)}")
    w = f.v(f"shufflevector <16 x i8> {lo}, <16 x i8> {hi}, <32 x i32> {_seq(32)}")
    return _legacy(f, dw, w, 8.0, tok)


def _q8_0(f: _Fn, p: str, tok) -> list:
    # int8 weights go in as u8 = w + 128 (xor 0x80)
    dw = f.h2f_splat(p)
    qs = f.load("<32 x i8>", f.gep(p, "2"))
    w = f.v(f"xor <32 x i8> {qs}, {_splat('i8', 32, -128)}")
    return _legacy(f, dw, w, 128.0, tok)


def _nibbles32(f: _Fn, qs: str) -> str:
    """<32 x i8> of the 32 4-bit indices of a block, element order (low nibbles 0-15)."""
    lo = f.v(f"and <16 x i8> {qs}, {_splat('i8', 16, 15)}")
    hi = f.v(f"lshr <16 x i8> {qs}, {_splat('i8', 16, 4)}")
    return f.v(f"shufflevector <16 x i8> {lo}, <16 x i8> {hi}, <32 x i32> {_seq(32)}")


def unsigned_table(name: str) -> list[int]:
    return [v + OFFSET[name] for v in KVALUES[name]]


def _mxfp4(f: _Fn, p: str, tok) -> list:
    # ggml_vec_dot_mxfp4_q8_0: E8M0_HALF(e) · d_x · Σ kvalue·x; the table shifted by 12
    e = f.v(f"zext i8 {f.load('i8', p)} to i32")
    dw = f.splat_f(f.e8m0_half(e))
    w = f.lookup16(_nibbles32(f, f.load("<16 x i8>", f.gep(p, "1"))), unsigned_table("mxfp4"))
    return _legacy(f, dw, w, float(OFFSET["mxfp4"]), tok)


def _iq4_nl(f: _Fn, p: str, tok) -> list:
    # ggml_vec_dot_iq4_nl_q8_0: d_w · d_x · Σ kvalue·x; the table shifted by 128
    dw = f.h2f_splat(p)
    w = f.lookup16(_nibbles32(f, f.load("<16 x i8>", f.gep(p, "2"))), unsigned_table("iq4_nl"))
    return _legacy(f, dw, w, float(OFFSET["iq4_nl"]), tok)


def _k_scales(f: _Fn, p: str) -> tuple[list[str], list[str]]:
    """The 8 (scale, min) 6-bit pairs of a Q4_K / Q5_K super-block, as i32."""
    b = []
    for i in range(12):
        byte = f.load("i8", f.gep(p, str(4 + i)))
        b.append(f.v(f"zext i8 {byte} to i32"))
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


def _q4_k(f: _Fn, p: str, tok) -> list:
    # per super-block: Σ_j d·sc_j·Σ(q x) − dmin·m_j·Σ x, times the activation scale;
    # the sub-block sums stay integer (lanes × sc_j) until the end of the super-block
    d = f.h2f(p)
    dmin = f.h2f(f.gep(p, "2"))
    sc, mn = _k_scales(f, p)
    ws = []
    for g in range(4):
        q = f.load("<32 x i8>", f.gep(p, str(16 + 32 * g)))
        ws.append(f.v(f"and <32 x i8> {q}, {_splat('i8', 32, 15)}"))
        ws.append(f.v(f"lshr <32 x i8> {q}, {_splat('i8', 32, 4)}"))
    scv = [f.splat_i(s) for s in sc]
    out = []
    for xq, xd, xs, acc, cor in tok:
        iacc = "zeroinitializer"
        msum = "0"
        for j in range(8):
            s = f.dot32(ws[j], f.load("<32 x i8>", f.gep(xq, str(32 * j))))
            m = f.v(f"mul <8 x i32> {s}, {scv[j]}")
            iacc = f.v(f"add <8 x i32> {iacc}, {m}")
            bs = f.v(f"add i32 {_i32_at(f, xs, 2 * j)}, {_i32_at(f, xs, 2 * j + 1)}")
            m = f.v(f"mul i32 {bs}, {mn[j]}")
            msum = f.v(f"add i32 {msum}, {m}")
        dx = f.load("float", xd, 4)
        fi = f.v(f"sitofp <8 x i32> {iacc} to <8 x float>")
        acc = f.fma(fi, f.splat_f(f.v(f"fmul float {d}, {dx}")), acc)
        dm = f.v(f"fmul float {dmin}, {dx}")
        cor = _fma1(f, f.v(f"fneg float {dm}"), _i2f(f, msum), cor)
        out.append((acc, cor))
    return out


def _q6_k(f: _Fn, p: str, tok) -> list:
    # 6-bit q = ql nibble | 2 qh bits, minus 32; int8 scales per 16 elements
    d = f.h2f(f.gep(p, "208"))
    scs = []
    for i in range(16):
        byte = f.load("i8", f.gep(p, str(192 + i)))
        scs.append(f.v(f"sext i8 {byte} to i32"))
    ws, svs = [], []
    for h in range(2):
        qa = f.load("<32 x i8>", f.gep(p, str(64 * h)))
        qb = f.load("<32 x i8>", f.gep(p, str(64 * h + 32)))
        qh = f.load("<32 x i8>", f.gep(p, str(128 + 32 * h)))

        def band(v, m):
            return f.v(f"and <32 x i8> {v}, {_splat('i8', 32, m)}")

        def shl(v, k):
            return f.v(f"shl <32 x i8> {v}, {_splat('i8', 32, k)}")

        def shr(v, k):
            return f.v(f"lshr <32 x i8> {v}, {_splat('i8', 32, k)}")

        ws.append(f.v(f"or <32 x i8> {band(qa, 15)}, {shl(band(qh, 3), 4)}"))
        ws.append(f.v(f"or <32 x i8> {band(qb, 15)}, {shl(band(qh, 12), 2)}"))
        ws.append(f.v(f"or <32 x i8> {shr(qa, 4)}, {band(qh, 48)}"))
        ws.append(f.v(f"or <32 x i8> {shr(qb, 4)}, {band(shr(qh, 2), 48)}"))
        for c in range(4):  # lanes 0-3: elements 0-15 (scale c·2), lanes 4-7: 16-31
            a, b = scs[8 * h + 2 * c], scs[8 * h + 2 * c + 1]
            v = "poison"
            for lane in range(8):
                v = f.v(f"insertelement <8 x i32> {v}, i32 {a if lane < 4 else b}, i32 {lane}")
            svs.append(v)
    out = []
    for xq, xd, xs, acc, cor in tok:
        iacc = "zeroinitializer"
        osum = "0"
        for j in range(8):
            s = f.dot32(ws[j], f.load("<32 x i8>", f.gep(xq, str(32 * j))))
            m = f.v(f"mul <8 x i32> {s}, {svs[j]}")
            iacc = f.v(f"add <8 x i32> {iacc}, {m}")
        for g in range(16):  # elements 16 g .. 16 g + 15 carry scale g (see svs above)
            m = f.v(f"mul i32 {_i32_at(f, xs, g)}, {scs[g]}")
            osum = f.v(f"add i32 {osum}, {m}")
        dd = f.v(f"fmul float {d}, {f.load('float', xd, 4)}")
        fi = f.v(f"sitofp <8 x i32> {iacc} to <8 x float>")
        acc = f.fma(fi, f.splat_f(dd), acc)
        cor = _fma1(f, f.v(f"fmul float {dd}, -32.0"), _i2f(f, osum), cor)
        out.append((acc, cor))
    return out


# name → (block bytes, elements, xd group, xs group, body)
_TYPES = {
    "q4_0": (18, 32, 4, 32, _q4_0),  # xd: 8 copies of each block's scale (32 elems / 4)
    "q8_0": (34, 32, 4, 32, _q8_0),
    "q4_k": (144, 256, 256, 16, _q4_k),
    "q6_k": (210, 256, 256, 16, _q6_k),
    "mxfp4": (17, 32, 4, 32, _mxfp4),
    "iq4_nl": (18, 32, 4, 32, _iq4_nl),
}
# kernel shapes (rows, tokens): one row for one token (decode), one row for 4 tokens
# (prefill). Several rows per call (one activation load for all) measure the same in
# cache and 3x slower from DRAM: interleaved row streams defeat the prefetchers.
NT_PREFILL = 4
SHAPES = ((1, 1), (1, NT_PREFILL))


def _module_text() -> str:
    parts = [_DECLS, "declare float @llvm.fma.f32(float, float, float)"]
    for name, (bb, el, xdp, xsp, body) in _TYPES.items():
        for nr, nt in SHAPES:
            parts.append(_kernel(f"efedge_{name}_{nr}x{nt}", nr, nt, bb, el, xdp, xsp, body))
    return "\n".join(parts)


_TEXT = None


def _ir_text() -> str:
    global _TEXT
    if _TEXT is None:
        _TEXT = _module_text()
    return _TEXT


def _make_intrinsic(name: str, nr: int, nt: int):
    """dot_<name>_<nr>x<nt>(w, r0, xq, xd, xs, out): rows r0 .. r0+nr-1 of the raw 2-D
    uint8 matrix w against tokens 0 .. nt-1 of xq / xd / xs; out[r·nt + t]."""
    bb, elems = _TYPES[name][0], _TYPES[name][1]
    sym = f"efedge_{name}_{nr}x{nt}"

    def impl(typingctx, w, r0, xq, xd, xs, out):
        if not (all(isinstance(a, types.Array) for a in (w, xq, xd, xs, out))
                and w.ndim == 2 and isinstance(r0, types.Integer)):
            return None
        sig = types.void(w, r0, xq, xd, xs, out)

        def codegen(context, builder, sig, args):
            link(context, _ir_text())
            i64, p8 = ir.IntType(64), ir.IntType(8).as_pointer()
            fnty = ir.FunctionType(ir.VoidType(), [p8, i64, i64, p8, p8, p8, i64, p8])
            fn = cgutils.get_or_insert_function(builder.module, fnty, sym)
            base, stride, nb = row_base(context, builder, sig.args[0], args[0], sig.args[1],
                                        args[1], bb)
            n = builder.mul(nb, ir.Constant(i64, elems))
            ptrs = [data_ptr(context, builder, sig.args[i], args[i]) for i in (2, 3, 4, 5)]
            builder.call(fn, [base, stride, nb, ptrs[0], ptrs[1], ptrs[2], n, ptrs[3]])
            return context.get_dummy_value()

        return sig, codegen

    impl.__name__ = f"dot_{name}_{nr}x{nt}"
    return intrinsic(impl)


dot_q4_0_1x1 = _make_intrinsic("q4_0", 1, 1)
dot_q4_0_1x4 = _make_intrinsic("q4_0", 1, 4)
dot_q8_0_1x1 = _make_intrinsic("q8_0", 1, 1)
dot_q8_0_1x4 = _make_intrinsic("q8_0", 1, 4)
dot_q4_k_1x1 = _make_intrinsic("q4_k", 1, 1)
dot_q4_k_1x4 = _make_intrinsic("q4_k", 1, 4)
dot_q6_k_1x1 = _make_intrinsic("q6_k", 1, 1)
dot_q6_k_1x4 = _make_intrinsic("q6_k", 1, 4)
dot_mxfp4_1x1 = _make_intrinsic("mxfp4", 1, 1)
dot_iq4_nl_1x1 = _make_intrinsic("iq4_nl", 1, 1)
