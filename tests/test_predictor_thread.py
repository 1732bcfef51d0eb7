"""The predictor's step on a helper thread (efedge/experts/predictor_thread.py): the same
state as the step on the caller's thread, bit for bit; steps it cannot take are left to
the caller; a helper that stops makes the caller fail, not hang; and a model decoding with
one keeps the resident logits."""

import numpy as np
import pytest
from conftest import load_benchmark

import efedge
from efedge.experts import native_workers as nw
from efedge.experts import predictor_thread as pt
from efedge.experts.issue import PlanBuffers
from efedge.experts.policies import ExpertFlow
from efedge.experts.predictor import HybridPredictor

pytestmark = pytest.mark.skipif(not pt.available(), reason="needs Linux futexes")

L, E, K, D = 5, 32, 4, 48


@pytest.fixture(autouse=True)
def patient(monkeypatch):
    """Helpers that are never given up on for slow waits (a test machine's load must not
    decide what these tests see; the giving up has its own test)."""
    monkeypatch.setattr(pt, "WAIT_LIMIT_NS", 10**15)


def _pair(seed=0):
    W = np.random.default_rng(seed).standard_normal((L, E, D)).astype(np.float32)
    preds = []
    for threaded in (False, True):
        p = HybridPredictor(L, E, K)
        p.set_router_weights(W)
        p.use_thread(threaded)
        preds.append(p)
    return preds


def _same_state(a: HybridPredictor, b: HybridPredictor) -> None:
    for x, y in zip(a._state, b._state, strict=True):
        np.testing.assert_array_equal(x, y)
    np.testing.assert_array_equal(a.p_next, b.p_next)
    np.testing.assert_array_equal(a.p_use, b.p_use)
    np.testing.assert_array_equal(a.order, b.order)
    for x, y in ((a._ctx, b._ctx), (a._prev, b._prev), (a._last_at, b._last_at),
                 (a.tok_tags, b.tok_tags), (a._tok1, b._tok1)):
        np.testing.assert_array_equal(x, y)
    assert a.step_no == b.step_no and a.pass_no == b.pass_no
    assert a._drafted == b._drafted and a._ctx_n == b._ctx_n


def test_posted_steps_leave_the_state_the_callers_steps_leave(monkeypatch):
    """Passes of one token (pass start, five steps at varying reach), with a prefill of
    several tokens between them (the helper is rebound to the grown tables), a new
    context now and then and one past the context's room (its arrays grow, and the
    helper is rebound to them for the passes' beginnings it runs): every array
    of the predictor is identical after every step, its context draft's too — tokens
    recur, so drafts are made, and their eviction values reach p_next."""
    begun, rebound = [], []
    post_begin, rebind = pt.PredictorThread.post_begin, pt.PredictorThread.rebind
    monkeypatch.setattr(pt.PredictorThread, "post_begin",
                        lambda th, tok, pos: begun.append(th) or post_begin(th, tok, pos))
    monkeypatch.setattr(pt.PredictorThread, "rebind",
                        lambda th, bound: rebound.append(th) or rebind(th, bound))
    a, b = _pair()
    rng = np.random.default_rng(1)
    pos = drafted = 0
    try:
        for i, tok in enumerate(rng.integers(0, 40, 60)):
            if i == 45:
                pos = 300  # (past the 256 positions the context has room for)
            elif i % 20 == 19:
                pos = 0  # a new context
            if tok % 17 == 0:  # a prefill: steps on the caller's thread in both
                toks = rng.integers(0, 40, 3)
                for p in (a, b):
                    p.begin_pass(toks, pos)
                pos += 3
                for layer in range(L):
                    ids = np.stack([rng.choice(E, K, replace=False) for _ in toks])
                    h = rng.standard_normal((3, D)).astype(np.float32)
                    a.step(layer, ids, hidden=h, n_pred=2)
                    assert not b.post_step(layer, ids.astype(np.int32), h, 2)
                    b.step(layer, ids, hidden=h, n_pred=2)
                _same_state(a, b)
            # every other pass start with layer 0's input, pre-gating layer 0 (on the
            # helper, where it has one), some with its router's logits given instead
            h0 = rng.standard_normal((1, D)).astype(np.float32) if tok % 2 else None
            z0 = rng.standard_normal((1, E)).astype(np.float32) if tok % 3 == 1 else None
            # the pass's beginning on the helper too (its context draft, token memory
            # bucket), most times: then the pass start waits for it first
            for p in (a, b):
                p.begin_pass([tok], pos, post=p is b and i % 4 != 3)
            # (b's left posted every third pass, waited for as its reader would: given
            # logits, it waits anyway)
            a.predict_pass_start(2, hidden=h0, logits=z0)
            b.predict_pass_start(2, hidden=h0, logits=z0, wait=i % 3 != 0)
            if i % 3 == 0:
                assert b._posted == (z0 is None)
                b.wait()
            assert np.isnan(b._pass_pg).all()  # (the row is left unknown for the next)
            pos += 1
            drafted += a._drafted
            _same_state(a, b)
            for layer in range(L):
                ids = rng.choice(E, K, replace=False).astype(np.int32)[None]
                h = rng.standard_normal((1, D)).astype(np.float32)
                n, also = 1 + layer % 3, (L if layer % 2 else 0)
                a.step(layer, ids, hidden=h, n_pred=n, also=also)
                assert b.post_step(layer, ids, h, n, also)
                h[:] = np.nan  # the caller's buffers are its own again: the post copied
                ids[:] = 0
                b.wait()
                _same_state(a, b)
        assert b.thread_posts > 200 and b._thread.busy_s > 0 and drafted >= 5
        # begun on the helper, which was rebound to grown tables (one thread throughout)
        assert len(begun) > 30 and len(rebound) >= 2 and len(set(map(id, begun))) == 1
    finally:
        b.close()
    assert b._thread is None


