"""The numba kernels of the hybrid predictor (efedge/experts/predictor.py holds the state
and describes the method). One call of `_step` per routed layer does the feedback, the
learning and the predictions; `_predict` alone serves the start of a pass (layer -1).
Shapes: L layers, E experts, K active, D width, T tokens in the pass, Dm max distance.
"""

from __future__ import annotations

import numpy as np
from numba import njit

PREGATE, TRANSITION, TEMPORAL, POPULAR, TOKEN = 0, 1, 2, 3, 4
N_COMP = 5
# params vector (float64), indices
# (_P_DRAFTP: the context draft's value at distance 1, for the helper thread's begin)
(_P_INC, _P_DECAY, _P_RECENT, _P_ETA, _P_CAL, _P_EPS, _P_WFLOOR, _P_RECALL, _P_POP,
 _P_REACHF, _P_SELMODE, _P_NGROUP, _P_NGUSED, _P_DRAFTP) = range(14)
# how a router's logits become its selection order (efedge/experts/selection.py)
SEL_NONE, SEL_BIAS, SEL_SOFTMAX, SEL_SIGMOID = 0, 1, 2, 3
LEARN_MARGIN = 2  # transitions are learned this many distances beyond the predictions' reach
# per (target layer, distance): recall@K of the mixture's ranking and of pre-gating's alone
# (EWMA at this rate); the layer is ranked by pre-gating alone while its lead exceeds the
# margin — the mixture can fall below its own best source (docs/scheduler.md §6)
SWITCH_RATE, SWITCH_MARGIN = 0.05, 0.01
REACH_FADE = 4  # passes for the learned reach to shrink by one distance


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
              prec_n, recall, params, switch):
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
        _score_sources(q, av, w, ids, k, switch[layer, d - 1])
        rr = max(params[_P_RECALL], 1.0 / (recall[d - 1, 1] + 1.0))
        recall[d - 1, 0] += rr * (hits / k - recall[d - 1, 0])
        recall[d - 1, 1] += 1.0


@njit(cache=True, fastmath=False)
def _score_sources(q, av, w, ids, k, sw):
    """Into sw (EWMA, SWITCH_RATE): the share of the chosen `ids` in the top k of the
    mixture of the stored components q (with today's weights w) and of pre-gating's q
    alone — a rank counted as the number of experts scored higher (ties: lower ids)."""
    if not av[PREGATE]:
        return
    e_n = q.shape[1]
    f = np.zeros(e_n)
    wsum = 0.0
    for c in range(N_COMP):
        if av[c]:
            wsum += w[c]
    if wsum <= 0.0:
        return
    for c in range(N_COMP):
        if av[c]:
            for e in range(e_n):
                f[e] += w[c] / wsum * q[c, e]
    pg = q[PREGATE]
    hit_mix, hit_pg = 0, 0
    for a in range(k):
        e = ids[a]
        r_mix, r_pg = 0, 0
        fe, pe = f[e], pg[e]
        for j in range(e_n):  # (branch-free: counts, not ifs on the scores)
            r_mix += (f[j] > fe) | ((f[j] == fe) & (j < e))
            r_pg += (pg[j] > pe) | ((pg[j] == pe) & (j < e))
        hit_mix += r_mix < k
        hit_pg += r_pg < k
    sw[0] += SWITCH_RATE * (hit_mix / k - sw[0])
    sw[1] += SWITCH_RATE * (hit_pg / k - sw[1])


@njit(cache=True, fastmath=False)
def _learn(layer, pass_no, ids, cur_ids, last_hist, hist_pass, trans, rowsum, recent,
           p_next, tok_hist, cur_tok, params, draft):
    """Transition counts ending at this layer (distances 1 up to how far predictions
    reached lately, params[_P_REACHF], + LEARN_MARGIN), temporal frequency, token
    history, token memory."""
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
    # only the distances predictions reach now (and a margin): each distance's counts
    # are cache lines the layer kernels have evicted since the last step
    n_learn = max(1, min(dm, int(np.ceil(params[_P_REACHF])) + LEARN_MARGIN))
    for d in range(1, n_learn + 1):
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
    for e in range(e_n):  # until a prediction for the next pass comes (or the draft's)
        p_next[layer, e] = max(recent[0, layer, e], draft[layer, e])


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


