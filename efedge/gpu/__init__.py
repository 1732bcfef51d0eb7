"""efedge on a GPU: `load_cuda_model(...)` plans device memory, uploads the non-expert
weights, builds the VRAM expert cache and returns a CudaModel with the surface
efedge.api.Model uses (forward, new_kv_cache, counters, close).

    from efedge.gpu import load_cuda_model
    m = load_cuda_model("model.gguf", cache="30%", policy="expertflow",
                        vram="8GB", link="pcie4x8")          # an emulated 8 GB laptop
    kv = m.new_kv_cache(512)
    logits = m.forward(ids, 0, kv, all_logits=False)

torch is imported only when a model is loaded: `import efedge.gpu` works without it.
Modules: kernels (torch dequant / matmul), model (forward), oss (gpt-oss's attention),
cache (VRAM slots, copy streams, events), hybrid (misses computed on the CPU), emulate
(VRAM budget, link).
"""

from __future__ import annotations

import gc
import logging
import math
from pathlib import Path

from efedge.errors import (
    ArgumentError,
    CacheBudgetError,
    EfedgeError,
    UnsupportedModelError,
)

log = logging.getLogger("efedge.gpu")
__all__ = ["load_cuda_model", "CudaModel", "cuda_available"]

FREE_MARGIN = 256 << 20  # left free on a real (not emulated) GPU for the allocator's slack
SCRATCH_BYTES = 256 << 20  # decoded experts of one batch (at least one expert)


def cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def _mac_hint() -> str:
    import sys

    return ("; macOS has no CUDA: on Apple silicon the CPU path's expert cache lives in the "
            "unified memory" if sys.platform == "darwin" else "")


def _import_torch(device):
    """torch, or the UnsupportedModelError a user without it should see (the CLI turns it
    into one line; a bare ImportError was a traceback) — e.g. on a Mac, where mlx users
    have no torch and no CUDA."""
    try:
        import torch
    except ImportError:
        raise UnsupportedModelError(
            f"device={device!r} needs torch with CUDA (pip install -e '.[gpu]' with your "
            f"CUDA build of torch); use device='cpu'{_mac_hint()}") from None
    return torch


def _bytes(spec, what: str) -> int:
    from efedge.experts.cache import parse_budget

    if isinstance(spec, str) and spec.strip().endswith("%"):
        raise CacheBudgetError(f"{what}={spec!r}: give bytes or a size like 8GB, not a share")
    return parse_budget(spec, 0)


def _custom_attention_matrices(host) -> list:
    """The matrices of the attentions that live in a host block's custom_attn rather than
    under the standard names: deepseek2's latent attention (per-head stacks flattened) and
    gpt-oss's sink attention."""
    from efedge.gpu.mla import host_matrices
    from efedge.gpu.oss import GpuSinkAttention
    from efedge.mla import MLAAttention
    from efedge.oss import SinkAttention

    out = []
    for il, b in enumerate(host.blocks):
        if isinstance(b.custom_attn, MLAAttention):
            out += host_matrices(b.custom_attn, il)
        elif isinstance(b.custom_attn, SinkAttention):
            out += [getattr(b.custom_attn, n) for n in GpuSinkAttention.MATRICES]
    return out


def _mla_scratch(cfg, ubatch: int, n_ctx: int) -> int:
    """Bytes the latent attention holds beyond the standard attention's activations: its
    wider per-token heads, and the float32 copy of one layer's cache the attention makes
    (one latent head of L + R and L per position in the split layout)."""
    from efedge.gpu.mla import act_floats

    return 4 * (ubatch * act_floats(cfg)
                + n_ctx * cfg.n_head_kv * (cfg.head_dim + cfg.v_head_dim))


