"""The predictor's step on a core of its own (ExpertFlow's predictor beside the compute).

Why: one predictor step costs the compute thread ~22 µs per routed layer on the demo
model, 8–9% of its decode, most of it caches the layer kernels left cold (docs/scheduler.md
§7). Where a core is free — fewer compute threads than cores, as `-t 1` on a 2-core
machine or `-t N-1` on a laptop — the step can run there: `post()` hands it the layer's
router choice and hidden state as soon as the layer has routed, the compute thread
issues that layer's demand loads meanwhile, and `wait()` (before the plan that reads the
prediction) finds it done. The helper keeps the predictor's tables warm in its own cache.
Each call from the compute thread costs it a microsecond or two cold, so the jobs are
handed over in as few as will do (thirty-eighth session): a one-token pass's beginning
(`BEGIN`: its context draft and token memory bucket) is posted as the pass begins and
runs beside the embedding; the pass start waits for it and posts its own prediction in
one call (`_pass_start`); and the plan that reads a layer's step, or the pass start's
prediction (since the fortieth session), waits for it in the plan's own kernel call
(`_wait_select`). Arrays that grow (cur_ids, the context
draft's tables) are rebound without a new thread (`rebind`: the helper leaves its loop
and enters it again on them). A job its helper has not begun `STEAL_NS` after its post —
the helper is off its core, preempted for a scheduler time slice — is claimed and run by
the caller that waits for it (`finish`): whichever side claims a job first runs it
(`J_CLAIM`, thirty-ninth session).

The thread is a Python thread that enters one numba loop with the GIL released and
stays in it: it spins (`sched_yield`, so that a transfer worker sharing its core runs
at once) for `SPIN_NS` after each job — the next layer's post comes within a layer's
compute — and then sleeps on a futex until the next post. The
hand-over is two int32 words: GEN, bumped by `post()` after the job is written, and
DONE, set to GEN by the helper once the step's results are written (both sequentially
consistent: what one side wrote before them the other reads after them).

Exactness of decisions: the step's inputs are copied at post time and the compute thread
reads nothing the step writes before `wait()`, except `p_next` (the eviction values),
which the demand loads' victims read meanwhile: the helper writes its own copy and
`wait()` publishes it (HybridPredictor), so every decision is the one the synchronous
step takes. A pass's beginning writes p_next too (the draft's values), and nothing
chooses a victim between it and the pass start that waits for it (ExpertFlow.on_pass
posts it only where a pass start follows). A job the caller takes over runs the same
kernel on the same arrays (`_run_job`): the same decisions again. Linux only (futex);
`available()` says whether this process can.
"""

from __future__ import annotations

import atexit
import os
import threading
import time
import weakref

import numpy as np
from numba import njit

from efedge.experts import native_workers as nw
from efedge.experts.horizon import select_prefetch
from efedge.experts.predictor_kernels import (
    _P_DRAFTP,
    _P_REACHF,
    _begin_one,
    _predict,
    _step,
    input_logits,
)
from efedge.kernels._sync import cpu_relax, sched_yield
from efedge.kernels.atomics import add32 as _add32
from efedge.kernels.atomics import cas as _cas
from efedge.kernels.atomics import load as _load
from efedge.kernels.atomics import store as _store

# control words (int32): STOP, DEAD (the helper left its loop), GEN, DONE, SLEEP (the
# helper waits on GEN: a post then wakes it with a system call)
# READY: the helper has entered its loop (the constructor waits for it, so that the
# first wait does not count the thread's start, compilation included, against the helper)
C_STOP, C_DEAD, C_GEN, C_DONE, C_SLEEP, C_READY = range(6)
# the job (int64): the step's scalar arguments
# (J_POSTS: jobs posted so far, counted by the posting kernels; J_BUSY_NS: the helper's
# time in them)
# (J_NLAYER, J_DM: the predictor's layers and longest distance, set once; J_NSRC and
# J_FEEDBACK too for steps — fewer arguments for the post's call)
# J_WAIT_NS: the caller's waits, an EWMA (ns); J_WAIT_LIMIT_NS: where it gives up on the
# helper (see _wait)
# J_BUSY_EW: the helper's time per job, an EWMA (ns)
# J_IDLE: the last post came when the helper had stopped spinning for posts — asleep,
# or past its spin time (a slow link's long stalls between layers): its wait holds a
# wake-up and is not counted; J_DONE_NS: when the helper finished its last job
# J_TOK, J_POS: a pass begun (BEGIN) with this one token at this context position;
# J_NDRAFT, J_DOCC, J_DWALK, J_DMATCH: the context draft's constants, set once
# J_SEL_WAIT_NS: the caller's time in the waits _wait_select made (ns, all of them)
# J_WAIT_T0: when a wait handed back as PENDING or STOLEN began (0: none), counted from
# there
# J_CLAIM: the GEN of the job last claimed — by the helper, or by a caller that found it
# unclaimed J_STEAL_NS after its post (J_POST_NS: when it was posted) and runs it itself
# (a helper preempted off its core; negative J_STEAL_NS: never); J_STOLEN: jobs so taken;
# J_WOKEN: transfer workers those callers woke (_stolen_done)
(J_LAYER, J_STEP, J_PASS, J_NPRED, J_ALSO, J_NSRC, J_FEEDBACK, J_KIND, J_POSTS,
 J_BUSY_NS, J_SPIN_NS, J_NLAYER, J_DM, J_WAIT_NS, J_WAIT_LIMIT_NS, J_BUSY_EW,
 J_IDLE, J_DONE_NS, J_TOK, J_POS, J_NDRAFT, J_DOCC, J_DWALK, J_DMATCH,
 J_SEL_WAIT_NS, J_WAIT_T0, J_CLAIM, J_POST_NS, J_STEAL_NS, J_STOLEN, J_WOKEN) = range(31)
