"""The forward pass on a torch device (CUDA; torch's CPU device in tests), mirroring
efedge/model.py step by step so the two paths agree (cosine ≥ 0.999, same greedy tokens).

What lives where:

* **Non-expert weights** are uploaded as they are in the file (quantized). Each matrix is
  then either dequantized *once* to float32 — when all such float32 copies together fit
  in a quarter of the budget (small models: the demo model's attention is a few MB, and
  the ~15 elementwise kernels of an on-the-fly decode would cost more than the product)
  — or kept quantized and decoded per call in row chunks (Qwen3-30B-A3B's 1.3 GB of
  quantized attention would be ~5 GB as float32: no room on an 8 GB laptop). F32
  matrices (routers) are used in place either way. The token embedding stays in the
  mapped file on the host (a row lookup, as llama.cpp keeps it); a tied output head is
  uploaded once.
* **KV cache** on the device, float16 as on the CPU path (GpuKVCache).
* **Routing**: router logits are computed on the device and routed on the host with the
  CPU path's own code (the host must know the experts anyway to schedule copies), so
  both paths route from the same code.
* **Experts** come from VRAM slots (efedge.gpu.cache), the ready ones first, in batches:
  the slots of a batch are gathered, decoded together and applied with batched matrix
  products; misses may run on the CPU (efedge.gpu.hybrid). Each (token, k) result lands
  in its own slot and the K slots are summed by one reduction over that fixed layout,
  so the result does not depend on the order experts arrive in (or on the cache size).

Activations are rounded as llama.cpp rounds them before every quantized product, as the
CPU path does; TF32 is switched off during a forward so float32 products stay float32.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from efedge.gpu import kernels as tk
from efedge.kv_cache import KVCache

CHUNK_BYTES = 64 << 20  # float32 decoded per step by an on-the-fly matrix product
ATTN_BYTES = 64 << 20  # float32 attention scores per query chunk


# -- weights -------------------------------------------------------------------------------

class GpuMatrix:
    """A [rows, cols] weight on the device: quantized bytes decoded per call, or float32."""

    def __init__(self, raw: np.ndarray, qtype: int, name: str, device, dense: bool):
        self.qtype, self.name = int(qtype), name
        self.rows, self.cols = raw.shape[0], tk.row_len(qtype, raw.shape[1])
        q = torch.from_numpy(np.array(raw, dtype=np.uint8)).to(device)
        self.raw: torch.Tensor | None = q
        self.dense: torch.Tensor | None = None
        if self.qtype == 0:  # F32: the bytes are the matrix
            self.dense = q.view(torch.float32).reshape(self.rows, self.cols)
        elif dense:
            self.dense = torch.empty((self.rows, self.cols), dtype=torch.float32, device=device)
            step = max(1, CHUNK_BYTES // (4 * self.cols))
            for lo in range(0, self.rows, step):
                self.dense[lo:lo + step] = tk.dequantize(q[lo:lo + step], self.qtype)
            self.raw = None

    @staticmethod
    def dense_extra(raw: np.ndarray, qtype: int) -> int:
        """Bytes a dense copy adds beyond the quantized bytes (0 for F32)."""
        return 0 if int(qtype) == 0 else raw.shape[0] * tk.row_len(qtype, raw.shape[1]) * 4

    @property
    def nbytes(self) -> int:
        t = self.dense if self.dense is not None else self.raw
        return t.numel() * t.element_size()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, cols] → [T, rows], x rounded for this weight type first."""
        x = tk.round_activations(x, self.qtype)
        if self.dense is not None:
            return x @ self.dense.T
        return tk.matmul(x, self.raw, self.qtype, CHUNK_BYTES)


def _vec(a: np.ndarray | None, device) -> torch.Tensor | None:
    return None if a is None else torch.from_numpy(np.array(a, dtype=np.float32)).to(device)


