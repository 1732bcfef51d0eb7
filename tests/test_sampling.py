"""efedge.sampling: llama.cpp's default sampler chain."""

import math
import warnings

import numpy as np
import pytest

from efedge.errors import EfedgeError, SamplingError
from efedge.sampling import Sampler, SamplingParams

# every filter off: the plain softmax(logits / T) distribution
PLAIN = dict(top_k=0, top_p=1.0, min_p=0.0)


def dist(logits, history=(), **kw):
    ids, probs = Sampler(SamplingParams(**kw)).distribution(np.asarray(logits, np.float32),
                                                            history)
    return dict(zip(ids.tolist(), probs.tolist(), strict=True))


def softmax(x):
    e = np.exp(np.asarray(x, np.float64) - np.max(x))
    return e / e.sum()


# a hand-built distribution, listed out of order so ids and ranks differ:
# token 2: 0.5, token 0: 0.25, token 3: 0.15, token 1: 0.10
HAND = np.log(np.array([0.25, 0.10, 0.5, 0.15], np.float32))


# -- greedy -------------------------------------------------------------------------------
def test_greedy_is_argmax():
    rng = np.random.default_rng(0)
    s = Sampler(SamplingParams(temperature=0.0, seed=1))
    for _ in range(50):
        x = rng.standard_normal(1000).astype(np.float32)
        assert s(x, []) == int(np.argmax(x))


def test_greedy_first_index_on_ties_and_neg_inf():
    s = Sampler(SamplingParams(temperature=0))
    assert s(np.array([1.0, 3.0, 3.0, -np.inf], np.float32), []) == 1
    assert s(np.array([-np.inf, -np.inf, -5.0], np.float32), []) == 2


def test_top_k_one_equals_greedy():
    rng = np.random.default_rng(1)
    s = Sampler(SamplingParams(temperature=1.5, top_k=1, top_p=1.0, min_p=0.0, seed=3))
    for _ in range(50):
        x = rng.standard_normal(5000).astype(np.float32)
        assert s(x, []) == int(np.argmax(x))


# -- determinism --------------------------------------------------------------------------
def test_seeded_reproducibility():
    x = np.random.default_rng(2).standard_normal(32000).astype(np.float32) * 2
    params = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=1234)
    a = Sampler(params)
    b = Sampler(params)
    seq_a = [a(x, []) for _ in range(200)]
    assert seq_a == [b(x, []) for _ in range(200)]
    assert len(set(seq_a)) > 20  # it really samples
    c = Sampler(SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=99))
    assert seq_a != [c(x, []) for _ in range(200)]


# -- filters on hand-built distributions ----------------------------------------------------
@pytest.mark.parametrize(("top_p", "kept"), [
    (0.4, {2}),           # 0.5 already reaches 0.4
    (0.7, {2, 0}),        # 0.5 + 0.25 = 0.75
    (0.8, {2, 0, 3}),     # 0.9
    (0.95, {2, 0, 3, 1}),
    (1.0, {2, 0, 3, 1}),  # off
])
def test_top_p_keeps_smallest_set_reaching_p(top_p, kept):
    d = dist(HAND, temperature=1.0, top_k=0, top_p=top_p, min_p=0.0)
    assert set(d) == kept
    mass = sum({2: 0.5, 0: 0.25, 3: 0.15, 1: 0.10}[i] for i in kept)
    for i, p in d.items():
        assert p == pytest.approx({2: 0.5, 0: 0.25, 3: 0.15, 1: 0.10}[i] / mass, rel=1e-5)


@pytest.mark.parametrize(("min_p", "kept"), [
    (0.0, {2, 0, 3, 1}),  # off
    (0.1, {2, 0, 3, 1}),  # p >= 0.05
    (0.25, {2, 0, 3}),    # p >= 0.125
    (0.45, {2, 0}),       # p >= 0.225
    (0.6, {2}),           # p >= 0.3
    (1.0, {2}),
])
def test_min_p_keeps_tokens_above_fraction_of_max(min_p, kept):
    assert set(dist(HAND, temperature=1.0, top_k=0, top_p=1.0, min_p=min_p)) == kept


def test_top_k_keeps_k_best():
    assert set(dist(HAND, temperature=1.0, top_k=2, top_p=1.0, min_p=0.0)) == {2, 0}
    assert set(dist(HAND, temperature=1.0, top_k=10, top_p=1.0, min_p=0.0)) == {0, 1, 2, 3}


