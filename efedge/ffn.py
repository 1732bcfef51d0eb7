"""Feed-forward pieces of the forward pass: dense / shared-expert SwiGLU, one routed
expert (alone, on one token, or through kernels.moe), a prefill layer's resident experts
in one call, and the zero-filled stand-in experts of the warm-up."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numba
import numpy as np

from efedge import kernels
from efedge.experts.store import ExpertStore, ExpertWeights, ResidentExperts
from efedge.kernels import decode as dk
from efedge.kernels import moe
from efedge.kernels import prefill as pk
from efedge.weights import _FFN, QMatrix

if TYPE_CHECKING:
    from efedge.model import Block

_ONE_ID = np.zeros(1, np.int32)


def swiglu(x: np.ndarray, gate: QMatrix, up: QMatrix, down: QMatrix) -> np.ndarray:
    """down(silu(gate·x) * (up·x)) for a dense FFN or a shared expert."""
    acts: dict = {}
    g, u = gate(x, acts), up(x, acts)
    a = np.empty_like(g)
    pk.silu_mul_rows(g, u, a)
    return down(a)


def _expert_token(h: np.ndarray, w: ExpertWeights, weight: float, out: np.ndarray,
                  qt: np.ndarray | None = None, sc: np.ndarray | None = None,
                  bias: tuple | None = None, e: int = 0, act_args: tuple = ()) -> None:
    """out [1, D] = one expert on one token h [D], times its routing weight.

    decode_ffn's rows and rounding with K = 1, on this thread alone: the expert cache
    hands experts out one at a time, and waking the other threads for each of them cost
    more than they brought (decode is bound by memory bandwidth; measured 436 against
    363 µs per layer of 4 experts). qt / sc: the experts' quant types and rounding
    schemes when the caller has them (they are per layer). bias: gpt-oss's bias tables
    of the layer, e: this expert's row in them. act_args: _FFN.act_args of the layer."""
    if qt is None:
        f = _FFN(w.gate, w.up, w.down, (w.gate_qtype, w.up_qtype, w.down_qtype))
        gate, up, down, qt, sc = f.gate, f.up, f.down, f.qt, f.sc
    else:
        gate, up, down = w.gate[None], w.up[None], w.down[None]
    wt = np.array([weight], np.float32)
    if bias is None:
        dk.decode_ffn_serial(h, _ONE_ID, wt, gate, up, down, qt, sc, out, *act_args)
    else:
        dk.decode_ffn_oai_serial(h, _ONE_ID, np.array([e], np.int32), wt, gate, up, down, qt,
                                 sc, *bias, out)


def stream_experts_token(experts, layer: int, h: np.ndarray, ids: np.ndarray, w: np.ndarray,
                         f: _FFN, y: np.ndarray, nt: int, bias: tuple | None = None) -> None:
    """y[k] = expert ids[k] on one token h [D] times w[k], for an expert cache: the
    experts come as they are ready (acquire_batches), and each batch runs in one kernel
    call over the slot pool — decode_ffn over several (threads woken once), its serial
    twin for one (waking threads costs more than one small expert brings). The same
    rows and rounding as resident decode, so the same bits in any grouping. A source
    without batches or pool views goes one expert at a time (_expert_token). bias:
    gpt-oss's bias tables of the layer (decode_ffn_oai)."""
    pool = getattr(experts, "pool_slots", _none)(layer)
    if pool is None or not hasattr(experts, "acquire_batches"):
        for e, ew in experts.acquire(layer, np.unique(ids)):
            k = int(np.flatnonzero(ids == e)[0])
            _expert_token(h, ew, float(w[k]), y[k:k + 1], f.qt, f.sc, bias, int(e),
                          f.act_args)
        return
    views, first = pool
    k_of = {int(e): k for k, e in enumerate(ids.tolist())}  # top-k ids are distinct
    for batch in experts.acquire_batches(layer, np.unique(ids)):
        _pool_experts(h, batch, k_of, first, w, views, f, y, nt, bias)


