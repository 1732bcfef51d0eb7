"""mimo2 (Xiaomi MiMo-V2-Flash) attention, as llama.cpp's llama_model_mimo2 graph computes
it: each layer its own head counts (``head_count`` / ``head_count_kv`` arrays: the window
layers have more kv heads than the full ones in the real model), q / k / v without biases
(split, or row ranges of one ``attn_qkv``), key heads of ``key_length`` and value heads of
``value_length``, neox rope on the first ``rope.dimension_count`` dims with the window
layers' own base, scores scaled by 1/√key_length, a learned sink logit per head where the
layer has ``attn_sinks.weight`` (the window layers), the window of
``attention.sliding_window`` positions on the layers the ``sliding_window_pattern`` array
marks; the output projection's result times ``attention.value_scale``.

The KV cache is sized by the largest kv-head count: a layer with fewer heads uses the
first n_ctx · Hkv · d values of its slab, viewed as [n_ctx, Hkv, d] (contiguous, so the
shared prefill kernels take it as they take any layer's). Decode runs this T-token path
with T = 1. Shapes: T tokens, H heads, Hkv kv heads, d key size, dv value size.
"""

from __future__ import annotations

import numpy as np

from efedge.errors import ModelFormatError, UnsupportedModelError
from efedge.kernels import prefill as pk
from efedge.kernels.prefill_oss import prefill_attend_sinks


def _check(gf, name: str, shape: tuple[int, ...]) -> None:
    ref = gf.tensor(name)
    if ref.shape != shape:
        raise ModelFormatError(f"tensor {name!r}: shape {ref.shape} does not match the "
                               f"metadata (expected {shape})")


def layer_cache(cache: np.ndarray, il: int, n_kv: int) -> np.ndarray:
    """Layer il's part of a KV array [n_layer, n_ctx, Hmax, d] as uint16 [n_ctx, n_kv, d]
    (the first n_kv heads' worth of the slab, contiguous)."""
    slab = cache.view(np.uint16)[il]
    n_ctx, _, d = slab.shape
    return slab.reshape(-1)[:n_ctx * n_kv * d].reshape(n_ctx, n_kv, d)


class MiMo2Attention:
    """One mimo2 attention layer: weights named as the GGUF tensors."""

    def __init__(self, gf, cfg, il: int):
        from efedge.weights import QMatrix, _qmatrix, _vector

        b, c = f"blk.{il}.", cfg
        self.n_head, self.n_head_kv = c.heads_of(il)
        d, hd, vd = c.n_embd, c.head_dim, c.v_head_dim
        widths = (self.n_head * hd, self.n_head_kv * hd, self.n_head_kv * vd)
        if b + "attn_qkv.weight" in gf.tensors:
            _check(gf, b + "attn_qkv.weight", (d, sum(widths)))
            qkv = _qmatrix(gf, b + "attn_qkv.weight")
            ends = np.cumsum((0, *widths))
            for p, r0, r1 in zip("qkv", ends[:-1], ends[1:], strict=True):
                setattr(self, "attn_" + p,
                        QMatrix(qkv.raw[r0:r1], qkv.qtype, f"{qkv.name}[{p}]"))
        else:
            for p, n in zip("qkv", widths, strict=True):
                _check(gf, b + f"attn_{p}.weight", (d, n))
                setattr(self, "attn_" + p, _qmatrix(gf, b + f"attn_{p}.weight"))
        for name in [b + f"attn_{p}.bias" for p in ("q", "k", "v", "qkv", "output")]:
            if name in gf.tensors:  # llama.cpp's mimo2 loader reads none
                raise UnsupportedModelError(f"tensor {name!r}: mimo2 attention has no "
                                            "biases (llama.cpp ignores them)")
        _check(gf, b + "attn_output.weight", (self.n_head * vd, d))
        self.attn_output = _qmatrix(gf, b + "attn_output.weight")
        # no sinks: a sink of -inf takes no weight (the kernel's softmax as without one)
        self.sinks = np.full(self.n_head, -np.inf, np.float32)
        if b + "attn_sinks.weight" in gf.tensors:
            _check(gf, b + "attn_sinks.weight", (self.n_head,))
            self.sinks = _vector(gf, b + "attn_sinks.weight").astype(np.float32)
        self.window = c.sliding_window if c.is_swa_layer(il) else 0
        self.scale = np.float32(c.attn_scale)
        self.value_scale = np.float32(c.value_scale)

    def __call__(self, tf, il: int, hn: np.ndarray, pos: int, kv) -> np.ndarray:
        c, t = tf.cfg, hn.shape[0]
        acts: dict = {}
        q, k, v = self.attn_q(hn, acts), self.attn_k(hn, acts), self.attn_v(hn, acts)
        cos, sin = tf._rope_rows(pos, t, il)  # the window layers' own base
        qh = np.empty((t, self.n_head, c.head_dim), np.float32)
        kc = layer_cache(kv.k, il, self.n_head_kv)
        vc = layer_cache(kv.v, il, self.n_head_kv)
        # rope (neox) on the first rope_dim dims, k / v stored as f16, q rounded to f16
        pk.prefill_qk(q, k, v, np.zeros(0, np.float32), np.zeros(0, np.float32), 0,
                      np.float32(c.norm_eps), cos, sin, True, self.n_head, self.n_head_kv,
                      c.head_dim, c.v_head_dim, kc, vc, pos, qh)
        att = prefill_attend_sinks(qh, kc, vc, pos, self.sinks, self.scale, self.window)
        out = self.attn_output(att)
        if self.value_scale:  # ggml_scale after the output projection
            out *= self.value_scale
        return out