JOB_WORDS = 31
# what _wait (_wait_for) returns; STOLEN: the caller claimed the job and must run it
# (PredictorThread.finish); AT_BEGIN, or-ed into _pass_start's answer: about the pass's
# beginning, the pass start itself not posted yet
FAILED, DONE_OK, SLOW, PENDING, STOLEN = 0, 1, 2, 3, 4
AT_BEGIN = 8
# how long _wait_select waits holding the GIL before it hands the wait back (PENDING)
_SELECT_PATIENCE_NS = 200_000
# Waiting for a helper that shares its core with other busy threads cost the compute
# thread milliseconds per step (demo model, -t 1, two busy processes beside it: decode
# 8x as long); past this average wait — a few times what the step costs the compute
# thread itself — the predictor takes its steps back (HybridPredictor._join)
# (each wait clipped at 1 ms with weight 1/32: a preemption now and then — one wait in a
# thousand over 0.4 ms on this VM — is not enough; two close together, or a loaded
# machine's waits of milliseconds, are)
WAIT_LIMIT_NS = 60_000
_WAIT_EWMA_N, _WAIT_CLIP_NS = 32, 1_000_000
# …or past this many times the helper's own time per job, where that is more (the bench
# model's step takes ~35 µs there: waits of that order still save the step's ~50 µs on
# the compute thread). A negative limit gives up at once (tests)
_BUSY_FACTOR = 3
# J_KIND: a layer's step, the prediction at a pass's start (J_ALSO 1: layer 0 pre-gated
# from its input, in the h buffer, first), or the beginning of a one-token pass (its
# context draft and token memory bucket: HybridPredictor.begin_pass); REBIND: leave the
# loop to enter it again on other arrays (PredictorThread.rebind)
STEP, PASS_START, BEGIN, REBIND = 0, 1, 2, 3
SPIN_NS = 2_000_000  # how long the helper spins for the next post before it sleeps
# A job no one has claimed this long after its post finds its helper off its core: a
# spinning helper claims a post within a microsecond or two, or within a transfer
# worker's copy where one runs on its core (its sched_yield hands that the core), while
# a preempted one came back only 1-4 ms later, and those waits alone took the
# predictor's cost on the compute thread from ~2.8% to 5-6% of decode in a run in three
# (thirty-ninth session). The caller then runs the job itself (finish).
STEAL_NS = 50_000
_NAP_NS = 10_000_000  # a sleep's longest stretch (a lost wake-up costs this, not a hang)
_WAIT_SPINS = 4000  # the compute thread's spins on DONE before it yields its core
_GIVE_UP_NS = 30_000_000_000  # …and how long it waits at most (then: an error)


def available() -> bool:
    """Whether a predictor thread can run in this process (Linux futexes)."""
    return nw.available()


def usable_cores() -> int:
    """Cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def spare_cores() -> int:
    """Cores this process may use beyond numba's compute threads."""
    import numba

    return usable_cores() - numba.get_num_threads()


def _asked(setting=None) -> bool | None:
    """The helper as asked for: `setting` True / False, or for None / "auto" the
    environment's EFEDGE_PREDICTOR_THREAD (1 → True, 0 → False, auto → None: where a core
    is spare)."""
    if setting is None or setting == "auto":
        env = os.environ.get("EFEDGE_PREDICTOR_THREAD", "auto").strip().lower()
        if env in ("0", "off", "no", "false"):
            return False
        return True if env in ("1", "on", "yes", "true") else None
    return bool(setting)


def may_run(setting=None) -> bool:
    """Whether a helper thread could run at all for this `setting` (wanted()'s), given a
    spare core: the platform has the primitives and neither the setting nor
    EFEDGE_PREDICTOR_THREAD turns it off."""
    return _asked(setting) is not False and available()