def test_filters_combine():
    # top-k 3 → {2, 0, 3}, renormalised 0.5/0.9 ...; top-p 0.8 then needs {2, 0}
    # (0.833 ≥ 0.8); min-p 0.55 alone would keep {2}.
    assert set(dist(HAND, temperature=1.0, top_k=3, top_p=0.8, min_p=0.0)) == {2, 0}
    assert set(dist(HAND, temperature=1.0, top_k=3, top_p=0.8, min_p=0.55)) == {2}


def test_temperature_applies_after_filters_like_llama_cpp():
    # llama.cpp's chain ends with temperature: top-p picks from the T=1 distribution,
    # T only reshapes the survivors. At T=2 the flatter distribution would need 3 tokens.
    d = dist(HAND, temperature=2.0, top_k=0, top_p=0.7, min_p=0.0)
    assert set(d) == {2, 0}
    assert d[2] == pytest.approx(math.sqrt(0.5) / (math.sqrt(0.5) + math.sqrt(0.25)), rel=1e-5)


def test_distribution_order_and_sum():
    ids, probs = Sampler(SamplingParams(temperature=0.7, **PLAIN)).distribution(HAND)
    assert ids.tolist() == [2, 0, 3, 1]
    assert probs.sum() == pytest.approx(1.0)
    assert np.all(np.diff(probs) <= 0)


def test_sampling_frequencies_follow_softmax():
    logits = np.array([1.0, 0.5, -0.5, 2.0], np.float32)
    temp = 0.7
    s = Sampler(SamplingParams(temperature=temp, seed=2024, **PLAIN))
    n = 20000
    counts = np.bincount([s(logits, []) for _ in range(n)], minlength=4)
    expected = softmax(logits / temp)
    # std of a frequency ≤ sqrt(0.25 / n) ≈ 0.0035; 0.015 is > 4 sigma
    np.testing.assert_allclose(counts / n, expected, atol=0.015)


def test_large_vocab_matches_naive_reference():
    # exercises the partial-sort path of top-p on a 152k vocabulary
    x = np.random.default_rng(5).standard_normal(152064).astype(np.float32) * 2
    ids, probs = Sampler(SamplingParams(temperature=0.8, top_k=0, top_p=0.9,
                                        min_p=0.0)).distribution(x)
    order = np.argsort(-x.astype(np.float64), kind="stable")
    p = softmax(x)[order]
    cut = int(np.searchsorted(np.cumsum(p), 0.9)) + 1
    ref_ids = order[:cut]
    assert ids.tolist() == ref_ids.tolist()
    ref = softmax(x[ref_ids] / 0.8)
    np.testing.assert_allclose(probs, ref, rtol=1e-6)
    tok = Sampler(SamplingParams(seed=0))(x, [1, 2, 3])
    assert 0 <= tok < x.size


def test_neg_inf_never_sampled():
    x = np.array([0.0, -np.inf, 0.0, -np.inf], np.float32)
    s = Sampler(SamplingParams(temperature=1.0, seed=0, **PLAIN))
    assert {s(x, []) for _ in range(200)} == {0, 2}


def test_pos_inf_wins():
    x = np.array([0.0, np.inf, 5.0], np.float32)
    assert Sampler(SamplingParams(seed=0))(x, []) == 1


# -- repetition penalty ---------------------------------------------------------------------
def test_repeat_penalty_llama_cpp_style():
    logits = [2.0, 1.0, -1.0, 0.5]
    # token 0 (positive) divided, token 2 (negative) multiplied; token 0 counted once
    d = dist(logits, [0, 2, 0, 0], temperature=1.0, repeat_penalty=2.0, **PLAIN)
    exp = softmax([1.0, 1.0, -2.0, 0.5])
    for i in range(4):
        assert d[i] == pytest.approx(exp[i], rel=1e-5)