def _select_args(p, layer, n_dist, cache_rng):
    """select_prefetch's arguments over predictor p's outputs and a random cache."""
    where = np.where(cache_rng.random((L, E)) < 0.4, 0, -1).astype(np.int64)
    needed = cache_rng.random(E) < K / E
    n_slots = 24
    bufs = PlanBuffers(p.p_use.shape[0] * E)  # (its own: where the plan is written)
    return (layer, n_dist, 0.05, p.p_use, p.order, where, needed, np.zeros(L, np.int64),
            np.full(n_slots, 2, np.int8), np.zeros(n_slots, np.int64),
            np.zeros(n_slots, np.int32), np.array([n_slots], np.int64), 3, 7, 0.5, True,
            bufs.ints, bufs.floats)


def _off_its_core(th: pt.PredictorThread) -> None:
    """A helper that never runs again, yet is not dead: as one preempted for good."""
    th.close()
    th.ctl[pt.C_STOP] = th.ctl[pt.C_DEAD] = 0


@pytest.mark.parametrize("helper", ["running", "off its core", "raced"])
def test_the_plan_waits_for_a_posted_step_in_its_own_call(helper, monkeypatch):
    """wait_select after a post_step — the helper's wait and horizon.select_prefetch in one
    kernel call — selects what select_prefetch selects after the caller's own step, and
    leaves the same state; without a posted step it is select_prefetch. The same where
    the helper is off its core (every job — the pass's beginning, its start, each step —
    is then run by the caller that waits for it: none hangs), and where the caller may
    take a job over at once (raced: helper and caller claim the same posts)."""
    from efedge.experts.horizon import select_prefetch

    if helper == "raced":
        monkeypatch.setattr(pt, "STEAL_NS", 0)
    a, b = _pair(3)
    rng = np.random.default_rng(4)
    chosen = 0
    try:
        if helper == "off its core":
            workers = np.zeros(8, np.int32)  # the transfer workers' control words
            b.use_thread(True, workers)
            _off_its_core(b._helper(D))
            # as a helper preempted while it spins leaves them: their wake-ups left to
            # it, and one of them asleep — each caller that takes a job over wakes one
            workers[nw.C_HELPER] = workers[nw.C_SLEEP] = 1
        def same_plan(layer: int, n_dist: int) -> int:
            """b's wait_select against select_prefetch after a's own prediction."""
            seed = int(rng.integers(1 << 30))
            args_a = _select_args(a, layer, n_dist, np.random.default_rng(seed))
            args_b = _select_args(b, layer, n_dist, np.random.default_rng(seed))
            want, got = select_prefetch(*args_a), b.wait_select(*args_b)
            assert not b._posted and want == got
            g = want[1]  # (the groups' columns and the candidates: the rest is scratch)
            (ia, fa), (ib, fb) = args_a[-2:], args_b[-2:]
            n = ia[0, g]
            assert n == ib[0, g]
            np.testing.assert_array_equal(ia[0, :g + 1], ib[0, :g + 1])
            np.testing.assert_array_equal(ia[1:3, :g], ib[1:3, :g])
            np.testing.assert_array_equal(fa[:2, :g], fb[:2, :g])
            np.testing.assert_array_equal(ia[3:, :n], ib[3:, :n])
            np.testing.assert_array_equal(fa[2, :n], fb[2, :n])
            _same_state(a, b)
            return g

        for i in range(12):
            tok = int(rng.integers(0, 9))
            for p in (a, b):
                p.begin_pass([tok], i, post=p is b)
            # the pass start: waited for at once, or (ExpertFlow's way) left posted for
            # the plan of the pass's first layers to wait for in its own call
            a.predict_pass_start(2)
            b.predict_pass_start(2, wait=i % 2 == 0)
            assert b._posted == (i % 2 == 1)
            chosen += same_plan(L - 1, 2)
            for layer in range(L):
                ids = rng.choice(E, K, replace=False).astype(np.int32)[None]
                h = rng.standard_normal((1, D)).astype(np.float32)
                a.step(layer, ids, hidden=h, n_pred=3)
                assert b.post_step(layer, ids, h, 3)
                chosen += same_plan(layer, 3)
        assert b.select_wait_s > 0 and chosen > 20
        th = b._thread
        if helper == "off its core":  # (each one's claim waited STEAL_NS past its post)
            assert th.stolen == th.posts == 12 * (L + 2) and th.busy_s == 0
            assert th.job[pt.J_WOKEN] == th.stolen
        elif helper == "running":
            assert th.stolen < th.posts
        # nothing posted: the selection alone (the predictor's outputs as they are)
        args = _select_args(b, 0, 2, np.random.default_rng(9))
        assert b.wait_select(*args)[:2] == select_prefetch(*args)[:2]
    finally:
        b.close()