def threads_beside_helper() -> int | None:
    """The compute threads that leave the helper a core: one fewer than this process's
    cores, at most numba's pool; None on a single core (nothing to leave)."""
    import numba

    cores = usable_cores()
    return None if cores < 2 else max(1, min(numba.config.NUMBA_NUM_THREADS, cores - 1))


def wanted(setting=None) -> bool:
    """Whether to run the predictor on a helper thread: `setting` True / False, or
    None / "auto" for the environment's EFEDGE_PREDICTOR_THREAD (1 / 0 / auto), auto
    meaning where a core is spare and the platform has the primitives."""
    asked = _asked(setting)
    if asked is None:
        return available() and spare_cores() >= 1
    return asked and available()


if available():
    _syscall, _NR_FUTEX = nw._syscall, nw._NR_FUTEX
    _FUTEX_WAIT, _FUTEX_WAKE = nw._FUTEX_WAIT, nw._FUTEX_WAKE

    @njit(nogil=True, cache=True, fastmath=False)
    def _wake_workers(wctl, wseen):
        """The transfer workers' GEN moved since wseen: wake one if one sleeps (what their
        publish() left to this thread); returns GEN now."""
        g = _load(wctl, nw.C_GEN)
        if g != wseen and _load(wctl, nw.C_SLEEP) > 0:
            _syscall(_NR_FUTEX, wctl.ctypes.data + 4 * nw.C_GEN, _FUTEX_WAKE, 1, 0, 0, 0)
        return g

    @njit(nogil=True, cache=True, fastmath=False)
    def _claim(job, gen):
        """Claim the job posted as GEN `gen` (one claimant wins: the helper or a caller);
        whether this one did. Claims only move forward (GEN as int32, wrapping): a helper
        that read GEN, was preempted, and meanwhile saw the caller take that job and a
        later one must not claim an older GEN over the newer."""
        c = _load(job, J_CLAIM)
        ahead = (gen - c) & 0xFFFFFFFF  # (how far gen is past the last claim)
        return 0 < ahead < 0x80000000 and _cas(job, J_CLAIM, c, gen) == c

    @njit(nogil=True, cache=True, fastmath=False)
    def _run_job(job, ids, h, W, Ws, pg, cur_ids, cur_tok, last_hist, hist_pass, trans,
                 rowsum, recent, weights, prec, prec_n, recall, ring_q, ring_avail,
                 ring_rank, ring_made, p_use, order, p_next, tok_hist, params, sel_rb, sel_sb,
                 switch, draft, tok_tags, ctx, prev, last_at, drafted):
        """The posted job (J_KIND: STEP, BEGIN or PASS_START; any other: nothing) on the
        bound arrays — by the helper (_serve), or by a caller that claimed it
        (PredictorThread.finish)."""
        if job[J_KIND] == STEP:
            _step(job[J_LAYER], job[J_STEP], job[J_PASS], job[J_NPRED], job[J_ALSO],
                  job[J_NSRC], job[J_FEEDBACK] != 0, ids, h, W, Ws, True, pg, cur_ids,
                  cur_tok, last_hist, hist_pass, trans, rowsum, recent, weights, prec,
                  prec_n, recall, ring_q, ring_avail, ring_rank, ring_made, p_use, order,
                  p_next, tok_hist, params, sel_rb, sel_sb, switch, draft)
        elif job[J_KIND] == BEGIN:  # HybridPredictor.begin_pass's kernel (decode)
            drafted[0] = _begin_one(ctx, prev, last_at, job[J_TOK], job[J_POS],
                                    drafted[0] != 0, job[J_NDRAFT], job[J_DOCC],
                                    job[J_DWALK], job[J_DMATCH], params[_P_DRAFTP],
                                    tok_tags, tok_hist, draft, p_next, p_next, cur_tok)
        elif job[J_KIND] == PASS_START:  # HybridPredictor.predict_pass_start's kernel
            gate = job[J_ALSO] != 0  # (ids: only its shape read)
            if gate:  # (into the pass start's pre-gating row, NaN again after)
                input_logits(0, h[0], W, Ws, params, sel_rb, sel_sb, pg[0, 0])
            params[_P_REACHF] = max(params[_P_REACHF], float(job[J_NPRED]))
            _predict(-1, job[J_STEP], job[J_PASS], job[J_NPRED], 0, job[J_NSRC], ids, h,
                     W, Ws, False, pg, cur_ids, cur_tok, last_hist, hist_pass, trans,
                     rowsum, recent, weights, prec, prec_n, recall, ring_q, ring_avail,
                     ring_rank, ring_made, p_use, order, p_next, tok_hist, params, sel_rb,
                     sel_sb, switch, draft)
            if gate:
                pg[0, 0, :] = np.nan

    @njit(nogil=True, cache=True, fastmath=False)
    def _serve(ctl, job, ids, h, wctl, W, Ws, pg, cur_ids, cur_tok, last_hist, hist_pass,
               trans, rowsum, recent, weights, prec, prec_n, recall, ring_q, ring_avail,
               ring_rank, ring_made, p_use, order, p_next, tok_hist, params, sel_rb, sel_sb,
               switch, draft, tok_tags, ctx, prev, last_at, drafted):
        """The helper's loop: wait for GEN to move, run the posted job, DONE = GEN. While
        it spins it also wakes the transfer workers for the copies queued meanwhile
        (wctl: their control words, native_workers.C_*; HELPER = 1 says so to publish()).
        p_next is the helper's own copy (published by _wait); drafted[0]: whether the
        context draft holds anything. Returns 0 when stopped, 1 for a REBIND (DONE set:
        the arrays are no longer touched)."""
        ts = np.zeros(2, np.int64)
        nap = np.array([0, _NAP_NS], np.int64)  # a timespec
        # the last job done, not GEN now: a post made before this thread got here (its
        # start takes a while) is still to be run
        seen = _load(ctl, C_DONE)
        wseen = _load(wctl, nw.C_GEN)
        _store(ctl, C_READY, np.int32(1))
        while True:
            t0 = nw._now_ns(ts)
            spins = 0
            _store(wctl, nw.C_HELPER, np.int32(1))
            while _load(ctl, C_GEN) == seen and _load(ctl, C_STOP) == 0:
                spins += 1
                wseen = _wake_workers(wctl, wseen)
                if spins & 63 != 0 or nw._now_ns(ts) - t0 < job[J_SPIN_NS]:
                    sched_yield()  # a transfer worker woken on this core runs at once
                else:  # no post for a while (between requests): sleep until one
                    # (publish() wakes the workers itself from here on; a GEN it moved
                    # before it could see that is handled here)
                    _store(wctl, nw.C_HELPER, np.int32(0))
                    wseen = _wake_workers(wctl, wseen)
                    _add32(ctl, C_SLEEP, 1)
                    if _load(ctl, C_GEN) == seen:
                        _syscall(_NR_FUTEX, ctl.ctypes.data + 4 * C_GEN, _FUTEX_WAIT, seen,
                                 nap.ctypes.data, 0, 0)
                    _add32(ctl, C_SLEEP, -1)
                    _store(wctl, nw.C_HELPER, np.int32(1))
            # running the job (or leaving), it watches nothing: publish() wakes them
            _store(wctl, nw.C_HELPER, np.int32(0))
            wseen = _wake_workers(wctl, wseen)
            if _load(ctl, C_STOP) != 0:
                return 0
            seen = _load(ctl, C_GEN)
            if job[J_KIND] == REBIND:
                _store(ctl, C_DONE, np.int32(seen))
                return 1
            if not _claim(job, seen):
                continue  # the caller took this job (finish: it sets DONE)
            t0 = nw._now_ns(ts)
            _run_job(job, ids, h, W, Ws, pg, cur_ids, cur_tok, last_hist, hist_pass, trans,
                     rowsum, recent, weights, prec, prec_n, recall, ring_q, ring_avail,
                     ring_rank, ring_made, p_use, order, p_next, tok_hist, params, sel_rb,
                     sel_sb, switch, draft, tok_tags, ctx, prev, last_at, drafted)
            done = nw._now_ns(ts)
            dt = done - t0
            job[J_DONE_NS] = done
            job[J_BUSY_NS] += dt
            job[J_BUSY_EW] += (dt - job[J_BUSY_EW]) // _WAIT_EWMA_N
            _store(ctl, C_DONE, np.int32(seen))

    @njit(nogil=True, cache=True, fastmath=False)
    def _publish_job(ctl, job):
        """GEN += 1 (a full barrier: the job written before it is seen with it), then
        wake the helper if it sleeps. J_IDLE: whether it had stopped spinning for posts
        (asleep, or its last job ended more than its spin time ago: it naps, and between
        naps it yields its core) — the wait that follows then holds a wake-up, which
        says nothing of whether the helper has a core of its own."""
        ts = np.zeros(2, np.int64)
        now = nw._now_ns(ts)
        idle = now - job[J_DONE_NS] > job[J_SPIN_NS]
        job[J_POST_NS] = now
        _add32(ctl, C_GEN, 1)
        if _load(ctl, C_SLEEP) > 0:
            idle = True
            _syscall(_NR_FUTEX, ctl.ctypes.data + 4 * C_GEN, _FUTEX_WAKE, 1, 0, 0, 0)
        job[J_IDLE] = 1 if idle else 0

    @njit(nogil=True, cache=True, fastmath=False)
    def _post(ctl, job, ids_buf, h_buf, ids, h, layer, pass_no, n_pred, also):
        """Write the step's job (its step number, the distances clamped as
        HybridPredictor.step clamps them) and its inputs, then _publish_job; False, with
        nothing done, where ids or h do not have the buffers' shapes. The caller has
        waited for the previous job."""
        if ids.shape[0] != 1 or ids.shape[1] != ids_buf.shape[1] or h.shape[0] != 1 or \
                h.shape[1] != h_buf.shape[1]:
            return False
        dm = job[J_DM]
        job[J_LAYER], job[J_PASS] = layer, pass_no
        job[J_STEP] = pass_no * job[J_NLAYER] + layer
        job[J_NPRED] = max(0, min(n_pred, dm))
        job[J_ALSO] = also if 0 < also <= dm else 0
        job[J_KIND] = STEP
        job[J_POSTS] += 1
        for i in range(ids_buf.shape[1]):
            ids_buf[0, i] = ids[0, i]
        for i in range(h_buf.shape[1]):
            h_buf[0, i] = h[0, i]
        _publish_job(ctl, job)
        return True

    @njit(nogil=True, cache=True, fastmath=False)
    def _post_pass_start(ctl, job, h_buf, h, gate, step, pass_no, n_pred):
        """The job of a single-token pass's start (n_pred clamped by the caller), layer 0
        pre-gated from h [1, D] (its input, copied into h_buf) where `gate`, then
        _publish_job."""
        if gate:
            for i in range(h_buf.shape[1]):
                h_buf[0, i] = h[0, i]
        job[J_STEP], job[J_PASS], job[J_NPRED] = step, pass_no, n_pred
        job[J_ALSO] = 1 if gate else 0
        job[J_KIND] = PASS_START
        job[J_POSTS] += 1
        _publish_job(ctl, job)

    @njit(nogil=True, cache=True, fastmath=False)
    def _post_begin(ctl, job, tok, pos):
        """The job of a one-token pass's beginning: token `tok` at context position
        `pos` (the caller has made room for both in the bound tables), then
        _publish_job."""
        job[J_TOK], job[J_POS] = tok, pos
        job[J_KIND] = BEGIN
        job[J_POSTS] += 1
        _publish_job(ctl, job)

    @njit(nogil=True, cache=True, fastmath=False)
    def _pass_start(ctl, job, h_buf, h, gate, after, step, pass_no, n_pred, dst, src, wait):
        """_wait for the job still posted where `after` (a pass's BEGIN), then
        _post_pass_start and, where `wait`, _wait for it: one call from the compute thread
        for what the plan of a pass's first layers waits for (without `wait` the plan's
        own kernel call waits for it: _wait_select). FAILED where a wait failed (nothing
        posted after a failure), else SLOW where one was slow, else DONE_OK. Either wait
        may take its job over (STOLEN, see _wait_steal): the answer is then STOLEN, with
        AT_BEGIN where that was the pass's beginning (its start not posted yet), and
        PredictorThread.pass_start does the rest."""
        r = DONE_OK
        if after:
            r = _wait_steal(ctl, job, dst, src)
            if r == FAILED:
                return r
            if r == STOLEN:
                return STOLEN | AT_BEGIN
        _post_pass_start(ctl, job, h_buf, h, gate, step, pass_no, n_pred)
        if not wait:
            return r
        r2 = _wait_steal(ctl, job, dst, src)
        return r2 if r2 != DONE_OK else r

    @njit(nogil=True, cache=True, fastmath=False)
    def _post_rebind(ctl, job):
        """The job that has the helper leave its loop (to enter it on other arrays)."""
        job[J_KIND] = REBIND
        _publish_job(ctl, job)

    @njit(nogil=True, cache=True, fastmath=False)
    def _stop(ctl):
        """STOP, then GEN += 1 and a wake-up: the helper leaves its loop."""
        _store(ctl, C_STOP, np.int32(1))
        _add32(ctl, C_GEN, 1)
        _syscall(_NR_FUTEX, ctl.ctypes.data + 4 * C_GEN, _FUTEX_WAKE, 1, 0, 0, 0)

    @njit(nogil=True, cache=True, fastmath=False)
    def _wait(ctl, job, dst, src):
        """Until DONE reaches GEN (the helper finished the last post), then dst[:] = src
        (2-D float32: the step's eviction values published, in the same call). Returns
        FAILED where the helper is dead or has not finished within _GIVE_UP_NS (a step
        takes microseconds: only a fault gets there, and a fault must not hang the
        caller); SLOW where the waits, on average (J_WAIT_NS, an EWMA), exceed
        J_WAIT_LIMIT_NS — the helper does not get a core of its own (a loaded machine)
        and waiting for it costs more than the step itself; else DONE_OK."""
        return _wait_for(ctl, job, dst, src, -1, False)

    @njit(nogil=True, cache=True, fastmath=False)
    def _wait_steal(ctl, job, dst, src):
        """_wait, or STOLEN, with nothing published, where the job was still unclaimed
        J_STEAL_NS after its post and this caller claimed it: it runs the job itself
        (PredictorThread.finish)."""
        return _wait_for(ctl, job, dst, src, -1, True)

    @njit(nogil=True, cache=True, fastmath=False)
    def _wait_for(ctl, job, dst, src, patience_ns, steal):
        """_wait, or PENDING, with nothing published, once `patience_ns` (≥ 0) have
        passed without DONE — for a caller that holds the GIL, which waits on without
        it (a helper that died needs the GIL to say so); or, where `steal`, STOLEN as
        _wait_steal. The wait that follows either counts from this one's start
        (J_WAIT_T0)."""
        gen = _load(ctl, C_GEN)
        spins = 0
        t0 = job[J_WAIT_T0]
        waited = 0
        ts = np.zeros(2, np.int64)
        steal = steal and job[J_STEAL_NS] >= 0 and job[J_KIND] != REBIND
        while _load(ctl, C_DONE) != gen:
            if _load(ctl, C_DEAD) != 0:
                job[J_WAIT_T0] = 0
                return FAILED
            spins += 1
            if t0 == 0:
                t0 = nw._now_ns(ts)
            if steal and spins & 15 == 1 and _load(job, J_CLAIM) != gen:
                now = nw._now_ns(ts)
                if now - job[J_POST_NS] > job[J_STEAL_NS] and _claim(job, gen):
                    job[J_WAIT_T0] = t0
                    return STOLEN
            if patience_ns >= 0 and spins & 63 == 0 and nw._now_ns(ts) - t0 > patience_ns:
                job[J_WAIT_T0] = t0
                return PENDING
            if spins < _WAIT_SPINS:
                cpu_relax()
            else:  # the helper is not running: let it have this core
                if spins & 1023 == 0 and nw._now_ns(ts) - t0 > _GIVE_UP_NS:
                    job[J_WAIT_T0] = 0
                    return FAILED
                sched_yield()
        job[J_WAIT_T0] = 0
        if t0 != 0:  # (clipped: a single preemption must not decide)
            waited = min(nw._now_ns(ts) - t0, _WAIT_CLIP_NS)
        for i in range(dst.shape[0]):
            for j in range(dst.shape[1]):
                dst[i, j] = src[i, j]
        ew = job[J_WAIT_NS]
        if job[J_IDLE] == 0:  # (a wait for a wake-up is not counted)
            ew += (waited - ew) // _WAIT_EWMA_N
        job[J_WAIT_NS] = ew
        limit = job[J_WAIT_LIMIT_NS]
        if limit >= 0:  # (a larger model's step takes longer, and so may its waits)
            limit = max(limit, _BUSY_FACTOR * job[J_BUSY_EW])
        return SLOW if ew > limit else DONE_OK

    @njit(nogil=True, cache=True, fastmath=False)
    def _stolen_done(ctl, job, wctl):
        """A job the caller claimed has run: DONE = its GEN (the wait after this finds it
        done and publishes). The helper that left it is off its core, and may have left
        the transfer workers' wake-ups to itself (wctl's HELPER: publish() then does not
        wake them): one sleeping worker is woken here, for copies queued meanwhile (one
        that finds none sleeps again). Returns whether one was woken (J_WOKEN counts)."""
        ts = np.zeros(2, np.int64)
        job[J_DONE_NS] = nw._now_ns(ts)
        job[J_STOLEN] += 1
        _store(ctl, C_DONE, np.int32(_load(job, J_CLAIM)))
        if _load(wctl, nw.C_HELPER) != 0 and _load(wctl, nw.C_SLEEP) > 0:
            _syscall(_NR_FUTEX, wctl.ctypes.data + 4 * nw.C_GEN, _FUTEX_WAKE, 1, 0, 0, 0)
            job[J_WOKEN] += 1
            return True
        return False

    @njit(cache=True, fastmath=False)
    def _wait_select(ctl, job, dst, src, layer, n_dist, p_min, p_use, order, where, needed,
                     layer_class, slot_state, slot_class, slot_pins, class_slots,
                     max_per_layer, step, rho, victim_aware, plan_i, plan_f):
        """_wait(ctl, job, dst, src), then horizon.select_prefetch on the step's outputs
        (its arguments follow): the wait and the plan that reads the step in one call
        from the compute thread (ExpertFlow, per routed layer). Returns _wait's answer,
        then select_prefetch's; where the helper FAILED, nothing is selected (its
        outputs may be half written). Keeps the GIL, as select_prefetch does, so it
        waits only _SELECT_PATIENCE_NS (a step takes microseconds): then it answers
        PENDING, selecting nothing, and the caller waits on without the GIL (_wait);
        or it claims a job its helper left unclaimed (STOLEN, as _wait_steal), selecting
        nothing either (PredictorThread.finish runs it). The time to the wait's end is
        added to J_SEL_WAIT_NS."""
        ts = np.zeros(2, np.int64)
        t0 = nw._now_ns(ts)
        r = _wait_for(ctl, job, dst, src, _SELECT_PATIENCE_NS, True)
        job[J_SEL_WAIT_NS] += nw._now_ns(ts) - t0
        out = select_prefetch(layer, n_dist if r == DONE_OK or r == SLOW else 0, p_min,
                              p_use, order, where, needed, layer_class, slot_state,
                              slot_class, slot_pins, class_slots, max_per_layer, step, rho,
                              victim_aware, plan_i, plan_f)
        return r, out


