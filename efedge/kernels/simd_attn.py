"""Attention inner loops for a block of 4 queries, in LLVM vector IR (as ``simd``).

A query's scores against S keys are a vector over keys: with the keys stored transposed
(kt [d, S], float32) each of the d dimensions is one FMA per 8 keys. numba's loops keep
the score vector in memory and reload it for every dimension; here 4 queries share each
key load and their 4 × 8 scores stay in registers for all d dimensions. The same for
the weighted sum of values: 4 queries × 32 output dimensions stay in registers while the
keys stream by.

    attn_scores_q4(kt, ldk, n8, q, d, ldq, scale, out, ldo):
        out[i, s] = scale · Σ_j q[i·ldq + j] · kt[j·ldk + s]   for i < 4, s < 8·n8
    attn_values_q4(p, ldp, n_keys, v, dv, out, ldo):
        out[i, c] += Σ_s p[i·ldp + s] · v[s, c]           for i < 4, c < dv (dv % 32 == 0)

kt's rows hold at least 8·n8 keys (padded to a multiple of 8); v rows are dv floats.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from ._ir import _Fn, data_ptr, link

NQ = 4  # queries per call


def _scores() -> str:
    # two blocks of 8 keys per pass (8 independent FMA chains: one block's 4 measured
    # FMA-latency bound); a last odd block runs alone (its twin's loads repeat it and
    # are dropped). Every score is the same chain over the d dimensions as one block
    # at a time gives.
    f = _Fn()
    f.raw("entry:")
    f.raw("  %scv0 = insertelement <8 x float> poison, float %scale, i32 0")
    f.raw("  %scv = shufflevector <8 x float> %scv0, <8 x float> poison, "
          "<8 x i32> zeroinitializer")
    f.raw("  %ld = mul i64 %n8, 8")
    f.raw("  br label %blk")
    f.raw("blk:")  # key blocks s .. s + 16 (or s .. s + 8 at the end)
    f.raw("  %s = phi i64 [0, %entry], [%sn, %blk.end]")
    f.raw("  %rem = sub i64 %ld, %s")
    f.raw("  %two = icmp uge i64 %rem, 16")
    f.raw("  %off1 = select i1 %two, i64 8, i64 0")
    f.raw("  br label %dim")
    f.raw("dim:")
    f.raw("  %j = phi i64 [0, %blk], [%jn, %dim]")
    for i in range(NQ):
        for h in range(2):
            f.raw(f"  %a{i}_{h} = phi <8 x float> [zeroinitializer, %blk], [%an{i}_{h}, %dim]")
    k0 = f.v("add i64 %s, " + f.v("mul i64 %j, %ldk"))
    kvs = [f.load("<8 x float>", f.gep("%kt", k0, "float"), 4),
           f.load("<8 x float>", f.gep("%kt", f.v(f"add i64 {k0}, %off1"), "float"), 4)]
    for i in range(NQ):
        qi = f.load("float", f.gep("%q", f.v(f"add i64 %j, {f.v(f'mul i64 %ldq, {i}')}"),
                                   "float"), 4)
        qv = f.splat_f(qi)
        for h in range(2):
            f.raw(f"  %an{i}_{h} = call <8 x float> @llvm.fma.v8f32(<8 x float> {qv}, "
                  f"<8 x float> {kvs[h]}, <8 x float> %a{i}_{h})")
    f.raw("  %jn = add i64 %j, 1")
    f.raw("  %jc = icmp ult i64 %jn, %d")
    f.raw("  br i1 %jc, label %dim, label %blk.st0")
    f.raw("blk.st0:")
    for i in range(NQ):
        r = f.v(f"fmul <8 x float> %an{i}_0, %scv")
        o = f.gep("%out", f.v(f"add i64 %s, {f.v(f'mul i64 %ldo, {i}')}"), "float")
        f.raw(f"  store <8 x float> {r}, ptr {o}, align 4")
    f.raw("  br i1 %two, label %blk.st1, label %blk.end")
    f.raw("blk.st1:")
    for i in range(NQ):
        r = f.v(f"fmul <8 x float> %an{i}_1, %scv")
        row = f.v(f"add i64 8, {f.v(f'mul i64 %ldo, {i}')}")
        o = f.gep("%out", f.v(f"add i64 %s, {row}"), "float")
        f.raw(f"  store <8 x float> {r}, ptr {o}, align 4")
    f.raw("  br label %blk.end")
    f.raw("blk.end:")
    f.raw("  %step = select i1 %two, i64 16, i64 8")
    f.raw("  %sn = add i64 %s, %step")
    f.raw("  %sc = icmp ult i64 %sn, %ld")
    f.raw("  br i1 %sc, label %blk, label %exit")
    f.raw("exit:")
    f.raw("  ret void")
    head = ("define weak_odr void @efedge_attn_scores_q4(ptr %kt, i64 %ldk, i64 %n8, ptr %q, "
            "i64 %d, i64 %ldq, float %scale, ptr %out, i64 %ldo) nounwind {")
    return "\n".join([head, *f.lines, "}"])


def _values() -> str:
    f = _Fn()
    nc = 4  # 4 vectors of 8 = 32 output dims per pass
    f.raw("entry:")
    f.raw("  br label %col")
    f.raw("col:")  # 32 output dims at a time
    f.raw("  %c = phi i64 [0, %entry], [%cn, %col.end]")
    for i in range(NQ):
        for k in range(nc):
            op = f.gep("%out", f.v(f"add i64 {f.v(f'mul i64 %ldo, {i}')}, "
                                   f"{f.v(f'add i64 %c, {8 * k}')}"), "float")
            f.raw(f"  %o{i}_{k}.p = getelementptr inbounds float, ptr {op}, i64 0")
            f.raw(f"  %o{i}_{k}.0 = load <8 x float>, ptr {op}, align 4")
    f.raw("  br label %key")
    f.raw("key:")
    f.raw("  %s = phi i64 [0, %col], [%sn, %key]")
    for i in range(NQ):
        for k in range(nc):
            f.raw(f"  %o{i}_{k} = phi <8 x float> [%o{i}_{k}.0, %col], [%on{i}_{k}, %key]")
    vrow = f.v("mul i64 %s, %dv")
    vs = [f.load("<8 x float>", f.gep("%v", f.v(f"add i64 {vrow}, "
                                                f"{f.v(f'add i64 %c, {8 * k}')}"), "float"), 4)
          for k in range(nc)]
    for i in range(NQ):
        pi = f.load("float", f.gep("%p", f.v(f"add i64 %s, {f.v(f'mul i64 %ldp, {i}')}"),
                                   "float"), 4)
        pv = f.splat_f(pi)
        for k in range(nc):
            f.raw(f"  %on{i}_{k} = call <8 x float> @llvm.fma.v8f32(<8 x float> {pv}, "
                  f"<8 x float> {vs[k]}, <8 x float> %o{i}_{k})")
    f.raw("  %sn = add i64 %s, 1")
    f.raw("  %sc = icmp ult i64 %sn, %nk")
    f.raw("  br i1 %sc, label %key, label %col.end")
    f.raw("col.end:")
    for i in range(NQ):
        for k in range(nc):
            f.raw(f"  store <8 x float> %on{i}_{k}, ptr %o{i}_{k}.p, align 4")
    f.raw(f"  %cn = add i64 %c, {8 * nc}")
    f.raw("  %cc = icmp ult i64 %cn, %dv")
    f.raw("  br i1 %cc, label %col, label %exit")
    f.raw("exit:")
    f.raw("  ret void")
    head = ("define weak_odr void @efedge_attn_values_q4(ptr %p, i64 %ldp, i64 %nk, ptr %v, "
            "i64 %dv, ptr %out, i64 %ldo) nounwind {")
    return "\n".join([head, *f.lines, "}"])


_TEXT = None


def _ir_text() -> str:
    global _TEXT
    if _TEXT is None:
        _TEXT = "\n".join([
            "declare <8 x float> @llvm.fma.v8f32(<8 x float>, <8 x float>, <8 x float>)",
            _scores(), _values()])
    return _TEXT


def _i64(context, builder, ty, val):
    return context.cast(builder, val, ty, types.int64)


@intrinsic
def attn_scores_q4(typingctx, kt, ldk, n8, q, d, ldq, scale, out, ldo):
    if not all(isinstance(a, types.Array) for a in (kt, q, out)):
        return None
    sig = types.void(kt, ldk, n8, q, d, ldq, scale, out, ldo)

    def codegen(context, builder, sig, args):
        link(context, _ir_text())
        i64, p8, f32 = ir.IntType(64), ir.IntType(8).as_pointer(), ir.FloatType()
        fnty = ir.FunctionType(ir.VoidType(), [p8, i64, i64, p8, i64, i64, f32, p8, i64])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "efedge_attn_scores_q4")
        a = sig.args
        sc = context.cast(builder, args[6], a[6], types.float32)
        builder.call(fn, [data_ptr(context, builder, a[0], args[0]),
                          _i64(context, builder, a[1], args[1]),
                          _i64(context, builder, a[2], args[2]),
                          data_ptr(context, builder, a[3], args[3]),
                          _i64(context, builder, a[4], args[4]),
                          _i64(context, builder, a[5], args[5]), sc,
                          data_ptr(context, builder, a[7], args[7]),
                          _i64(context, builder, a[8], args[8])])
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def attn_values_q4(typingctx, p, ldp, n_keys, v, dv, out, ldo):
    if not all(isinstance(a, types.Array) for a in (p, v, out)):
        return None
    sig = types.void(p, ldp, n_keys, v, dv, out, ldo)

    def codegen(context, builder, sig, args):
        link(context, _ir_text())
        i64, p8 = ir.IntType(64), ir.IntType(8).as_pointer()
        fnty = ir.FunctionType(ir.VoidType(), [p8, i64, i64, p8, i64, p8, i64])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "efedge_attn_values_q4")
        a = sig.args
        builder.call(fn, [data_ptr(context, builder, a[0], args[0]),
                          _i64(context, builder, a[1], args[1]),
                          _i64(context, builder, a[2], args[2]),
                          data_ptr(context, builder, a[3], args[3]),
                          _i64(context, builder, a[4], args[4]),
                          data_ptr(context, builder, a[5], args[5]),
                          _i64(context, builder, a[6], args[6])])
        return context.get_dummy_value()

    return sig, codegen
