"""One transformer layer's weights (Block), read from the GGUF file and shaped for the
kernels, and the token embeddings' rows as floats (efedge/model.py runs them)."""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType

from efedge import kernels
from efedge.config import ModelConfig, fused_qkv, qk_norm_of, qkv_widths
from efedge.errors import UnsupportedModelError
from efedge.gguf_file import GGUFFile
from efedge.kernels import decode as dk
from efedge.kernels.nn import ACT_RELU, ACT_SILU
from efedge.weights import _FFN, QMatrix, _qmatrix, _vector

_EMPTY = np.zeros(0, np.float32)
# read-only as every weight is (weights._readonly): a dense layer's empty router would
# otherwise give decode_attn a second specialisation, compiled anew (~10 s) for it
_EMPTY_RAW = np.zeros((0, 1), np.uint8)
_EMPTY_RAW.flags.writeable = False
_QK_MODE = {"none": dk.QK_NONE, "head": dk.QK_HEAD, "full": dk.QK_FULL,
            "head_post": dk.QK_HEAD_POST}


# token embeddings stored as floats: the dtype to view their raw rows as (BF16 is not here:
# numpy has no bfloat16)
_FLOAT_ROWS = {int(GGMLQuantizationType.F32): np.float32,
               int(GGMLQuantizationType.F16): np.float16}


def embedding_rows(rows: np.ndarray, qtype: int) -> np.ndarray:
    """Raw embedding rows uint8 [T, row_bytes] as float32 [T, n_embd]: kernels.dequantize's
    values. F32 and F16 rows convert exactly in numpy: a decode step starts here with the
    caches the previous token's output head left, and the generic dequantizer's dispatch
    and code, fetched cold, took ~55 µs per token (demo decode 1.05× paired without it)."""
    view = _FLOAT_ROWS.get(qtype)
    if view is not None:
        return rows.view(view).astype(np.float32)
    return kernels.dequantize(rows, qtype).astype(np.float32)


