"""efedge.kernels against gguf-py: bit-exact dequantization, products vs float64 matmul."""

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf import quants as gq

from efedge.errors import UnsupportedModelError
from efedge.kernels import SUPPORTED_QTYPES, check_qtype, dequantize, matmul, matvec

Q = GGMLQuantizationType

ALL_TYPES = [Q.F32, Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0,
             Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.IQ4_NL, Q.IQ4_XS]
QUANTIZABLE = {Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0}  # gguf.quants.quantize works
# byte offsets of the fp16 scale fields in one block of the types built from random bytes
SCALE_FIELDS = {Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2),
                Q.Q6_K: (208,), Q.IQ4_NL: (0,), Q.IQ4_XS: (0,)}
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
    for off in SCALE_FIELDS[qt]:
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


@pytest.mark.parametrize("qt", [Q.Q4_1, Q.Q5_1, Q.Q2_K, Q.Q5_K, Q.Q6_K, Q.IQ4_XS],
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
    raw = np.zeros((2, GGML_QUANT_SIZES[Q.IQ2_XXS][1]), np.uint8)
    with pytest.raises(UnsupportedModelError, match="blk.0.ffn_up.*IQ2_XXS"):
        check_qtype(int(Q.IQ2_XXS), "blk.0.ffn_up")
    for call in (lambda: dequantize(raw, int(Q.IQ2_XXS)),
                 lambda: matvec(raw, int(Q.IQ2_XXS), np.zeros(256, np.float32)),
                 lambda: matmul(raw, int(Q.IQ2_XXS), np.zeros((1, 256), np.float32))):
        with pytest.raises(UnsupportedModelError, match="IQ2_XXS"):
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
