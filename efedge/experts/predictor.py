"""The hybrid expert predictor: which experts will layers l+1 … l+H ask for?

Four sources of evidence, each a distribution over the E experts of a future layer m:

* **pre-gating** — the router of layer m applied to the current (ffn-normalised) hidden
  state. The residual stream changes slowly, so this is sharp a layer or two ahead; it
  only exists within the current token (the next token's hidden state is not known).
* **transitions** — how often expert j ran at layer l+d after expert i ran at layer l,
  counted online with exponential decay (optionally seeded from a routing trace). This is
  the model's own routing structure; it also crosses token boundaries.
* **temporal locality** — what the previous tokens chose at layer m: a fast-decaying
  frequency (the last few tokens) and a slow one (the expert's popularity).
* **token memory** — what the router chose at layer m the last times this same token id
  was computed (a shift register of the last 8 occurrences per expert, newest weighing
  most). Routing is largely a function of the token itself (on the demo model's held-out
  text the last occurrence alone finds 63–88% of a layer's experts, against 19–38% for
  the previous token's). It needs the token, so it serves the layers of the pass being
  computed: from every routed layer, and once more at the start of a pass
  (`begin_pass(tokens)` + `predict_pass_start`), before its first layer runs. A
  direct-mapped table with the token id as tag, ≤ 16 MiB.

They are mixed with weights per (target layer, distance) that adapt online by
exponentiated gradient on the log-likelihood of what the router then actually chose
(the "feedback"). The mixture ranks the experts; the rank is turned into a *calibrated*
probability of use by a per (target layer, distance, rank) hit rate, learned from the
same feedback, so the scheduler can weigh a prefetch's expected saving against its cost.
For a batch (prefill) the per-token probabilities are combined into the probability that
*any* token of the batch needs the expert: 1 - Π_t (1 - p_t).

Layers are a cyclic stream: step = pass · L + layer, a pass being one forward call. A
prediction at distance d from layer l targets layer (l + d) mod L, in the next pass when
l + d ≥ L. All hot loops are numba kernels over arrays; the class holds the state. The per-layer
kernels take microseconds and run on the compute thread, so they keep the GIL
(`nogil=False`): releasing and re-taking it around each call let the transfer threads in
and tripled the measured cost of eviction calls on a loaded 2-core machine.
Shapes: L layers, E experts, K active, D width, T tokens in the pass, Dm max distance.
"""

from __future__ import annotations

import numpy as np
from numba import njit

PREGATE, TRANSITION, TEMPORAL, POPULAR, TOKEN = 0, 1, 2, 3, 4
N_COMP = 5
TOKEN_MEMORY_BYTES = 16 << 20  # the token table's budget: [buckets, L, E] uint8
# params vector (float64), indices
_P_INC, _P_DECAY, _P_RECENT, _P_ETA, _P_CAL, _P_EPS, _P_WFLOOR, _P_RECALL, _P_POP = range(9)


@njit(cache=True, fastmath=False)
def _learn_pairs(trans, rowsum, src, dst, di, w):
    """Count (i at the source layer) → (j at distance di+1) for one token's top-k sets."""
    k = src.shape[0]
    for a in range(k):
        i = src[a]
        if i < 0:
            continue
        for b in range(dst.shape[0]):
            trans[di, i, dst[b]] += w
        rowsum[di, i] += w * dst.shape[0]


@njit(cache=True, nogil=True, fastmath=False)
def _seed_kernel(trans, rowsum, experts, weight):
    """Transition counts from a whole trace [N, L, K] (token-major layer stream)."""
    n, n_layer, _ = experts.shape
    dm = trans.shape[1]
    for t in range(n):
        for s in range(n_layer):
            for d in range(1, dm + 1):
                tt = t + (s + d) // n_layer
                m = (s + d) % n_layer
                if tt >= n:
                    continue
                _learn_pairs(trans[s], rowsum[s], experts[t, s], experts[tt, m], d - 1, weight)


@njit(cache=True, fastmath=False)
def _rescale(trans, rowsum, params):
    inv = 1.0 / params[_P_INC]
    for idx in np.ndindex(trans.shape):
        trans[idx] *= inv
    for idx in np.ndindex(rowsum.shape):
        rowsum[idx] *= inv
    params[_P_INC] = 1.0