_SEL_EDGE = 0.01  # biased gate scores map through logit / log inside [edge, 1 - edge] …
_SEL_SLOPE = 4.0  # … and linearly beyond (logit's slope at 0.5): order kept, no infinity


@njit(cache=True, fastmath=False)
def _selection_logits(z, mode, rb, sb, n_groups, n_used):
    """In place: router logits z [E] (float64) → logits ordered as the router selects.
    SEL_NONE: as they are; SEL_BIAS: + router bias + selection bias (top-k of the
    logits, gpt-oss); SEL_SOFTMAX / SEL_SIGMOID: s = gate(z + rb) + sb as llama.cpp
    selects (DeepSeek-V3's selection bias). Without a selection bias the logits (+ rb)
    order the gate's scores already and are kept: their softmax stays the predictor's
    pre-gating distribution, as for a plain softmax router. With one, s is mapped back
    to a logit scale (log s for softmax, logit s for sigmoid), monotone everywhere —
    biased scores leave (0, 1). With expert groups (DeepSeek-V2 / V3), experts outside
    the n_used groups whose two best s sum highest fall 30 below the lowest logit
    (finite: a trace row with -inf reads as unknown)."""
    e_n = z.shape[0]
    if mode == SEL_NONE and not (n_groups > 1 and 0 < n_used < n_groups):
        return
    biased = False
    for e in range(e_n):
        z[e] += rb[e]
        biased = biased or sb[e] != 0.0
    s = np.empty(e_n)  # the gate's selection scores
    if mode == SEL_SOFTMAX:
        mx = -np.inf
        for e in range(e_n):
            mx = max(mx, z[e])
        tot = 0.0
        for e in range(e_n):
            s[e] = np.exp(z[e] - mx)
            tot += s[e]
        for e in range(e_n):
            s[e] = s[e] / tot + sb[e]
    elif mode == SEL_SIGMOID:
        for e in range(e_n):
            s[e] = 1.0 / (1.0 + np.exp(-z[e])) + sb[e]
    else:
        for e in range(e_n):
            s[e] = z[e] + sb[e]
    if biased or mode == SEL_BIAS or mode == SEL_NONE:
        lo, hi = _SEL_EDGE, 1.0 - _SEL_EDGE
        for e in range(e_n):
            v = s[e]
            if mode == SEL_SOFTMAX:
                z[e] = np.log(v) if v >= lo else np.log(lo) + _SEL_SLOPE * (v - lo) / lo
            elif mode == SEL_SIGMOID:
                w = min(max(v, lo), hi)
                z[e] = np.log(w / (1.0 - w)) + _SEL_SLOPE * (v - w)
            else:
                z[e] = v
    if n_groups > 1 and 0 < n_used < n_groups and e_n % n_groups == 0:
        per = e_n // n_groups
        score = np.empty(n_groups)
        low = np.inf
        for g in range(n_groups):
            b1, b2 = -np.inf, -np.inf  # the group's two best selection scores
            for e in range(g * per, (g + 1) * per):
                low = min(low, z[e])
                if s[e] > b1:
                    b1, b2 = s[e], b1
                elif s[e] > b2:
                    b2 = s[e]
            score[g] = b1 + b2
        keep = _rank_desc(score)  # ties towards the lower group, as a stable argsort
        for r in range(n_used, n_groups):
            g = keep[r]
            for e in range(g * per, (g + 1) * per):
                z[e] = low - 30.0


@njit(cache=True, fastmath=False)
def _selection_rows(z, mode, rb, sb, n_groups, n_used):
    """_selection_logits on each row of z [T, E] (selection.py's numpy entry; here, in
    the file of the function it calls: numba's cache checks only the caller's file)."""
    for t in range(z.shape[0]):
        _selection_logits(z[t], mode, rb, sb, n_groups, n_used)


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
def _rank_desc(x):
    """Indices of x by decreasing value, ties in index order (NaN ranks as -inf). Each
    element's place is the count of those before it — compares that compile to vector
    code with no branch on the data: E is small, and the insertion sort this replaced
    (the library sort's code had fallen out of cache between layers) mispredicted a
    branch per element on each new row of scores (a step's replay: 11.3 → 10.6 µs)."""
    n = x.shape[0]
    out = np.empty(n, dtype=np.int64)
    for e in range(n):
        v = x[e]
        if v != v:
            v = -np.inf
        c = 0
        for j in range(n):
            u = x[j]
            u = u if u == u else -np.inf
            c += (u > v) | ((u == v) & (j < e))
        out[c] = e
    return out