def test_extreme_penalties_saturate_without_warnings():
    """The largest and smallest penalties a float32 holds: a repeated token's logit goes
    to -inf (banned) or +inf, as llama.cpp's float arithmetic takes it there — no
    overflow or divide-by-zero warning on the way (numpy warned, and 1e-308 divided by
    zero)."""
    x = np.array([2.0, -2.0, 0.5, 3.0], np.float32)
    big, tiny = float(np.finfo(np.float32).max), float(np.finfo(np.float32).tiny)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s = Sampler(SamplingParams(temperature=0, repeat_penalty=big))
        pen = s._penalised(x, [0, 1, 3])
        assert pen[1] == -np.inf and 0 < pen[0] < pen[3] < 1e-37 and pen[2] == 0.5
        assert s(x, [0, 1, 3]) == 2
        s = Sampler(SamplingParams(temperature=0, repeat_penalty=tiny, frequency_penalty=big,
                                   presence_penalty=-big))
        assert s(x, [1, 3, 3]) == 0  # (3 / tiny - 2 big + big < 0)
        s = Sampler(SamplingParams(temperature=0, repeat_penalty=tiny))
        y = np.array([2.0, -1.0, 0.0, 5.0], np.float32)
        pen = s._penalised(y, [0, 3])
        assert pen[3] == np.inf and np.isfinite(pen[0]) and s(y, [0, 3]) == 3