def test_a_step_posted_right_after_a_rebind_is_waited_for_in_the_plan():
    """A longer pass grows cur_ids, and the next posted step rebinds the helper to it (it
    leaves its loop and enters it again, which takes the GIL); the plan then waits for
    that step holding the GIL (wait_select). Before either guard — the rebind returns
    only once the helper is back in its loop; wait_select waits on without the GIL after
    200 µs — that wait spun out its 30 s and failed (found in review)."""
    a, b = _pair(5)
    rng = np.random.default_rng(6)
    ids, h = np.arange(K, dtype=np.int32)[None], np.ones((1, D), np.float32)
    try:
        b.begin_pass([1])
        assert b.post_step(0, ids, h, 1)
        b.wait()
        th = b._thread
        for n_tok in (3, 5):  # each prefill longer than any before: cur_ids grows
            toks = rng.integers(0, 40, n_tok)
            b.begin_pass(toks)
            for layer in range(L):
                b.step(layer, rng.integers(0, E, (n_tok, K)), hidden=rng.standard_normal(
                    (n_tok, D)).astype(np.float32), n_pred=1)
            b.begin_pass([2])  # (not posted: the step's post is the one that rebinds)
            assert b.post_step(0, ids, h, 2)
            out = b.wait_select(*_select_args(b, 0, 2, np.random.default_rng(n_tok)))
            assert b._thread is th and th.bound[3] is b.cur_ids and b.threaded
            assert b.thread_fallbacks == 0 and out[1] >= 0
    finally:
        b.close()


