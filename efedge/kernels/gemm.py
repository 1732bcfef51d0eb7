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

Unpacked tile of 8 rows, n elements each (``tile_shapes``; ``gemm_unpack`` makes it):
    wt  uint8 [n · 8]:    element e of row r at wt[8·(e - e % 4) + 4·r + e % 4], as an
                          unsigned value (Q4_0 / Q4_K nibble, Q8_0 byte + 128, Q5_K 5-bit
                          value, Q6_K 6-bit, Q3_K 3-bit, Q2_K 2-bit, MXFP4 / IQ4_NL /
                          IQ4_XS table entry + 12 / + 128 / + 128)
    ws  float32 [n/S, 8]: scale of sub-block s of row r (S = 32 elements; Q2_K, Q3_K,
                          Q6_K 16): Q4_0 / Q8_0 / IQ4_NL d, MXFP4 E8M0 / 2, K-quants
                          d·sc (Q3_K d·(sc - 32)), IQ4_XS d·(ls - 32)
    wm  float32 [n/S, 8]: Q2_K / Q4_K / Q5_K dmin·m (the sub-block's offset); unused
                          otherwise
Activations (``gemm_acts``): xq int8 [T, n]; xdb float32 [T, n/B]: the scale of each
activation block of B elements (32 for Q8_0, 256 for Q8_K); xsum int32 [T, n/S]: Σ xq
over each sub-block. Per (row, token):

    acc = Σ_B  xdb · Σ_s∈B ( float(Σ_e w·xq − off·xsum_s) · ws_s  − wm_s · xsum_s )

with off = 8 (Q4_0), 128 (Q8_0, IQ4_NL, IQ4_XS), 12 (MXFP4), 32 (Q6_K), 4 (Q3_K),
0 (Q2_K, Q4_K, Q5_K): the same operations in the same order whatever the number of
tokens in a call, so a product does not depend on how tokens are batched. (The decode
kernels sum in another order: prefill and decode agree to float rounding, not bit for
bit.)
"""

from __future__ import annotations

from functools import cache

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from ._ir import _VNNI_FN, LUT_DECL, _Fn, data_ptr, link, row_base
from .gemm_unpack import L, unpack_fn

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
    "q5_k": (176, 256, 32, 0),
    "iq4_xs": (136, 256, 32, 128),
    "q3_k": (110, 256, 16, 4),
    "q2_k": (84, 256, 16, 0),
}
MINS = ("q4_k", "q5_k", "q2_k")  # the types whose sub-blocks carry an offset (wm)

_DECLS = """
declare <8 x float> @llvm.fma.v8f32(<8 x float>, <8 x float>, <8 x float>)
""" + (f"declare <8 x i32> @{_VNNI_FN}(<8 x i32>, <8 x i32>, <8 x i32>)\n" if _VNNI_FN
       else "") + LUT_DECL


def tile_shapes(name: str, n: int) -> tuple[int, int]:
    """(wt bytes, ws / wm floats) of an unpacked tile of rows of n elements."""
    sub = _TYPES[name][2]
    return 8 * n, n // sub * L


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
               if name in MINS else None)
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


@cache
def _ir_text(name: str, nt: int) -> str:
    """The module of one kernel: gemm_<name>_<nt>, or unpack_<name> for nt = 0. Each call
    site links only the kernel it calls (one module of every kernel is 3.7 MB of IR,
    parsed again at each of the ~50 call sites of a dispatching function)."""
    if nt == 0:
        return _DECLS + unpack_fn(name, *_TYPES[name][:3])
    return _DECLS + _gemm_fn(name, nt)


def _ir_all() -> str:
    """Every kernel in one module (for checks: it must parse and verify)."""
    return _DECLS + "\n".join(_ir_text(n, t)[len(_DECLS):] for n in _TYPES
                                for t in (0, *TOKEN_STEPS))


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
            link(context, _ir_text(name, 0))
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
            link(context, _ir_text(name, nt))
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


def _make_gemms(name: str) -> tuple:
    """The 8-, 4-, 2- and 1-token tiled products of one type, in that order."""
    return tuple(_make_gemm(name, nt) for nt in (8, 4, 2, 1))


unpack_q4_0 = _make_unpack("q4_0")
gemm_q4_0_8, gemm_q4_0_4, gemm_q4_0_2, gemm_q4_0_1 = _make_gemms("q4_0")
unpack_q8_0 = _make_unpack("q8_0")
gemm_q8_0_8, gemm_q8_0_4, gemm_q8_0_2, gemm_q8_0_1 = _make_gemms("q8_0")
unpack_q4_k = _make_unpack("q4_k")
gemm_q4_k_8, gemm_q4_k_4, gemm_q4_k_2, gemm_q4_k_1 = _make_gemms("q4_k")
unpack_q6_k = _make_unpack("q6_k")
gemm_q6_k_8, gemm_q6_k_4, gemm_q6_k_2, gemm_q6_k_1 = _make_gemms("q6_k")
unpack_mxfp4 = _make_unpack("mxfp4")
gemm_mxfp4_8, gemm_mxfp4_4, gemm_mxfp4_2, gemm_mxfp4_1 = _make_gemms("mxfp4")
unpack_iq4_nl = _make_unpack("iq4_nl")
gemm_iq4_nl_8, gemm_iq4_nl_4, gemm_iq4_nl_2, gemm_iq4_nl_1 = _make_gemms("iq4_nl")
unpack_q5_k = _make_unpack("q5_k")
gemm_q5_k_8, gemm_q5_k_4, gemm_q5_k_2, gemm_q5_k_1 = _make_gemms("q5_k")
unpack_iq4_xs = _make_unpack("iq4_xs")
gemm_iq4_xs_8, gemm_iq4_xs_4, gemm_iq4_xs_2, gemm_iq4_xs_1 = _make_gemms("iq4_xs")
unpack_q3_k = _make_unpack("q3_k")
gemm_q3_k_8, gemm_q3_k_4, gemm_q3_k_2, gemm_q3_k_1 = _make_gemms("q3_k")
unpack_q2_k = _make_unpack("q2_k")
gemm_q2_k_8, gemm_q2_k_4, gemm_q2_k_2, gemm_q2_k_1 = _make_gemms("q2_k")
