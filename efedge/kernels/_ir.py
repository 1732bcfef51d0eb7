"""Text LLVM IR for the vector kernels (``simd``, ``simd_attn``): a small SSA emitter, the
host's vector features, and the hook that links a kernel module into the numba function
that calls it.

Kernels are written as IR text, parsed by llvmlite, and added to the calling function's
code library (``link``): numba then optimises, caches and inlines them like its own code.
Their symbols are weak_odr, so several numba functions may each carry a copy.
"""

from __future__ import annotations

import os

import llvmlite.binding as llvm
from llvmlite import ir

try:
    _FEATS = dict(llvm.get_host_cpu_features())
except RuntimeError:  # pragma: no cover - unknown host
    _FEATS = {}
# EFEDGE_CPU_FEATURES="-avx512vnni,-avxvnni,-f16c" builds the kernels as for a CPU without
# those features (the portable paths, tested on machines that have them). Use it with a
# NUMBA_CACHE_DIR of its own: numba's cache does not know about this switch.
for _name in filter(None, os.environ.get("EFEDGE_CPU_FEATURES", "").split(",")):
    _FEATS[_name.strip().lstrip("+-")] = not _name.strip().startswith("-")


def _has(*names: str) -> bool:
    return all(_FEATS.get(n, False) for n in names)


VNNI = _has("avx512vnni", "avx512vl") or _has("avxvnni")
F16C = _has("f16c")
# AVX-VNNI's 256-bit forms are the same LLVM intrinsics as AVX512-VNNI + VL's (clang's
# avxvnniintrin.h calls the same builtins)
_VNNI_FN = "llvm.x86.avx512.vpdpbusd.256" if VNNI else None
# 16-bit pair products (``_Fn.dot32_scaled``): vpmaddubsw (AVX2), then vpdpwssd (VNNI) or
# vpmaddwd + vpaddd
_PMADDUBS_FN = "llvm.x86.avx2.pmadd.ub.sw" if _has("avx2") else None
_DPWSSD_FN = "llvm.x86.avx512.vpdpwssd.256" if VNNI and _PMADDUBS_FN else None
_PMADDWD_FN = "llvm.x86.avx2.pmadd.wd" if _PMADDUBS_FN else None
PMADD = _PMADDUBS_FN is not None
PMADD_DECL = (f"declare <16 x i16> @{_PMADDUBS_FN}(<32 x i8>, <32 x i8>)\n"
              f"declare <8 x i32> @{_PMADDWD_FN}(<16 x i16>, <16 x i16>)\n" if PMADD else "") + (
    f"declare <8 x i32> @{_DPWSSD_FN}(<8 x i32>, <8 x i32>, <8 x i32>)\n" if _DPWSSD_FN
    else "")
# 16-entry byte tables (MXFP4, IQ4_NL) are looked up with vpshufb where there is AVX2
_PSHUFB_FN = "llvm.x86.avx2.pshuf.b" if _has("avx2") else None
LUT_DECL = (f"declare <32 x i8> @{_PSHUFB_FN}(<32 x i8>, <32 x i8>)\n" if _PSHUFB_FN else "")

# 4-bit indices into a table of 16 int8 values, 32 per block (ggml's kvalues_mxfp4: the
# e2m1 values doubled, scaled by half the E8M0 power of two; kvalues_iq4nl with an fp16
# scale, IQ4_NL and IQ4_XS). The tables go in shifted by OFFSET so that every entry is an
# unsigned byte.
KVALUES = {
    "mxfp4": (0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12),
    "iq4_nl": (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113),
}
OFFSET = {"mxfp4": 12, "iq4_nl": 128}


def unsigned_table(name: str) -> list[int]:
    return [v + OFFSET[name] for v in KVALUES[name]]


def _seq(n: int, start: int = 0, step: int = 1) -> str:
    return "<" + ", ".join(f"i32 {start + i * step}" for i in range(n)) + ">"