def test_tiny_temperature_is_greedy_without_warnings():
    """A temperature so small that the logits over it overflow: the best token alone, as
    greedy (numpy warned of the overflow on the way)."""
    x = np.array([2.0, -2.0, 0.5, 3.0], np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for t in (1e-300, 5e-324):
            ids, probs = Sampler(SamplingParams(temperature=t, **PLAIN)).distribution(x)
            assert probs[0] == 1.0 and ids[0] == 3 and not probs[1:].any()


def test_a_temperature_a_float_holds_as_zero_is_greedy_on_ties():
    """llama.cpp keeps the temperature in a float: 1e-50 is 0 there, greedy, the first of
    exactly tied logits. Dividing by it here left the tie to the draw."""
    x = np.array([1.0, 3.0, 3.0, 0.5], np.float32)
    for seed in range(8):
        s = Sampler(SamplingParams(temperature=1e-50, seed=seed, **PLAIN))
        assert s(x, []) == 1
    assert SamplingParams(temperature=1e-50).greedy and not SamplingParams(1e-30).greedy


def test_repeat_penalty_changes_greedy_choice():
    x = np.array([2.0, 1.5, 0.0], np.float32)
    assert Sampler(SamplingParams(temperature=0))(x, [0]) == 0
    assert Sampler(SamplingParams(temperature=0, repeat_penalty=1.5))(x, [0]) == 1


def test_repeat_last_n_window():
    x = np.array([2.0, 1.9, 0.0], np.float32)
    greedy = dict(temperature=0, repeat_penalty=2.0)
    hist = [0, 1, 2, 2]
    assert Sampler(SamplingParams(repeat_last_n=2, **greedy))(x, hist) == 0  # only 2 hit
    assert Sampler(SamplingParams(repeat_last_n=4, **greedy))(x, hist) == 0  # both halved
    assert Sampler(SamplingParams(repeat_last_n=3, **greedy))(x, [1, 0, 2, 2]) == 1
    assert Sampler(SamplingParams(repeat_last_n=2, **greedy))(x, [1, 0, 2, 2]) == 0
    assert Sampler(SamplingParams(repeat_last_n=4, **greedy))(x, [0, 2, 2, 2]) == 1
    assert Sampler(SamplingParams(repeat_last_n=2, **greedy))(x, [0, 2, 2, 2]) == 0
    assert Sampler(SamplingParams(repeat_last_n=-1, **greedy))(x, [0] + [2] * 500) == 1
    assert Sampler(SamplingParams(repeat_last_n=0, **greedy))(x, [0]) == 0  # off


def test_frequency_and_presence_penalties_llama_cpp_style():
    """llama.cpp's penalties sampler: over the window, the repeat penalty first, then
    count · frequency_penalty + presence_penalty subtracted (OpenAI's definition too)."""
    logits, hist = [2.0, 1.0, -1.0, 0.5], [0, 2, 0, 0]  # token 0 three times, token 2 once
    d = dist(logits, hist, temperature=1.0, frequency_penalty=0.5, presence_penalty=0.25,
             **PLAIN)
    exp = softmax([2.0 - 1.75, 1.0, -1.0 - 0.75, 0.5])
    assert [d[i] for i in range(4)] == pytest.approx(exp.tolist(), rel=1e-5)
    d = dist(logits, hist, temperature=1.0, repeat_penalty=2.0, frequency_penalty=0.5,
             presence_penalty=0.25, **PLAIN)
    exp = softmax([1.0 - 1.75, 1.0, -2.0 - 0.75, 0.5])
    assert [d[i] for i in range(4)] == pytest.approx(exp.tolist(), rel=1e-5)
    # a negative penalty favours what was said; the window limits what counts
    x = np.array([1.0, 1.2, 0.0], np.float32)
    assert Sampler(SamplingParams(temperature=0, presence_penalty=-0.5))(x, [0]) == 0
    assert Sampler(SamplingParams(temperature=0, frequency_penalty=0.1))(x, [1, 1, 1]) == 0
    assert Sampler(SamplingParams(temperature=0, frequency_penalty=0.1,
                                  repeat_last_n=1))(x, [1, 1, 0]) == 1


def test_history_out_of_vocab_raises():
    with pytest.raises(SamplingError, match="outside the vocabulary"):
        Sampler(SamplingParams(repeat_penalty=1.1))(np.zeros(4, np.float32), [7])


# -- input handling ------------------------------------------------------------------------
def test_input_not_mutated():
    x = np.random.default_rng(3).standard_normal(1000).astype(np.float32)
    x[5] = -np.inf
    before = x.copy()
    x.setflags(write=False)  # would raise if anything wrote into it
    for temp in (0.0, 0.8):
        s = Sampler(SamplingParams(temperature=temp, repeat_penalty=1.3, seed=0))
        s(x, list(range(100)))
        s.distribution(x, [1, 2, 3])
    np.testing.assert_array_equal(x, before)


def test_nan_logits_raise():
    x = np.array([0.0, np.nan, 1.0], np.float32)
    with pytest.raises(EfedgeError, match="NaN"):
        Sampler(SamplingParams(seed=0))(x, [])
    with pytest.raises(EfedgeError, match="NaN"):
        Sampler(SamplingParams(temperature=0))(x, [])


def test_all_neg_inf_raises():
    with pytest.raises(SamplingError, match="-inf"):
        Sampler(SamplingParams(seed=0))(np.full(3, -np.inf, np.float32), [])


def test_bad_logits_shape_raises():
    with pytest.raises(SamplingError, match="1-D"):
        Sampler(SamplingParams())(np.zeros((2, 3), np.float32), [])


# -- validation ----------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "value"), [
    ("temperature", -0.1), ("temperature", float("nan")), ("temperature", float("inf")),
    ("temperature", "0.8"), ("temperature", True), ("temperature", None),
    ("top_k", -1), ("top_k", 40.0), ("top_k", True), ("top_k", "40"),
    ("top_p", 0.0), ("top_p", 1.01), ("top_p", -0.5), ("top_p", float("nan")),
    ("top_p", False),
    ("min_p", -0.01), ("min_p", 1.5), ("min_p", float("nan")), ("min_p", None),
    ("repeat_penalty", 0.0), ("repeat_penalty", -1.0), ("repeat_penalty", float("inf")),
    ("repeat_penalty", float("nan")), ("repeat_penalty", "1.1"),
    ("repeat_last_n", -2), ("repeat_last_n", 64.0), ("repeat_last_n", False),
    ("seed", -1), ("seed", 1.5), ("seed", True), ("seed", "42"), ("seed", float("nan")),
    ("frequency_penalty", float("nan")), ("frequency_penalty", "1"),
    # beyond what llama.cpp's float holds (numpy overflowed, with a RuntimeWarning)
    ("repeat_penalty", 1e308), ("repeat_penalty", 1e-300), ("frequency_penalty", -1e39),
    ("presence_penalty", 1e300),
    ("presence_penalty", float("inf")), ("presence_penalty", None),
])
def test_invalid_parameter_raises_naming_it(name, value):
    params = SamplingParams(**{name: value})
    with pytest.raises(SamplingError, match=name) as err:
        params.validate()
    assert isinstance(err.value, ValueError) and isinstance(err.value, EfedgeError)
    with pytest.raises(SamplingError, match=name):
        Sampler(params)


@pytest.mark.parametrize("kw", [
    {}, dict(temperature=0), dict(top_k=0), dict(top_p=1.0), dict(min_p=0.0), dict(min_p=1.0),
    dict(repeat_last_n=-1), dict(repeat_last_n=0), dict(seed=0), dict(seed=2**40),
    dict(temperature=2, top_k=np.int64(5), top_p=np.float32(0.5)),
])
def test_valid_parameters_accepted(kw):
    SamplingParams(**kw).validate()