@njit(cache=True, fastmath=False)
def _isotonic_decreasing(y):
    """The non-increasing sequence closest to y (pool adjacent violators). Returns y
    itself when it already is one (the usual case once calibrated: no allocation)."""
    n = y.shape[0]
    ok = True
    for i in range(1, n):
        if y[i] > y[i - 1]:
            ok = False
            break
    if ok:
        return y
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
             cur_tok, last_hist, hist_pass, trans, rowsum, recent, weights, prec, prec_n,
             recall, ring_q, ring_avail, ring_rank, ring_made, p_use, order, p_next, tok_hist,
             params, sel_rb, sel_sb, switch, draft):
    """Calibrated probabilities of use for distances 1..n_pred (into p_use / order).
    layer -1: the start of a pass, before its first layer (targets d - 1, this pass).
    p_next gets each expert's, or the draft's value where that is higher (_draft_kernel)."""
    t_n, k = ids.shape
    dm = trans.shape[1]
    n_layer = recent.shape[1]
    e_n = recent.shape[2]
    ring = ring_made.shape[0]
    eps = params[_P_EPS]
    sel_mode = int(params[_P_SELMODE])
    n_groups, n_used = int(params[_P_NGROUP]), int(params[_P_NGUSED])
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
                z = _router_logits(W[m], Ws[m], h[t])
                _selection_logits(z, sel_mode, sel_rb[m], sel_sb[m], n_groups, n_used)
                q[PREGATE] = _softmax(z)
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
                    if rs > 0.0:  # (indexed, not a row view: no reference counting)
                        inv = 1.0 / rs
                        for e in range(e_n):
                            q[TRANSITION, e] += trans[sl, dd - 1, i, e] * inv
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
            sw = switch[m, d - 1]
            if av[PREGATE] and sw[1] > sw[0] + SWITCH_MARGIN:  # pre-gating ranks better
                for e in range(e_n):
                    f[e] = q[PREGATE, e] + 1e-3 * f[e]
            ordt = _rank_desc(f)
            for e in range(e_n):  # (no temporary array)
                fs[e] += f[e] / (t_n - t0)
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
            ordu = _rank_desc(pu + 1e-7 * fs)
        for e in range(e_n):
            p_use[d - 1, e] = pu[e]
            order[d - 1, e] = ordu[e]
            # (the mixture orders equal calibrations)
            p_next[m, e] = max(pu[e] + 1e-4 * fs[e], draft[m, e])


@njit(cache=True, fastmath=False)
def _step(layer, step, pass_no, n_pred, extra, n_src, feedback, ids, h, W, Ws, has_w, pg,
          cur_ids, cur_tok, last_hist, hist_pass, trans, rowsum, recent, weights, prec, prec_n,
          recall, ring_q, ring_avail, ring_rank, ring_made, p_use, order, p_next, tok_hist,
          params, sel_rb, sel_sb, switch, draft):
    """One routed layer: score the predictions that targeted it (feedback), learn from
    its choice, predict. The arguments from last_hist on are the predictor's persistent
    state, in the order of HybridPredictor._state."""
    # how far predictions reached lately (it fades by one distance per REACH_FADE passes):
    # _learn learns transitions that far, plus a margin
    fade = 1.0 / (REACH_FADE * p_next.shape[0])
    params[_P_REACHF] = max(float(max(n_pred, extra)), params[_P_REACHF] - fade)
    if feedback:
        _feedback(layer, step, ids[0], ring_q, ring_avail, ring_rank, ring_made, weights, prec,
                  prec_n, recall, params, switch)
    _learn(layer, pass_no, ids, cur_ids, last_hist, hist_pass, trans, rowsum, recent, p_next,
           tok_hist, cur_tok, params, draft)
    if n_pred > 0 or extra > 0:
        _predict(layer, step, pass_no, n_pred, extra, n_src, ids, h, W, Ws, has_w, pg, cur_ids,
                 cur_tok, last_hist, hist_pass, trans, rowsum, recent, weights, prec, prec_n,
                 recall, ring_q, ring_avail, ring_rank, ring_made, p_use, order, p_next,
                 tok_hist, params, sel_rb, sel_sb, switch, draft)


