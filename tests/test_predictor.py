"""The hybrid predictor: each source of evidence on hand-built routers and transition
tables with known answers, fusion weights that follow the informative source, calibrated
probabilities, batch unions, trace seeding."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import load_benchmark

from efedge.experts import predictor as predictor_mod
from efedge.experts.predictor import PREGATE, TEMPORAL, TOKEN, TRANSITION, HybridPredictor
from efedge.experts.predictor_kernels import _rank_desc

L, E, K, D = 3, 8, 2, 8


def _only(pred: HybridPredictor, comp: int) -> HybridPredictor:
    """Fix the fusion weights to a single source (no adaptation)."""
    pred.adapt = False
    pred.weights[:] = 0.0
    pred.weights[:, :, comp] = 1.0
    return pred


def _eye_routers() -> np.ndarray:
    """Router of layer m scores expert e by h[(e + m) % D]: a one-hot hidden state on
    dimension j selects expert (j - m) % E at layer m."""
    W = np.zeros((L, E, D), dtype=np.float32)
    for m in range(L):
        for e in range(E):
            W[m, e, (e + m) % D] = 4.0
    return W


def test_pregating_picks_the_future_routers_choice():
    pred = _only(HybridPredictor(L, E, K, max_distance=2), PREGATE)
    pred.set_router_weights(_eye_routers())
    h = np.zeros((1, D), dtype=np.float32)
    h[0, 5], h[0, 6] = 1.0, 0.8
    pred.step(0, np.array([[0, 1]]), hidden=h, n_pred=2)
    # layer 1: dims 5, 6 → experts 4, 5 (in that order); layer 2: experts 3, 4
    assert pred.order[0, :2].tolist() == [4, 5]
    assert pred.order[1, :2].tolist() == [3, 4]
    # calibrated probability follows the rank (prior: top-K ranks 0.5, the rest lower)
    assert pred.p_use[0, 4] == pytest.approx(0.5) and pred.p_use[0, 0] < 0.5


def test_pregating_from_trace_logits_and_unknown_rows():
    pred = _only(HybridPredictor(L, E, K, max_distance=2), PREGATE)
    pg = np.full((1, 2, E), np.nan, dtype=np.float32)
    pg[0, 0] = np.arange(E)  # layer 1: expert 7 best, then 6
    pred.step(0, np.array([[0, 1]]), pregate=pg, n_pred=2)
    assert pred.order[0, :2].tolist() == [7, 6]
    # distance 2 has no information (NaN): all experts equally likely
    assert np.allclose(pred.p_use[1], pred.p_use[1, 0])


def test_a_pass_start_pregates_its_first_layer_from_that_layers_input():
    """With layer 0's input known before its attention (a one-token pass), the pass start
    ranks layer 0's experts by layer 0's own router on it — from the normalised input
    (router weights set) or from the router's logits (a trace's) — and only layer 0:
    without it, or at layer 1, pre-gating has nothing to say."""
    pred = _only(HybridPredictor(L, E, K, max_distance=2), PREGATE)
    pred.set_router_weights(_eye_routers())
    h = np.zeros((1, D), dtype=np.float32)
    h[0, 5], h[0, 6] = 1.0, 0.8  # layer 0's router: experts 5, 6 (layer 1's: 4, 5)
    pred.begin_pass([3])
    pred.predict_pass_start(2, hidden=h)
    assert pred.order[0, :2].tolist() == [5, 6]
    assert np.allclose(pred.p_use[1], pred.p_use[1, 0])  # layer 1: no information
    pred.begin_pass([3])
    pred.predict_pass_start(2)  # no input: layer 0 is not pre-gated either
    assert np.allclose(pred.p_use[0], pred.p_use[0, 0])
    assert np.isnan(pred._pass_pg).all()  # (nothing left for the next pass start)
    z = np.zeros((1, E), dtype=np.float32)
    z[0, 7], z[0, 2] = 3.0, 2.0
    pred.begin_pass([3])
    pred.predict_pass_start(2, logits=z)
    assert pred.order[0, :2].tolist() == [7, 2]
    for bad in (np.full((1, E), np.nan, np.float32), np.zeros((1, E + 1), np.float32)):
        pred.begin_pass([3])
        pred.predict_pass_start(2, logits=bad)  # unusable: ignored
        assert np.allclose(pred.p_use[0], pred.p_use[0, 0])


def test_transitions_from_a_seeded_table_cross_the_token_boundary():
    # every token: layer 0 uses {a, a+1}, layer 1 {a+2, a+3}, layer 2 {a+4, a+5}, and the
    # next token starts at a+1: the chain is deterministic at every distance
    n = 200
    ex = np.zeros((n, L, K), dtype=np.int64)
    for t in range(n):
        for m in range(L):
            ex[t, m] = [(t + 2 * m) % E, (t + 2 * m + 1) % E]
    pred = _only(HybridPredictor(L, E, K, max_distance=4), TRANSITION)
    pred.seed(ex)
    pred.step(0, np.array([[3, 4]]), n_pred=4)
    assert set(pred.order[0, :2].tolist()) == {5, 6}   # layer 1, same token
    assert set(pred.order[1, :2].tolist()) == {7, 0}   # layer 2
    assert set(pred.order[2, :2].tolist()) == {4, 5}   # layer 0 of the next token (a+1)
    assert set(pred.order[3, :2].tolist()) == {6, 7}   # layer 1 of the next token
    # the same table learned online instead of seeded; the next token (60) starts at a = 4,
    # and the previous token's layers (sources across the pass boundary) agree
    live = _only(HybridPredictor(L, E, K, max_distance=4), TRANSITION)
    for t in range(60):
        for m in range(L):
            live.step(m, ex[t, m][None], n_pred=0)
    live.step(0, ex[60, 0][None], n_pred=4)
    expect = [{6, 7}, {0, 1}, {5, 6}, {7, 0}]
    assert [set(live.order[d, :2].tolist()) for d in range(4)] == expect


def test_temporal_locality_repeats_the_recent_choice():
    pred = _only(HybridPredictor(L, E, K, max_distance=3), TEMPORAL)
    for _ in range(5):
        for m in range(L):
            pred.step(m, np.array([[m, 7 - m]]), n_pred=0)
    pred.step(2, np.array([[2, 5]]), n_pred=3)
    for d in range(1, 4):
        m = (2 + d) % L
        assert set(pred.order[d - 1, :2].tolist()) == {m, 7 - m}


def test_fusion_weights_follow_the_informative_source():
    rng = np.random.default_rng(0)
    W = _eye_routers()
    pred = HybridPredictor(L, E, K, max_distance=1, eta=0.5)
    pred.set_router_weights(W)
    hot = rng.choice(E, K, replace=False)
    for _ in range(150):
        # pre-gating is exact; transitions and history are noise (random each token)
        for m in range(L):
            ids = rng.choice(E, K, replace=False)[None] if m == 0 else hot[None]
            nxt = rng.choice(E, K, replace=False)
            h = np.zeros((1, D), dtype=np.float32)
            if m + 1 < L:
                h[0, (nxt[0] + m + 1) % D], h[0, (nxt[1] + m + 1) % D] = 1.0, 0.9
            hot = nxt
            pred.step(m, ids, hidden=h, n_pred=1)
    # among the sources that were available (no begin_pass: no token memory)
    w = pred.weights[1:, 0, :TOKEN] / pred.weights[1:, 0, :TOKEN].sum(axis=1, keepdims=True)
    assert (w[:, PREGATE] > 0.8).all(), w
    # recall@K pools target layers: 1 and 2 are exact, layer 0 (next token) is chance
    assert pred.recall_at_k()[0] > (2 + K / E) / 3 - 0.05
    # calibration learned that the top-K ranks at distance 1 are (almost) always used
    assert pred.prec[1, 0, :K].min() > 0.9 and pred.prec[1, 0, K:].max() < 0.1


def test_batch_prediction_is_the_union_over_tokens():
    pred = _only(HybridPredictor(L, E, K, max_distance=1), PREGATE)
    pred.set_router_weights(_eye_routers())
    h = np.zeros((2, D), dtype=np.float32)
    h[0, 1], h[0, 2] = 1.0, 0.9  # token 0 → layer 1 experts 0, 1
    h[1, 5], h[1, 6] = 1.0, 0.9  # token 1 → layer 1 experts 4, 5
    pred.step(0, np.array([[0, 1], [2, 3]]), hidden=h, n_pred=1)
    assert set(pred.order[0, :4].tolist()) == {0, 1, 4, 5}
    hi, lo = pred.prec[1, 0, 0], pred.prec[1, 0, K]  # calibration of a top / other rank
    union = 1 - (1 - hi) * (1 - lo)  # used by one token, or by the other
    assert pred.p_use[0, 0] == pytest.approx(union) and pred.p_use[0, 4] == pytest.approx(union)
    # the expected number of distinct experts the batch needs exceeds one token's
    single = _only(HybridPredictor(L, E, K, max_distance=1), PREGATE)
    single.set_router_weights(_eye_routers())
    single.step(0, np.array([[0, 1]]), hidden=h[:1], n_pred=1)
    assert pred.p_use[0].sum() > 1.5 * single.p_use[0].sum()


def test_seed_validation_and_npz(tmp_path):
    pred = HybridPredictor(L, E, K, max_distance=2)
    with pytest.raises(ValueError):
        pred.seed(np.zeros((5, L + 1, K), dtype=np.int64))
    with pytest.raises(ValueError, match=rf"0\.\.{E - 1} .*from {E} to {E}"):
        pred.seed(np.full((5, L, K), E, dtype=np.int64))
    with pytest.raises(ValueError, match="from -1 to 0"):  # numpy would wrap -1 round
        pred.seed(-np.eye(5, L * K, dtype=np.int64).reshape(5, L, K))
    with pytest.raises(ValueError, match="integers, got dtype float64"):  # not truncated
        pred.seed(np.full((5, L, K), 1.5))
    ex = np.random.default_rng(1).integers(0, E, (20, L, K))
    np.savez(tmp_path / "t.npz", experts=ex.astype(np.int16))
    pred.seed(tmp_path / "t.npz")
    assert pred.rowsum.sum() > 0


def test_decay_rescaling_keeps_ratios():
    pred = HybridPredictor(L, E, K, max_distance=1, decay=0.5)  # fast decay: rescales often
    for t in range(300):
        for m in range(L):
            pred.step(m, np.array([[t % 2, 2 + t % 2]]), n_pred=0)
    assert np.isfinite(pred.trans).all() and pred.params[0] <= 1e20
    row = pred.trans[0, 0, 1] / pred.rowsum[0, 0, 1]  # 1 at layer 0 → layer 1 has {1, 3}
    assert row[[1, 3]].sum() == pytest.approx(1.0, rel=1e-3)


def _token_pass(pred: HybridPredictor, token: int, per_layer: dict) -> None:
    pred.begin_pass([token])
    for m in range(L):
        pred.step(m, np.array([per_layer[m]]), n_pred=0)


def test_token_memory_predicts_a_seen_tokens_experts_before_its_pass():
    pred = _only(HybridPredictor(L, E, K, max_distance=3), TOKEN)
    five = {0: [1, 2], 1: [3, 4], 2: [5, 6]}
    seven = {0: [0, 7], 1: [0, 1], 2: [2, 3]}
    _token_pass(pred, 5, five)
    _token_pass(pred, 7, seven)
    # token 5 again: before layer 0 runs, its last choices at layers 0, 1, 2
    pred.begin_pass([5])
    pred.predict_pass_start(3)
    for d in range(1, 4):
        assert set(pred.order[d - 1, :K].tolist()) == set(five[d - 1]), d
        assert pred.p_next[d - 1, five[d - 1]].min() > pred.p_next[d - 1].mean()
    # and from a routed layer, for the layers after it in the same pass
    pred.step(0, np.array([five[0]]), n_pred=2)
    assert set(pred.order[0, :K].tolist()) == set(five[1])
    assert set(pred.order[1, :K].tolist()) == set(five[2])


def _context_pass(pred: HybridPredictor, token: int, pos, per_layer: dict) -> None:
    pred.begin_pass([token], pos)
    for m in range(L):
        pred.step(m, np.array([per_layer[m]]), n_pred=0)


def test_the_context_draft_values_what_followed_a_tokens_last_occurrence():
    """A token seen earlier in the same context: the tokens that followed it there are
    the draft, and the experts each of them chose the last time it ran are valued
    DRAFT_P / sqrt(distance) (the highest where drafts overlap) — in `draft` and, where
    higher, in the eviction values p_next. Not across contexts, not from positions
    rewound, not for a batch, not with draft_tokens=0."""
    pred = HybridPredictor(L, E, K, draft_tokens=2, draft_p=0.5)
    five = {0: [1, 2], 1: [3, 4], 2: [5, 6]}
    six = {0: [0, 7], 1: [0, 1], 2: [2, 3]}
    seven = {0: [7, 6], 1: [5, 4], 2: [2, 0]}
    eight = {0: [4, 5], 1: [6, 7], 2: [1, 4]}
    for pos, (tok, route) in enumerate([(5, five), (6, six), (7, seven), (8, eight)]):
        _context_pass(pred, tok, pos, route)
        assert not pred.draft.any()  # no token occurred before in this context
    pred.begin_pass([5], 4)  # 5 again: 6 then 7 followed it (8 is beyond two tokens)
    want = np.zeros((L, E), np.float32)
    for d, route in ((2, seven), (1, six)):
        for m, ids in route.items():
            want[m, ids] = np.maximum(want[m, ids], np.float32(0.5 / np.sqrt(d)))
    assert np.allclose(pred.draft, want)
    assert (pred.p_next >= pred.draft).all()
    assert (pred.p_next[want > 0] >= want[want > 0]).all()
    for m in range(L):  # a layer's eviction values after its step keep the draft's
        pred.step(m, np.array([five[m]]), n_pred=1)
        assert (pred.p_next[m] >= pred.draft[m]).all()
    # a new context: token 5's earlier occurrence is not in it
    _context_pass(pred, 5, 0, five)
    assert not pred.draft.any()
    _context_pass(pred, 6, 1, six)
    pred.begin_pass([5], 2)
    assert pred.draft[0, six[0]].tolist() == [0.5, 0.5] and pred.draft.sum() == 0.5 * 6
    # rewound to position 1: the 5 at position 2 is gone (another token is there now), so
    # nothing after it is drafted (unchecked, the 9 at position 3 would be)
    for pos, (tok, route) in enumerate([(7, seven), (8, eight), (9, five)], start=1):
        _context_pass(pred, tok, pos, route)
    pred.begin_pass([5], 4)
    assert not pred.draft.any()
    # a batch drafts nothing
    pred.begin_pass([6, 7], 5)
    assert not pred.draft.any()
    # two earlier occurrences: the one before the latest counts at half the value
    for pos, (tok, route) in enumerate([(5, five), (6, six), (5, five), (7, seven)]):
        _context_pass(pred, tok, pos, route)
    pred.begin_pass([5], 4)  # after 5 at 2: 7 (d 1); after 5 at 0: 6 (d 1), 5 (d 2)
    want = np.zeros((L, E), np.float32)
    for p, route in ((0.25 / np.sqrt(2), five), (0.25, six), (0.5, seven)):
        for m, ids in route.items():
            want[m, ids] = np.maximum(want[m, ids], np.float32(p))
    assert np.allclose(pred.draft, want)
    off = HybridPredictor(L, E, K, draft_tokens=0)
    for pos, (tok, route) in enumerate([(5, five), (6, six), (5, five)]):
        _context_pass(off, tok, pos, route)
        assert not off.draft.any()
        b = tok % off.tok_tags.shape[0]  # (the token memory still learns each pass's)
        assert off.tok_tags[b] == tok and off._tok1[0] == b and off.tok_hist[b].any()


def test_the_context_draft_prefers_what_followed_the_same_tokens():
    """Of a token's earlier occurrences, the one preceded by most of the same tokens as
    the current pass's (up to DRAFT_MATCH) is drafted first, at full value, then the
    latest at half; without such a match the latest leads (as above)."""
    routes = {t: {m: [(t + m) % E, (t + 2 * m + 1) % E] for m in range(L)} for t in range(10)}

    def drafted(text: list[int], tok: int) -> np.ndarray:
        pred = HybridPredictor(L, E, K, draft_tokens=2, draft_p=0.5)
        for pos, t in enumerate(text):
            _context_pass(pred, t, pos, routes[t])
        pred.begin_pass([tok], len(text))
        return pred.draft

    def valued(*pairs) -> np.ndarray:  # (value, token): that token's experts at that value
        want = np.zeros((L, E), np.float32)
        for p, t in pairs:
            for m, ids in routes[t].items():
                want[m, ids] = np.maximum(want[m, ids], np.float32(p))
        return want

    half, d2 = 0.25, 1 / np.sqrt(2)
    # 5 after a 7, as at position 1: 6 (d 1), 8 (d 2) at 0.5; after the latest 5 (at 4):
    # 9, 7 at 0.25
    assert np.allclose(drafted([7, 5, 6, 8, 5, 9, 7], 5),
                       valued((half * d2, 7), (half, 9), (0.5 * d2, 8), (0.5, 6)))
    # "3 7 5" at 0-2 matches three tokens, "7 5" at 5-6 two: the longer match leads
    assert np.allclose(drafted([3, 7, 5, 6, 8, 7, 5, 9, 4, 3, 7], 5),
                       valued((half * d2, 4), (half, 9), (0.5 * d2, 8), (0.5, 6)))
    # "8 5": the latest occurrence (at 4) is the match itself, then the one before
    assert np.allclose(drafted([7, 5, 6, 8, 5, 9, 8], 5),
                       valued((half * d2, 8), (half, 6), (0.5 * d2, 8), (0.5, 9)))


def test_the_context_draft_reads_a_prefill_like_one_token_passes():
    """A prompt passed as one batch (prefill) is context as the same tokens passed one by
    one are: a later one-token pass drafts the same from it. Token ids past the table's
    initial size grow it; ids past _LAST_AT_MAX are not recorded (no draft, no error)."""
    big = 100_000  # past the initial 64 Ki ids
    text = [7, big, 6, 8, big, 9]
    routes = {t: {m: [(t + m) % E, (t + 2 * m + 1) % E] for m in range(L)} for t in text}

    def pred_after(batch: bool) -> HybridPredictor:
        pred = HybridPredictor(L, E, K, draft_tokens=2, draft_p=0.5)
        if batch:
            pred.begin_pass(text, 0)
            for m in range(L):
                pred.step(m, np.array([routes[t][m] for t in text]), n_pred=0)
        else:
            for pos, t in enumerate(text):
                _context_pass(pred, t, pos, routes[t])
        pred.begin_pass([big], len(text))
        return pred

    batch, single = pred_after(True), pred_after(False)
    assert batch.draft.any()  # after `big` at 4: 9 (d 1); at 1: 6 (d 1), 8 (d 2)
    assert np.array_equal(batch.draft, single.draft)
    assert (batch.p_next >= batch.draft).all()  # (the rest of p_next learned differently)
    huge = predictor_mod._LAST_AT_MAX + 5
    pred = HybridPredictor(L, E, K, draft_tokens=2, draft_p=0.5)
    for pos, t in enumerate([huge, 3, huge]):
        _context_pass(pred, t, pos, routes[7])
    assert not pred.draft.any()
    assert pred._last_at.shape[0] <= predictor_mod._LAST_AT_MAX


def test_token_memory_weighs_the_latest_occurrence_and_resets_on_collision():
    pred = _only(HybridPredictor(L, E, K, max_distance=1), TOKEN)
    first = {0: [1, 2], 1: [3, 4], 2: [5, 6]}
    latest = {0: [2, 7], 1: [0, 4], 2: [5, 1]}
    _token_pass(pred, 9, first)
    _token_pass(pred, 9, latest)
    pred.begin_pass([9])
    pred.predict_pass_start(1)
    # both occurrences chose 2 at layer 0; the latest adds 7, ahead of the older 1
    assert pred.order[0, :3].tolist() == [2, 7, 1]
    # another token in the same bucket takes it over: nothing of token 9 is kept
    other = 9 + pred.tok_tags.shape[0]
    _token_pass(pred, other, {0: [3, 4], 1: [5, 6], 2: [0, 1]})
    pred.begin_pass([9])
    assert not pred.tok_hist[9 % pred.tok_tags.shape[0]].any()
    for m in range(L):  # (the pass begun above)
        pred.step(m, np.array([[0, 1]]), n_pred=0)
    # a pass begun without begin_pass learns nothing into the token table
    before = pred.tok_hist.copy()
    for m in range(L):
        pred.step(m, np.array([[2, 3]]), n_pred=0)
    assert (pred.tok_hist == before).all()


def test_rank_helper_orders_by_decreasing_score_with_ties_in_index_order():
    x = np.array([0.1, 0.5, 0.1, 0.9, 0.5, 0.0])
    assert _rank_desc(x).tolist() == [3, 1, 4, 0, 2, 5]
    assert _rank_desc(np.zeros(4)).tolist() == [0, 1, 2, 3]
    y = np.random.default_rng(3).random(64)
    assert _rank_desc(y).tolist() == np.argsort(-y, kind="stable").tolist()
    # NaN (a hidden state that overflowed) ranks as -inf: always a permutation — the
    # order indexes expert tables unchecked
    z = np.array([0.3, np.nan, 0.3, 1.0, -np.inf, np.nan, 0.2])
    assert _rank_desc(z).tolist() == [3, 0, 2, 6, 1, 4, 5]
    assert sorted(_rank_desc(np.full(5, np.nan)).tolist()) == [0, 1, 2, 3, 4]


def test_transitions_are_learned_only_as_far_as_predictions_reach():
    """Counts at a distance no prediction reads are cache lines the layer kernels have
    evicted: they stop being learned once predictions stay near, and resume at once
    when a prediction reaches that far again."""
    pred = HybridPredictor(L, E, K, max_distance=6)
    ids = [np.array([[t % E, (t + 3) % E]]) for t in range(3)]

    def run(tokens: int, n_pred: int) -> np.ndarray:
        before = pred.rowsum.sum(axis=(0, 2)).copy()  # per distance
        for t in range(tokens):
            for m in range(L):
                pred.step(m, ids[(t + m) % 3], n_pred=n_pred)
        return pred.rowsum.sum(axis=(0, 2)) > before

    assert run(4, 1).all()  # at first every distance is learned
    run(60, 1)  # predictions reach 1: after a few passes, distances 1..1+margin only
    grew = run(4, 1)
    assert grew[:3].all() and not grew[3:].any()
    assert run(1, 5)[:6].all()  # a prediction 5 ahead: learned as far again at once


def test_ids_of_the_wrong_width_are_refused_before_any_kernel():
    pred = HybridPredictor(L, E, K)
    with pytest.raises(ValueError):
        pred.step(0, np.zeros((1, K + 1), dtype=np.int32))
    pred.step(0, np.arange(K, dtype=np.int64))  # a flat int64 row is taken as one token
    assert pred.cur_ids[0, 0].tolist() == list(range(K))


# -- how routers select (efedge/experts/selection.py) ---------------------------------------

def _selection(mode, rb, sb, groups=(0, 0)):
    from efedge.experts.selection import RouterSelection

    return RouterSelection(mode, rb[None].astype(np.float32), sb[None].astype(np.float32),
                           *groups)


@pytest.mark.parametrize("gating,groups,biased", [
    ("sigmoid", (8, 4), True),  # DeepSeek-V3 / Kimi: selection bias within the best groups
    ("sigmoid", (0, 0), True),  # GLM-4.5: selection bias, no groups
    ("softmax", (8, 3), False),  # DeepSeek-V2: softmax within groups
    ("softmax", (0, 0), True),
    ("softmax_weight", (0, 0), True),  # gpt-oss: router bias, top-k of the logits
])
def test_selection_logits_rank_experts_as_the_router_selects(gating, groups, biased):
    from efedge import layers
    from efedge.experts import predictor_kernels as pk

    rng = np.random.default_rng(3)
    e, k, t = 64, 8, 40
    logits = rng.normal(0.0, 1.5, (t, e)).astype(np.float32)
    rb = (rng.normal(0.0, 1.0, e) if gating == "softmax_weight" else np.zeros(e))
    sb = rng.normal(0.0, 0.6, e) if biased and gating != "softmax_weight" else np.zeros(e)
    mode = {"sigmoid": pk.SEL_SIGMOID, "softmax": pk.SEL_SOFTMAX,
            "softmax_weight": pk.SEL_BIAS}[gating]
    sel = _selection(mode, rb, sb, groups)
    z = sel.apply(0, logits)
    ids = layers.route_ext((logits + rb).astype(np.float32), k, gating,
                           sb.astype(np.float32) if sb.any() else None, *groups)[0]
    mine = np.argsort(-z.astype(np.float64), axis=1, kind="stable")[:, :k]
    assert (np.sort(mine, axis=1) == np.sort(ids, axis=1)).all()
    # the raw logits alone would name other experts: the test can fail
    raw = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    assert (np.sort(raw, axis=1) != np.sort(ids, axis=1)).any()


def test_selection_logits_without_biases_are_the_logits():
    from efedge import layers
    from efedge.experts import predictor_kernels as pk

    rng = np.random.default_rng(4)
    logits = rng.normal(0.0, 2.0, (5, 16)).astype(np.float32)
    zero = np.zeros(16)
    z = _selection(pk.SEL_SIGMOID, zero, zero).apply(0, logits)
    assert np.allclose(z, logits, atol=1e-4)
    z = _selection(pk.SEL_SOFTMAX, zero, zero).apply(0, logits)
    assert np.allclose(layers.softmax(z), layers.softmax(logits), atol=1e-6)
    assert (_selection(pk.SEL_NONE, zero, zero).apply(0, logits) == logits).all()


def test_pregating_predicts_what_a_biased_router_selects():
    """A sigmoid router with a selection bias (DeepSeek-V3's exp_probs_b): the logits
    favour experts 4, 5 at layer 1, the bias makes the router take 0, 1 — pre-gating
    with the router's selection rule predicts 0, 1; without it, 4, 5."""
    from efedge.experts import predictor_kernels as pk
    from efedge.experts.selection import RouterSelection

    h = np.zeros((1, D), dtype=np.float32)
    h[0, 5], h[0, 6] = 1.0, 0.8  # layer 1: logits 4.0 / 3.2 on experts 4 / 5
    sb = np.zeros((L, E), dtype=np.float32)
    sb[1, :2] = 0.5  # sigmoid(0) + 0.5 = 1.0 > sigmoid(4.0) ≈ 0.98
    sel = RouterSelection(pk.SEL_SIGMOID, np.zeros((L, E), np.float32), sb)
    for selection, want in ((sel, {0, 1}), (None, {4, 5})):
        pred = _only(HybridPredictor(L, E, K, max_distance=1), PREGATE)
        pred.set_router_weights(_eye_routers(), selection)
        pred.step(0, np.array([[2, 3]]), hidden=h, n_pred=1)
        assert set(pred.order[0, :2].tolist()) == want


@pytest.mark.parametrize("arch", ["deepseek2-v3", "gpt-oss"])
def test_a_models_selection_rule_reproduces_its_routers_choice(tiny_gguf, arch):
    """On a real forward pass (sigmoid + selection bias + expert groups; router bias),
    the rule the predictors get names exactly the experts each router chose — and it is
    what expertflow's predictor carries."""
    import efedge
    from efedge.experts import predictor_kernels as pk
    from efedge.experts.selection import RouterSelection

    with efedge.load(tiny_gguf(arch, "F16"), cache="50%", policy="expertflow") as m:
        tf = m._tf
        sel = RouterSelection.of_model(tf)
        assert sel.mode == (pk.SEL_SIGMOID if arch == "deepseek2-v3" else pk.SEL_BIAS)
        seen = []
        hook = tf.on_route

        def record(layer, hidden, ids, *a, **kw):
            seen.append((layer, np.array(hidden, dtype=np.float32), np.array(ids)))
            return hook(layer, hidden, ids, *a, **kw)

        tf.on_route = record
        m.logits(list(range(3, 40)))
        k = m.config.n_expert_used
        assert seen
        for layer, h, ids in seen:
            z = sel.apply(layer, tf.blocks[layer].ffn_gate_inp(h))
            mine = np.sort(np.argsort(-z.astype(np.float64), axis=1, kind="stable")[:, :k])
            assert (mine == np.sort(ids, axis=1)).all()
        pred = m._experts.policy.predictor
        assert pred.params[pk._P_SELMODE] == sel.mode
        assert (pred.sel_sb == sel.select_bias).all() and (pred.sel_rb == sel.router_bias).all()


def test_refine_pick_drops_queued_outside_the_top_and_wants_the_missing_top():
    """expertflow:refine at a layer's start: the router on the layer's input ranks its
    experts; queued prefetches (due ≥ 0) outside the top k + margin are dropped, the top k
    not resident or loading (where < 0) are wanted, likeliest first."""
    from efedge.experts.predictor_kernels import refine_pick

    z = np.array([0.1, 3.0, -1.0, 2.0, 0.5, 1.0, -2.0, 0.0])  # rank: 1 3 5 4 0 7 2 6
    due = np.array([-1, -1, 7, 7, -1, -1, 7, 7], dtype=np.int64)  # queued: 2 3 6 7
    where = np.array([-1, -1, 4, 9, 5, -1, 11, 12], dtype=np.int64)  # 0 1 5 not in
    drop, want = np.empty(8, np.int64), np.empty(8, np.int64)
    nd, nw = refine_pick(z, 2, 1, due, where, drop, want)  # top 2: 1 3; keep 1 3 5
    assert drop[:nd].tolist() == [2, 6, 7] and want[:nw].tolist() == [1]
    nd, nw = refine_pick(z, 4, 2, due, where, drop, want)  # top 4: 1 3 5 4; keep + 0 7
    assert drop[:nd].tolist() == [2, 6] and want[:nw].tolist() == [1, 5]
    nd, nw = refine_pick(z, 8, 0, due, where, drop, want)  # everything kept and wanted
    assert nd == 0 and want[:nw].tolist() == [1, 5, 0]


def test_score_sources_counts_top_k_hits_of_the_mixture_and_of_pregating():
    """_score_sources: one stored prediction scored against the chosen experts — the
    mixture (today's weights) and pre-gating alone, each a share of K, into the EWMAs."""
    from efedge.experts.predictor_kernels import N_COMP, SWITCH_RATE, _score_sources

    q = np.zeros((N_COMP, E))
    q[PREGATE, [2, 3]] = 0.5  # pre-gating: experts 2, 3
    q[TEMPORAL, [5, 6]] = 0.5  # the recent choices: 5, 6
    av = np.zeros(N_COMP, dtype=np.bool_)
    av[[PREGATE, TEMPORAL]] = True
    w = np.zeros(N_COMP)
    w[PREGATE], w[TEMPORAL] = 1.0, 3.0  # the mixture ranks 5, 6 first
    sw = np.zeros(2)
    _score_sources(q, av, w, np.array([2, 3]), K, sw)  # the router chose 2 and 3
    assert sw.tolist() == pytest.approx([0.0, SWITCH_RATE])
    _score_sources(q, av, w, np.array([3, 6]), K, sw)  # one each
    assert sw.tolist() == pytest.approx([SWITCH_RATE * 0.5,
                                         SWITCH_RATE + SWITCH_RATE * (0.5 - SWITCH_RATE)])
    av[PREGATE] = False  # nothing to compare without pre-gating
    before = sw.copy()
    _score_sources(q, av, w, np.array([2, 3]), K, sw)
    assert np.array_equal(sw, before)


def test_a_layer_is_ranked_by_pregating_alone_while_it_leads_the_mixture():
    """Where pre-gating's measured recall leads the mixture's by more than the margin, the
    layer's experts are ranked by pre-gating alone (the mixture breaks its ties); else by
    the mixture, as it weighs its sources."""
    from efedge.experts.predictor_kernels import SWITCH_MARGIN

    def predict(lead: float) -> list[int]:
        pred = HybridPredictor(L, E, K, max_distance=1, adapt=False)
        pred.set_router_weights(_eye_routers())
        pred.weights[:] = 0.0
        pred.weights[:, :, PREGATE], pred.weights[:, :, TEMPORAL] = 1.0, 3.0
        pred.recent[:, 1, [6, 7]] = 1.0  # layer 1's recent experts: 6, 7
        pred.switch[1, 0] = (0.5, 0.5 + lead)  # (mixture, pre-gating) recall@K
        h = np.zeros((1, D), dtype=np.float32)
        h[0, 3], h[0, 4] = 1.0, 0.9  # layer 1's router: experts 2, 3
        pred.step(0, np.array([[0, 1]]), hidden=h, n_pred=1)
        return pred.order[0, :2].tolist()

    assert predict(0.3) == [2, 3]
    assert sorted(predict(0.0)) == [6, 7]
    assert sorted(predict(SWITCH_MARGIN / 2)) == [6, 7]


def test_the_step_benchmark_times_the_predictor_it_is_given(monkeypatch, capsys):
    """benchmarks/predictor_step.py (a script): it runs the real step at the shape it is
    asked for — the predictor's state moves — and prints both timings; bad sizes are a
    usage error."""
    import sys

    mod = load_benchmark("predictor_step")
    seen = []
    real_step = HybridPredictor.step

    def step(self, layer, ids, **kw):
        seen.append((self.n_layer, self.n_expert, self.n_active, layer, ids.shape))
        return real_step(self, layer, ids, **kw)

    monkeypatch.setattr(HybridPredictor, "step", step)
    monkeypatch.setattr(sys, "argv", ["predictor_step.py", "--layers", "3", "--experts", "8",
                                      "--top-k", "2", "--width", "16", "-n", "2",
                                      "--flush-mb", "0.01"])
    mod.main()
    out = capsys.readouterr().out
    assert "3 layers x 8 experts, top-2, width 16: step" in out and "us warm" in out
    # warm-up 20 passes, then 2 warm and 1 flushed, 3 layers each
    assert len(seen) == 3 * (20 + 2 + 1)
    assert {s[:3] for s in seen} == {(3, 8, 2)} and {s[4] for s in seen} == {(1, 2)}
    monkeypatch.setattr(sys, "argv", ["predictor_step.py", "--top-k", "40"])
    with pytest.raises(SystemExit):
        mod.main()