_LIVE: weakref.WeakSet = weakref.WeakSet()
_NO_P = np.zeros((0, 0), np.float32)  # (a wait with nothing to publish)


@atexit.register
def _stop_all() -> None:
    """Stop every helper before the interpreter frees the arrays it writes."""
    for t in list(_LIVE):
        t.close()


_WARMED = threading.Event()


def _warm_finish(th: PredictorThread) -> None:
    """Load the kernels a caller runs a job with (finish) into this process, off the
    compute thread (once): the first call of each from Python loads it from numba's
    cache — ~40 ms for _run_job, ~4 ms for _wait (the waits there call _wait_steal),
    which the first job taken over cost the compute thread (thirty-ninth session) — so a
    thread that needs none of them does it beforehand."""
    if _WARMED.is_set():
        return
    _WARMED.set()
    job, ctl = np.zeros(JOB_WORDS, np.int64), np.zeros(8, np.int32)
    job[J_KIND] = REBIND  # (no job: _run_job does nothing)
    job[J_CLAIM] = -1  # (then the claim of GEN 0 is taken, and DONE set to it)

    def load():
        _run_job(job, th.ids, th.h, *th.bound)
        _claim(job, 0)
        _stolen_done(ctl, job, np.zeros(8, np.int32))
        p = np.zeros((1, 1), np.float32)
        _wait(ctl, job, p, p)  # (DONE is GEN: at once)

    threading.Thread(target=load, name="efedge-predictor-warm", daemon=True).start()