@njit(cache=True, fastmath=False)
def _occurrence(ctx, i, before, tok):
    """i if position i (a recorded occurrence of `tok`) is still one before `before` in
    the context (positions rewound since no longer hold it), else -1."""
    return i if 0 <= i < before and ctx[i] == tok else -1


@njit(cache=True, fastmath=False)
def _draft_kernel(ctx, prev, tok, j, pos, n_draft, n_occ, n_walk, n_match, p_draft, tok_tags,
                  tok_hist, draft, p_next, p_next_k):
    """The context draft of a one-token pass of token `tok` at `pos`, whose last earlier
    occurrence in the same context was at `j` (the caller's record; checked here against
    ctx, as positions may have been rewound since — then no draft): ctx[pos] and
    prev[pos] (each position's previous occurrence of its token) are written. The tokens
    that followed an earlier occurrence i, ctx[i+1 .. i+n_draft] (before pos), are taken
    as the likeliest next ones (prompt lookup); the experts each of them chose the last
    time it ran (the token memory's newest bit) are valued p_draft / sqrt(d) at draft
    distance d, the highest value winning. First drafted, at full value: of the latest
    n_walk occurrences, the one preceded by the most of the same tokens as `pos` (up to
    n_match; the latest on ties) — what followed the same few tokens is the likelier
    continuation; then the latest, then the ones before it, n_occ in all, each at half
    the value of the one before. Into draft [L, E] (0 elsewhere). p_next (and
    the helper thread's copy p_next_k) take the draft's value where it is higher: the
    eviction values read it. Returns whether anything was drafted."""
    j = _occurrence(ctx, j, pos, tok)
    ctx[pos] = tok
    prev[pos] = j
    draft[:] = 0.0
    n_set = 0
    n_b = tok_tags.shape[0]
    scale = p_draft
    first = -1  # the occurrence with the longest match of the tokens before it, if any
    best = 0
    i = j
    for _ in range(n_walk):
        if i < 0:
            break
        n = 0
        while n < n_match and n < i and ctx[i - 1 - n] >= 0 and ctx[i - 1 - n] == ctx[pos - 1 - n]:
            n += 1
        if n > best:
            best, first = n, i
            if n == n_match:
                break
        i = _occurrence(ctx, prev[i], i, tok)
    latest = j
    src = first if first >= 0 else latest
    for o in range(n_occ):
        if src < 0:
            break
        for d in range(1, n_draft + 1):
            if src + d >= pos:
                break
            nt = ctx[src + d]
            if nt < 0:
                continue
            b = nt % n_b
            if tok_tags[b] != nt:
                continue
            p = np.float32(scale / np.sqrt(d))
            row = tok_hist[b]
            for m in range(row.shape[0]):  # (branch-free: the compiler vectorises it)
                for e in range(row.shape[1]):
                    hit = row[m, e] >> 7
                    n_set += hit
                    draft[m, e] = max(draft[m, e], p * np.float32(hit))
        scale *= 0.5
        if o == 0 and first >= 0 and first != latest:
            src = latest  # (after the longest match, the latest occurrence)
        else:  # the occurrence before (a stale link — rewound — is not followed)
            src = _occurrence(ctx, prev[src], src, tok)
    if n_set == 0:
        return False
    for m in range(draft.shape[0]):
        for e in range(draft.shape[1]):
            v = draft[m, e]
            p_next[m, e] = max(p_next[m, e], v)
            p_next_k[m, e] = max(p_next_k[m, e], v)
    return True


@njit(cache=True, fastmath=False)
def _record_context(ctx, prev, last_at, tokens, pos):
    """A batch of tokens (a prefill) at positions pos.. of the context: each position's
    token (ctx), its previous occurrence there (prev, -1 for none or one rewound since)
    and each token's latest position (last_at [vocab]; ids past it are not recorded)."""
    for i in range(tokens.shape[0]):
        t = tokens[i]
        p = pos + i
        j = -1
        if 0 <= t < last_at.shape[0]:
            j = last_at[t]
            last_at[t] = p
        prev[p] = _occurrence(ctx, j, p, t)
        ctx[p] = t