@njit(cache=True, fastmath=False)
def _feedback(layer, step, ids, ring_q, ring_avail, ring_rank, ring_made, weights, prec,
              prec_n, recall, params):
    """The router of `layer` chose `ids` (one token): score every stored prediction that
    targeted this step, update the fusion weights and the rank calibration."""
    dm = weights.shape[1]
    e_n = prec.shape[2]
    k = ids.shape[0]
    ring = ring_made.shape[0]
    eps, eta, floor = params[_P_EPS], params[_P_ETA], params[_P_WFLOOR]
    chosen = np.zeros(e_n, dtype=np.bool_)
    for a in range(k):
        chosen[ids[a]] = True
    r = step % ring
    for d in range(1, dm + 1):
        if ring_made[r, d - 1] != step - d:
            continue
        ring_made[r, d - 1] = -1
        q = ring_q[r, d - 1]
        av = ring_avail[r, d - 1]
        w = weights[layer, d - 1]
        wsum = 0.0
        for c in range(N_COMP):
            if av[c]:
                wsum += w[c]
        if wsum > 0.0:
            # exponentiated gradient on log f(chosen): g_c = mean_a q_c(a) / f(a)
            g = np.zeros(N_COMP)
            for a in range(k):
                e = ids[a]
                f = 0.0
                for c in range(N_COMP):
                    if av[c]:
                        f += w[c] / wsum * q[c, e]
                f = (1.0 - eps) * f + eps / e_n
                for c in range(N_COMP):
                    if av[c]:
                        g[c] += q[c, e] / f / k
            tot = 0.0
            for c in range(N_COMP):
                if av[c]:
                    w[c] *= np.exp(eta * (g[c] - 1.0))
                    tot += w[c]
            for c in range(N_COMP):
                if av[c]:
                    w[c] = max(w[c] / tot * wsum, floor)
        # calibration: hit rate of each rank at (layer, distance)
        n = prec_n[layer, d - 1]
        rate = max(params[_P_CAL], 1.0 / (n + 2.0))
        pr = prec[layer, d - 1]
        hits = 0
        for e in range(e_n):
            rk = ring_rank[r, d - 1, e]
            hit = 1.0 if chosen[e] else 0.0
            pr[rk] += rate * (hit - pr[rk])
            if chosen[e] and rk < k:
                hits += 1
        prec_n[layer, d - 1] = n + 1
        rr = max(params[_P_RECALL], 1.0 / (recall[d - 1, 1] + 1.0))
        recall[d - 1, 0] += rr * (hits / k - recall[d - 1, 0])
        recall[d - 1, 1] += 1.0


@njit(cache=True, fastmath=False)
def _learn(layer, pass_no, ids, cur_ids, last_hist, hist_pass, trans, rowsum, recent,
           p_next, tok_hist, cur_tok, params):
    """Transition counts ending at this layer, temporal frequency, token history, token
    memory."""
    t_n, k = ids.shape
    n_layer = cur_ids.shape[0]
    dm = trans.shape[1]
    e_n = recent.shape[2]
    ring = last_hist.shape[0]
    for t in range(t_n):
        for a in range(k):
            cur_ids[layer, t, a] = ids[t, a]
        b = cur_tok[t]
        if b >= 0:  # shift in this occurrence: bit 7 = chosen now, bit 6 = the time before…
            row = tok_hist[b, layer]
            for e in range(e_n):
                row[e] = row[e] >> 1
            for a in range(k):
                row[ids[t, a]] = row[ids[t, a]] | 128
    # lazy decay: newer counts weigh more instead of shrinking every old count
    params[_P_INC] *= params[_P_DECAY] ** (-t_n / n_layer)
    w = params[_P_INC]
    for d in range(1, dm + 1):
        s = layer - d
        if s >= 0:  # same pass: token-aligned pairs
            for t in range(t_n):
                _learn_pairs(trans[s], rowsum[s], cur_ids[s, t], ids[t], d - 1, w)
        else:  # an earlier pass: its last token → this pass's first token
            back = (-s + n_layer - 1) // n_layer
            src_pass = pass_no - back
            slot = src_pass % ring
            if src_pass >= 0 and hist_pass[slot] == src_pass:
                sl = s + back * n_layer
                _learn_pairs(trans[sl], rowsum[sl], last_hist[slot, sl], ids[0], d - 1, w)
    if params[_P_INC] > 1e20:
        _rescale(trans, rowsum, params)
    slot = pass_no % ring
    hist_pass[slot] = pass_no
    for a in range(k):
        last_hist[slot, layer, a] = ids[t_n - 1, a]
    # temporal locality: decayed share of the pass's tokens that used each expert, fast
    # (recent[0]) and slow (recent[1], popularity)
    freq = np.zeros(e_n)
    for t in range(t_n):
        for a in range(k):
            freq[ids[t, a]] += 1.0 / t_n
    for j in range(2):
        keep = (1.0 - params[_P_RECENT if j == 0 else _P_POP]) ** t_n
        for e in range(e_n):
            recent[j, layer, e] = keep * recent[j, layer, e] + (1.0 - keep) * min(freq[e], 1.0)
    for e in range(e_n):
        p_next[layer, e] = recent[0, layer, e]  # until a prediction for the next pass comes


