"""deepseek2 multi-head latent attention (MLA), as llama.cpp computes it.

Each token is compressed to a latent c = RMSNorm(W_kv_a · x)[:kv_lora] (kv_lora wide)
plus one rotary key k_pe = rope(W_kv_a · x)[kv_lora:] shared by all heads. Queries come
from W_q · x (DeepSeek-V2-Lite) or W_q_b · RMSNorm(W_q_a · x) (the q lora); each head's
query splits into q_nope and a rotary part q_pe (rope on that part only, adjacent pairs).

Two GGUF layouts:

* split (``attn_k_b`` / ``attn_v_b``, current converters; head_count_kv = 1): the
  cache holds [c, k_pe] as one key head and c as the value; each head's q_nope is
  absorbed into latent space (W_k_b,h · q_nope), attention runs over the latent, and
  W_v_b,h decompresses each head's result before attn_output — llama.cpp's MLA cache.
* legacy (``attn_kv_b``): c is decompressed to per-head k_nope and v, the cache holds
  per-head keys [k_nope, k_pe] and values, plain multi-head attention.

Scores are scaled by 1/√(nope + rope) in both (times mscale² under YaRN: efedge/rope.py,
the rope tables carry the rest). Shapes: T tokens, H heads, D width,
L kv_lora, R rope dims, N nope dims, V value dims.
"""

from __future__ import annotations

import numpy as np

from efedge import kernels, layers, rope
from efedge.errors import ModelFormatError, UnsupportedModelError
from efedge.kernels import _readonly
from efedge.kernels import decode_mla as dmla
from efedge.kernels import prefill as pk
from efedge.kernels.activations import act_scheme
from efedge.kernels.heads import heads_matmul

# one token's per-head products run as one kernel call over all heads (the decode
# kernels' arithmetic); a batch goes head by head through the tiled product, whose
# result for a token does not depend on the batch (until 2026-11-30 up to 4 tokens took
# the one call, so a prompt's last tokens came out ~1e-6 off their rows in a longer batch)
HEADS_IN_ONE_CALL = 1


