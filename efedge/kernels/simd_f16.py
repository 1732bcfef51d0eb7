"""F16 rows dotted with float activations in one pass, for decode (``rowdot.dot_rows``),
and F16 rows converted to float32 8 at a time (``quant_legacy.deq_f16``).

The generic path decodes a row into a float buffer (the exact bit conversion, element by
element) and then dots the buffer: two passes over the row, and on the demo model (F16,
rows of 256) 60 ns per row — most of a decode step. Here 8 halves at a time become
floats with one vcvtph2ps (F16C; LLVM's fpext of <8 x half>) and go into four
accumulators of 8 lanes by fused multiply-add: 32 elements per step, the shape of
ggml's own F16 dot (GGML_F16_STEP 32, 4 × 8 lanes). The lanes are summed in a fixed
order, so a row's result depends only on the row and the activations.

The conversion is exact, as is the generic path's; only the order of the sum differs
from it. Built only where the CPU has F16C (``AVAILABLE``): elsewhere LLVM would turn the
fpext into a call to a runtime helper numba does not link, and dot_rows keeps the
generic path.
"""

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from ._ir import F16C, data_ptr, link, row_base

AVAILABLE = F16C
_SYM = "efedge_dot_f16"


def _ir_text() -> str:
    acc = [f"%a{k}" for k in range(4)]
    body = []
    for k in range(4):
        body += [
            f"  %o{k} = add i64 %e, {8 * k}",
            f"  %wp{k} = getelementptr inbounds i16, ptr %w, i64 %o{k}",
            f"  %wh{k} = load <8 x half>, ptr %wp{k}, align 2",
            f"  %wf{k} = fpext <8 x half> %wh{k} to <8 x float>",
            f"  %xp{k} = getelementptr inbounds float, ptr %x, i64 %o{k}",
            f"  %xv{k} = load <8 x float>, ptr %xp{k}, align 4",
            f"  {acc[k]}n = call <8 x float> @llvm.fma.v8f32(<8 x float> %wf{k}, "
            f"<8 x float> %xv{k}, <8 x float> {acc[k]})",
        ]
    phis = [f"  {a} = phi <8 x float> [zeroinitializer, %entry], [{a}n, %loop]" for a in acc]
    outs = [f"  {a}o = phi <8 x float> [zeroinitializer, %entry], [{a}n, %loop]" for a in acc]
    return "\n".join([
        "declare <8 x float> @llvm.fma.v8f32(<8 x float>, <8 x float>, <8 x float>)",
        "declare float @llvm.fma.f32(float, float, float)",
        "declare float @llvm.vector.reduce.fadd.v8f32(float, <8 x float>)",
        "",
        f"define weak_odr float @{_SYM}(ptr %w, ptr %x, i64 %n) alwaysinline {{",
        "entry:",
        "  %nb = lshr i64 %n, 5",
        "  %any = icmp ne i64 %nb, 0",
        "  br i1 %any, label %loop, label %sum",
        "loop:",
        "  %b = phi i64 [0, %entry], [%bn, %loop]",
        *phis,
        "  %e = shl i64 %b, 5",
        *body,
        "  %bn = add i64 %b, 1",
        "  %more = icmp ult i64 %bn, %nb",
        "  br i1 %more, label %loop, label %sum",
        "sum:",
        *outs,
        "  %s01 = fadd <8 x float> %a0o, %a1o",
        "  %s23 = fadd <8 x float> %a2o, %a3o",
        "  %s = fadd <8 x float> %s01, %s23",
        # ordered: lane 0 first, then 1 … 7 (no reassoc flag)
        "  %r = call float @llvm.vector.reduce.fadd.v8f32(float 0.0, <8 x float> %s)",
        "  %t0 = shl i64 %nb, 5",
        "  %tail = icmp ult i64 %t0, %n",
        "  br i1 %tail, label %rest, label %done",
        "rest:",  # the last n mod 32 elements, one at a time
        "  %i = phi i64 [%t0, %sum], [%in, %rest]",
        "  %acc = phi float [%r, %sum], [%accn, %rest]",
        "  %hp = getelementptr inbounds i16, ptr %w, i64 %i",
        "  %h = load half, ptr %hp, align 2",
        "  %hf = fpext half %h to float",
        "  %xq = getelementptr inbounds float, ptr %x, i64 %i",
        "  %xs = load float, ptr %xq, align 4",
        "  %accn = call float @llvm.fma.f32(float %hf, float %xs, float %acc)",
        "  %in = add i64 %i, 1",
        "  %go = icmp ult i64 %in, %n",
        "  br i1 %go, label %rest, label %done",
        "done:",
        "  %res = phi float [%r, %sum], [%accn, %rest]",
        "  ret float %res",
        "}",
    ])


_TEXT = _ir_text()


def contiguous_rows(*arrays) -> bool:
    """Whether these numba types are 1-D C-contiguous arrays (what f16_to_f32_row reads
    and writes through raw pointers)."""
    return all(isinstance(a, types.Array) and a.ndim == 1 and a.layout == "C"
               for a in arrays)