@njit(cache=True, fastmath=False)
def _softmax(x):
    out = np.empty(x.shape[0])
    mx = -np.inf
    for i in range(x.shape[0]):
        mx = max(mx, x[i])
    tot = 0.0
    for i in range(x.shape[0]):
        out[i] = np.exp(x[i] - mx)
        tot += out[i]
    for i in range(x.shape[0]):
        out[i] /= tot
    return out


@njit(cache=True, fastmath=True)
def _router_logits(wq, scale, x):
    """int8 router rows [E, D] with per-row scales, times x [D] → float64 logits [E]."""
    e_n, d_n = wq.shape
    out = np.empty(e_n)
    for e in range(e_n):
        acc = np.float32(0.0)
        for j in range(d_n):
            acc += np.float32(wq[e, j]) * x[j]
        out[e] = acc * scale[e]
    return out


@njit(cache=True, fastmath=False)
def _pregate_row(row):
    """Router logits → probabilities; None-like (all zero) when the row carries no
    information (NaN from a trace beyond its horizon, or a constant row)."""
    lo, hi = np.inf, -np.inf
    for i in range(row.shape[0]):
        v = row[i]
        if not np.isfinite(v):
            return np.zeros(row.shape[0]), False
        lo, hi = min(lo, v), max(hi, v)
    if hi - lo <= 0.0:
        return np.zeros(row.shape[0]), False
    return _softmax(row.astype(np.float64)), True


@njit(cache=True, fastmath=False)
def _isotonic_decreasing(y):
    """The non-increasing sequence closest to y (pool adjacent violators)."""
    n = y.shape[0]
    val = np.empty(n)
    cnt = np.empty(n, dtype=np.int64)
    top = 0
    for i in range(n):
        val[top], cnt[top] = y[i], 1
        top += 1
        while top > 1 and val[top - 2] < val[top - 1]:
            c = cnt[top - 2] + cnt[top - 1]
            val[top - 2] = (val[top - 2] * cnt[top - 2] + val[top - 1] * cnt[top - 1]) / c
            cnt[top - 2] = c
            top -= 1
    out = np.empty(n)
    i = 0
    for b in range(top):
        for _ in range(cnt[b]):
            out[i] = val[b]
            i += 1
    return out