class GpuBlock:
    """One layer's non-expert weights; names follow the GGUF tensor names (model.Block)."""

    MATRICES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate_inp", "ffn_gate_shexp",
                "ffn_up_shexp", "ffn_down_shexp", "ffn_gate", "ffn_up", "ffn_down")

    def __init__(self, host_block, device, dense_names: set[str]):
        hb = self.host = host_block  # routing (on the host) reads its biases
        self.moe = hb.moe  # False in dense models and in a MoE model's dense layers
        self.qk_norm = getattr(hb, "qk_norm", "none")  # per layer where optional (glm4moe)
        self.attn_norm, self.ffn_norm = _vec(hb.attn_norm, device), _vec(hb.ffn_norm, device)
        bias = getattr(hb, "bias", None)  # (a custom attention's block has none)
        self.bias = None if bias is None else tuple(_vec(b, device) for b in bias)
        self.q_norm = _vec(getattr(hb, "q_norm", None), device)
        self.k_norm = _vec(getattr(hb, "k_norm", None), device)
        # gpt-oss's sink attention (efedge/gpu/oss.py); deepseek2's latent attention is
        # GpuTransformer.mla's (efedge/gpu/mla.py)
        self.attn = None
        from efedge.oss import SinkAttention

        if isinstance(hb.custom_attn, SinkAttention):
            from efedge.gpu.oss import GpuSinkAttention

            self.attn = GpuSinkAttention(hb.custom_attn, device, dense_names)
        # gpt-oss: the experts' gate / up / down biases [E, F], [E, F], [E, D] (small:
        # resident beside the router, never cache traffic, as on the CPU path)
        self.exp_bias = None if hb.exp_bias is None else tuple(_vec(b, device)
                                                               for b in hb.exp_bias)
        self.ffn_gate_inp_shexp = _vec(getattr(hb, "ffn_gate_inp_shexp", None), device)
        for name in self.MATRICES:
            # a dense layer's stand-in router of zeros (model.Block) is never asked to route
            qm = getattr(hb, name, None) if hb.moe or name != "ffn_gate_inp" else None
            setattr(self, name, None if qm is None else
                    GpuMatrix(qm.raw, qm.qtype, qm.name, device, qm.name in dense_names))

    def matrices(self) -> list[GpuMatrix]:
        own = [m for n in self.MATRICES if (m := getattr(self, n)) is not None]
        return own + (self.attn.matrices() if self.attn is not None else [])


class GpuKVCache(KVCache):
    """KVCache (same checks, store / view / truncate) with float16 tensors on the device."""

    def __init__(self, n_layer: int, n_ctx: int, n_head_kv: int, head_dim: int,
                 v_head_dim: int, device):
        from efedge.errors import ContextLengthError

        if n_ctx <= 0:
            raise ContextLengthError(f"context size must be positive, got {n_ctx}")
        self.n_ctx, self.n_past = n_ctx, 0
        self.k = torch.zeros((n_layer, n_ctx, n_head_kv, head_dim), dtype=torch.float16,
                             device=device)
        self.v = torch.zeros((n_layer, n_ctx, n_head_kv, v_head_dim), dtype=torch.float16,
                             device=device)

    @staticmethod
    def bytes_for(n_layer: int, n_ctx: int, n_head_kv: int, head_dim: int,
                  v_head_dim: int) -> int:
        return 2 * n_layer * n_ctx * n_head_kv * (head_dim + v_head_dim)


# -- layer arithmetic (efedge/layers.py, op for op) -----------------------------------------