def test_a_wait_handed_back_counts_from_its_start():
    """_wait_for with a patience answers PENDING once it has passed (nothing published);
    the wait that follows counts the whole time from the first one's start."""
    ctl, job = np.zeros(8, np.int32), np.zeros(pt.JOB_WORDS, np.int64)
    ctl[pt.C_GEN] = 1  # posted, not done
    job[pt.J_WAIT_LIMIT_NS] = 10**15
    dst, src = np.zeros((2, 3), np.float32), np.ones((2, 3), np.float32)
    assert pt._wait_for(ctl, job, dst, src, 200_000, False) == pt.PENDING
    t0 = job[pt.J_WAIT_T0]
    assert t0 > 0 and not dst.any()
    import time
    time.sleep(0.01)
    ctl[pt.C_DONE] = 1
    assert pt._wait(ctl, job, dst, src) == pt.DONE_OK
    assert dst.all() and job[pt.J_WAIT_T0] == 0
    # the EWMA's sample was the whole wait, over 10 ms (clipped at 1 ms), over 32
    assert job[pt.J_WAIT_NS] == pt._WAIT_CLIP_NS // pt._WAIT_EWMA_N


def test_a_job_is_claimed_once_and_claims_only_move_forward():
    """_claim: one claimant per GEN; a helper that read an older GEN (preempted while the
    caller took that job and the next) cannot claim it over the newer; GEN wraps."""
    job = np.zeros(pt.JOB_WORDS, np.int64)
    assert pt._claim(job, 1) and not pt._claim(job, 1)
    assert pt._claim(job, 3) and not pt._claim(job, 2) and job[pt.J_CLAIM] == 3
    job[pt.J_CLAIM] = 2**31 - 1  # the last int32 GEN; the next post's wraps
    assert not pt._claim(job, 2**31 - 2) and pt._claim(job, -2**31)
    assert job[pt.J_CLAIM] == -2**31


@pytest.mark.parametrize("helper_wakes,asleep,woken", [(1, 1, True), (0, 1, False),
                                                       (1, 0, False)])
def test_a_job_taken_over_wakes_a_worker_only_where_the_helper_was_to(helper_wakes,
                                                                      asleep, woken):
    """_stolen_done: DONE = the claimed GEN; a sleeping transfer worker is woken only
    where publish() left its wake-ups to the (preempted) helper."""
    ctl, job, workers = (np.zeros(8, np.int32), np.zeros(pt.JOB_WORDS, np.int64),
                         np.zeros(8, np.int32))
    ctl[pt.C_GEN] = 7
    assert pt._claim(job, 7)
    workers[nw.C_HELPER], workers[nw.C_SLEEP] = helper_wakes, asleep
    assert pt._stolen_done(ctl, job, workers) == woken
    assert ctl[pt.C_DONE] == 7 and job[pt.J_STOLEN] == 1 and job[pt.J_WOKEN] == woken


def test_steps_it_cannot_post_are_left_to_the_caller():
    """post_step does nothing and says False for a step of several tokens, a pass begun
    without begin_pass, a hidden state of another width or dtype (or none), or a
    predictor without a thread."""
    a, b = _pair()
    c = HybridPredictor(L, E, K)  # no thread
    c.set_router_weights(np.zeros((L, E, D), np.float32))
    try:
        ids = np.arange(K, dtype=np.int32)[None]
        h = np.ones((1, D), np.float32)
        before = [x.copy() for x in b._state]
        assert not b.post_step(0, ids, h, 1)  # no begin_pass yet
        b.begin_pass([3])
        assert not b.post_step(0, np.tile(ids, (2, 1)), np.tile(h, (2, 1)), 1)
        assert not b.post_step(0, ids, np.ones((1, D + 1), np.float32), 1)
        assert not b.post_step(0, ids, np.ones((1, D), np.float16), 1)
        assert not b.post_step(0, ids, None, 1)
        assert all(np.array_equal(x, y) for x, y in zip(before, b._state, strict=True))
        assert b.step_no == -1 and not b._posted
        c.begin_pass([3])
        assert not c.post_step(0, ids, h, 1) and not c.threaded
        assert b.post_step(0, ids, h, 1)
        assert not b.post_step(0, ids, h, 1)  # layer 0 again: a new pass, not begun
    finally:
        b.close()


def test_a_step_posted_before_the_helper_enters_its_loop_is_run(monkeypatch):
    """The first post reaches a thread that may not have entered its loop yet (here: held
    back 50 ms; it once read GEN after that post and waited for the next one — a hang
    under load)."""
    import time

    run = pt.PredictorThread._run

    def late_run(self):
        time.sleep(0.05)
        run(self)

    monkeypatch.setattr(pt.PredictorThread, "_run", late_run)
    a, b = _pair()
    ids, h = np.arange(K, dtype=np.int32)[None], np.ones((1, D), np.float32)
    try:
        for i in range(3):
            b.close()  # the next post starts a new thread
            b.begin_pass([i])
            assert b.post_step(0, ids, h, 1)
            b.wait()
            assert b._thread.posts == 1
    finally:
        b.close()