@njit(cache=True, fastmath=False)
def _predict(layer, step, pass_no, n_pred, extra, n_src, ids, h, W, Ws, has_w, pg, cur_ids,
             last_hist, hist_pass, recent, trans, rowsum, weights, prec, ring_q, ring_avail,
             ring_rank, ring_made, p_use, order, p_next, tok_hist, cur_tok, params):
    """Calibrated probabilities of use for distances 1..n_pred (into p_use / order).
    layer -1: the start of a pass, before its first layer (targets d - 1, this pass)."""
    t_n, k = ids.shape
    dm = trans.shape[1]
    n_layer = recent.shape[1]
    e_n = recent.shape[2]
    ring = ring_made.shape[0]
    eps = params[_P_EPS]
    # distances n_pred..1 (nearest last, so p_next keeps the nearest view), and before
    # them `extra` if it lies beyond: one more layer to value for eviction
    n_d = n_pred + (1 if extra > n_pred else 0)
    dists = np.empty(n_d, dtype=np.int64)
    for i in range(n_pred):
        dists[n_d - 1 - i] = i + 1
    if n_d > n_pred:
        dists[0] = extra
    for d in dists:
        m = (layer + d) % n_layer
        same = layer + d < n_layer
        t0 = 0 if same else t_n - 1  # across a pass only the last token carries on
        single = same and t_n == 1 or not same
        rsum = np.zeros(2)
        for j in range(2):
            for e in range(e_n):
                rsum[j] += recent[j, m, e]
        pu = np.zeros(e_n)
        fs = np.zeros(e_n)  # summed mixture scores: break ties between equal calibrations
        pm = _isotonic_decreasing(prec[m, d - 1])  # calibrated p by rank
        for t in range(t0, t_n):
            q = np.zeros((N_COMP, e_n))
            av = np.zeros(N_COMP, dtype=np.bool_)
            if same and has_w:
                q[PREGATE] = _softmax(_router_logits(W[m], Ws[m], h[t]))
                av[PREGATE] = True
            elif same and pg.shape[1] >= d:
                q[PREGATE], av[PREGATE] = _pregate_row(pg[t, d - 1])
            if same and cur_tok[t] >= 0:  # this token's own past choices at layer m
                row = tok_hist[cur_tok[t], m]
                tot = 0.0
                for e in range(e_n):
                    tot += row[e]
                if tot > 0.0:
                    for e in range(e_n):
                        q[TOKEN, e] = row[e] / tot
                    av[TOKEN] = True
            # transitions from the last n_src routed layers (this one and the ones before,
            # across the pass boundary), each at its own distance to the target
            cnt = 0
            for j in range(n_src):
                dd = d + j
                if dd > dm:
                    break
                sl = layer - j
                if sl >= 0:
                    src = cur_ids[sl, t]
                else:
                    back = (-sl + n_layer - 1) // n_layer
                    slot = (pass_no - back) % hist_pass.shape[0]
                    if t > 0 or pass_no - back < 0 or hist_pass[slot] != pass_no - back:
                        break
                    sl += back * n_layer
                    src = last_hist[slot, sl]
                for a in range(k):
                    i = src[a]
                    rs = rowsum[sl, dd - 1, i]
                    if rs > 0.0:
                        inv = 1.0 / rs
                        row = trans[sl, dd - 1, i]
                        for e in range(e_n):
                            q[TRANSITION, e] += row[e] * inv
                        cnt += 1
            if cnt > 0:
                for e in range(e_n):
                    q[TRANSITION, e] /= cnt
                av[TRANSITION] = True
            for j in range(2):
                if rsum[j] > 0.0:
                    for e in range(e_n):
                        q[TEMPORAL + j, e] = recent[j, m, e] / rsum[j]
                    av[TEMPORAL + j] = True
            w = weights[m, d - 1]
            wsum = 0.0
            for c in range(N_COMP):
                if av[c]:
                    wsum += w[c]
            f = np.full(e_n, eps / e_n)
            if wsum > 0.0:
                for c in range(N_COMP):
                    if av[c]:
                        wc = (1.0 - eps) * w[c] / wsum
                        for e in range(e_n):
                            f[e] += wc * q[c, e]
            ordt = np.argsort(-f)
            fs += f / (t_n - t0)
            rk = 0
            while rk < e_n:  # experts with equal scores share their ranks' mean calibration
                r2 = rk + 1
                while r2 < e_n and f[ordt[r2]] >= f[ordt[rk]] - 1e-12:
                    r2 += 1
                p = 0.0
                for j in range(rk, r2):
                    p += pm[j] / (r2 - rk)
                for j in range(rk, r2):
                    e = ordt[j]
                    pu[e] = 1.0 - (1.0 - pu[e]) * (1.0 - p)
                rk = r2
            if single and step >= 0:
                r = (step + d) % ring
                for c in range(N_COMP):
                    ring_avail[r, d - 1, c] = av[c]
                    for e in range(e_n):
                        ring_q[r, d - 1, c, e] = q[c, e]
                for rk in range(e_n):
                    ring_rank[r, d - 1, ordt[rk]] = rk
                ring_made[r, d - 1] = step
        if t_n - t0 == 1:
            ordu = ordt  # one token: the calibration keeps the mixture's order
        else:
            ordu = np.argsort(-(pu + 1e-7 * fs))
        for e in range(e_n):
            p_use[d - 1, e] = pu[e]
            order[d - 1, e] = ordu[e]
            p_next[m, e] = pu[e] + 1e-4 * fs[e]  # the mixture orders equal calibrations