class PredictorThread:
    """A helper thread running HybridPredictor steps on the arrays it was started with
    (`bound`: W, W_scale, the pre-gating placeholder, cur_ids, cur_tok, the state, then
    the context draft's tables: tok_tags, ctx, prev, last_at, drafted). `draft`: the
    context draft's constants (tokens, occurrences, walk, match)."""

    def __init__(self, bound: tuple, n_active: int, width: int, max_distance: int,
                 n_layer: int, n_sources: int, feedback: bool,
                 workers_ctl: np.ndarray | None = None,
                 draft: tuple[int, int, int, int] = (0, 0, 0, 0)):
        if not available():
            raise RuntimeError("a predictor thread needs Linux futexes")
        self.bound = bound
        # the native transfer workers' control words (their wake-ups are left to this
        # thread while it spins), or words no one moves
        self.workers_ctl = np.zeros(8, np.int32) if workers_ctl is None else workers_ctl
        self.ctl = np.zeros(8, np.int32)
        self.job = np.zeros(JOB_WORDS, np.int64)
        self.job[[J_NDRAFT, J_DOCC, J_DWALK, J_DMATCH]] = draft
        self.job[J_SPIN_NS] = SPIN_NS  # (tests hold a helper spinning longer)
        self.job[J_STEAL_NS] = STEAL_NS
        self.job[J_WAIT_LIMIT_NS] = WAIT_LIMIT_NS
        # the predictor's constants, as HybridPredictor.step passes them (one token:
        # feedback is the predictor's adapt)
        self.job[J_NLAYER], self.job[J_DM] = n_layer, max_distance
        self.job[J_NSRC], self.job[J_FEEDBACK] = n_sources, 1 if feedback else 0
        self.ids = np.zeros((1, n_active), np.int32)
        self.h = np.zeros((1, width), np.float32)
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="efedge-predictor",
                                        daemon=True)
        self._thread.start()
        _LIVE.add(self)
        end = time.monotonic() + 120.0  # (its loop may be compiled first)
        while not self.ctl[C_READY] and not self.ctl[C_DEAD] and time.monotonic() < end:
            time.sleep(0.0002)
        if not self.ctl[C_READY]:
            err = self.error
            self.close()
            raise RuntimeError("the predictor thread did not start"
                               + (f": {err!r}" if err is not None else "")) from err
        _warm_finish(self)

    def _run(self) -> None:
        try:
            bound = self.bound
            while _serve(self.ctl, self.job, self.ids, self.h, self.workers_ctl, *bound):
                bound = self._rebound  # (rebind: set before its job was posted)
        except BaseException as exc:  # noqa: BLE001 (handed to the compute thread)
            self.error = exc
        finally:
            self.ctl[C_DEAD] = 1

    def pass_start(self, after: bool, step: int, pass_no: int, n_pred: int,
                   first_input: np.ndarray | None, dst: np.ndarray, src: np.ndarray,
                   wait: bool = True) -> int:
        """A single-token pass's start prediction on the helper (see _serve), layer 0
        pre-gated from `first_input` ([1, D] float32, D its width) where given, posted and
        — where `wait` — waited for, after the job still posted (`after`: the pass's
        beginning), in one call (_pass_start); _wait's answer (without `wait`, the
        beginning's: the start is left posted, for the caller's next wait). A job the
        call took over from a helper off its core is run here (finish), and the pass
        start posted after it."""
        gate = first_input is not None
        h = first_input if gate else self.h
        r = _pass_start(self.ctl, self.job, self.h, h, gate, after, step, pass_no, n_pred,
                        dst, src, wait)
        if r & AT_BEGIN:  # (the beginning taken over: the start is posted after it)
            r = self.finish(r & ~AT_BEGIN, dst, src)
            if r == FAILED:
                return r
            r2 = _pass_start(self.ctl, self.job, self.h, h, gate, False, step, pass_no,
                             n_pred, dst, src, wait)
            r = r2 if r2 != DONE_OK else r
        return self.finish(r, dst, src) if r == STOLEN else r

    def finish(self, r: int, dst: np.ndarray, src: np.ndarray) -> int:
        """After a wait answered `r` PENDING or STOLEN: the job run here where this caller
        claimed it (STOLEN, or PENDING and still unclaimed — the helper is off its core),
        else waited for (without the GIL); then _wait's answer (its eviction values
        published into dst)."""
        if r == PENDING and self.job[J_STEAL_NS] >= 0 and \
                _claim(self.job, int(self.ctl[C_GEN])):
            r = STOLEN
        if r == STOLEN:
            try:
                _run_job(self.job, self.ids, self.h, *self.bound)
            finally:  # (a fault here is raised here; the helper waits on for posts)
                _stolen_done(self.ctl, self.job, self.workers_ctl)
        return _wait(self.ctl, self.job, dst, src)

    def post_begin(self, tok: int, pos: int) -> None:
        """Hand the helper a one-token pass's beginning (see _serve)."""
        _post_begin(self.ctl, self.job, tok, pos)

    def rebind(self, bound: tuple) -> None:
        """Run the jobs from now on over other arrays (`bound`, as the constructor's; the
        caller has waited for the last job): the helper leaves its loop and enters it
        again on them — a Python call on the helper thread, cheaper than a new thread.
        Returns once it is back in its loop: it needs the GIL to get there, and a caller
        waiting for its next job with the GIL held (_wait_select) would not let it."""
        self._rebound = self.bound = bound
        self.ctl[C_READY] = 0  # (the loop sets it as it enters)
        _post_rebind(self.ctl, self.job)
        if _wait(self.ctl, self.job, _NO_P, _NO_P) == FAILED:
            self.fail()
        end = time.monotonic() + 60.0
        while not self.ctl[C_READY] and not self.ctl[C_DEAD] and time.monotonic() < end:
            time.sleep(0.00005)  # (the GIL to the helper)
        if not self.ctl[C_READY]:
            self.fail()

    @property
    def posts(self) -> int:
        """Jobs posted to this thread so far."""
        return int(self.job[J_POSTS])

    @property
    def stolen(self) -> int:
        """Jobs this thread's callers ran themselves (the helper was off its core)."""
        return int(self.job[J_STOLEN])

    @property
    def select_wait_s(self) -> float:
        """The caller's time in the waits made with the plan's selection (_wait_select)."""
        return float(self.job[J_SEL_WAIT_NS]) * 1e-9

    @property
    def busy_s(self) -> float:
        """The helper's time in its jobs so far (seconds; read after a wait)."""
        return float(self.job[J_BUSY_NS]) * 1e-9

    def wait(self, dst: np.ndarray, src: np.ndarray) -> bool:
        """Until the last posted step is done, then dst[:] = src (float32 [L, E]: what the
        helper wrote, published); raises what the helper raised, if it did. False where
        waiting for it has cost more than it saves (SLOW)."""
        r = _wait(self.ctl, self.job, dst, src)
        if r == FAILED:
            self.fail()
        return r == DONE_OK

    def fail(self) -> None:
        """Raise the error of a helper that stopped before finishing its job."""
        err = self.error
        what = "stopped" if self.ctl[C_DEAD] else f"took over {_GIVE_UP_NS / 1e9:.0f} s"
        raise RuntimeError(f"the predictor thread {what} before finishing a step"
                           + (f": {err!r}" if err is not None else "")) from err

    def close(self) -> None:
        """Stop the helper and join it (a step under way ends first)."""
        if self.ctl[C_STOP]:
            return
        _stop(self.ctl)
        self._thread.join()
        _LIVE.discard(self)
