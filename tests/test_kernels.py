"""efedge.kernels against gguf-py: bit-exact dequantization, products vs float64 matmul."""

import os

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf import quants as gq

from efedge.errors import UnsupportedModelError
from efedge.kernels import SUPPORTED_QTYPES, check_qtype, dequantize, matmul, matvec

Q = GGMLQuantizationType

ALL_TYPES = [Q.F32, Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0,
             Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.IQ4_NL, Q.IQ4_XS, Q.MXFP4]
# the low-bit lattice and ternary types: no integer kernel, Q8_K activations
IQ_TYPES = [Q.IQ2_XXS, Q.IQ2_XS, Q.IQ2_S, Q.IQ3_XXS, Q.IQ3_S, Q.IQ1_S, Q.IQ1_M,
            Q.TQ1_0, Q.TQ2_0]
ALL_TYPES += IQ_TYPES
# gguf.quants.quantize works
QUANTIZABLE = {Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.MXFP4}
# byte offsets of the fp16 scale fields in one block of the types built from random bytes
SCALE_FIELDS = {Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2),
                Q.Q6_K: (208,), Q.IQ4_NL: (0,), Q.IQ4_XS: (0,),
                Q.IQ2_XXS: (0,), Q.IQ2_XS: (0,), Q.IQ2_S: (0,), Q.IQ3_XXS: (0,),
                Q.IQ3_S: (0,), Q.IQ1_S: (0,), Q.TQ1_0: (52,), Q.TQ2_0: (64,)}
# (rows, blocks per row): one row, odd counts, rows not a multiple of 4 or 8
SHAPES = [(1, 1), (3, 2), (13, 3), (37, 2)]


def make_raw(qt: Q, rows: int, blocks: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 [rows, row_bytes] of plausible blocks of ``qt`` (finite scales)."""
    elems, nbytes = GGML_QUANT_SIZES[qt]
    n = blocks * elems
    if qt == Q.F32:
        return rng.standard_normal((rows, n)).astype(np.float32).view(np.uint8)
    if qt == Q.F16:
        return rng.standard_normal((rows, n)).astype(np.float16).view(np.uint8)
    if qt in QUANTIZABLE:
        w = rng.standard_normal((rows, n)).astype(np.float32)
        return np.ascontiguousarray(gq.quantize(w, qt).view(np.uint8).reshape(rows, -1))
    raw = rng.integers(0, 256, (rows, blocks, nbytes), dtype=np.uint8)
    if qt == Q.IQ1_M:  # the fp16 scale is the top nibbles of the four u16 at byte 48
        d = rng.uniform(-0.05, 0.05, (rows, blocks)).astype(np.float16).view(np.uint16)
        sc = raw[..., 48:56].copy().view(np.uint16)
        for k in range(4):
            sc[..., k] = (sc[..., k] & 0x0FFF) | (((d >> (4 * k)) & 0xF) << 12)
        raw[..., 48:56] = sc.view(np.uint8)
    for off in SCALE_FIELDS.get(qt, ()):
        scale = rng.uniform(-0.05, 0.05, (rows, blocks)).astype(np.float16)
        raw[..., off:off + 2] = scale.view(np.uint8).reshape(rows, blocks, 2)
    return raw.reshape(rows, -1)


def readonly(a: np.ndarray) -> np.ndarray:
    a = a.view()
    a.flags.writeable = False
    return a


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


def check_close(got: np.ndarray, w64: np.ndarray, x64: np.ndarray) -> None:
    """|got - x @ w.T| within 1e-5 of the |w| @ |x| scale (float32 accumulation)."""
    ref = x64 @ w64.T
    scale = np.abs(x64) @ np.abs(w64).T
    err = np.abs(got.astype(np.float64) - ref)
    assert np.all(err <= 1e-5 * scale.max() + 1e-30), float(err.max() / scale.max())


@pytest.mark.parametrize("qt", [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_K])
def test_embedding_rows_are_the_dequantized_rows(qt):
    """The token embedding's rows (model.embedding_rows: numpy for F32 / F16) equal
    kernels.dequantize's, every fp16 bit pattern and random F32 bits (inf, NaN) included."""
    from efedge.model import embedding_rows

    rng = np.random.default_rng(3)
    if qt == Q.F16:
        raw = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.uint8).reshape(64, -1)
    else:
        raw = rng.integers(0, 256, (64, GGML_QUANT_SIZES[qt][1] * 4), np.uint8)
    with np.errstate(invalid="ignore", over="ignore"):
        got, ref = embedding_rows(raw, int(qt)), dequantize(raw, int(qt))
    assert got.dtype == np.float32 and got.shape == ref.shape
    nan = np.isnan(ref)
    assert np.array_equal(np.isnan(got), nan)
    assert np.array_equal(got.view(np.uint32)[~nan], ref.view(np.uint32)[~nan])


@pytest.mark.parametrize("qt", ALL_TYPES, ids=lambda t: t.name)
def test_supported(qt):
    assert int(qt) in SUPPORTED_QTYPES
    check_qtype(int(qt), "w")


@pytest.mark.parametrize("qt", ALL_TYPES, ids=lambda t: t.name)
def test_dequantize_bit_exact(qt):
    rng = np.random.default_rng(int(qt))
    for rows, blocks in SHAPES:
        raw = readonly(make_raw(qt, rows, blocks, rng))
        got = dequantize(raw, int(qt))
        assert got.dtype == np.float32 and got.flags.writeable
        assert same_bits(got, gq.dequantize(raw, qt)), (rows, blocks)
    # leading dimensions are kept, and one row can be given as 1-D
    raw = make_raw(qt, 6, 2, rng)
    assert same_bits(dequantize(raw.reshape(2, 3, -1), int(qt)),
                     gq.dequantize(raw, qt).reshape(2, 3, -1))
    assert same_bits(dequantize(raw[4], int(qt)), gq.dequantize(raw[4:5], qt)[0])


@pytest.mark.parametrize("qt", [Q.Q4_1, Q.Q5_1, Q.Q2_K, Q.Q5_K, Q.Q6_K, Q.IQ4_XS, *IQ_TYPES],
                         ids=lambda t: t.name)