def _pool_experts(h, batch, k_of, first, w, views, f: _FFN, y, nt, bias=None) -> None:
    """One batch [(expert, slot)] of stream_experts_token: its experts' rows of y."""
    ks = [k_of[e] for e, _s in batch]
    slots = np.array([s - first for _e, s in batch], np.int32)
    one = len(ks) == 1
    out = y[ks[0]:ks[0] + 1] if one else np.empty((len(ks), y.shape[1]), np.float32)
    if bias is not None:
        bid = np.array([e for e, _s in batch], np.int32)
        if one:
            dk.decode_ffn_oai_serial(h, slots, bid, w[ks], *views, f.qt, f.sc, *bias, out)
        else:
            dk.decode_ffn_oai(h, slots, bid, w[ks], *views, f.qt, f.sc, *bias, out, nt)
    elif one:
        dk.decode_ffn_serial(h, slots, w[ks], *views, f.qt, f.sc, out, *f.act_args)
    else:
        dk.decode_ffn(h, slots, w[ks], *views, f.qt, f.sc, out, nt, *f.act_args)
    if not one:
        y[ks] = out


def experts_token(experts, layer: int, h: np.ndarray, ids: np.ndarray, w: np.ndarray,
                  f: _FFN, y: np.ndarray, nt: int, bias: tuple | None = None) -> None:
    """y[k] = routed expert ids[k] on one token h [D] times w[k] (ids int32 [K], w float32
    [K]): all K in one decode_ffn call when they are resident or already in the cache,
    else as the cache hands them out (stream_experts_token). Every path computes the
    same rows, so the same bits. bias: gpt-oss's bias tables (decode_ffn_oai)."""
    if isinstance(experts, ResidentExperts):
        # every request to resident experts is a hit: counted as acquire() would
        experts.counters.expert_requests += len(ids)
        experts.counters.hits += len(ids)
        slots, (gate, up, down) = ids, (f.gate, f.up, f.down)
    else:
        ready = getattr(experts, "ready_pool", _none)(layer, ids)
        if ready is None:
            stream_experts_token(experts, layer, h, ids, w, f, y, nt, bias)
            return
        slots, (gate, up, down) = ready
    if bias is None:
        dk.decode_ffn(h, slots, w, gate, up, down, f.qt, f.sc, y, nt, *f.act_args)
    else:
        dk.decode_ffn_oai(h, slots, ids, w, gate, up, down, f.qt, f.sc, *bias, y, nt)


def _none(*_args) -> None:
    return None


def _fused_ok(f: _FFN) -> bool:
    """Whether kernels.moe covers gate, up and down (every type generic.deq_row decodes)."""
    return all(int(q) in kernels.SUPPORTED_QTYPES for q in f.qt)