def _splat(ty: str, n: int, v) -> str:
    return "<" + ", ".join(f"{ty} {v}" for _ in range(n)) + ">"


class _Fn:
    """A tiny SSA text emitter: ``v(expr)`` appends ``%vN = expr`` and returns ``%vN``."""

    def __init__(self):
        self.lines: list[str] = []
        self.n = 0

    def v(self, expr: str) -> str:
        name = f"%v{self.n}"
        self.n += 1
        self.lines.append(f"  {name} = {expr}")
        return name

    def raw(self, line: str) -> None:
        self.lines.append(line)

    def block_loop(self) -> int:
        """Close the entry block and open the loop over blocks %b = 0 .. %nb-1; returns
        where the loop's other phis go (the caller inserts them once it knows them)."""
        self.raw("  br label %loop")
        self.raw("loop:")
        self.raw("  %b = phi i64 [0, %entry], [%bn, %loop]")
        return len(self.lines)

    def end_block_loop(self) -> None:
        """Next block, or on to %exit after block %nb-1."""
        self.raw("  %bn = add i64 %b, 1")
        self.raw("  %c = icmp ult i64 %bn, %nb")
        self.raw("  br i1 %c, label %loop, label %exit")
        self.raw("exit:")

    # -- helpers ------------------------------------------------------------------------
    def gep(self, base: str, off: str, ty: str = "i8") -> str:
        return self.v(f"getelementptr inbounds {ty}, ptr {base}, i64 {off}")

    def load(self, ty: str, ptr: str, align: int = 1) -> str:
        return self.v(f"load {ty}, ptr {ptr}, align {align}")

    def h2f(self, ptr: str) -> str:
        """float32 of the fp16 at ptr (exact)."""
        if F16C:
            return self.v(f"extractelement <8 x float> {self.h2f_splat(ptr)}, i32 0")
        h = self.load("i16", ptr)
        x = self.v(f"zext i16 {h} to i32")
        m = self.v(f"and i32 {x}, 32767")
        mag = self.v(f"shl i32 {m}, 13")
        f0 = self.v(f"bitcast i32 {mag} to float")
        f1 = self.v(f"fmul float {f0}, 0x46F0000000000000")  # × 2^112
        big = self.v(f"fcmp oge float {f1}, 65536.0")
        ni = self.v(f"or i32 {mag}, 2139095040")
        nf = self.v(f"bitcast i32 {ni} to float")
        f2 = self.v(f"select i1 {big}, float {nf}, float {f1}")
        sg = self.v(f"and i32 {x}, 32768")
        s = self.v(f"shl i32 {sg}, 16")
        b2 = self.v(f"bitcast float {f2} to i32")
        b3 = self.v(f"or i32 {b2}, {s}")
        return self.v(f"bitcast i32 {b3} to float")

    def h2f_splat(self, ptr: str) -> str:
        """<8 x float>: the fp16 at ptr in every lane.

        With F16C a broadcast load and vcvtph2ps. (A scalar fpext, or an insert into a
        zero vector, becomes vpinsrw into a register LLVM knows to have zero upper lanes
        — often a scalar accumulator — which chains every block to the previous one.)"""
        if not F16C:
            return self.splat_f(self.h2f(ptr))
        h = self.load("i16", ptr)
        v0 = self.v(f"insertelement <8 x i16> poison, i16 {h}, i32 0")
        v = self.v(f"shufflevector <8 x i16> {v0}, <8 x i16> poison, <8 x i32> zeroinitializer")
        hv = self.v(f"bitcast <8 x i16> {v} to <8 x half>")
        return self.v(f"fpext <8 x half> {hv} to <8 x float>")

    def dot32(self, w: str, x: str) -> str:
        """<8 x i32>: lane i = sum of w[4i+j] (u8) * x[4i+j] (s8), j < 4."""
        if _VNNI_FN:
            wi = self.v(f"bitcast <32 x i8> {w} to <8 x i32>")
            xi = self.v(f"bitcast <32 x i8> {x} to <8 x i32>")
            return self.v(f"call <8 x i32> @{_VNNI_FN}(<8 x i32> zeroinitializer, "
                          f"<8 x i32> {wi}, <8 x i32> {xi})")
        wz = self.v(f"zext <32 x i8> {w} to <32 x i16>")
        xs = self.v(f"sext <32 x i8> {x} to <32 x i16>")
        p = self.v(f"mul <32 x i16> {wz}, {xs}")
        pe = self.v(f"shufflevector <32 x i16> {p}, <32 x i16> poison, <16 x i32> {_seq(16, 0, 2)}")
        po = self.v(f"shufflevector <32 x i16> {p}, <32 x i16> poison, <16 x i32> {_seq(16, 1, 2)}")
        pe32 = self.v(f"sext <16 x i16> {pe} to <16 x i32>")
        po32 = self.v(f"sext <16 x i16> {po} to <16 x i32>")
        s16 = self.v(f"add <16 x i32> {pe32}, {po32}")
        se = self.v(f"shufflevector <16 x i32> {s16}, <16 x i32> poison, <8 x i32> {_seq(8, 0, 2)}")
        so = self.v(f"shufflevector <16 x i32> {s16}, <16 x i32> poison, <8 x i32> {_seq(8, 1, 2)}")
        return self.v(f"add <8 x i32> {se}, {so}")

    def dot32_scaled(self, acc: str, w: str, x: str, s: str) -> str:
        """acc + lane i · scale i, lane i as dot32's, for weights w <= 127 (u8) so that
        vpmaddubsw's pair sums (at most 2 · 127 · 128) never saturate: the same integers
        as acc + dot32(w, x) · scale, in 2 instructions instead of 4 (vpdpbusd, vpmulld's
        two, vpaddd). s: <8 x i32> holding lane i's scale in both of its 16-bit halves
        (vpdpwssd / vpmaddwd multiply i16 pairs); PMADD hosts only."""
        p = self.v(f"call <16 x i16> @{_PMADDUBS_FN}(<32 x i8> {w}, <32 x i8> {x})")
        if _DPWSSD_FN:
            pi = self.v(f"bitcast <16 x i16> {p} to <8 x i32>")
            return self.v(f"call <8 x i32> @{_DPWSSD_FN}(<8 x i32> {acc}, <8 x i32> {pi}, "
                          f"<8 x i32> {s})")
        s16 = self.v(f"bitcast <8 x i32> {s} to <16 x i16>")
        m = self.v(f"call <8 x i32> @{_PMADDWD_FN}(<16 x i16> {p}, <16 x i16> {s16})")
        return self.v(f"add <8 x i32> {acc}, {m}")

    def lookup16(self, idx: str, table) -> str:
        """<32 x i8>: table[idx[i]] for 32 indices 0..15 (table: 16 ints, -128..255).

        One vpshufb with AVX2 (the table in both 128-bit halves); elsewhere a select per
        table entry. Both give the table's bytes exactly."""
        vals = [v - 256 if v > 127 else v for v in table]
        if _PSHUFB_FN:
            tab = "<" + ", ".join(f"i8 {v}" for v in vals + vals) + ">"
            return self.v(f"call <32 x i8> @{_PSHUFB_FN}(<32 x i8> {tab}, <32 x i8> {idx})")
        out = _splat("i8", 32, vals[0])
        for i in range(1, 16):
            m = self.v(f"icmp eq <32 x i8> {idx}, {_splat('i8', 32, i)}")
            out = self.v(f"select <32 x i1> {m}, <32 x i8> {_splat('i8', 32, vals[i])}, "
                         f"<32 x i8> {out}")
        return out

    def e8m0_half(self, e: str, n: int = 1) -> str:
        """float (n = 1) or <n x float> of ggml_e8m0_to_fp32_half(e) for e: i32 / <n x i32>
        holding the exponent byte: 2^(e - 128) built from its bits, the two smallest
        exponents as the subnormals ggml writes for them."""
        ty = "i32" if n == 1 else f"<{n} x i32>"
        ft = "float" if n == 1 else f"<{n} x float>"

        def c(v):
            return str(v) if n == 1 else _splat("i32", n, v)

        small = self.v(f"icmp ult {ty} {e}, {c(2)}")
        sub = self.v(f"shl {ty} {c(0x00200000)}, {self.v(f'and {ty} {e}, {c(1)}')}")
        norm = self.v(f"shl {ty} {self.v(f'sub {ty} {e}, {c(1)}')}, {c(23)}")
        bt = "i1" if n == 1 else f"<{n} x i1>"
        bits = self.v(f"select {bt} {small}, {ty} {sub}, {ty} {norm}")
        return self.v(f"bitcast {ty} {bits} to {ft}")

    def splat_f(self, s: str) -> str:
        a = self.v(f"insertelement <8 x float> poison, float {s}, i32 0")
        return self.v(f"shufflevector <8 x float> {a}, <8 x float> poison, <8 x i32> "
                      "zeroinitializer")

    def splat_i(self, s: str) -> str:
        a = self.v(f"insertelement <8 x i32> poison, i32 {s}, i32 0")
        return self.v(f"shufflevector <8 x i32> {a}, <8 x i32> poison, <8 x i32> "
                      "zeroinitializer")

    def fma(self, a: str, b: str, c: str) -> str:
        return self.v(f"call <8 x float> @llvm.fma.v8f32(<8 x float> {a}, <8 x float> {b}, "
                      f"<8 x float> {c})")

    def fma1(self, a: str, b: str, c: str) -> str:
        return self.v(f"call float @llvm.fma.f32(float {a}, float {b}, float {c})")

    def i2f(self, v: str) -> str:
        return self.v(f"sitofp i32 {v} to float")

    def i32_at(self, base: str, i: int) -> str:
        """The i-th i32 of the array at base."""
        return self.load("i32", self.gep(base, str(i), "i32"), 4)

    def byte_at(self, base: str, i: int) -> str:
        """The unsigned byte at base + i, as i32."""
        return self.v(f"zext i8 {self.load('i8', self.gep(base, str(i)))} to i32")

    def nibbles32(self, qs: str) -> str:
        """<32 x i8> of the 32 4-bit indices in the <16 x i8> qs, element order: the low
        nibbles are elements 0-15, the high ones 16-31 (Q4_0, IQ4_NL, IQ4_XS …)."""
        lo = self.v(f"and <16 x i8> {qs}, {_splat('i8', 16, 15)}")
        hi = self.v(f"lshr <16 x i8> {qs}, {_splat('i8', 16, 4)}")
        return self.v(f"shufflevector <16 x i8> {lo}, <16 x i8> {hi}, <32 x i32> {_seq(32)}")


def link(context, text: str) -> None:
    """Add the IR module ``text`` to the numba function being lowered."""
    context.active_code_library.add_llvm_module(llvm.parse_assembly(text))


def data_ptr(context, builder, aryty, val):
    """An i8* to the data of a numba array argument."""
    arr = context.make_array(aryty)(context, builder, val)
    return builder.bitcast(arr.data, ir.IntType(8).as_pointer())


def row_base(context, builder, aryty, val, r0ty, r0, block_bytes: int):
    """For a raw 2-D uint8 matrix argument (rows of quant blocks, any row stride): an i8*
    to row r0, the row stride in bytes and the number of blocks per row (i64 values)."""
    from numba import types

    i64 = ir.IntType(64)
    arr = context.make_array(aryty)(context, builder, val)
    row_bytes = builder.extract_value(arr.shape, 1)
    stride = builder.extract_value(arr.strides, 0)
    r = context.cast(builder, r0, r0ty, types.int64)
    base = builder.gep(builder.bitcast(arr.data, ir.IntType(8).as_pointer()),
                       [builder.mul(r, stride)])
    return base, stride, builder.udiv(row_bytes, ir.Constant(i64, block_bytes))