@njit(cache=True, fastmath=False)
def _begin_one(ctx, prev, last_at, tok, pos, drafted, n_draft, n_occ, n_walk, n_match,
               p_draft, tok_tags, tok_hist, draft, p_next, p_next_k, tok1):
    """A one-token pass of token `tok` at context position `pos` begins (begin_pass on
    decode, in one call: Python scalars and a dict cost the compute thread more, cold,
    than the work): the context draft (_draft_kernel) where the token occurred earlier —
    last_at [vocab] holds each token's latest position, -1 for none — or where the last
    pass drafted (its draft is cleared), else the position recorded without one; then
    the token memory's bucket for it (a bucket another token held is reset) into tok1[0].
    Returns whether anything is drafted now."""
    j = -1
    if 0 <= tok < last_at.shape[0]:
        j = last_at[tok]
        last_at[tok] = pos
    if j >= 0 or drafted:  # (the draft kernel checks j against the context)
        drafted = _draft_kernel(ctx, prev, tok, j, pos, n_draft, n_occ, n_walk, n_match,
                                p_draft, tok_tags, tok_hist, draft, p_next, p_next_k)
    else:
        ctx[pos] = tok
        prev[pos] = -1
    tag_one(tok, tok_tags, tok_hist, tok1)
    return drafted


@njit(cache=True, fastmath=False)
def tag_one(tok, tok_tags, tok_hist, tok1):
    """A one-token pass's token memory bucket for token `tok` into tok1[0] (a bucket
    another token held is reset: a collision resets rather than mixes)."""
    b = tok % tok_tags.shape[0]
    if tok_tags[b] != tok:
        tok_tags[b] = tok
        tok_hist[b] = 0
    tok1[0] = b


@njit(cache=True, fastmath=False)
def refine_pick(z, k, margin, due_row, where_row, drop, want):
    """A layer's queue against its router's selection logits z [E] on its input
    (ExpertFlow's refine): into `drop` the experts with a prefetch queued for it
    (due_row ≥ 0) outside the top k + margin, into `want` those of the top k neither
    resident nor loading (where_row < 0), likeliest first. Returns (n_drop, n_want)."""
    e_n = z.shape[0]
    order = _rank_desc(z)
    keep = np.zeros(e_n, dtype=np.bool_)
    for r in range(min(k + margin, e_n)):
        keep[order[r]] = True
    n_drop = 0
    for e in range(e_n):
        if due_row[e] >= 0 and not keep[e]:
            drop[n_drop] = e
            n_drop += 1
    n_want = 0
    for r in range(min(k, e_n)):
        e = order[r]
        if where_row[e] < 0:
            want[n_want] = e
            n_want += 1
    return n_drop, n_want


@njit(cache=True, fastmath=False)
def _routed_logits(layer, h, W, Ws, params, sel_rb, sel_sb):
    """Layer's selection logits [E] (float64) from its int8 router (the predictor's copy)
    on h [D], normalised as the router's input is."""
    z = _router_logits(W[layer], Ws[layer], h)
    _selection_logits(z, int(params[_P_SELMODE]), sel_rb[layer], sel_sb[layer],
                      int(params[_P_NGROUP]), int(params[_P_NGUSED]))
    return z


@njit(cache=True, fastmath=False)
def input_logits(layer, h, W, Ws, params, sel_rb, sel_sb, out):
    """Into out [E] (float32): _routed_logits on layer's own input — what pre-gating from
    that input sees (the pass start's first layer)."""
    z = _routed_logits(layer, h, W, Ws, params, sel_rb, sel_sb)
    for e in range(out.shape[0]):
        out[e] = z[e]


@njit(cache=True, fastmath=False)
def refine_pick_routed(layer, h, W, Ws, params, sel_rb, sel_sb, k, margin, due_row,
                       where_row, drop, want):
    """refine_pick with the layer's selection logits computed here from its int8 router
    (the predictor's copy) on h [D]: one call, no temporaries in Python."""
    return refine_pick(_routed_logits(layer, h, W, Ws, params, sel_rb, sel_sb), k, margin,
                       due_row, where_row, drop, want)