def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    ms = torch.mean(x * x, dim=-1, keepdim=True)
    return (x * (1.0 / torch.sqrt(ms + eps))) * w


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, style: str):
    half = cos.shape[1]
    out = x.clone()
    c, s = cos[:, None, :], sin[:, None, :]
    if style == "neox":
        a, b = x[..., :half], x[..., half:2 * half]
        out[..., :half] = a * c - b * s
        out[..., half:2 * half] = a * s + b * c
    else:
        a, b = x[..., 0:2 * half:2], x[..., 1:2 * half:2]
        out[..., 0:2 * half:2] = a * c - b * s
        out[..., 1:2 * half:2] = a * s + b * c
    return out


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: int,
              scale: float) -> torch.Tensor:
    """Causal GQA attention with the CPU path's float16 roundings. q [T, H, d] at positions
    pos..pos+T, k / v [S, Hkv, d] float16; scores × scale (1/√d, or granite's
    attention.scale). Queries go in chunks so the float32 scores stay within ATTN_BYTES.
    Returns [T, H·dv]."""
    t, h, d = q.shape
    s, hkv, dv = v.shape
    g = h // hkv
    scale = float(np.float32(scale))
    kt = k.to(torch.float32).permute(1, 2, 0)[:, None]  # [Hkv, 1, d, S]
    vv = v.to(torch.float32).permute(1, 0, 2)[:, None]  # [Hkv, 1, S, dv]
    q = q.to(torch.float16).to(torch.float32)
    step = max(1, ATTN_BYTES // (4 * h * s))
    out = torch.empty((t, h * dv), dtype=torch.float32, device=q.device)
    keys = torch.arange(s, device=q.device)
    for lo in range(0, t, step):
        qc = q[lo:lo + step]
        tc = qc.shape[0]
        qg = qc.reshape(tc, hkv, g, d).permute(1, 2, 0, 3)  # [Hkv, g, tc, d]
        scores = torch.matmul(qg, kt) * scale
        qpos = pos + lo + torch.arange(tc, device=q.device)
        scores.masked_fill_(keys[None, :] > qpos[:, None], float("-inf"))
        scores = scores - scores.amax(dim=-1, keepdim=True)
        p = torch.exp(scores)
        p = p / p.sum(dim=-1, keepdim=True)
        p = p.to(torch.float16).to(torch.float32)
        o = torch.matmul(p, vv)  # [Hkv, g, tc, dv]
        out[lo:lo + tc] = o.permute(2, 0, 1, 3).reshape(tc, h * dv)
    return out


def silu(x: torch.Tensor) -> torch.Tensor:
    return x / (1.0 + torch.exp(-x))


def swiglu_oai(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """gpt-oss's clamped SwiGLU (alpha 1.702, limit 7) as kernels.nn.swiglu_oai:
    x = min(g, 7), y = clamp(u, -7, 7), x / (1 + exp(1.702 · -x)) · (y + 1)."""
    x = torch.clamp(g, max=7.0)
    y = torch.clamp(u, min=-7.0, max=7.0)
    return (x / (1.0 + torch.exp(-x * 1.702))) * (y + 1.0)


def swiglu(x: torch.Tensor, gate: GpuMatrix, up: GpuMatrix, down: GpuMatrix) -> torch.Tensor:
    return down(silu(gate(x)) * up(x))


# -- the model -----------------------------------------------------------------------------

class GpuTransformer:
    """Weights on the device + forward. Built by efedge.gpu.load_cuda_model, which plans
    the memory; `source` is the expert source (GpuStreamingExperts) or None (dense)."""

    def __init__(self, host, device, dense_names: set[str], source=None, hybrid=None,
                 max_batch: int = 8, ubatch: int = 512, resident: bool = False):
        self.host, self.cfg = host, host.cfg
        # whether a one-token pass hands layer 0's input to the policy (on_layer_input): its
        # embedding is computed on the host, so this costs no device copy; the other layers'
        # inputs live on the device and are never handed over (expertflow:refine's)
        pol = getattr(source, "policy", None)
        self.first_input = bool(pol is not None and pol.layer_inputs == "first"
                                and host.blocks[0].moe
                                and host.cfg.spec.router_input != "layer")
        if self.first_input:
            pol.layer_input_wired = True
        self.device = torch.device(device)
        self.source, self.hybrid = source, hybrid
        self.max_batch, self.ubatch = max(1, int(max_batch)), max(1, int(ubatch))
        self.resident = resident  # every expert in VRAM: no policy calls
        self.output_norm = _vec(host.output_norm, self.device)
        out = host.output
        self.output = GpuMatrix(out.raw, out.qtype, out.name, self.device,
                                out.name in dense_names)
        self.blocks = [GpuBlock(b, self.device, dense_names) for b in host.blocks]
        # deepseek2's latent attention (efedge/gpu/mla.py) where the host block has one
        from efedge.gpu.mla import GpuMLA
        from efedge.mla import MLAAttention

        self.mla = [GpuMLA(b.custom_attn, il, self.device, dense_names)
                    if isinstance(b.custom_attn, MLAAttention) else None
                    for il, b in enumerate(host.blocks)]
        self._pool = (ThreadPoolExecutor(1, thread_name_prefix="efedge-hybrid")
                      if hybrid is not None and hybrid.mode != "off" else None)
        self.hybrid_wait_s = 0.0
        from efedge.gpu.cache import DeviceBackend

        self.up = DeviceBackend(self.device).upload  # host array → device, no host wait

    def weight_bytes(self) -> int:
        mats = [m for b in self.blocks for m in b.matrices()]
        mats += [m for a in self.mla if a is not None for m in a.matrices()]
        return self.output.nbytes + sum(m.nbytes for m in mats)

    def new_kv_cache(self, n_ctx: int) -> GpuKVCache:
        c = self.cfg
        return GpuKVCache(c.n_layer, n_ctx, c.n_head_kv, c.head_dim, c.v_head_dim, self.device)

    # -- pieces ------------------------------------------------------------------------------
    def _attention(self, blk: GpuBlock, il: int, h, pos: int, kv, rope) -> torch.Tensor:
        if blk.attn is not None:  # gpt-oss's sinks: its own biases, rope and window
            return blk.attn(self, il, h, pos, kv, rope)
        if self.mla[il] is not None:
            return self.mla[il](h, il, pos, kv, rope)
        c = self.cfg
        t = h.shape[0]
        q, k, v = blk.attn_q(h), blk.attn_k(h), blk.attn_v(h)
        if blk.bias is not None:
            q, k, v = q + blk.bias[0], k + blk.bias[1], v + blk.bias[2]
        if blk.qk_norm == "full":
            q, k = rms_norm(q, blk.q_norm, c.norm_eps), rms_norm(k, blk.k_norm, c.norm_eps)
        q = q.reshape(t, c.n_head, c.head_dim)
        k = k.reshape(t, c.n_head_kv, c.head_dim)
        v = v.reshape(t, c.n_head_kv, c.v_head_dim)
        if blk.qk_norm == "head":
            q, k = rms_norm(q, blk.q_norm, c.norm_eps), rms_norm(k, blk.k_norm, c.norm_eps)
        q = apply_rope(q, *rope, c.spec.rope_style)
        k = apply_rope(k, *rope, c.spec.rope_style)
        if blk.qk_norm == "head_post":  # hunyuan-moe: after rope
            q, k = rms_norm(q, blk.q_norm, c.norm_eps), rms_norm(k, blk.k_norm, c.norm_eps)
        kv.store(il, pos, k.to(torch.float16), v.to(torch.float16))
        keys, values = kv.view(il, pos + t)
        return blk.attn_output(attention(q, keys, values, pos, c.attn_scale))

    def _moe(self, blk: GpuBlock, il: int, h: torch.Tensor) -> torch.Tensor:
        # T tokens, K active, D width
        c, src = self.cfg, self.source
        t, kk_n = h.shape[0], c.n_expert_used
        # the CPU path's routing rule on the device's logits (selection bias, groups,
        # sigmoid gating, weight norm / scale: whatever the architecture has)
        ids, w, _ = self.host.route_logits(blk.host, blk.ffn_gate_inp(h).cpu().numpy())
        h_np = None
        if not self.resident:
            if src.policy.prefetches:
                h_np = h.cpu().numpy()
            src.on_route(il, h_np, ids)
        uniq, counts = np.unique(ids, return_counts=True)
        qg, qu, _ = src.store.qtypes(il)
        hp = torch.cat([h, torch.zeros_like(h[:1])])  # + the dummy row
        hg = tk.round_activations(hp, qg)
        hu = hg if qu == qg else tk.round_activations(hp, qu)
        # row T of w / slots is a dummy that padded batch entries point at: scattering
        # with a boolean mask instead would make the host wait for the device
        w_dev = self.up(np.concatenate([w, np.zeros((1, kk_n), dtype=np.float32)]))
        slots = torch.zeros((t + 1, kk_n, c.n_embd), dtype=torch.float32, device=self.device)
        futures = []

        def on_cpu(e: int) -> None:  # a hybrid miss: run it beside the GPU work
            nonlocal h_np
            if h_np is None:
                h_np = h.cpu().numpy()
            tok, kk = np.nonzero(ids == e)
            futures.append((tok, kk, self._pool.submit(self.hybrid.run, il, e, h_np[tok])))

        tokens = dict(zip(uniq.tolist(), counts.tolist(), strict=True))
        for batch in src.acquire_batches(il, uniq, tokens=tokens, max_batch=self.max_batch,
                                         cpu_submit=on_cpu if self._pool else None):
            self._experts(il, batch, hg, hu, ids, w_dev, slots)
        for tok, kk, fut in futures:
            t0 = time.perf_counter()
            y = fut.result()
            waited = time.perf_counter() - t0
            self.hybrid_wait_s += waited
            src.counters.stall_s += waited  # the compute thread waited for an expert
            slots[self.up(tok), self.up(kk)] = self.up(y * w[tok, kk, None])
        # one reduction over a fixed layout: the same sum whatever order experts came in
        out = slots[:t].sum(dim=1)
        if blk.ffn_gate_shexp is not None:
            shared = swiglu(h, blk.ffn_gate_shexp, blk.ffn_up_shexp, blk.ffn_down_shexp)
            if blk.ffn_gate_inp_shexp is None:  # ungated (granitemoe, deepseek2, glm4moe, …)
                out += shared
            else:
                scale = 1.0 / (1.0 + torch.exp(-(h @ blk.ffn_gate_inp_shexp)))
                out += shared * scale[:, None]
        return out

    def _experts(self, il: int, batch, hg, hu, ids: np.ndarray, w_dev, slots) -> None:
        """A batch of resident experts on their tokens: gather the slots, decode the
        batch's gate / up / down at once, batched products, scatter into (token, k).
        gpt-oss: each expert's biases and the clamped SwiGLU (efedge.kernels.moe's
        moe_ffn_oai)."""
        cache = self.source.cache
        qg, qu, qd = self.source.store.qtypes(il)
        sel = [np.nonzero(ids == e) for e, _ in batch]
        n, tmax = len(batch), max(len(tok) for tok, _ in sel)
        tok_idx = np.full((n, tmax), ids.shape[0], dtype=np.int64)  # padding → dummy row
        k_idx = np.zeros((n, tmax), dtype=np.int64)
        for i, (tok, kk) in enumerate(sel):
            tok_idx[i, :len(tok)], k_idx[i, :len(tok)] = tok, kk
        g_raw, u_raw, d_raw = cache.parts(il, cache.gather([s for _, s in batch]))
        wg, wu, wd = tk.dequantize(g_raw, qg), tk.dequantize(u_raw, qu), tk.dequantize(d_raw, qd)
        ti, ki = self.up(tok_idx), self.up(k_idx)
        xg = hg[ti]  # [n, tmax, D]; hg has the dummy row too
        xu = xg if hu is hg else hu[ti]
        g, u = torch.bmm(xg, wg.transpose(1, 2)), torch.bmm(xu, wu.transpose(1, 2))
        bias = self.blocks[il].exp_bias
        if bias is None:
            a = silu(g) * u
        else:
            e_idx = self.up(np.array([e for e, _ in batch], dtype=np.int64))
            a = swiglu_oai(g + bias[0][e_idx][:, None], u + bias[1][e_idx][:, None])
        f = a.shape[-1]
        a = tk.round_activations(a.reshape(n * tmax, f), qd).reshape(n, tmax, f)
        y = torch.bmm(a, wd.transpose(1, 2))
        if bias is not None:
            y = y + bias[2][e_idx][:, None]
        slots[ti, ki] = y * w_dev[ti, ki][..., None]

    # -- forward -----------------------------------------------------------------------------
    def forward(self, tokens, pos: int, kv: GpuKVCache, experts=None,
                all_logits: bool = True) -> np.ndarray:
        """Run T tokens at positions pos..pos+T (in micro-batches of `ubatch`); logits
        float32 numpy [T, n_vocab], or [1, n_vocab] for the last token. `experts` is
        accepted for efedge.model.Transformer's signature; this model uses its own."""
        c = self.cfg
        tokens = c.token_ids(tokens)
        t = tokens.shape[0]
        kv.check_room(pos, t)
        # float32 products must stay float32 (TF32 keeps 10 mantissa bits): switch it off
        # for this call if the process turned it on
        tf32 = self.device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32
        if tf32:
            torch.backends.cuda.matmul.allow_tf32 = False
        try:
            outs = []
            for lo in range(0, t, self.ubatch):
                hi = min(t, lo + self.ubatch)
                if all_logits or hi == t:
                    outs.append(self._forward_ubatch(tokens[lo:hi], pos + lo, kv, all_logits))
                else:
                    self._forward_ubatch(tokens[lo:hi], pos + lo, kv, None)
            return np.concatenate(outs, axis=0)
        finally:
            if tf32:
                torch.backends.cuda.matmul.allow_tf32 = True

    def _forward_ubatch(self, tokens: np.ndarray, pos: int, kv, all_logits) -> np.ndarray | None:
        c = self.cfg
        t = tokens.shape[0]
        e = self.host.embed(tokens)  # granite's embedding_scale included
        x = self.up(e)
        if c.is_moe and not self.resident:
            self.source.on_pass(tokens, pos)
            if t == 1 and self.first_input:  # layer 0's input, on the host already: the
                b0 = self.host.blocks[0]  # policy's pass start pre-gates layer 0 from it
                self.source.on_layer_input(0, self.host._norm(e, b0.ffn_norm, b0.ffn_norm_b))
        rs = c.residual_scale  # granite; 1 elsewhere
        ropes: dict = {}
        for il, blk in enumerate(self.blocks):
            # the CPU path's tables (rope scaling, llama-3 frequency divisors and a layer's
            # own base folded in), uploaded once per distinct table
            swa = c.rope_swa is not None and c.is_swa_layer(il)  # gpt-oss's other base
            rope = ropes.get(swa)
            if rope is None:
                cos, sin = self.host._rope_rows(pos, t, il)
                rope = ropes[swa] = (self.up(np.ascontiguousarray(cos)),
                                     self.up(np.ascontiguousarray(sin)))
            h = rms_norm(x, blk.attn_norm, c.norm_eps)
            a = self._attention(blk, il, h, pos, kv, rope)
            x = x + (a * rs if rs != 1 else a)
            h = rms_norm(x, blk.ffn_norm, c.norm_eps)
            if blk.moe:
                f = self._moe(blk, il, h)
            else:  # a dense model, or a MoE model's dense layer (leading, interleaved)
                f = swiglu(h, blk.ffn_gate, blk.ffn_up, blk.ffn_down)
            x = x + (f * rs if rs != 1 else f)
        kv.n_past = pos + t
        if all_logits is None:
            return None
        if not all_logits:
            x = x[-1:]
        x = rms_norm(x, self.output_norm, c.norm_eps)
        out = self.output(x)
        if c.logit_scale != 1.0:  # granite divides the logits
            out = out * float(np.float32(1.0 / c.logit_scale))
        return out.cpu().numpy()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        self.blocks, self.mla, self.output = [], [], None