def test_a_helper_that_stopped_fails_the_wait_instead_of_hanging():
    a, b = _pair()
    b.begin_pass([1])
    assert b.post_step(0, np.arange(K, dtype=np.int32)[None], np.ones((1, D), np.float32), 1)
    b.wait()
    th = b._thread
    th.close()  # as if the thread had died: DONE will never reach GEN
    with pytest.raises(RuntimeError, match="predictor thread stopped"):
        th.wait(b.p_next, b._p_next_k)
    b._thread = None


@pytest.mark.parametrize("after", ["step", "begin"])
def test_a_helper_that_stopped_fails_the_plan_and_the_pass_start(after):
    """The calls that wait inside another kernel (the plan's wait_select, the pass
    start's wait for the pass's beginning) fail too, selecting nothing from outputs a
    dead helper may have half written."""
    a, b = _pair()
    ids, h = np.arange(K, dtype=np.int32)[None], np.ones((1, D), np.float32)
    b.begin_pass([1])
    assert b.post_step(0, ids, h, 1)
    b.wait()
    th = b._thread
    if after == "step":
        assert b.post_step(1, ids, h, 1)
    else:
        b.begin_pass([2], post=True)
        assert b._posted
    th.close()  # the post may have been run: as if it had not, DONE back behind GEN
    th.ctl[pt.C_DONE] = th.ctl[pt.C_GEN] - 1
    with pytest.raises(RuntimeError, match="predictor thread stopped"):
        if after == "step":
            b.wait_select(*_select_args(b, 1, 2, np.random.default_rng(0)))
        else:
            b.predict_pass_start(2)
    b._thread = None


def test_a_helper_too_slow_to_wait_for_hands_the_steps_back_and_is_tried_again(monkeypatch):
    """Where waiting for the helper costs more than the step (a loaded machine: its
    core is not its own), the predictor takes its steps back — the same state as the
    caller's steps throughout — and tries a helper again THREAD_RETRY_FIRST passes later;
    twice as long each time it is given up again within THREAD_RETRY_PASSES passes of a
    try (at most THREAD_RETRY_PASSES), and THREAD_RETRY_FIRST again after a longer run."""
    import efedge.experts.predictor as predictor_mod

    monkeypatch.setattr(predictor_mod, "THREAD_RETRY_FIRST", 2)
    monkeypatch.setattr(predictor_mod, "THREAD_RETRY_PASSES", 8)
    a, b = _pair()
    rng = np.random.default_rng(4)
    slow = (1, 4, 9, 17, 34)  # the tokens whose waits are long at layer 2
    modes = []
    try:
        for tok in range(37):
            for p in (a, b):
                p.begin_pass([tok])
                p.predict_pass_start(2)
            for layer in range(L):
                ids = rng.choice(E, K, replace=False).astype(np.int32)[None]
                h = rng.standard_normal((1, D)).astype(np.float32)
                a.step(layer, ids, hidden=h, n_pred=2)
                if b.post_step(layer, ids, h, 2):
                    if tok in slow and layer == 2:  # as if its waits had been long
                        b._thread.job[pt.J_WAIT_LIMIT_NS] = -1
                    b.wait()
                else:
                    b.step(layer, ids, hidden=h, n_pred=2)
                _same_state(a, b)
            modes.append(b.threaded)
        assert b.thread_fallbacks == len(slow)
        # given up at token 1: tried again 2 passes later (3); given up at 4, soon after
        # that try: 4 passes (8); at 9: 8 (17, the cap), given up in that pass: 8 more
        # (25); then a run of 9 passes (25-33), longer than 8: at 34 back to 2 (36)
        helper = {0, 3, *range(8, 9), *range(25, 34), 36}
        assert modes == [tok in helper for tok in range(37)]
    finally:
        b.close()