class MLAAttention:
    """One layer's latent attention: weights named as the GGUF tensors."""

    def __init__(self, gf, cfg, il: int):
        from efedge.weights import _qmatrix, _vector

        b, c = f"blk.{il}.", cfg
        h, d, r, lora = c.n_head, c.n_embd, c.rope_dim, c.kv_lora_rank
        self.split = b + "attn_k_b.weight" in gf.tensors
        if self.split:
            if not (c.k_head_dim_mla and c.v_head_dim_mla):
                raise ModelFormatError(f"{gf.path}: {b}attn_k_b.weight needs the metadata "
                                       "keys attention.key_length_mla / value_length_mla")
            nope, v = c.k_head_dim_mla - r, c.v_head_dim_mla
            if c.n_head_kv != 1 or c.head_dim != lora + r or c.v_head_dim != lora:
                raise ModelFormatError(
                    f"{gf.path}: MLA cache of {c.n_head_kv} kv heads of {c.head_dim} / "
                    f"{c.v_head_dim}; expected 1 of kv_lora_rank + rope ({lora + r}) / "
                    f"kv_lora_rank ({lora})")
        else:
            nope, v = c.head_dim - r, c.v_head_dim
            if c.n_head_kv != h:
                raise UnsupportedModelError(f"{gf.path}: deepseek2 without attn_k_b needs "
                                            f"head_count_kv == head_count")
        if nope <= 0:
            raise ModelFormatError(f"{gf.path}: deepseek2 heads have no non-rotary part "
                                   f"(key size {nope + r}, rope {r})")
        self.h, self.nope, self.r, self.v, self.lora = h, nope, r, v, lora
        self._decode_args = None  # decode_mla_attn's, built at the first decode step
        self.eps = np.float32(c.norm_eps)
        # 1/√(nope + rope), times mscale² under YaRN (llm_build_deepseek2)
        self.scale = np.float32(rope.mla_kq_scale(c.rope_scaling, nope + r))
        qk = h * (nope + r)
        self.attn_q = self.attn_q_a = None
        if b + "attn_q.weight" in gf.tensors:  # V2-Lite: no q lora
            self.attn_q = self._mat(gf, _qmatrix, b + "attn_q.weight", (d, qk))
        else:
            ql = c.q_lora_rank
            if ql <= 0:
                raise ModelFormatError(f"{gf.path}: {b}attn_q_a.weight needs the metadata "
                                       "key attention.q_lora_rank")
            self.attn_q_a = self._mat(gf, _qmatrix, b + "attn_q_a.weight", (d, ql))
            self.attn_q_a_norm = self._vec(gf, _vector, b + "attn_q_a_norm.weight", (ql,))
            self.attn_q_b = self._mat(gf, _qmatrix, b + "attn_q_b.weight", (ql, qk))
        self.attn_kv_a_mqa = self._mat(gf, _qmatrix, b + "attn_kv_a_mqa.weight", (d, lora + r))
        self.attn_kv_a_norm = self._vec(gf, _vector, b + "attn_kv_a_norm.weight", (lora,))
        if self.split:
            self.k_b = self._heads(gf, b + "attn_k_b.weight", (nope, lora, h))
            self.v_b = self._heads(gf, b + "attn_v_b.weight", (lora, v, h))
        else:
            self.attn_kv_b = self._mat(gf, _qmatrix, b + "attn_kv_b.weight",
                                       (lora, h * (nope + v)))
        self.attn_output = self._mat(gf, _qmatrix, b + "attn_output.weight", (h * v, d))
        if v % 32:  # prefill_attend's value width
            raise UnsupportedModelError(f"{gf.path}: deepseek2 value heads of {v} (not a "
                                        "multiple of 32) are not supported")

    @staticmethod
    def _check(gf, name: str, shape: tuple[int, ...]) -> None:
        got = gf.tensor(name).shape
        if got != shape:
            raise ModelFormatError(f"tensor {name!r}: shape {got} does not match the "
                                   f"metadata (expected {shape})")

    def _mat(self, gf, make, name, shape):
        self._check(gf, name, shape)
        return make(gf, name)

    def _vec(self, gf, make, name, shape):
        self._check(gf, name, shape)
        return make(gf, name)

    def _heads(self, gf, name: str, shape: tuple[int, ...]):
        """A per-head stack [H, rows, row_bytes] of raw rows and its quant type."""
        self._check(gf, name, shape)
        ref = gf.tensor(name)
        kernels.check_qtype(ref.qtype, f"tensor {name!r}")
        raw = gf.raw(name)
        raw = raw.view(np.ndarray)
        raw.flags.writeable = False
        return raw, ref.qtype

    @staticmethod
    def _per_head(mats, x: np.ndarray) -> np.ndarray:
        """x [T, H, K] → [T, H, rows]: head h through its own matrix (ggml's batched
        mul_mat over heads). One token: every head in one call; more: one tiled product
        per head."""
        raw, qt = mats
        if x.shape[0] <= HEADS_IN_ONE_CALL:
            return heads_matmul(raw, qt, x)
        out = np.empty((x.shape[0], x.shape[1], raw.shape[1]), np.float32)
        for hh in range(x.shape[1]):
            out[:, hh] = kernels.qmatmul(raw[hh], qt, np.ascontiguousarray(x[:, hh]))
        return out

    def _fused_args(self, blk, eps: float) -> tuple:
        """decode_mla_attn's per-layer arguments, built once."""
        none = _readonly(np.zeros((0, 1), np.uint8))
        lq = self.attn_q_a is not None
        qa, qb = (self.attn_q_a, self.attn_q_b) if lq else (None, self.attn_q)
        if self.split:
            (kb, kbt), (vb, vbt) = self.k_b, self.v_b
            kbs, vbs = act_scheme(kbt, self.nope), act_scheme(vbt, self.lora)
        else:  # attn_kv_b's rows grouped by head: [H, nope + v, row_bytes]; no v_b
            m = self.attn_kv_b
            kb = _readonly(m.raw.reshape(self.h, self.nope + self.v, m.raw.shape[1]))
            kbt, kbs = m.qtype, m.scheme
            vb, vbt, vbs = _readonly(np.zeros((0, 1, 1), np.uint8)), 0, 0
        qt = np.array([qa.qtype if lq else 0, qb.qtype, self.attn_kv_a_mqa.qtype, kbt, vbt,
                       self.attn_output.qtype], np.int64)
        sc = np.array([qa.scheme if lq else 0, qb.scheme, self.attn_kv_a_mqa.scheme, kbs,
                       vbs, self.attn_output.scheme], np.int64)
        qa_norm = self.attn_q_a_norm if lq else np.zeros(0, np.float32)
        return (blk.attn_norm, blk.ffn_norm, np.float32(eps), qa.raw if lq else none,
                qa_norm, qb.raw, self.attn_kv_a_mqa.raw, self.attn_kv_a_norm, kb, vb,
                self.attn_output.raw, qt, sc, self.nope, self.lora, self.v)

    def decode(self, tf, blk, il: int, x: np.ndarray, pos: int, kv, x_out: np.ndarray,
               h_out: np.ndarray, ids: np.ndarray, w: np.ndarray, nt: int) -> None:
        """One token at ``pos``: the attention half of the layer as one parallel region
        (kernels.decode_mla, either layout), x_out = x + attention, h_out = the FFN input
        and, in a MoE layer, ids / w = its experts and weights, so that the model's fused
        one-token FFN kernels take over (model.Transformer._decode)."""
        args = self._decode_args
        if args is None:
            args = self._decode_args = self._fused_args(blk, tf.cfg.norm_eps)
        cos, sin = tf._rope_rows(pos, 1, il)
        dmla.decode_mla_attn(x, *args, cos[0], sin[0], self.scale, kv.k.view(np.uint16)[il],
                             kv.v.view(np.uint16)[il], pos, x_out, h_out, nt)
        if blk.moe:
            r_ids, r_w, _ = tf._route(blk, h_out[None])
            ids[:], w[:] = r_ids[0], r_w[0]

    def __call__(self, tf, il: int, hn: np.ndarray, pos: int, kv) -> np.ndarray:
        """The attention output [T, D] of normalised hidden states hn [T, D] at positions
        pos..pos+T; writes this layer's cache rows."""
        t, h, nope, r = hn.shape[0], self.h, self.nope, self.r
        acts: dict = {}
        if self.attn_q is not None:
            q = self.attn_q(hn, acts)
        else:
            q = self.attn_q_b(tf._norm(self.attn_q_a(hn, acts), self.attn_q_a_norm))
        q = q.reshape(t, h, nope + r)
        ckv = self.attn_kv_a_mqa(hn, acts)  # [T, L + R]
        cos, sin = tf._rope_rows(pos, t, il)
        q_pe = layers.apply_rope(q[:, :, nope:], cos, sin, "normal")
        k_pe = layers.apply_rope(ckv[:, None, self.lora:], cos, sin, "normal")[:, 0]
        latent = tf._norm(np.ascontiguousarray(ckv[:, :self.lora]), self.attn_kv_a_norm)
        end = pos + t
        if self.split:
            q_lat = self._per_head(self.k_b, q[:, :, :nope])  # [T, H, L]
            qh = np.concatenate([q_lat, q_pe], axis=-1)
            kv.k[il, pos:end, 0] = np.concatenate([latent, k_pe], axis=-1)
            kv.v[il, pos:end, 0] = latent
            n_kv, v_dim = 1, self.lora
        else:
            kvb = self.attn_kv_b(latent).reshape(t, h, nope + self.v)
            qh = np.concatenate([q[:, :, :nope], q_pe], axis=-1)
            kv.k[il, pos:end] = np.concatenate(
                [kvb[:, :, :nope], np.broadcast_to(k_pe[:, None], (t, h, r))], axis=-1)
            kv.v[il, pos:end] = kvb[:, :, nope:]
            n_kv, v_dim = h, self.v
        # ggml rounds q to f16 for its F16 K·Q product
        qh = np.ascontiguousarray(qh.astype(np.float16).astype(np.float32))
        att = np.empty((t, h * v_dim), np.float32)
        pk.prefill_attend(qh, kv.k.view(np.uint16)[il], kv.v.view(np.uint16)[il], pos, n_kv,
                          v_dim, self.scale, att)
        if self.split:
            att = self._per_head(self.v_b, att.reshape(t, h, self.lora)).reshape(t, -1)
        return self.attn_output(att)