def test_dequantize_raw_bytes(qt):
    """Fully random bytes, scales included: inf and NaN scales decode as numpy does."""
    raw = np.random.default_rng(1).integers(0, 256, (64, GGML_QUANT_SIZES[qt][1]), np.uint8)
    with np.errstate(invalid="ignore", over="ignore"):
        got, ref = dequantize(raw, int(qt)), gq.dequantize(raw, qt)
    nan = np.isnan(ref)
    assert np.array_equal(np.isnan(got), nan)
    assert np.array_equal(got.view(np.uint32)[~nan], ref.view(np.uint32)[~nan])


def test_every_half_value():
    """All 65536 fp16 bit patterns, as F16 weights and as Q8_0 block scales (q = 1)."""
    halves = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    ref = halves.view(np.float16).astype(np.float32)
    nan = np.isnan(ref)
    got = dequantize(halves.view(np.uint8), int(Q.F16))
    assert np.array_equal(np.isnan(got), nan)
    assert np.array_equal(got.view(np.uint32)[~nan], ref.view(np.uint32)[~nan])
    blocks = np.ones((65536, 34), np.uint8)
    blocks[:, :2] = halves.view(np.uint8).reshape(-1, 2)
    got = dequantize(blocks, int(Q.Q8_0))[:, 0]
    assert np.array_equal(np.isnan(got), nan)
    assert np.array_equal(got.view(np.uint32)[~nan], ref.view(np.uint32)[~nan])


@pytest.mark.parametrize("qt", ALL_TYPES, ids=lambda t: t.name)
def test_matvec(qt):
    rng = np.random.default_rng(100 + int(qt))
    for rows, blocks in [*SHAPES, (20, 8)]:
        raw = readonly(make_raw(qt, rows, blocks, rng))
        w64 = gq.dequantize(raw, qt).astype(np.float64)
        x = readonly(rng.standard_normal(w64.shape[1]).astype(np.float32))
        got = matvec(raw, int(qt), x)
        assert got.shape == (rows,) and got.dtype == np.float32
        check_close(got[None], w64, x[None].astype(np.float64))
        out = np.full(rows, np.nan, np.float32)
        assert matvec(raw, int(qt), x, out=out) is out
        np.testing.assert_array_equal(out, got)


@pytest.mark.parametrize("qt", ALL_TYPES, ids=lambda t: t.name)
def test_matmul(qt):
    rng = np.random.default_rng(200 + int(qt))
    for (rows, blocks), n_tok in zip([*SHAPES, (37, 3)], [1, 2, 3, 5, 9], strict=True):
        raw = readonly(make_raw(qt, rows, blocks, rng))
        w64 = gq.dequantize(raw, qt).astype(np.float64)
        x = readonly(rng.standard_normal((n_tok, w64.shape[1])).astype(np.float32))
        got = matmul(raw, int(qt), x)
        assert got.shape == (n_tok, rows) and got.dtype == np.float32
        check_close(got, w64, x.astype(np.float64))
        out = np.full((n_tok, rows), np.nan, np.float32)
        assert matmul(raw, int(qt), x, out=out) is out
        np.testing.assert_allclose(out, got, rtol=1e-5, atol=1e-6 * np.abs(got).max())


@pytest.mark.parametrize("qt", [Q.Q4_0, Q.Q4_K], ids=lambda t: t.name)
def test_memmap_input(qt, tmp_path):
    """The real input: a read-only memmap of the file, a slice of its rows."""
    rng = np.random.default_rng(7)
    raw = make_raw(qt, 24, 2, rng)
    path = tmp_path / "w.bin"
    raw.tofile(path)
    mm = np.memmap(path, dtype=np.uint8, mode="r", shape=raw.shape)[8:19]
    w64 = gq.dequantize(raw[8:19], qt).astype(np.float64)
    x = rng.standard_normal((4, w64.shape[1])).astype(np.float32)
    assert same_bits(dequantize(mm, int(qt)), w64.astype(np.float32))
    check_close(matvec(mm, int(qt), x[0])[None], w64, x[:1].astype(np.float64))
    check_close(matmul(mm, int(qt), x), w64, x.astype(np.float64))


def test_unsupported_type_named():
    raw = np.zeros((2, GGML_QUANT_SIZES[Q.NVFP4][1]), np.uint8)
    with pytest.raises(UnsupportedModelError, match="blk.0.ffn_up.*NVFP4"):
        check_qtype(int(Q.NVFP4), "blk.0.ffn_up")
    n = GGML_QUANT_SIZES[Q.NVFP4][0]
    for call in (lambda: dequantize(raw, int(Q.NVFP4)),
                 lambda: matvec(raw, int(Q.NVFP4), np.zeros(n, np.float32)),
                 lambda: matmul(raw, int(Q.NVFP4), np.zeros((1, n), np.float32))):
        with pytest.raises(UnsupportedModelError, match="NVFP4"):
            call()
    with pytest.raises(UnsupportedModelError, match="9999"):
        check_qtype(9999, "w")


def test_malformed_input():
    q4 = int(Q.Q4_0)
    w = make_raw(Q.Q4_0, 4, 2, np.random.default_rng(0))  # [4, 36] bytes, 64 per row
    x = np.zeros(64, np.float32)
    bad = [
        lambda: dequantize(np.zeros((2, 19), np.uint8), q4),  # not whole blocks
        lambda: matvec(np.zeros((2, 19), np.uint8), q4, np.zeros(32, np.float32)),
        lambda: dequantize(w.view(np.int8), q4),  # wrong dtype
        lambda: dequantize(np.zeros((4, 40), np.uint8)[:, :36], q4),  # not contiguous
        lambda: matvec(w, q4, np.zeros(63, np.float32)),  # wrong x length
        lambda: matvec(w, q4, np.zeros((1, 64), np.float32)),  # x must be 1-D
        lambda: matvec(w.reshape(-1), q4, x),  # weights must be 2-D
        lambda: matvec(w, q4, np.zeros(64, np.int32)),  # x not floating point
        lambda: matmul(w, q4, x),  # x must be 2-D
        lambda: matmul(w, q4, np.zeros((3, 32), np.float32)),
        lambda: matvec(w, q4, x, out=np.zeros(5, np.float32)),  # wrong out shape
        lambda: matvec(w, q4, x, out=np.zeros(4, np.float64)),  # wrong out dtype
        lambda: matmul(w, q4, x[None], out=readonly(np.zeros((1, 4), np.float32))),
    ]
    for i, call in enumerate(bad):
        try:
            call()
        except ValueError:
            continue
        pytest.fail(f"malformed case {i} did not raise ValueError")