def test_a_wait_that_woke_the_helper_does_not_count_against_it():
    """A helper that slept (no post for its spin time: a slow link's long stalls between
    layers) is woken by the next post, and that wait holds the wake-up — it says nothing
    of whether the helper has a core, so it does not move the waits' average: a helper
    woken for every step, with a limit any counted wait would pass, is kept."""
    import time

    a, b = _pair()
    rng = np.random.default_rng(5)
    try:
        b.begin_pass([1])
        h = rng.standard_normal((1, D)).astype(np.float32)
        assert b.post_step(0, np.arange(K, dtype=np.int32)[None], h, 1)
        b.wait()
        th = b._thread
        th.job[pt.J_SPIN_NS] = 0  # it sleeps as soon as a job is done
        th.job[pt.J_WAIT_NS] = 0  # (the first wait's, whatever the machine's load)
        th.job[pt.J_WAIT_LIMIT_NS] = 1
        for layer in range(1, L):
            end = time.monotonic() + 10.0  # until it naps (a loaded machine: a while)
            while not th.ctl[pt.C_SLEEP] and time.monotonic() < end:
                time.sleep(0.001)
            if not th.ctl[pt.C_SLEEP]:
                pytest.skip("the helper never got as far as its nap (a loaded machine)")
            ids = rng.choice(E, K, replace=False).astype(np.int32)[None]
            before = int(th.job[pt.J_WAIT_NS])
            assert b.post_step(layer, ids, h, 1)
            if not th.job[pt.J_IDLE]:  # (not idle after all: a counted wait)
                b.wait()
                break
            b.wait()
            assert th.job[pt.J_WAIT_NS] == before  # not counted
            assert b.threaded and b.thread_fallbacks == 0
        assert layer > 1 or b.threaded  # (at least the first was a wake-up)
    finally:
        b.close()


@pytest.mark.parametrize("env,spare,want", [("0", 3, False), ("off", 3, False),
                                            ("1", 0, True), ("auto", 1, True),
                                            ("auto", 0, False), (None, 2, True)])
def test_a_helper_runs_where_a_core_is_spare_unless_told(monkeypatch, env, spare, want):
    if env is None:
        monkeypatch.delenv("EFEDGE_PREDICTOR_THREAD", raising=False)
    else:
        monkeypatch.setenv("EFEDGE_PREDICTOR_THREAD", env)
    monkeypatch.setattr(pt, "spare_cores", lambda: spare)
    assert pt.wanted() is want and pt.wanted("auto") is want
    assert pt.wanted(False) is False and pt.wanted(True) is True


def test_a_model_decoding_with_a_helper_keeps_the_resident_logits(tiny_gguf):
    path = tiny_gguf("qwen3moe", "Q4_K_M")
    ids = np.random.default_rng(2).integers(0, 500, 24).tolist()
    with efedge.load(path) as m:
        ref = m.logits(ids)
        greedy = m.generate(ids[:6], max_tokens=16, temperature=0)
    pol = ExpertFlow(predictor_thread=True)
    with efedge.load(path, cache="30%", policy=pol, link="2GB/s") as m:
        assert np.array_equal(m.logits(ids), ref)
        assert m.generate(ids[:6], max_tokens=16, temperature=0) == greedy
        pred = pol.predictor
        assert pred.threaded and pred.thread_posts >= 15 * 2  # a step per layer per token
        thread = pred._thread._thread
        assert thread.is_alive() and m.stats()["prefetch_issued"] > 0
    assert not thread.is_alive() and pred._thread is None  # stopped by close()


def test_a_model_whose_helper_is_off_its_core_decodes_the_same(tiny_gguf):
    """Every job the helper leaves is run by the compute thread (finish) — the pass's
    beginning, its start, each step — and the model's tokens stay the resident run's."""
    path = tiny_gguf("qwen3moe", "Q4_K_M")
    ids = np.random.default_rng(3).integers(0, 500, 24).tolist()
    with efedge.load(path) as m:
        greedy = m.generate(ids[:6], max_tokens=16, temperature=0)
    pol = ExpertFlow(predictor_thread=True)
    with efedge.load(path, cache="30%", policy=pol, link="2GB/s") as m:
        m.logits(ids)  # (the longest pass first: no array grows after the helper stops)
        assert m.generate(ids[:6], max_tokens=16, temperature=0) == greedy
        pred = pol.predictor
        _off_its_core(pred._thread)
        posts, stolen = pred.thread_posts, pred.thread_stolen
        assert m.generate(ids[:6], max_tokens=16, temperature=0) == greedy
        assert pred.threaded and pred.thread_posts - posts >= 15 * 2
        assert pred.thread_stolen - stolen == pred.thread_posts - posts


