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
    Q8_K (K-quants,       xd [T, n/256] = 1/iscale; xs [T, n/16]: Σ xq per 16
    IQ4_XS)

— exactly the values ``activations.round_activations`` rounds to (xq · scale), so an
integer dot equals dequant(w) · round_activations(x) up to float summation order.

Every kernel computes NR rows × NT tokens at once; NR = 1 (see SHAPES), NT = 1 for
decode (the 4-token shape is kept for experiments: prefill uses ``gemm``'s tiled product).

Row layouts: see quant_legacy / quant_k. Offsets of the weight nibbles are chosen so that
element i of a block meets x[i]: Q4_0 low nibbles are elements 0-15, high 16-31. The
256-element super-block types (Q2_K … Q6_K, IQ4_XS) have their block bodies in
``simd_k``; each kernel is linked on its own (``_ir_text``).
"""

from __future__ import annotations

from functools import cache

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from . import simd_k as k
from ._ir import (
    _VNNI_FN,
    LUT_DECL,
    OFFSET,
    PMADD_DECL,
    _Fn,
    _seq,
    _splat,
    data_ptr,
    link,
    row_base,
    unsigned_table,
)

_DECLS = """
declare <8 x float> @llvm.fma.v8f32(<8 x float>, <8 x float>, <8 x float>)
declare float @llvm.vector.reduce.fadd.v8f32(float, <8 x float>)
declare i32 @llvm.vector.reduce.add.v16i32(<16 x i32>)
""" + (f"declare <8 x i32> @{_VNNI_FN}(<8 x i32>, <8 x i32>, <8 x i32>)\n" if _VNNI_FN
       else "") + LUT_DECL + PMADD_DECL

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
        cor = f.fma1(dwc, f.load("float", xs, 4), cor)
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


def _mxfp4(f: _Fn, p: str, tok) -> list:
    # ggml_vec_dot_mxfp4_q8_0: E8M0_HALF(e) · d_x · Σ kvalue·x; the table shifted by 12
    e = f.v(f"zext i8 {f.load('i8', p)} to i32")
    dw = f.splat_f(f.e8m0_half(e))
    w = f.lookup16(f.nibbles32(f.load("<16 x i8>", f.gep(p, "1"))), unsigned_table("mxfp4"))
    return _legacy(f, dw, w, float(OFFSET["mxfp4"]), tok)


def _iq4_nl(f: _Fn, p: str, tok) -> list:
    # ggml_vec_dot_iq4_nl_q8_0: d_w · d_x · Σ kvalue·x; the table shifted by 128
    dw = f.h2f_splat(p)
    w = f.lookup16(f.nibbles32(f.load("<16 x i8>", f.gep(p, "2"))), unsigned_table("iq4_nl"))
    return _legacy(f, dw, w, float(OFFSET["iq4_nl"]), tok)


# name → (block bytes, elements, xd group, xs group, body)
_TYPES = {
    "q4_0": (18, 32, 4, 32, _q4_0),  # xd: 8 copies of each block's scale (32 elems / 4)
    "q8_0": (34, 32, 4, 32, _q8_0),
    "q4_k": (144, 256, 256, 16, k.q4_k),
    "q6_k": (210, 256, 256, 16, k.q6_k),
    "mxfp4": (17, 32, 4, 32, _mxfp4),
    "iq4_nl": (18, 32, 4, 32, _iq4_nl),
    "q5_k": (176, 256, 256, 16, k.q5_k),
    "iq4_xs": (136, 256, 256, 16, k.iq4_xs),
    "q3_k": (110, 256, 256, 16, k.q3_k),
    "q2_k": (84, 256, 256, 16, k.q2_k),
}
# kernel shapes (rows, tokens): one row for one token (decode), one row for 4 tokens
# (prefill). Several rows per call (one activation load for all) measure the same in
# cache and 3x slower from DRAM: interleaved row streams defeat the prefetchers.
NT_PREFILL = 4
SHAPES = ((1, 1), (1, NT_PREFILL))


_HEAD = _DECLS + "declare float @llvm.fma.f32(float, float, float)\n"


@cache
def _ir_text(name: str, nr: int, nt: int) -> str:
    """The module of one kernel (each call site links only the kernel it calls)."""
    bb, el, xdp, xsp, body = _TYPES[name]
    return _HEAD + _kernel(f"efedge_{name}_{nr}x{nt}", nr, nt, bb, el, xdp, xsp, body)


def _ir_all() -> str:
    """Every kernel in one module (for checks: it must parse and verify)."""
    return _HEAD + "\n".join(_ir_text(n, nr, nt)[len(_HEAD):] for n in _TYPES
                               for nr, nt in SHAPES)


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
            link(context, _ir_text(name, nr, nt))
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
dot_q5_k_1x1 = _make_intrinsic("q5_k", 1, 1)
dot_iq4_xs_1x1 = _make_intrinsic("iq4_xs", 1, 1)
dot_q3_k_1x1 = _make_intrinsic("q3_k", 1, 1)
dot_q2_k_1x1 = _make_intrinsic("q2_k", 1, 1)