class CudaModel:
    """A GGUF model on a torch device. Use `load_cuda_model`; call `close()` to free the
    device memory and stop the transfer workers."""

    def __init__(self, gf, config, *, cache, policy, link, vram, reserve, n_ctx, device,
                 workers, hybrid, dense, counters, ubatch, scratch_bytes, policy_kwargs,
                 own_file, host_cache=None, disk_link=None):
        torch = _import_torch(device)

        from efedge.experts.cache import parse_budget
        from efedge.experts.stats import Counters
        from efedge.gpu import kernels as tk
        from efedge.gpu.emulate import LAPTOP_RESERVE, VramBudget
        from efedge.gpu.model import ATTN_BYTES, CHUNK_BYTES, GpuKVCache, GpuMatrix, GpuTransformer
        from efedge.model import Transformer

        self._gf, self._own_file = gf, own_file
        self.config = cfg = config
        self.counters = counters if counters is not None else Counters()
        self.device = dev = torch.device(device)
        self.source, self.hybrid, self.link, self._tf = None, None, None, None
        self.host_tier = None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise UnsupportedModelError(
                f"device={device!r} needs an NVIDIA GPU and a CUDA build of torch; torch "
                f"{torch.__version__} sees no GPU (use device='cpu'{_mac_hint()})")
        if dev.type not in ("cuda", "cpu"):
            raise UnsupportedModelError(f"device {device!r}: efedge.gpu runs 'cuda' (and "
                                        "torch's 'cpu' device for tests)")
        if dev.type == "cuda" and dev.index is not None:
            n_gpu = torch.cuda.device_count()
            if dev.index >= n_gpu:  # else torch's first allocation: "invalid device ordinal"
                raise UnsupportedModelError(
                    f"device={device!r}: this machine has {n_gpu} GPU{'s' * (n_gpu != 1)} "
                    f"(cuda:0 to cuda:{n_gpu - 1})")
        from efedge.gpu.hybrid import MODES

        if hybrid not in MODES:  # checked here: a resident or dense model never builds one
            raise ArgumentError(f"hybrid mode must be one of {', '.join(MODES)}, got "
                                f"{hybrid!r}")
        for name, ref in gf.tensors.items():
            if name != "token_embd.weight" or "output.weight" not in gf.tensors:
                tk.block_size(ref.qtype)  # UnsupportedModelError names the type
        host = Transformer(gf, cfg, n_ctx=n_ctx)
        self.host = host

        # -- the budget --------------------------------------------------------------------
        emulated = vram is not None
        if dev.type == "cuda":
            free, _ = torch.cuda.mem_get_info(dev)
            total = (_bytes(vram, "vram") if emulated else free - FREE_MARGIN)
            if total > free:
                raise CacheBudgetError(f"vram={vram!r} is more than the {free / 2**30:.2f} GiB "
                                       f"free on {torch.cuda.get_device_name(dev)}")
            torch.cuda.reset_peak_memory_stats(dev)
            self._alloc0 = torch.cuda.memory_allocated(dev)
        else:
            total = _bytes(vram, "vram") if emulated else math.inf
        res = int(reserve) if reserve is not None else (LAPTOP_RESERVE if emulated else 0)
        self.budget = budget = VramBudget(total, res, emulated)

        # -- non-expert weights: dense float32 when small (see efedge/gpu/model.py) ---------
        mats = [host.output] + [getattr(b, n) for b in host.blocks for n in
                                ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate_inp",
                                 "ffn_gate_shexp", "ffn_up_shexp", "ffn_down_shexp",
                                 "ffn_gate", "ffn_up", "ffn_down")
                                if hasattr(b, n) and (b.moe or n != "ffn_gate_inp")]
        mats += _custom_attention_matrices(host)  # deepseek2's, gpt-oss's
        extra = {m.name: GpuMatrix.dense_extra(m.raw, m.qtype) for m in mats}
        if dense == "auto":
            allowance = 0.25 * (total - res)
            dense_names, used = set(), 0
            for m in sorted(mats, key=lambda m: extra[m.name]):
                if used + extra[m.name] <= allowance:
                    dense_names.add(m.name)
                    used += extra[m.name]
        elif dense in (True, False):
            dense_names = {m.name for m in mats} if dense else set()
        else:
            raise ValueError(f"dense must be 'auto', True or False, got {dense!r}")
        w_bytes = sum(extra[m.name] if m.name in dense_names and extra[m.name]
                      else m.raw.nbytes for m in mats)
        w_bytes += sum(x.nbytes for b in host.blocks if b.exp_bias is not None
                       for x in b.exp_bias)  # gpt-oss's expert biases, on the device
        budget.take("weights", w_bytes)
        self.n_ctx = int(n_ctx) if n_ctx is not None else min(cfg.n_ctx_train, 4096)
        budget.take("kv_cache", GpuKVCache.bytes_for(cfg.n_layer, self.n_ctx, cfg.n_head_kv,
                                                     cfg.head_dim, cfg.v_head_dim))
        max_batch, expert_scratch = 1, 0
        store = host.store
        if cfg.is_moe:
            per = max(4 * 3 * cfg.n_ff_exp * cfg.n_embd + store.expert_bytes(il)
                      for il in range(cfg.n_layer))
            max_batch = max(1, min(cfg.n_expert, int(scratch_bytes) // per))
            expert_scratch = max_batch * per
        act = 4 * ubatch * (8 * cfg.n_embd + 4 * max(cfg.n_ff, cfg.n_ff_exp, cfg.n_ff_shexp)
                            + cfg.n_expert_used * cfg.n_embd)
        if cfg.spec.attention == "mla":
            act += _mla_scratch(cfg, ubatch, self.n_ctx)
        budget.take("scratch", expert_scratch + CHUNK_BYTES + ATTN_BYTES + act)

        # -- the expert cache, then the weights on the device --------------------------------
        # without cache= the VRAM cache takes what the budget leaves: every expert when
        # they fit (then the host level has nothing to do, and says so), else a cache
        # that streams, which the host level serves as with an explicit cache=
        if host_cache is not None and not cfg.is_moe:
            raise EfedgeError("host_cache= is a second expert-cache level behind the VRAM "
                              "cache: it needs a model with experts")
        if disk_link is not None and host_cache is None:
            raise EfedgeError("disk_link= emulates reads from the disk into the host cache: "
                              "it needs host_cache=...")
        try:  # from here on threads and device memory exist: release them on any failure
            resident = False
            if cfg.is_moe:
                all_bytes = store.total_bytes()
                if cache is None:
                    want = min(all_bytes, int(min(budget.remaining, 2**62)))
                else:
                    want = parse_budget(cache, all_bytes)
                    if want > budget.remaining:
                        raise CacheBudgetError(
                            f"cache={cache!r} ({want / 2**20:.0f} MiB) does not fit: "
                            f"{max(budget.remaining, 0) / 2**20:.0f} MiB of device memory are "
                            f"left after weights, KV cache and scratch")
                resident = self._build_cache(store, min(want, all_bytes), policy, link,
                                             workers, hybrid, policy_kwargs or {},
                                             host_cache, disk_link)
            elif cache is not None or link is not None:
                log.info("dense model: cache= and link= have no effect")
            self._tf = GpuTransformer(host, dev, dense_names, self.source, self.hybrid,
                                      max_batch=max_batch, ubatch=ubatch, resident=resident)
        except BaseException:
            self.close()
            raise
        self.max_batch, self.resident = max_batch, resident

    def _build_cache(self, store, want, policy, link, workers, hybrid, policy_kwargs,
                     host_cache=None, disk_link=None) -> bool:
        from efedge.experts.cache import parse_budget
        from efedge.experts.link import parse_link
        from efedge.experts.scheduler import make_policy
        from efedge.experts.selection import RouterSelection
        from efedge.gpu.cache import (
            DeviceBackend,
            GpuExpertCache,
            GpuStreamingExperts,
            GpuTransferEngine,
        )
        from efedge.gpu.emulate import LinkEmulator
        from efedge.gpu.host_tier import HostTier
        from efedge.gpu.hybrid import HybridMisses

        cfg = self.config
        backend = DeviceBackend(self.device)
        link_obj = parse_link(link)
        # both checked before any memory is taken, and named
        try:
            disk_obj = parse_link(disk_link)
        except EfedgeError as exc:
            raise EfedgeError(f"disk_link={disk_link!r}: {exc}") from None
        host_bytes = None
        if host_cache is not None:
            try:
                host_bytes = min(parse_budget(host_cache, store.total_bytes()),
                                 store.total_bytes())
            except CacheBudgetError as exc:
                raise CacheBudgetError(f"host_cache={host_cache!r}: {exc}") from None
        ecache = GpuExpertCache(store, want, cfg.n_expert_used, backend)
        self.budget.take("expert_cache", ecache.nbytes)
        self.link = link_obj
        resident = ecache.n_slots >= store.n_layer * store.n_expert
        if host_bytes is not None and not resident:
            # host memory, outside the VRAM budget; pinned on CUDA
            try:
                self.host_tier = HostTier(store, host_bytes, cfg.n_expert_used, backend,
                                          disk_obj)
            except CacheBudgetError as exc:
                raise CacheBudgetError(f"host_cache={host_cache!r}: {exc}") from None
        elif host_cache is not None:
            log.info("host_cache= has no effect: every expert is resident in VRAM")
        pol = make_policy("ondemand" if resident else policy, **policy_kwargs)
        if not resident and hybrid != "off":
            self.hybrid = HybridMisses(store, hybrid,
                                       exp_bias=[b.exp_bias for b in self.host.blocks])
            if hybrid == "auto":
                self.hybrid.calibrate(store.moe_layers[0])  # not a dense lead layer
        emulator = LinkEmulator(link_obj) if link_obj is not None else None
        engine = GpuTransferEngine(self._gf.path, store, ecache, self.counters, backend,
                                   emulator, workers, host_tier=self.host_tier)
        try:
            self.source = GpuStreamingExperts(store, ecache, engine, pol, self.counters,
                                              routers=[b.ffn_gate_inp for b in self.host.blocks],
                                              n_active=cfg.n_expert_used, hybrid=self.hybrid,
                                              # pre-gating ranks as the routers select
                                              selection=RouterSelection.of_model(self.host))
        except BaseException:
            engine.close()
            raise
        if resident:
            self.source.preload_all()
            self.counters.bytes_loaded = 0  # loading is not streaming
        return resident

    # -- what efedge.api.Model calls ---------------------------------------------------------
    def _check_open(self) -> None:
        if self._tf is None:  # (as efedge.api.Model says it, not an AttributeError)
            raise EfedgeError("this model has been closed")

    def forward(self, tokens, pos: int, kv, experts=None, all_logits: bool = True):
        self._check_open()
        return self._tf.forward(tokens, pos, kv, all_logits=all_logits)

    def new_kv_cache(self, n_ctx: int):
        self._check_open()
        if n_ctx > self.n_ctx:
            raise CacheBudgetError(f"a KV cache of {n_ctx} tokens is larger than the "
                                   f"{self.n_ctx} planned at load (pass n_ctx=)")
        return self._tf.new_kv_cache(n_ctx)

    def generate_greedy(self, prompt: list[int], max_tokens: int,
                        n_ctx: int | None = None) -> list[int]:
        """Greedy continuation of `prompt` through efedge.generate (prefill, then decode
        token by token), with Counters filled as efedge.api.Model fills them."""
        from efedge.generate import Session, generate_tokens
        from efedge.sampling import Sampler, SamplingParams

        ctx = n_ctx or min(self.n_ctx, len(prompt) + max_tokens)
        session = Session(self.forward, self.new_kv_cache(ctx), self.counters)
        sampler = Sampler(SamplingParams(temperature=0.0))
        return list(generate_tokens(session, list(prompt), sampler, max_tokens=max_tokens,
                                    eog=frozenset()))

    @property
    def store(self):
        return self.host.store

    def reset_stats(self) -> None:
        """Zero the device figures that count (Model.reset_stats zeroes Counters and calls
        this), so that after a reset hybrid_cpu_experts cannot exceed misses, nor the
        staging counts run on from load: copy-worker time, hybrid decisions, staging,
        the compute thread's waits for CPU experts. (policy_overhead_s is a running total,
        as on the CPU path: read it as a difference.)"""
        if self._tf is not None:
            self._tf.hybrid_wait_s = 0.0
        if self.source is not None:
            eng = self.source.engine
            eng.copy_s = eng.stage_issued = eng.stage_cancelled = 0
        if self.hybrid is not None:
            self.hybrid.reset_counts()

    def extra_stats(self) -> dict:
        """Device figures beyond Counters: memory, batches, hybrid misses, link."""
        import torch

        out = {"device": str(self.device), "max_batch": self.max_batch,
               "resident": self.resident, "vram": self.budget.report(),
               "weight_bytes_on_device": self._tf.weight_bytes() if self._tf else 0,
               "link": str(self.link) if self.link else None,
               "hybrid_wait_s": self._tf.hybrid_wait_s if self._tf else 0.0}
        if self.device.type == "cuda":
            out["device_name"] = torch.cuda.get_device_name(self.device)
            out["vram_peak_allocated_bytes"] = (torch.cuda.max_memory_allocated(self.device)
                                                - self._alloc0)
        if self.source is not None:
            out["copy_worker_s"] = self.source.engine.copy_s
            out["policy_overhead_s"] = self.source.policy.overhead_s
            out["policy"] = self.source.policy.name
        if self.hybrid is not None:
            out.update(self.hybrid.stats())
        if self.host_tier is not None:
            out.update(self.host_tier.stats())
            eng = self.source.engine if self.source is not None else None
            if eng is not None:
                out["host_stage_issued"] = eng.stage_issued
                out["host_stage_cancelled"] = eng.stage_cancelled
        return out

    def close(self) -> None:
        """Stop the workers, free the device memory, unmap the file if we mapped it."""
        if self.source is not None:
            self.source.close()
            self.source.cache.dev_pools = []
            self.source = None
        if self.host_tier is not None:
            self.host_tier.pools = self.host_tier._np_pools = []  # free the pinned memory

        if self._tf is not None:
            self._tf.close()
            self._tf = None
        if self._own_file and self._gf is not None:
            # GGUFFile.close unmaps only when no view of the mapping is left: drop every
            # holder of views (the host weights, the expert store behind the hybrid
            # misses and the host tier, the policy ↔ source cycle) first, or the file
            # stays open and mapped until this object is collected (as efedge.api does)
            self.host = self.hybrid = self.host_tier = None
            gc.collect()
            self._gf.close()
        self._gf = None

    def __enter__(self) -> CudaModel:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def load_cuda_model(path=None, *, cache=None, policy: str = "expertflow", link=None,
                    vram=None, reserve: int | None = None, n_ctx: int | None = None,
                    device: str = "cuda", workers: int = 2, hybrid: str = "auto",
                    dense="auto", counters=None, ubatch: int = 512,
                    scratch_bytes: int = SCRATCH_BYTES, policy_kwargs: dict | None = None,
                    config=None, host_cache=None, disk_link=None) -> CudaModel:
    """Load a GGUF model onto a GPU.

    path: a file, an open efedge.gguf_file.GGUFFile (not closed by the model), or None for
    the demo model. cache: expert cache bytes / "512MiB" / "25%" of expert bytes; None =
    every expert if they fit, else all the memory left. vram: a budget like "8GB" (laptop
    emulation; `reserve` bytes of it, default 512 MiB, stand for driver and display) or
    None = the GPU's free memory. link: an emulated host→device link ("pcie4x8",
    "12.5GB/s", a Link). hybrid: "auto" (misses computed on the CPU when that is faster,
    measured), "off", or "always" (every miss on the CPU; for tests). dense: non-expert
    weights as float32 ("auto": when small), or kept quantized. device: "cuda", "cuda:1",
    or "cpu" (torch's CPU device: the same code, for tests). host_cache: a second
    expert-cache level in pinned host memory between the file and VRAM (bytes / "4GB" /
    "50%" of expert bytes; needs cache=), filled on VRAM misses and by expertflow's
    predictions further ahead (efedge/gpu/host_tier.py). disk_link: an emulated disk for
    file → host reads ("nvme", "2GB/s"; needs host_cache=)."""
    from efedge.config import config_from_gguf
    from efedge.gguf_file import GGUFFile

    own = not isinstance(path, GGUFFile)
    if own:
        if path is None:
            from efedge.demo import demo_model_path

            path = demo_model_path()
        gf = GGUFFile(Path(path))
    else:
        gf = path
    try:
        cfg = config if config is not None else config_from_gguf(gf)
        s = cfg.spec
        if s.attention not in ("standard", "sinks", "mla"):  # efedge/gpu/oss.py, mla.py
            from efedge.errors import UnsupportedModelError

            raise UnsupportedModelError(f"device='cuda' does not run architecture {cfg.arch!r} "
                                        f"yet (its {s.attention!r} attention); use "
                                        "device='cpu'")
        if s.irope or s.weight_before_ffn or not s.gpu:
            from efedge.errors import UnsupportedModelError

            raise UnsupportedModelError(  # llama4, smallthinker, phimoe: CPU-only layers
                f"device='cuda' does not run architecture {cfg.arch!r} yet (its chunked, "
                "NoPE or sliding-window attention layers, routing weights on the experts' "
                "input, a router before attention, ReLU experts or norm and output biases "
                "are CPU-only); use device='cpu'")
        return CudaModel(gf, cfg, cache=cache, policy=policy, link=link, vram=vram,
                         reserve=reserve, n_ctx=n_ctx, device=device, workers=workers,
                         hybrid=hybrid, dense=dense, counters=counters, ubatch=ubatch,
                         scratch_bytes=scratch_bytes, policy_kwargs=policy_kwargs,
                         own_file=own, host_cache=host_cache, disk_link=disk_link)
    except BaseException:
        if own:
            gf.close()
        raise