@njit(cache=True, fastmath=False)
def _step(layer, step, pass_no, n_pred, extra, n_src, feedback, ids, h, W, Ws, has_w, pg,
          cur_ids, last_hist, hist_pass, trans, rowsum, recent, weights, prec, prec_n, recall,
          ring_q, ring_avail, ring_rank, ring_made, p_use, order, p_next, tok_hist, cur_tok,
          params):
    if feedback:
        _feedback(layer, step, ids[0], ring_q, ring_avail, ring_rank, ring_made, weights, prec,
                  prec_n, recall, params)
    _learn(layer, pass_no, ids, cur_ids, last_hist, hist_pass, trans, rowsum, recent, p_next,
           tok_hist, cur_tok, params)
    if n_pred > 0 or extra > 0:
        _predict(layer, step, pass_no, n_pred, extra, n_src, ids, h, W, Ws, has_w, pg, cur_ids,
                 last_hist, hist_pass, recent, trans, rowsum, weights, prec, ring_q,
                 ring_avail, ring_rank, ring_made, p_use, order, p_next, tok_hist, cur_tok,
                 params)


class HybridPredictor:
    """Online state of the hybrid predictor; `step()` once per routed MoE layer.

    After `step(layer, ids, …, n_pred=n)`, `p_use[d-1]` holds, for the layer d steps ahead,
    each expert's calibrated probability of being used (by any token of the pass) and
    `order[d-1]` the experts by that probability, for d = 1..n. `p_next[m, e]` is the
    latest such estimate for the next use of layer m (the eviction score reads it).
    """

    def __init__(self, n_layer: int, n_expert: int, n_active: int, max_distance: int = 8,
                 decay: float = 0.998, recent_rate: float = 0.3, eta: float = 0.3,
                 calibration_rate: float = 0.05, eps: float = 0.01,
                 weight_floor: float = 0.02, popularity_rate: float = 0.02,
                 n_sources: int = 1, adapt: bool = True, token_weight: float = 1.0):
        L, E, K, dm = n_layer, n_expert, n_active, max(1, int(max_distance))
        self.n_layer, self.n_expert, self.n_active, self.max_distance = L, E, K, dm
        self.adapt = adapt
        self.n_sources = max(1, int(n_sources))  # routed layers the transitions start from
        self.params = np.array([1.0, decay, recent_rate, eta, calibration_rate, eps,
                                weight_floor, 0.1, popularity_rate], dtype=np.float64)
        self.trans = np.zeros((L, dm, E, E), dtype=np.float32)  # [src layer, d-1, i, j]
        self.rowsum = np.zeros((L, dm, E), dtype=np.float32)
        self.recent = np.zeros((2, L, E), dtype=np.float32)  # fast, slow frequency
        # fusion weights per (target layer, distance): pre-gating leads near, the
        # model's statistics further out (priors; feedback moves them)
        self.weights = np.empty((L, dm, N_COMP), dtype=np.float64)
        # token memory: as much as all the others together where the token was seen
        for d in range(1, dm + 1):
            pg = 0.7 / d
            self.weights[:, d - 1] = (pg, (1 - pg) * 0.5, (1 - pg) * 0.3, (1 - pg) * 0.2,
                                      token_weight)
        # calibration prior: the top-K ranks are used half the time, the rest rarely
        self.prec = np.full((L, dm, E), 0.5 * K / E, dtype=np.float64)
        self.prec[:, :, :K] = 0.5
        self.prec_n = np.zeros((L, dm), dtype=np.int64)
        self.recall = np.zeros((dm, 2), dtype=np.float64)  # EWMA recall@K per distance, n
        ring = dm + 1  # stored predictions, keyed by target step mod ring
        self.ring_q = np.zeros((ring, dm, N_COMP, E), dtype=np.float32)
        self.ring_avail = np.zeros((ring, dm, N_COMP), dtype=np.bool_)
        self.ring_rank = np.zeros((ring, dm, E), dtype=np.int32)
        self.ring_made = np.full((ring, dm), -1, dtype=np.int64)
        passes = (dm + L - 1) // L + 1
        self.last_hist = np.full((passes, L, K), -1, dtype=np.int32)
        self.hist_pass = np.full(passes, -1, dtype=np.int64)
        self.cur_ids = np.zeros((L, 1, K), dtype=np.int32)
        self.p_use = np.zeros((dm, E), dtype=np.float32)
        self.order = np.zeros((dm, E), dtype=np.int32)
        self.p_next = np.zeros((L, E), dtype=np.float32)
        # router weights [L, E, D] if known, as int8 with a scale per row [L, E]: four
        # times less memory to stream per prediction (the decode has just flushed caches)
        self.W = np.zeros((0, 0, 0), dtype=np.int8)
        self.W_scale = np.zeros((0, 0), dtype=np.float32)
        self.pass_no = -1
        self.step_no = -1
        self._last_layer = L
        self._pass_tokens = 1
        self._no_h = np.zeros((1, 1), dtype=np.float32)
        self._no_pg = np.zeros((1, 0, E), dtype=np.float32)
        # token memory: bucket = token id mod B, the id itself as tag (a collision resets
        # the bucket rather than mixing two tokens' histories)
        n_buckets = int(min(65536, max(256, TOKEN_MEMORY_BYTES // (L * E))))
        self.tok_tags = np.full(n_buckets, -1, dtype=np.int64)
        self.tok_hist = np.zeros((n_buckets, L, E), dtype=np.uint8)
        self.cur_tok = np.full(1, -1, dtype=np.int64)  # the pass's tokens' buckets (-1: none)

    # -- inputs ---------------------------------------------------------------------------
    def set_router_weights(self, W: np.ndarray) -> None:
        """Routers as dense matrices [L, E, D] (router logits = W[m] @ h)."""
        W = np.asarray(W, dtype=np.float32)
        if W.ndim != 3 or W.shape[:2] != (self.n_layer, self.n_expert):
            raise ValueError(f"router weights must be [{self.n_layer}, {self.n_expert}, D], "
                             f"got {list(W.shape)}")
        scale = np.abs(W).max(axis=2) / 127.0
        scale[scale == 0] = 1.0
        self.W = np.ascontiguousarray(np.round(W / scale[:, :, None]), dtype=np.int8)
        self.W_scale = np.ascontiguousarray(scale, dtype=np.float32)

    def seed(self, experts, weight: float = 1.0) -> None:
        """Transition counts from a routing trace: an array [n_tokens, n_layer, K] of
        expert ids, or a path to a .npz holding one under "experts"."""
        if isinstance(experts, str | bytes) or hasattr(experts, "__fspath__"):
            with np.load(experts) as z:
                experts = z["experts"]
        ex = np.ascontiguousarray(experts, dtype=np.int32)
        if ex.ndim != 3 or ex.shape[1] != self.n_layer or ex.size == 0:
            raise ValueError(f"a trace must be [n_tokens, {self.n_layer}, K], got "
                             f"{list(ex.shape)}")
        if ex.min() < 0 or ex.max() >= self.n_expert:
            raise ValueError("trace expert ids are outside 0..n_expert-1")
        _seed_kernel(self.trans, self.rowsum, ex, float(weight) * self.params[_P_INC])
        if self.params[_P_INC] > 1e20:
            _rescale(self.trans, self.rowsum, self.params)

    # -- the start of a pass (the tokens are known before any layer runs) ----------------
    def begin_pass(self, tokens) -> None:
        """A forward pass over `tokens` begins: token memory can serve its layers. Without
        this call a pass starts at its first step() and token memory stays unused."""
        tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
        if tokens.size == 0:
            return
        b = tokens % self.tok_tags.shape[0]
        new = np.flatnonzero(self.tok_tags[b] != tokens)
        if new.size:
            self.tok_tags[b[new]] = tokens[new]
            self.tok_hist[b[new]] = 0
        self.cur_tok = np.ascontiguousarray(b)
        self.pass_no += 1
        self._last_layer = -1  # the next step(0) is in this pass
        self._pass_tokens = int(tokens.size)

    def predict_pass_start(self, n_pred: int) -> None:
        """After begin_pass: predict this pass's layers 0..n_pred-1 (into p_use / order at
        distances 1..n_pred, and p_next) before any has routed: from the token memory,
        the transitions out of the previous pass's last layer and temporal locality. For a
        single token the prediction replaces the one made at the previous pass's last
        layer for the same steps (feedback scores this one)."""
        n = max(0, min(int(n_pred), self.max_distance, self.n_layer))
        if n == 0:
            return
        t_n = self.cur_tok.shape[0]
        if t_n > self.cur_ids.shape[1]:
            grown = np.zeros((self.n_layer, t_n, self.n_active), dtype=np.int32)
            grown[:, :self.cur_ids.shape[1]] = self.cur_ids
            self.cur_ids = grown
        ids = np.zeros((t_n, self.n_active), dtype=np.int32)  # only its shape is read
        pg = np.zeros((t_n, 0, self.n_expert), dtype=np.float32)
        _predict(-1, self.pass_no * self.n_layer - 1, self.pass_no, n, 0, self.n_sources, ids,
                 self._no_h, self.W, self.W_scale, False, pg, self.cur_ids, self.last_hist,
                 self.hist_pass, self.recent, self.trans, self.rowsum, self.weights, self.prec,
                 self.ring_q, self.ring_avail, self.ring_rank, self.ring_made, self.p_use,
                 self.order, self.p_next, self.tok_hist, self.cur_tok, self.params)

    # -- the per-layer step -----------------------------------------------------------------
    def step(self, layer: int, ids: np.ndarray, hidden: np.ndarray | None = None,
             pregate: np.ndarray | None = None, n_pred: int | None = None,
             also: int = 0) -> int:
        """Learn from `ids` [T, K] chosen at `layer`, then predict n_pred layers ahead from
        the hidden state [T, D] (with router weights set) or pre-gating logits
        [T, n, E] for layers layer+1..layer+n (NaN rows: unknown); `also`: one more
        distance to predict (its p_next only, e.g. this layer's next turn). Returns the
        step."""
        L = self.n_layer
        ids = np.ascontiguousarray(ids, dtype=np.int32).reshape(-1, self.n_active)
        t_n = ids.shape[0]
        if layer <= self._last_layer:  # a pass begun without begin_pass: no token memory
            self.pass_no += 1
            self._pass_tokens = t_n
            self.cur_tok = np.full(t_n, -1, dtype=np.int64)
        if self.cur_tok.shape[0] != t_n:
            self.cur_tok = np.full(t_n, -1, dtype=np.int64)
        self._last_layer = layer
        step = self.pass_no * L + layer
        self.step_no = step
        if t_n > self.cur_ids.shape[1]:
            grown = np.zeros((L, t_n, self.n_active), dtype=np.int32)
            grown[:, :self.cur_ids.shape[1]] = self.cur_ids
            self.cur_ids = grown
        n = self.max_distance if n_pred is None else max(0, min(int(n_pred), self.max_distance))
        has_w = hidden is not None and self.W.shape[0] == L and hidden.ndim == 2 and \
            hidden.shape[1] == self.W.shape[2]
        h = np.ascontiguousarray(hidden, dtype=np.float32) if has_w else self._no_h
        pg = self._no_pg
        if not has_w and pregate is not None:
            pg = np.ascontiguousarray(pregate, dtype=np.float32).reshape(t_n, -1,
                                                                         self.n_expert)
        feedback = self.adapt and t_n == 1
        also = int(also) if 0 < int(also) <= self.max_distance else 0
        _step(layer, step, self.pass_no, n, also, self.n_sources, feedback, ids, h, self.W,
              self.W_scale, has_w, pg, self.cur_ids, self.last_hist, self.hist_pass, self.trans,
              self.rowsum, self.recent, self.weights, self.prec, self.prec_n, self.recall,
              self.ring_q, self.ring_avail, self.ring_rank, self.ring_made, self.p_use,
              self.order, self.p_next, self.tok_hist, self.cur_tok, self.params)
        return step

    # -- reporting ---------------------------------------------------------------------------
    def recall_at_k(self) -> np.ndarray:
        """Recall of the top-K predictions per distance 1..Dm (NaN where never scored)."""
        r = self.recall[:, 0].copy()
        r[self.recall[:, 1] == 0] = np.nan
        return r

    def mean_weights(self) -> np.ndarray:
        """Fusion weights per distance, averaged over layers [Dm, 5] (pre-gating,
        transitions, recent, popular, token memory), each row normalised."""
        w = self.weights.mean(axis=0)
        return w / w.sum(axis=1, keepdims=True)