def _moe_tile(f: _FFN) -> int:
    """Rows per work item of kernels.moe.moe_ffn: a multiple of 8, at most 64, and at
    least two items per thread for one expert's gate and up."""
    rows = f.gate.shape[1]
    return max(8, min(64, rows // (numba.get_num_threads() * 2)) // 8 * 8)


def _fused_experts(f: _FFN, x: np.ndarray, ids: np.ndarray, w: np.ndarray,
                   slots: np.ndarray, bias: tuple | None = None) -> None:
    """slots[t, k] = w[t, k] · expert ids[t, k] on x[t] (kernels.moe: one call for every
    expert of the layer, the same bits as one call per expert). bias: gpt-oss's bias
    tables, rows by ids (moe_ffn_oai)."""
    args = (np.ascontiguousarray(x, np.float32), np.ascontiguousarray(ids, np.int64),
            np.ascontiguousarray(w, np.float32), f.gate, f.up, f.down, f.qt, f.sc)
    if bias is None:
        kernels.dynamic(moe.moe_ffn, *args, slots, _moe_tile(f), *f.act_args)
    else:
        kernels.dynamic(moe.moe_ffn_oai, *args, *bias, slots, _moe_tile(f))


def _resident_moe(blk: Block, h: np.ndarray, ids: np.ndarray, w: np.ndarray, experts,
                  slots: np.ndarray, before: bool = False) -> bool:
    """All routed experts of a prefill layer in one call when they are resident (counted
    as ResidentExperts.acquire counts them); False where the expert loop must run.
    before (llama4): the weights scale each expert's input instead of its output, so
    every (token, slot) is a row of its own with weight 1."""
    if not isinstance(experts, ResidentExperts) or not _fused_ok(blk.experts):
        return False
    n = len(np.unique(ids))
    experts.counters.expert_requests += n
    experts.counters.hits += n
    if before:
        t, k = ids.shape
        x = (h[:, None, :] * w[:, :, None]).reshape(t * k, -1)
        _fused_experts(blk.experts, x, ids.reshape(t * k, 1), np.ones((t * k, 1), np.float32),
                       slots.reshape(t * k, 1, -1), blk.exp_bias)
        return True
    _fused_experts(blk.experts, h, ids, w, slots, blk.exp_bias)
    return True


def expert_ffn(x: np.ndarray, w: ExpertWeights, act: int = 0) -> np.ndarray:
    """One routed expert on the tokens sent to it: x [t, D] → [t, D] (act: the layer's
    _FFN.act, SiLU or smallthinker's ReLU)."""
    f = _FFN(w.gate, w.up, w.down, (w.gate_qtype, w.up_qtype, w.down_qtype), act)
    if _fused_ok(f):  # the resident prefill path's arithmetic (_resident_moe)
        t = x.shape[0]
        slots = np.empty((t, 1, f.down.shape[1]), np.float32)
        _fused_experts(f, x, np.zeros((t, 1), np.int64), np.ones((t, 1), np.float32), slots)
        return slots[:, 0]
    if x.shape[0] == 1:
        out = np.empty((1, w.down.shape[0]), np.float32)
        _expert_token(np.ascontiguousarray(x[0], dtype=np.float32), w, 1.0, out,
                      act_args=f.act_args)
        return out
    acts: dict = {}
    g = kernels.qmatmul(w.gate, w.gate_qtype, x, acts)
    u = kernels.qmatmul(w.up, w.up_qtype, x, acts)
    a = np.empty_like(g)
    if act:  # ReLU (ggml_reglu): g · u where g > 0
        a[:] = np.where(g > 0, g * u, np.float32(0))
    else:
        pk.silu_mul_rows(g, u, a)
    return kernels.qmatmul(w.down, w.down_qtype, a)


def _ffn_sum(x: np.ndarray, y: np.ndarray, n: int, scale: np.float32, out: np.ndarray) -> None:
    """out = x + the n slots of y summed in order (times granite's residual_scale)."""
    if scale == 1:
        dk.ffn_sum(x, y, n, out)
    else:
        dk.ffn_sum_scaled(x, y, n, scale, out)


def _expert(blk: Block, e: int, x: np.ndarray, w: ExpertWeights) -> np.ndarray:
    """Routed expert e of this layer on its tokens x [t, D] (with gpt-oss's biases and
    clamped SwiGLU where the layer has them: moe_ffn_oai on this expert and its bias
    rows, the resident path's arithmetic)."""
    if blk.exp_bias is None:
        return expert_ffn(x, w, blk.experts.act)
    return expert_ffn_oai(x, w, tuple(b[e:e + 1] for b in blk.exp_bias))


def expert_ffn_oai(x: np.ndarray, w: ExpertWeights, bias: tuple) -> np.ndarray:
    """One gpt-oss expert on its tokens x [t, D] → [t, D]: bias = its rows of the layer's
    bias tables (gate [1, F], up [1, F], down [1, D]); moe_ffn_oai, the resident path's
    arithmetic."""
    f = _FFN(w.gate, w.up, w.down, (w.gate_qtype, w.up_qtype, w.down_qtype))
    t = x.shape[0]
    slots = np.empty((t, 1, f.down.shape[1]), np.float32)
    _fused_experts(f, x, np.zeros((t, 1), np.int64), np.ones((t, 1), np.float32), slots,
                   bias)
    return slots[:, 0]


class _StandInExperts:
    """An expert source of zero-filled experts with the real shapes and quant types
    (read-only, like the mapping and the cache slots), for the warm-up."""

    def __init__(self, store: ExpertStore):
        self.store = store
        self._parts: dict[tuple, np.ndarray] = {}

    def parts(self, layer: int) -> tuple[np.ndarray, ...]:
        out = []
        for part in ("gate", "up", "down"):
            shape = tuple(self.store.part_shape(layer, part))
            if shape not in self._parts:
                a = np.zeros(shape, np.uint8)
                a.flags.writeable = False
                self._parts[shape] = a
            out.append(self._parts[shape])
        return tuple(out)

    def acquire(self, layer: int, experts):
        g, u, d = self.parts(layer)
        for e in experts:
            yield int(e), ExpertWeights(g, u, d, *self.store.qtypes(layer))