class Block:
    """One transformer layer's weights; attribute names follow the GGUF tensor names."""

    def __init__(self, gf: GGUFFile, cfg: ModelConfig, il: int):
        b, spec = f"blk.{il}.", cfg.spec
        self.attn_norm = _vector(gf, b + "attn_norm.weight")
        self.ffn_norm = _vector(gf, b + spec.ffn_norm + ".weight")
        # phimoe: the norms' biases, added after the RMS norm (None elsewhere)
        self.attn_norm_b = self.ffn_norm_b = None
        if spec.norm_bias:
            self.attn_norm_b = _vector(gf, b + "attn_norm.bias")
            self.ffn_norm_b = _vector(gf, b + spec.ffn_norm + ".bias")
        self.attn_output_b = None  # phimoe: added after attn_output (Transformer.forward)
        # afmoe: the attention gate (ArchSpec.attn_gate) and the norms of the attention's
        # and the FFN's outputs (ArchSpec.post_norms); None elsewhere
        self.attn_gate = None
        self.attn_post_norm = self.ffn_post_norm = None
        if spec.post_norms:
            self.attn_post_norm = _vector(gf, b + "post_attention_norm.weight")
            self.ffn_post_norm = _vector(gf, b + "post_ffw_norm.weight")
        # attention the fused kernels do not cover (deepseek2's MLA, gpt-oss's sinks):
        # an object called as custom_attn(transformer, il, hn, pos, kv) → [T, D]
        self.custom_attn = None
        if spec.attention == "mla":
            from efedge.mla import MLAAttention

            self.custom_attn = MLAAttention(gf, cfg, il)
        elif spec.attention == "mimo2":
            from efedge.mimo2 import MiMo2Attention

            self.custom_attn = MiMo2Attention(gf, cfg, il)
        elif spec.attention == "sinks":
            from efedge.oss import SinkAttention

            self.custom_attn = SinkAttention(gf, cfg, il)
        else:
            self._standard_attention(gf, cfg, il)
        self.moe = cfg.is_moe_layer(il)  # False for dense models and leading dense layers
        self.shared = None
        self.exp_bias = None  # gpt-oss: (gate [E, F], up [E, F], down [E, D]) biases
        self.router_bias = None
        if self.moe:
            self._moe_ffn(gf, cfg, b)
        else:
            self.ffn_gate = _qmatrix(gf, b + "ffn_gate.weight")
            self.ffn_up = _qmatrix(gf, b + "ffn_up.weight")
            self.ffn_down = _qmatrix(gf, b + "ffn_down.weight")
            m = (self.ffn_gate, self.ffn_up, self.ffn_down)
            self.dense = _FFN(*(x.raw for x in m), tuple(x.qtype for x in m))
            if cfg.is_moe:  # a leading dense layer: a router of zeros stands in for the
                # expert runtime's per-layer router lists; it is never asked to route
                z = np.zeros((cfg.n_expert, 4 * cfg.n_embd), np.uint8)
                self.ffn_gate_inp = QMatrix(z, int(GGMLQuantizationType.F32), "(dense layer)")
        if self.custom_attn is None:
            self._decode_args(cfg)

    def _standard_attention(self, gf: GGUFFile, cfg: ModelConfig, il: int) -> None:
        spec, b = cfg.spec, f"blk.{il}."
        self.bias = None
        if fused_qkv(gf, cfg, il):
            self._fused_qkv(gf, cfg, b)
        else:
            self.attn_q = _qmatrix(gf, b + "attn_q.weight")
            self.attn_k = _qmatrix(gf, b + "attn_k.weight")
            self.attn_v = _qmatrix(gf, b + "attn_v.weight")
        self.attn_output = _qmatrix(gf, b + "attn_output.weight")
        if spec.attn_gate:
            self.attn_gate = _qmatrix(gf, b + "attn_gate.weight")
        if spec.out_bias:
            self.attn_output_b = _vector(gf, b + "attn_output.bias")
        elif b + "attn_output.bias" in gf.tensors and not spec.output_bias_unused:
            # llama.cpp adds it (its llama graph's wo_b); efedge's attention kernels have no
            # output bias, and running the layer without it is silently another model
            raise UnsupportedModelError(f"tensor {b + 'attn_output.bias'!r}: an attention "
                                        "output bias is not supported")
        # llama.cpp adds each q / k / v bias a file has, whatever the arch (qwen2 requires
        # them); one that is absent adds zeros here
        names = [b + f"attn_{p}.bias" for p in "qkv"]
        if self.bias is None and (spec.attn_bias or any(n in gf.tensors for n in names)):
            rows = (self.attn_q, self.attn_k, self.attn_v)
            self.bias = tuple(_vector(gf, n) if n in gf.tensors or spec.attn_bias
                              else np.zeros(m.raw.shape[0], np.float32)
                              for n, m in zip(names, rows, strict=True))
        self.q_norm = self.k_norm = None
        self.qk_norm = qk_norm_of(gf, cfg, il)  # the spec's, or "none" where it is optional
        if self.qk_norm != "none":
            self.q_norm = _vector(gf, b + "attn_q_norm.weight")
            self.k_norm = _vector(gf, b + "attn_k_norm.weight")
        if cfg.kq_norm and not cfg.is_nope_layer(il):
            # llama4's rope layers: an unweighted RMS norm of each q / k head after rope;
            # rope rotates every pair of the head, so normed before rope it is the same
            self.qk_norm = "head"
            self.q_norm = self.k_norm = np.ones(cfg.head_dim, np.float32)

    def _fused_qkv(self, gf: GGUFFile, cfg: ModelConfig, b: str) -> None:
        """q, k and v as row ranges of one attn_qkv tensor (each output row is its own
        dot product, so a view of the rows computes what llama.cpp's fused product and
        its split views do)."""
        qkv = _qmatrix(gf, b + "attn_qkv.weight")
        ends = np.cumsum((0, *qkv_widths(cfg)))
        for p, r0, r1 in zip("qkv", ends[:-1], ends[1:], strict=True):
            setattr(self, "attn_" + p, QMatrix(qkv.raw[r0:r1], qkv.qtype, f"{qkv.name}[{p}]"))
        if b + "attn_qkv.bias" in gf.tensors:
            full = _vector(gf, b + "attn_qkv.bias")
            self.bias = tuple(full[r0:r1].copy() for r0, r1 in zip(ends[:-1], ends[1:],
                                                                   strict=True))

    def _moe_ffn(self, gf: GGUFFile, cfg: ModelConfig, b: str) -> None:
        spec = cfg.spec
        self.ffn_gate_inp = _qmatrix(gf, b + "ffn_gate_inp.weight")
        parts = [f"{b}ffn_{p}_exps.weight" for p in ("gate", "up", "down")]
        for name in parts:
            kernels.check_qtype(gf.tensor(name).qtype, f"tensor {name}")
        self.experts = _FFN(*(gf.raw(n) for n in parts),
                            tuple(gf.tensor(n).qtype for n in parts),
                            ACT_RELU if spec.expert_act == "relu" else ACT_SILU)
        if spec.expert_bias:  # small: resident beside the router, never cache traffic
            self.router_bias = _vector(gf, b + "ffn_gate_inp.bias")
            self.exp_bias = tuple(
                _vector(gf, f"{b}ffn_{p}_exps.bias").reshape(cfg.n_expert, -1)
                for p in ("gate", "up", "down"))
        self.exp_probs_b = None  # DeepSeek-V3's selection bias
        if b + "exp_probs_b.bias" in gf.tensors:
            self.exp_probs_b = _vector(gf, b + "exp_probs_b.bias")
        if cfg.has_shared:
            self.ffn_gate_inp_shexp = None  # ungated (granitemoe, deepseek2)
            if spec.shared_gate:
                self.ffn_gate_inp_shexp = _vector(gf, b + "ffn_gate_inp_shexp.weight")
            self.ffn_gate_shexp = _qmatrix(gf, b + "ffn_gate_shexp.weight")
            self.ffn_up_shexp = _qmatrix(gf, b + "ffn_up_shexp.weight")
            self.ffn_down_shexp = _qmatrix(gf, b + "ffn_down_shexp.weight")
            m = (self.ffn_gate_shexp, self.ffn_up_shexp, self.ffn_down_shexp)
            self.shared = _FFN(*(x.raw for x in m), tuple(x.qtype for x in m))

    def _decode_args(self, cfg: ModelConfig) -> None:
        """decode_attn's per-layer arguments, built once."""
        mats = [self.attn_q, self.attn_k, self.attn_v, self.attn_output]
        # the kernel routes by softmax top-k; other routings run after it (_decode)
        routes = self.moe and cfg.spec.routing == "softmax"
        if routes:
            mats.append(self.ffn_gate_inp)
        router = self.ffn_gate_inp.raw if routes else _EMPTY_RAW
        qt = np.array([m.qtype for m in mats] + [0] * (5 - len(mats)), np.int64)
        sc = np.array([m.scheme for m in mats] + [0] * (5 - len(mats)), np.int64)
        bq, bk, bv = self.bias if self.bias is not None else (_EMPTY, _EMPTY, _EMPTY)
        qn, kn = (self.q_norm, self.k_norm) if self.q_norm is not None else (_EMPTY, _EMPTY)
        self.decode_args = (self.attn_norm, self.ffn_norm, np.float32(cfg.norm_eps),
                            self.attn_q.raw, self.attn_k.raw, self.attn_v.raw,
                            self.attn_output.raw, router, qt, sc, bq, bk, bv, qn, kn,
                            _QK_MODE[self.qk_norm])