@pytest.mark.skipif(pt.usable_cores() < 2, reason="a helper needs a spare core")
def test_the_cost_benchmark_counts_the_jobs_the_helper_left():
    """benchmarks/policies.py --cost (scheduler_cost) reports the jobs posted to the
    helper and how many of them the compute thread ran."""
    from efedge.demo import demo_model_path

    mod = load_benchmark("policies")
    ids = list(range(3, 40))
    c = mod.scheduler_cost(demo_model_path(), ids[:20], 8, 1, "50%", mod._link("2GB/s"),
                           ids[20:])
    assert c["helper_steps"] >= 8 and 0 <= c["helper_jobs_taken_over"] <= c["helper_steps"]


def test_passes_abandoned_after_their_beginning_was_posted_leave_decoding_exact(tiny_gguf):
    """A one-token pass posts its beginning to the helper, then is abandoned before its
    pass start (an exception in layer 0's input hook, as Ctrl-C would be): run again, it
    and the passes after it decode the resident model's logits, on the same helper."""
    path = tiny_gguf("qwen3moe", "Q4_K_M")
    ids = np.random.default_rng(3).integers(0, 500, 30).tolist()
    with efedge.load(path) as m:
        s = m._session
        s.prefill(ids[:6])
        ref = [s.decode(t).copy() for t in ids[6:]]
    pol = ExpertFlow(predictor_thread=True)
    with efedge.load(path, cache="30%", policy=pol, link="2GB/s") as m:
        hook, calls, begun = m._tf.on_layer_input, [0], []

        def abandon(layer, h, **kw):
            calls[0] += 1
            if calls[0] % 5 == 2 and layer == 0:
                begun.append(pol.predictor._posted)  # (its beginning still on the helper)
                raise KeyboardInterrupt
            return hook(layer, h, **kw)

        m._tf.on_layer_input = abandon
        s = m._session
        s.prefill(ids[:6])
        for want, t in zip(ref, ids[6:], strict=True):
            while True:
                try:
                    got = s.decode(t)
                    break
                except KeyboardInterrupt:
                    pass
            assert np.array_equal(got, want)
        assert len(begun) >= 4 and all(begun)
        assert pol.predictor.threaded


def test_the_helper_benchmark_runs_both_arms(capsys):
    """benchmarks/predictor_thread.py (a script): both arms decode, B on its helper."""
    mod = load_benchmark("predictor_thread")
    assert mod.main(["-n", "4", "--rounds", "2", "--link", "2GB/s", "--cache", "40%"]) == 0
    out = capsys.readouterr().out
    assert "A (compute thread): decode" in out and "B (helper thread ): decode" in out
    assert "B / A decode time: median" in out


@pytest.mark.skipif(pt.usable_cores() < 2, reason="a helper needs a spare core")
def test_the_paired_cost_benchmark_reports_the_predictors_share_per_tree(capsys):
    """benchmarks/policies.py --ab OLD NEW --cost: two warm worker processes (here one
    tree against itself) taking turns, each round's predictor share of decode and its
    parts per tree, expertflow alone by default."""
    from pathlib import Path

    mod = load_benchmark("policies")
    root = str(Path(__file__).resolve().parents[1])
    assert mod.main(["--ab", root, root, "--cost", "--cache", "50%", "--links", "2GB/s",
                     "-n", "6", "--prompt", "6", "--rounds", "2", "--pairs", "1"]) == 0
    out = capsys.readouterr().out
    rows = {line.split("|")[2].strip(): line for line in out.splitlines()
            if line.startswith("| expertflow |")}
    assert {"predictor % of decode", "predictor us/token", "pass start us/token",
            "tok/s"} <= set(rows)
    assert "| ondemand |" not in out
    share = [float(x) for x in rows["predictor % of decode"].split("|")[3:5]]
    assert all(0 < x < 100 for x in share)