def test_empty_and_float64_x():
    w = np.zeros((0, 68), np.uint8)
    assert dequantize(w, int(Q.Q8_0)).shape == (0, 64)
    assert matvec(w, int(Q.Q8_0), np.zeros(64, np.float32)).shape == (0,)
    w = make_raw(Q.Q8_0, 3, 2, np.random.default_rng(0))
    x = np.random.default_rng(1).standard_normal(64)  # float64 is converted
    np.testing.assert_allclose(matvec(w, int(Q.Q8_0), x),
                               matvec(w, int(Q.Q8_0), x.astype(np.float32)))
    assert matmul(w, int(Q.Q8_0), np.zeros((0, 64), np.float32)).shape == (0, 3)


# -- integer products on 8-bit activations (what the model computes) ----------------------

from efedge.kernels import INT_QTYPES, qmatmul  # noqa: E402
from efedge.kernels.activations import (  # noqa: E402
    ACT_Q8_0,
    ACT_Q8_K,
    act_scheme,
    quantize_activations,
    round_activations,
)


def _round_q8_0_ref(x):
    # the numpy definition the numba rounding must reproduce bit for bit
    t, k = x.shape
    xb = x.reshape(t, k // 32, 32)
    d = np.abs(xb).max(axis=-1) / np.float32(127.0)
    with np.errstate(divide="ignore"):
        inv = np.where(d != 0, np.float32(1.0) / d, np.float32(0.0)).astype(np.float32)
    q = np.round(xb * inv[..., None])
    d16 = d.astype(np.float16).astype(np.float32)
    return (q * d16[..., None]).astype(np.float32).reshape(t, k)


def _round_q8_k_ref(x):
    t, k = x.shape
    xb = x.reshape(t, k // 256, 256)
    idx = np.abs(xb).argmax(axis=-1)
    mx = np.take_along_axis(xb, idx[..., None], axis=-1)[..., 0]
    with np.errstate(divide="ignore"):
        iscale = np.where(mx != 0, np.float32(-127.0) / mx, np.float32(0.0)).astype(np.float32)
        d = np.where(mx != 0, np.float32(1.0) / iscale, np.float32(0.0)).astype(np.float32)
    q = np.minimum(np.round(xb * iscale[..., None]), 127)
    return (q * d[..., None]).astype(np.float32).reshape(t, k)


@pytest.mark.parametrize("scale", [1e-6, 1e-3, 1.0, 1e3])
def test_round_activations_bit_exact(scale):
    x = (np.random.default_rng(3).standard_normal((9, 512)) * scale).astype(np.float32)
    x[1, :256] = 0
    x[2, 7] = -np.abs(x[2]).max() * 2  # a negative extreme sets the Q8_K scale
    assert same_bits(round_activations(x, int(Q.Q4_0)), _round_q8_0_ref(x))
    assert same_bits(round_activations(x, int(Q.Q4_K)), _round_q8_k_ref(x))
    assert same_bits(round_activations(x, int(Q.F16)), x.astype(np.float16).astype(np.float32))
    # the 8-bit form the integer kernels read holds exactly those values (up to the sign
    # of zero: integers have none)
    for qt, ref, group in ((Q.Q8_0, _round_q8_0_ref, 32), (Q.Q6_K, _round_q8_k_ref, 256)):
        scheme = act_scheme(int(qt), 512)
        xq, xd, _ = quantize_activations(x, scheme)
        scales = xd[:, ::8] if scheme == ACT_Q8_0 else xd
        got = xq.astype(np.float32) * np.repeat(scales, group, axis=1)
        assert np.array_equal(got, ref(x))


@pytest.mark.parametrize("qt", ALL_TYPES, ids=lambda t: t.name)
def test_qmatmul_is_the_rounded_product(qt):
    """qmatmul = round_activations(x) @ dequantize(w).T; for the integer types the 1-
    and 4-token kernels agree bit for bit, so any token count gives the same rows."""
    rng = np.random.default_rng(300 + int(qt))
    blocks = 3 if GGML_QUANT_SIZES[qt][0] == 256 else 9
    raw = readonly(make_raw(qt, 21, blocks, rng))
    w64 = gq.dequantize(raw, qt).astype(np.float64)
    x = rng.standard_normal((9, w64.shape[1])).astype(np.float32)
    got = qmatmul(raw, int(qt), x)
    check_close(got, w64, round_activations(x, int(qt)).astype(np.float64))
    if int(qt) in INT_QTYPES:
        for t in (1, 4, 5):
            assert same_bits(qmatmul(raw, int(qt), x[:t]), got[:t])
    acts: dict = {}
    assert same_bits(qmatmul(raw, int(qt), x, acts), got)
    assert same_bits(qmatmul(raw, int(qt), x, acts), got)  # reused 8-bit activations


@pytest.mark.parametrize("qt", IQ_TYPES, ids=lambda t: t.name)
def test_iq_activations_are_q8_k(qt):
    """llama.cpp's vec_dot_type for every IQ1 / IQ2 / IQ3 and TQ type is Q8_K (ggml-cpu.c,
    type_traits_cpu): activations are rounded in blocks of 256, never left as floats."""
    assert act_scheme(int(qt), 512) == ACT_Q8_K
    x = np.random.default_rng(4).standard_normal((2, 512)).astype(np.float32)
    assert same_bits(round_activations(x, int(qt)), round_activations(x, int(Q.Q4_K)))
    assert not same_bits(round_activations(x, int(qt)), x)


def _exp_ulp_error(x: np.ndarray, o: np.ndarray) -> float:
    """Largest error of o ≈ e**x in float32 ulps of the exact value."""
    ref64 = np.exp(x.astype(np.float64))
    return float((np.abs(o - ref64) / np.spacing(ref64.astype(np.float32))).max())


def test_half_conversions_and_exp():
    from numba import njit

    from efedge.kernels._fp import bits_to_f32, f32_to_f16
    from efedge.kernels.nn import exp_f32

    @njit
    def to_half(bits, out):
        for i in range(bits.shape[0]):
            out[i] = f32_to_f16(bits_to_f32(bits[i]))

    rng = np.random.default_rng(0)
    bits = np.concatenate([rng.integers(0, 2**32, 1_000_000, dtype=np.uint64).astype(np.uint32),
                           np.arange(0x33000000, 0x48000000, 0x3FF, dtype=np.uint32)])
    out = np.empty(bits.shape[0], np.int64)
    to_half(bits.astype(np.int64), out)
    f = bits.view(np.float32)
    with np.errstate(all="ignore"):
        ref = f.astype(np.float16).view(np.uint16).astype(np.int64)
    nan = np.isnan(f)
    assert np.array_equal(out[~nan], ref[~nan])
    assert np.all((out[nan] & 0x7C00) == 0x7C00) and np.all(out[nan] & 0x3FF)

    @njit
    def exps(x, o):
        for i in range(x.shape[0]):
            o[i] = exp_f32(x[i])

    x = np.linspace(-87, 88.7, 400_001).astype(np.float32)
    o = np.empty_like(x)
    exps(x, o)
    assert _exp_ulp_error(x, o) < 1.5


def test_stage_sync_any_thread_mapping():
    """The claim / finish / wait stages give every item exactly once and order the
    stages, with the threads numba has and with one."""
    import numba
    from numba import njit, prange

    from efedge.kernels._sync import claim, finish, wait_stage

    @njit(nogil=True)
    def worker(ctr, a, b, n):
        while True:
            i = claim(ctr, 0)
            if i >= n:
                break
            a[i] += i * 2.0
            finish(ctr, 0)
        wait_stage(ctr, 0, n)
        while True:
            i = claim(ctr, 1)
            if i >= n:
                break
            b[i] = a[n - 1 - i] + 1
            finish(ctr, 1)
        wait_stage(ctr, 1, n)

    @njit(parallel=True, nogil=True)
    def run(a, b, n, nt):
        ctr = np.zeros(4, np.int64)
        for _t in prange(nt):
            worker(ctr, a, b, n)

    n = 20_000
    for nt in (1, 2, 2 * numba.get_num_threads() + 1):
        a, b = np.zeros(n), np.zeros(n)
        run(a, b, n, nt)
        assert np.array_equal(b, np.arange(n)[::-1] * 2.0 + 1)


@pytest.mark.parametrize("qts", [(Q.Q4_0, Q.Q4_0, Q.Q4_0), (Q.Q4_K, Q.Q4_K, Q.Q6_K),
                                 (Q.Q8_0, Q.Q8_0, Q.IQ4_NL), (Q.F16, Q.F16, Q.F32),
                                 (Q.Q5_K, Q.Q3_K, Q.Q2_K), (Q.IQ4_XS, Q.IQ4_XS, Q.Q5_K),
                                 (Q.IQ2_XXS, Q.IQ3_S, Q.IQ1_M), (Q.IQ1_S, Q.IQ2_S, Q.TQ2_0)],
                         ids=lambda q: "-".join(t.name for t in q))
def test_decode_ffn_all_experts_equals_one_at_a_time(qts):
    """The resident path (all K experts in one call) and the expert-cache path (one call
    per expert) give the same bits, and both are the rounded SwiGLU."""
    import numba

    from efedge.kernels.decode import decode_ffn, ffn_sum

    rng = np.random.default_rng(11)
    d, f, e = 256, 512, 6
    per = GGML_QUANT_SIZES[qts[0]][0]
    gate = np.stack([make_raw(qts[0], f, d // per, rng) for _ in range(e)])
    up = np.stack([make_raw(qts[1], f, d // per, rng) for _ in range(e)])
    down = np.stack([make_raw(qts[2], d, f // GGML_QUANT_SIZES[qts[2]][0], rng)
                     for _ in range(e)])
    gate, up, down = readonly(gate), readonly(up), readonly(down)
    qt = np.array([int(q) for q in qts], np.int64)
    sc = np.array([act_scheme(int(qts[0]), d), act_scheme(int(qts[1]), d),
                   act_scheme(int(qts[2]), f)], np.int64)
    h = rng.standard_normal(d).astype(np.float32)
    ids = np.array([4, 1, 3], np.int32)
    w = np.array([0.5, 0.3, 0.2], np.float32)
    nt = numba.get_num_threads()
    y_all = np.empty((3, d), np.float32)
    decode_ffn(h, ids, w, gate, up, down, qt, sc, y_all, nt)
    y_one = np.empty((3, d), np.float32)
    for k in (2, 0, 1):  # any arrival order
        decode_ffn(h, np.zeros(1, np.int32), w[k:k + 1], gate[ids[k]][None], up[ids[k]][None],
                   down[ids[k]][None], qt, sc, y_one[k:k + 1], nt)
    assert same_bits(y_all, y_one)
    x = rng.standard_normal(d).astype(np.float32)
    out = np.empty(d, np.float32)
    ffn_sum(x, y_all, 3, out)
    assert same_bits(out, x + ((y_all[0] + y_all[1]) + y_all[2]))
    for k, ex in enumerate(ids):  # against dequantized weights in float64
        g = qmatmul(gate[ex], int(qts[0]), h[None])[0].astype(np.float64)
        u = qmatmul(up[ex], int(qts[1]), h[None])[0].astype(np.float64)
        with np.errstate(over="ignore"):  # exp(-g) of a large negative g: a = 0
            a = (g / (1 + np.exp(-g)) * u).astype(np.float32)
        ref = qmatmul(down[ex], int(qts[2]), a[None])[0] * w[k]
        assert np.abs(y_all[k] - ref).max() <= 1e-4 * np.abs(ref).max()


def test_prefill_attention_matches_numpy_reference():
    from efedge import layers
    from efedge.kernels.prefill import prefill_attend, prefill_qk

    rng = np.random.default_rng(5)
    t, pos, h, hkv, d = 23, 6, 8, 2, 64  # several key blocks and value passes
    n_ctx = 40
    kc = np.zeros((n_ctx, hkv, d), np.uint16)
    vc = np.zeros((n_ctx, hkv, d), np.uint16)
    old_k = rng.standard_normal((pos, hkv, d)).astype(np.float16)
    old_v = rng.standard_normal((pos, hkv, d)).astype(np.float16)
    kc[:pos], vc[:pos] = old_k.view(np.uint16), old_v.view(np.uint16)
    q = rng.standard_normal((t, h * d)).astype(np.float32)
    k = rng.standard_normal((t, hkv * d)).astype(np.float32)
    v = rng.standard_normal((t, hkv * d)).astype(np.float32)
    cos, sin = layers.rope_tables(np.arange(pos, pos + t), d, 10000.0)
    qh = np.empty((t, h, d), np.float32)
    empty = np.zeros(0, np.float32)
    prefill_qk(q, k, v, empty, empty, 0, np.float32(1e-6), cos, sin, True, h, hkv, d, d,
               kc, vc, pos, qh)
    out = np.empty((t, h * d), np.float32)
    prefill_attend(qh, kc, vc, pos, hkv, d, np.float32(1 / np.sqrt(d)), out)
    qr = layers.apply_rope(q.reshape(t, h, d), cos, sin, "neox")
    kr = layers.apply_rope(k.reshape(t, hkv, d), cos, sin, "neox")
    keys = np.concatenate([old_k, kr.astype(np.float16)])
    vals = np.concatenate([old_v, v.reshape(t, hkv, d).astype(np.float16)])
    assert np.array_equal(kc[:pos + t].view(np.float16), keys)
    assert np.array_equal(vc[:pos + t].view(np.float16), vals)
    ref = layers.attention(qr, keys, vals, pos)
    # the softmax weights are rounded to float16 (as ggml does): a weight whose float32
    # value differs in the last bit may round the other way
    err = np.abs(out - ref)
    assert err.max() <= 1e-3 * np.abs(ref).max() and err.mean() <= 1e-5 * np.abs(ref).max()


def test_every_kernel_states_its_fastmath_flags():
    """numba gives a callee that leaves fastmath unset its first caller's flags and caches
    that build: a helper first reached from a FAST kernel computed with reassociation
    everywhere after (order-dependent results). Every kernel must say."""
    import re
    from pathlib import Path

    import efedge

    root = Path(efedge.__file__).parent
    loose = [f"{f.relative_to(root)}: {d}" for f in root.rglob("*.py")
             for d in re.findall(r"@(?:numba\.)?n?jit\b(?:\([^)]*\))?", f.read_text())
             if "fastmath" not in d]
    assert not loose, loose


def test_exp_is_exact_after_a_fast_caller():
    """exp_f32 reached first from a fastmath caller keeps its own (strict) arithmetic."""
    from numba import njit

    from efedge.kernels._fp import FAST
    from efedge.kernels.nn import exp_f32

    @njit(fastmath=FAST)
    def fast_caller(x, o):
        for i in range(x.shape[0]):
            o[i] = exp_f32(x[i])

    x = np.linspace(-87, 88.7, 4001).astype(np.float32)
    o = np.empty_like(x)
    fast_caller(x, o)
    assert np.isfinite(o).all()
    assert _exp_ulp_error(x, o) < 1.5


def test_mxfp4_every_exponent_bit_exact():
    """MXFP4 (gpt-oss experts): all 256 E8M0 exponents, including the ones below 2 that
    ggml_e8m0_to_fp32_half shifts by hand and 255 (inf / nan), and every nibble."""
    raw = np.zeros((256, 17), np.uint8)
    raw[:, 0] = np.arange(256)
    raw[:, 1:] = (np.arange(16, dtype=np.uint8) * 17)[None]  # nibbles 0..15, low and high
    got = dequantize(readonly(raw), int(Q.MXFP4))
    with np.errstate(over="ignore", invalid="ignore"):
        ref = gq.dequantize(raw, Q.MXFP4)
    assert same_bits(got, ref)


@pytest.mark.slow  # compiles every kernel twice more in a fresh cache: minutes
def test_portable_paths_give_the_same_bits(tiny_gguf, tmp_path):
    """Kernels built as for a CPU without VNNI and F16C (most AMD and pre-Ice-Lake Intel
    laptops) and without AVX2's byte shuffle (the MXFP4 / IQ4_NL table lookup) give
    bitwise the same logits: the integer dot products, the lookups and the half
    conversions are exact on every path."""
    import subprocess
    import sys

    script = (
        "import sys, numpy as np, efedge\n"
        "from efedge.kernels import _ir\n"
        "assert (_ir._VNNI_FN is None) == (sys.argv[1] == 'off')\n"
        "out = []\n"
        "for p in sys.argv[3:]:\n"
        "    with efedge.load(p) as m:\n"
        "        out.append(np.concatenate([m.logits(list(range(5, 29))), m.logits([7])]))\n"
        "np.save(sys.argv[2], np.concatenate(out))\n")
    files = [str(tiny_gguf("qwen3moe", "Q4_K_M")), str(tiny_gguf("qwen2moe", "Q4_0")),
             str(tiny_gguf("gpt-oss", "MXFP4_MOE"))]
    results = {}
    for mode in ("off", "host"):
        env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / f"cache-{mode}"))
        if mode == "off":
            env["EFEDGE_CPU_FEATURES"] = "-avx512vnni,-avxvnni,-f16c,-avx2"
        else:
            env.pop("EFEDGE_CPU_FEATURES", None)
        out = tmp_path / f"{mode}.npy"
        proc = subprocess.run([sys.executable, "-c", script, mode, str(out), *files], env=env,
                              capture_output=True, text=True, timeout=1500)
        if mode == "host" and proc.returncode != 0 and "AssertionError" in proc.stderr:
            pytest.skip("this CPU has no VNNI: the portable path is the host path")
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[mode] = np.load(out)
    assert np.array_equal(results["off"], results["host"])


def _lut_raw(qt: Q, rows: int, blocks: int, rng: np.random.Generator) -> np.ndarray:
    """Random MXFP4 / IQ4_NL rows: every nibble, and for MXFP4 exponents from the two
    subnormal ones (0, 1) to large ones."""
    raw = rng.integers(0, 256, (rows, blocks, 17 if qt == Q.MXFP4 else 18), dtype=np.uint8)
    if qt == Q.MXFP4:
        raw[..., 0] = rng.choice(np.r_[0, 1, 2, 3, 100:140, 180, 200], (rows, blocks))
    else:
        scale = rng.uniform(-0.05, 0.05, (rows, blocks)).astype(np.float16)
        raw[..., :2] = scale.view(np.uint8).reshape(rows, blocks, 2)
    return raw.reshape(rows, -1)


def _vec_dot_ref(raw: np.ndarray, qt: Q, x: np.ndarray) -> np.ndarray:
    """ggml_vec_dot_{mxfp4,iq4_nl}_q8_0 as llama.cpp's generic C computes it: per block
    sumf += (d_w · d_x) · Σ kvalue · xq, in float32, x quantized to Q8_0 first."""
    from efedge.kernels._ir import KVALUES

    rows, n = raw.shape[0], x.shape[0]
    xq, xd, _ = quantize_activations(x[None], ACT_Q8_0)
    kv = np.array(KVALUES["mxfp4" if qt == Q.MXFP4 else "iq4_nl"], np.int64)
    bb = 17 if qt == Q.MXFP4 else 18
    blk = raw.reshape(rows, n // 32, bb)
    if qt == Q.MXFP4:
        dw = gq.MXFP4.e8m0_to_fp32_half(blk[..., 0].astype(np.uint32))
    else:
        dw = blk[..., :2].copy().view(np.float16)[..., 0].astype(np.float32)
    qs = blk[..., bb - 16:]
    idx = np.concatenate([qs & 15, qs >> 4], axis=-1)  # elements 0-15, 16-31
    sumi = (kv[idx] * xq[0].reshape(1, -1, 32).astype(np.int64)).sum(-1)
    dx = xd[0, ::8]  # Q8_0's 8 copies per block
    out = np.zeros(rows, np.float32)
    with np.errstate(over="ignore"):
        for b in range(n // 32):
            out += (dw[:, b] * dx[b]).astype(np.float32) * sumi[:, b].astype(np.float32)
    return out


@pytest.mark.parametrize("qt", [Q.MXFP4, Q.IQ4_NL], ids=lambda t: t.name)
def test_lut_integer_kernels_match_the_scalar_vec_dot(qt):
    """MXFP4 / IQ4_NL (4-bit indices into a 16-entry table) through the integer kernels:
    the decode row dot and the tiled prefill product give llama.cpp's scalar vec_dot (and
    dequantize × rounded activations in float64) up to float summation order, and the
    tiled product the same bits for any number of tokens per call."""
    from efedge.kernels import rowdot

    rng = np.random.default_rng(41 + int(qt))
    rows, blocks = 37, 24
    raw = readonly(_lut_raw(qt, rows, blocks, rng))
    w64 = gq.dequantize(raw, qt).astype(np.float64)
    x = rng.standard_normal((6, blocks * 32)).astype(np.float32)
    xr = round_activations(x, int(qt)).astype(np.float64)
    pre = qmatmul(raw, int(qt), x)
    check_close(pre, w64, xr)
    for t in (1, 2, 5):
        assert same_bits(qmatmul(raw, int(qt), x[:t]), pre[:t])
    n = x.shape[1]
    # writable, as the shared dispatcher's C callback passes its rows: the specialisation
    # compiled at import, rather than a second one compiled for this test alone (~15 s)
    raw_c = raw.copy()
    for t in range(x.shape[0]):
        pack = rowdot.new_pack(n)
        rowdot.prep(ACT_Q8_0, int(qt), x[t], pack)
        dec = np.empty(rows, np.float32)
        rowdot.dot_rows(int(qt), raw_c, 0, rows, n, pack, np.empty(n, np.float32), dec)
        check_close(dec[None], w64, xr[t:t + 1])
        ref = _vec_dot_ref(raw, qt, x[t])
        scale = np.abs(w64) @ np.abs(xr[t])
        assert np.all(np.abs(dec - ref) <= 1e-5 * scale)  # per row
        assert np.all(np.abs(pre[t] - ref) <= 1e-5 * scale)


# the 256-element super-block types, all with integer kernels against Q8_K activations
K_INT_TYPES = [Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.IQ4_XS]


@pytest.mark.parametrize("qt", K_INT_TYPES, ids=lambda t: t.name)
def test_k_integer_kernels_are_the_rounded_product(qt):
    """The K-quants and IQ4_XS through the integer kernels (unsigned weights, integer
    sub-block scales, the mins / offsets through the Q8_K block sums): the decode row dot
    and the tiled prefill product give dequantize(w) · round_activations(x) in float64, per
    row and token, up to float32 summation, for rows of 1, 3 and 16 super-blocks (4096
    elements: a model's hidden size), a row of all-ones bytes (every bit set: the largest
    weights and scales) among them."""
    from efedge.kernels import rowdot

    assert rowdot.has_int(int(qt)) and int(qt) in INT_QTYPES
    rng = np.random.default_rng(61 + int(qt))
    for blocks in (1, 3, 16):
        raw = make_raw(qt, 19, blocks, rng)
        raw[0] = 0xFF
        for off in SCALE_FIELDS[qt]:
            raw[0].reshape(blocks, -1)[:, off:off + 2] = np.array([0.01], np.float16).view(np.uint8)
        raw = readonly(raw)
        w64 = gq.dequantize(raw, qt).astype(np.float64)
        n = w64.shape[1]
        x = rng.standard_normal((5, n)).astype(np.float32)
        x[1] = 1.0  # every 8-bit activation -127 (the largest integer products)
        xr = round_activations(x, int(qt)).astype(np.float64)
        ref = xr @ w64.T
        tol = 1e-5 * (np.abs(xr) @ np.abs(w64).T)
        pre = qmatmul(raw, int(qt), x)
        assert np.all(np.abs(pre - ref) <= tol), float(np.max(np.abs(pre - ref) / tol))
        for t in (1, 3):
            assert same_bits(qmatmul(raw, int(qt), x[:t]), pre[:t])
        for t in range(x.shape[0]):
            pack = rowdot.new_pack(n)
            rowdot.prep(ACT_Q8_K, int(qt), x[t], pack)
            dec = np.empty(raw.shape[0], np.float32)
            rowdot.dot_rows(int(qt), raw, 0, raw.shape[0], n, pack, np.empty(n, np.float32), dec)
            assert np.all(np.abs(dec - ref[t]) <= tol[t]), float(np.max(np.abs(dec - ref[t])
                                                                        / tol[t]))


def _swiglu_oai_ref(g: np.ndarray, u: np.ndarray) -> np.ndarray:
    x = np.minimum(g, 7.0)
    y = np.clip(u, -7.0, 7.0)
    return x / (1.0 + np.exp(1.702 * -x)) * (y + 1.0)


def test_oai_experts_one_call_equals_one_at_a_time():
    """gpt-oss's experts (biases, clamped SwiGLU; MXFP4 weights) in one call — the decode
    kernel over all K, or over a slot pool whose slots are not the expert ids, and the
    prefill kernel over all tokens — give the bits of one call per expert (the expert
    cache's path), and both are the biased, clamped SwiGLU of the rounded products."""
    import numba

    from efedge.kernels import moe
    from efedge.kernels.decode import decode_ffn_oai, decode_ffn_oai_serial

    rng = np.random.default_rng(12)
    d, f, e, k_used = 128, 96, 5, 3
    qts = (Q.MXFP4, Q.MXFP4, Q.MXFP4)
    gate = readonly(np.stack([_lut_raw(Q.MXFP4, f, d // 32, rng) for _ in range(e)]))
    up = readonly(np.stack([_lut_raw(Q.MXFP4, f, d // 32, rng) for _ in range(e)]))
    down = readonly(np.stack([_lut_raw(Q.MXFP4, d, f // 32, rng) for _ in range(e)]))
    for a in (gate, up, down):  # moderate exponents: activations in the clamp's range
        a.base[..., ::17] = rng.integers(121, 127, a.base[..., ::17].shape)
    bg, bu = (rng.standard_normal((e, f)).astype(np.float32) for _ in range(2))
    bd = rng.standard_normal((e, d)).astype(np.float32)
    qt = np.array([int(q) for q in qts], np.int64)
    sc = np.array([act_scheme(int(Q.MXFP4), d)] * 2 + [act_scheme(int(Q.MXFP4), f)], np.int64)
    nt = numba.get_num_threads()
    # decode: all K, a pool in another order, one at a time
    h = rng.standard_normal(d).astype(np.float32)
    ids = np.array([4, 0, 2], np.int32)
    w = np.array([0.5, 0.3, 0.2], np.float32)
    y_all = np.empty((k_used, d), np.float32)
    decode_ffn_oai(h, ids, ids, w, gate, up, down, qt, sc, bg, bu, bd, y_all, nt)
    perm = np.array([2, 4, 0, 1, 3])  # pool slot s holds expert perm[s]
    slot = np.argsort(perm).astype(np.int32)
    y_pool = np.empty((k_used, d), np.float32)
    decode_ffn_oai(h, slot[ids], ids, w, gate[perm], up[perm], down[perm], qt, sc, bg, bu, bd,
                   y_pool, nt)
    assert same_bits(y_all, y_pool)
    for k in (2, 0, 1):
        one = np.empty((1, d), np.float32)
        ex = ids[k]
        decode_ffn_oai_serial(h, np.zeros(1, np.int32), ids[k:k + 1], w[k:k + 1],
                              gate[ex][None], up[ex][None], down[ex][None], qt, sc,
                              bg, bu, bd, one)
        assert same_bits(one[0], y_all[k])
        g = qmatmul(gate[ex], int(Q.MXFP4), h[None])[0].astype(np.float64) + bg[ex]
        u = qmatmul(up[ex], int(Q.MXFP4), h[None])[0].astype(np.float64) + bu[ex]
        a = _swiglu_oai_ref(g, u).astype(np.float32)
        assert np.abs(a).max() > 1 and (np.abs(g) > 7).any()  # the clamp is exercised
        ref = (qmatmul(down[ex], int(Q.MXFP4), a[None])[0] + bd[ex]) * w[k]
        assert np.abs(y_all[k] - ref).max() <= 1e-4 * np.abs(ref).max()
    # prefill: every expert of the layer in one call against one call per expert
    t = 11
    x = rng.standard_normal((t, d)).astype(np.float32)
    tid = np.stack([rng.permutation(e)[:k_used] for _ in range(t)]).astype(np.int64)
    tw = rng.uniform(0.1, 1, (t, k_used)).astype(np.float32)
    slots = np.zeros((t, k_used, d), np.float32)
    moe.moe_ffn_oai(x, tid, tw, gate, up, down, qt, sc, bg, bu, bd, slots, 8)
    for ex in range(e):
        tok, kk = np.nonzero(tid == ex)
        one = np.empty((len(tok), 1, d), np.float32)
        moe.moe_ffn_oai(x[tok], np.zeros((len(tok), 1), np.int64), np.ones((len(tok), 1),
                        np.float32), gate[ex:ex + 1], up[ex:ex + 1], down[ex:ex + 1], qt, sc,
                        bg[ex:ex + 1], bu[ex:ex + 1], bd[ex:ex + 1], one, 8)
        assert same_bits(slots[tok, kk], one[:, 0] * tw[tok, kk, None])
        g = qmatmul(gate[ex], int(Q.MXFP4), x[tok]).astype(np.float64) + bg[ex]
        u = qmatmul(up[ex], int(Q.MXFP4), x[tok]).astype(np.float64) + bu[ex]
        a = _swiglu_oai_ref(g, u).astype(np.float32)
        ref = qmatmul(down[ex], int(Q.MXFP4), a) + bd[ex]
        assert np.abs(one[:, 0] - ref).max() <= 1e-4 * np.abs(ref).max()


@pytest.mark.parametrize("pos, window", [(0, 0), (5, 4), (3, 64)])
def test_sink_attention_kernel_matches_numpy_reference(pos, window):
    """gpt-oss's prefill attention kernel (sinks, sliding window, grouped heads, a cached
    prefix) against oss.attention_sinks, the numpy reference."""
    from efedge.kernels.prefill_oss import prefill_attend_sinks
    from efedge.oss import attention_sinks

    rng = np.random.default_rng(pos + window)
    t, h, hkv, d = 9, 8, 2, 64
    n_ctx = 32
    q = rng.standard_normal((t, h, d)).astype(np.float16).astype(np.float32)
    kc = rng.standard_normal((n_ctx, hkv, d)).astype(np.float16)
    vc = rng.standard_normal((n_ctx, hkv, d)).astype(np.float16)
    sinks = rng.standard_normal(h).astype(np.float32) * 2
    got = prefill_attend_sinks(q, kc.view(np.uint16), vc.view(np.uint16), pos, sinks,
                               np.float32(0.125), window)
    ref = attention_sinks(q, kc[:pos + t], vc[:pos + t], pos, sinks, 0.125, window)
    assert np.abs(got - ref).max() <= 2e-3 * np.abs(ref).max()


@pytest.mark.parametrize("qt", [Q.F32, Q.F16, Q.Q8_0, Q.Q5_0, Q.Q4_K, Q.Q6_K],
                         ids=lambda t: t.name)
def test_heads_matmul_is_each_heads_rounded_product(qt):
    """kernels.heads.heads_matmul (deepseek2's per-head k_b / v_b products in one call) =
    each head's round_activations(x) @ dequantize(w).T; for the float-path types and one
    token (deepseek2's decode) the same bits as qmatmul head by head, since both decode
    the row and take the same dot (two tokens or more go through the tiled product)."""
    from efedge.kernels.heads import heads_matmul

    rng = np.random.default_rng(400 + int(qt))
    heads, rows = 3, 37  # rows not a multiple of the kernel's chunk of 32
    blocks = 1 if GGML_QUANT_SIZES[qt][0] == 256 else 4
    raw = np.stack([make_raw(qt, rows, blocks, rng) for _ in range(heads)])
    k = blocks * GGML_QUANT_SIZES[qt][0]
    x = rng.standard_normal((2, heads, k)).astype(np.float32)
    got = heads_matmul(readonly(raw), int(qt), x)
    assert got.shape == (2, heads, rows)
    for hh in range(heads):
        w64 = gq.dequantize(raw[hh], qt).astype(np.float64)
        check_close(got[:, hh], w64, round_activations(x[:, hh], int(qt)).astype(np.float64))
        if int(qt) == Q.Q5_0:
            one = heads_matmul(readonly(raw), int(qt), x[:1])
            assert same_bits(one[:, hh], qmatmul(readonly(raw[hh]), int(qt), x[:1, hh]))
    with pytest.raises(ValueError, match=r"x must be \[T, 3, "):
        heads_matmul(raw, int(qt), x[:, :2])
    with pytest.raises(ValueError, match="raw must be"):
        heads_matmul(raw[0], int(qt), x)


def test_f16_rows_convert_every_bit_pattern_exactly():
    # F16C converts 8 at a time; the odd length runs the one-by-one tail too. Signalling
    # NaNs keep their quiet bit clear, as gguf-py's dequantize leaves them.
    from efedge.kernels import quant_legacy

    every = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    for h in (every, every[:65533]):
        out = np.empty(h.shape[0], np.float32)
        quant_legacy.deq_f16(h.view(np.uint8), out)
        ref = gq.dequantize(h.view(np.uint8), GGMLQuantizationType.F16)
        assert np.array_equal(out.view(np.uint32), ref.astype(np.float32).view(np.uint32))


@pytest.mark.parametrize("n", [256, 96, 40, 7])
def test_f16_decode_rows_are_the_product_of_the_rounded_activations(n):
    # rowdot's F16 rows (converted on the fly where the CPU has F16C), tails included
    from efedge.kernels import generic, rowdot
    from efedge.kernels.activations import act_scheme

    rng = np.random.default_rng(n)
    w = (rng.standard_normal((24, n)) * 0.2).astype(np.float16)
    x = rng.standard_normal(n).astype(np.float32)
    pack = rowdot.new_pack(n)
    rowdot.prep(act_scheme(generic.F16, n), generic.F16, x, pack)
    out = np.empty(24, np.float32)
    rowdot.dot_rows(generic.F16, w.view(np.uint8), 0, 24, n, pack, np.empty(n, np.float32),
                    out)
    ref = w.astype(np.float64) @ pack[0][:n].astype(np.float64)
    assert np.abs(out - ref).max() <= 1e-5 * np.abs(ref).max()
    assert np.array_equal(pack[0][:n], x.astype(np.float16).astype(np.float32))


@pytest.mark.parametrize("n", [256, 100, 33, 8, 7, 1])
def test_f16_output_head_matvec(n):
    """The F16 matvec (an output head like the demo model's): 8 halves per conversion
    where the CPU has F16C, the scalar kernel elsewhere; both are the float64 product
    up to float32 rounding, and a row's result does not depend on the rows around it."""
    from efedge import kernels
    from efedge.kernels import quant_legacy, simd_f16

    fused, _view = kernels._FUSED_MATVEC[int(Q.F16)]
    want = quant_legacy.matvec_f16_rows if simd_f16.AVAILABLE else quant_legacy.matvec_f16
    assert fused is want
    rng = np.random.default_rng(n)
    w = (rng.standard_normal((37, n)) * 0.2).astype(np.float16)
    x = rng.standard_normal(n).astype(np.float32)
    got = matvec(readonly(w.view(np.uint8)), int(Q.F16), x)
    ref = w.astype(np.float64) @ x.astype(np.float64)
    assert np.abs(got - ref).max() <= 1e-5 * max(np.abs(ref).max(), 1e-30)
    one = matvec(readonly(np.ascontiguousarray(w[5:6]).view(np.uint8)), int(Q.F16), x)
    assert one[0] == got[5]