def _keep_signalling(pre: str, post: str, h: str, f: str, out: str) -> list[str]:
    """IR lines: out = f, except that a signalling NaN half (h) keeps its quiet bit clear
    in the float, as numpy's conversion (and gguf-py's dequantize) leave it: vcvtph2ps
    sets it. pre / post: "<8 x " / ">" for vectors, empty for scalars."""
    n = 8 if pre else 1

    def c(ty: str, v: int) -> str:
        return f"<{', '.join(f'{ty} {v}' for _ in range(n))}>" if pre else str(v)

    i16, i32, i1, fl = (f"{pre}{t}{post}" for t in ("i16", "i32", "i1", "float"))
    p = out[1:]
    return [
        f"  %{p}b = bitcast {pre}half{post} {h} to {i16}",
        f"  %{p}e = and {i16} %{p}b, {c('i16', 0x7E00)}",
        f"  %{p}s = icmp eq {i16} %{p}e, {c('i16', 0x7C00)}",  # all-ones exponent, quiet bit 0
        f"  %{p}m = and {i16} %{p}b, {c('i16', 0x01FF)}",
        f"  %{p}z = icmp ne {i16} %{p}m, {c('i16', 0)}",  # … and not infinity
        f"  %{p}n = and {i1} %{p}s, %{p}z",
        f"  %{p}f = bitcast {fl} {f} to {i32}",
        f"  %{p}c = and {i32} %{p}f, {c('i32', -4194305)}",  # ~0x00400000
        f"  %{p}r = select {i1} %{p}n, {i32} %{p}c, {i32} %{p}f",
        f"  {out} = bitcast {i32} %{p}r to {fl}",
    ]


_CVT = "efedge_f16_to_f32"
_CVT_TEXT = "\n".join([
    f"define weak_odr void @{_CVT}(ptr %w, ptr %y, i64 %n) alwaysinline {{",
    "entry:",
    "  %nb = lshr i64 %n, 3",
    "  %any = icmp ne i64 %nb, 0",
    "  br i1 %any, label %loop, label %tail0",
    "loop:",  # 8 at a time
    "  %b = phi i64 [0, %entry], [%bn, %loop]",
    "  %e = shl i64 %b, 3",
    "  %wp = getelementptr inbounds i16, ptr %w, i64 %e",
    "  %wh = load <8 x half>, ptr %wp, align 2",
    "  %wf = fpext <8 x half> %wh to <8 x float>",
    *_keep_signalling("<8 x ", ">", "%wh", "%wf", "%wr"),
    "  %yp = getelementptr inbounds float, ptr %y, i64 %e",
    "  store <8 x float> %wr, ptr %yp, align 4",
    "  %bn = add i64 %b, 1",
    "  %more = icmp ult i64 %bn, %nb",
    "  br i1 %more, label %loop, label %tail0",
    "tail0:",
    "  %t0 = shl i64 %nb, 3",
    "  %tail = icmp ult i64 %t0, %n",
    "  br i1 %tail, label %rest, label %done",
    "rest:",
    "  %i = phi i64 [%t0, %tail0], [%in, %rest]",
    "  %hp = getelementptr inbounds i16, ptr %w, i64 %i",
    "  %h = load half, ptr %hp, align 2",
    "  %hf = fpext half %h to float",
    *_keep_signalling("", "", "%h", "%hf", "%hr"),
    "  %yq = getelementptr inbounds float, ptr %y, i64 %i",
    "  store float %hr, ptr %yq, align 4",
    "  %in = add i64 %i, 1",
    "  %go = icmp ult i64 %in, %n",
    "  br i1 %go, label %rest, label %done",
    "done:",
    "  ret void",
    "}",
])


@intrinsic
def dot_f16_row(typingctx, w, r, x, n):
    """dot(row r of the raw F16 matrix w [rows, 2·n] uint8, x[:n]) as float32."""
    if not (isinstance(w, types.Array) and w.ndim == 2 and isinstance(r, types.Integer)
            and isinstance(x, types.Array) and x.dtype == types.float32
            and isinstance(n, types.Integer)):
        return None
    sig = types.float32(w, r, x, n)

    def codegen(context, builder, sig, args):
        link(context, _TEXT)
        i64, p8 = ir.IntType(64), ir.IntType(8).as_pointer()
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.FloatType(), [p8, p8, i64]), _SYM)
        base, _, _ = row_base(context, builder, sig.args[0], args[0], sig.args[1], args[1], 2)
        xp = data_ptr(context, builder, sig.args[2], args[2])
        nv = context.cast(builder, args[3], sig.args[3], types.int64)
        return builder.call(fn, [base, xp, nv])

    return sig, codegen


@intrinsic
def f16_to_f32_row(typingctx, src, dst):
    """dst[i] = the half whose bits are src's bytes 2i, 2i+1 (exact; dst: float32 [n],
    src: uint8 [2n])."""
    if not (contiguous_rows(src, dst) and dst.dtype == types.float32):
        return None
    sig = types.void(src, dst)

    def codegen(context, builder, sig, args):
        link(context, _CVT_TEXT)
        i64, p8 = ir.IntType(64), ir.IntType(8).as_pointer()
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [p8, p8, i64]), _CVT)
        dst_arr = context.make_array(sig.args[1])(context, builder, args[1])
        n = builder.extract_value(dst_arr.shape, 0)
        builder.call(fn, [data_ptr(context, builder, sig.args[0], args[0]),
                          data_ptr(context, builder, sig.args[1], args[1]), n])
        return context.get_dummy_value()

    return sig, codegen
