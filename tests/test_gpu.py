"""efedge.gpu: torch kernels, the device forward pass, the VRAM cache's streams and events,
hybrid misses, laptop emulation.

Everything except the tests marked `cuda` runs on torch's CPU device (the same code; copies
are synchronous there, and tests substitute backends whose events complete late or that
record the order of copies and waits). `@pytest.mark.cuda` tests need an NVIDIA GPU and
skip cleanly without one; scripts/gpu_check.sh runs them on a lent GPU.
"""

from __future__ import annotations

import contextlib
import gc
import os
import threading
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")
gguf = pytest.importorskip("gguf")

import efedge  # noqa: E402
from efedge.config import config_from_gguf  # noqa: E402
from efedge.errors import CacheBudgetError, TransferError, UnsupportedModelError  # noqa: E402
from efedge.experts.link import Link  # noqa: E402
from efedge.experts.scheduler import make_policy  # noqa: E402
from efedge.experts.stats import Counters  # noqa: E402
from efedge.experts.store import ExpertStore  # noqa: E402
from efedge.gguf_file import GGUFFile  # noqa: E402
from efedge.gpu import kernels as tk  # noqa: E402
from efedge.gpu import load_cuda_model  # noqa: E402
from efedge.gpu.cache import (  # noqa: E402
    DeviceBackend,
    GpuExpertCache,
    GpuStreamingExperts,
    GpuTransferEngine,
)
from efedge.gpu.emulate import DelayedEvent, LinkEmulator, laptop_setup  # noqa: E402
from efedge.gpu.hybrid import HybridMisses  # noqa: E402
from efedge.kernels.activations import round_activations  # noqa: E402

Q = gguf.GGMLQuantizationType
HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA,
                                reason="needs an NVIDIA GPU with a CUDA build of torch")
ALL_QTYPES = sorted(Q(t).name for t in tk.SUPPORTED_QTYPES)
# byte offsets of the float16 scales in each block: set to sane values in random blocks
F16_FIELDS = {"Q8_0": [0], "Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2],
              "Q2_K": [80, 82], "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208],
              "IQ4_NL": [0], "IQ4_XS": [0], "IQ2_XXS": [0], "IQ2_XS": [0], "IQ2_S": [0],
              "IQ3_XXS": [0], "IQ3_S": [0], "IQ1_S": [0], "IQ1_M": [], "TQ1_0": [52],
              "TQ2_0": [64], "MXFP4": []}


def random_rows(name: str, rows: int = 6, row_len: int = 512, seed: int = 0) -> np.ndarray:
    """Random GGUF rows of type `name`: every bit pattern of the payload, finite scales."""
    rng = np.random.default_rng(seed)
    qt = Q[name]
    el, nb = gguf.GGML_QUANT_SIZES[qt]
    nblk = row_len // el
    if name == "F32":
        return rng.standard_normal((rows, nblk)).astype(np.float32).view(np.uint8)
    if name == "F16":
        return rng.standard_normal((rows, nblk)).astype(np.float16).view(np.uint8)
    if name == "BF16":
        bits = rng.standard_normal((rows, nblk)).astype(np.float32).view(np.uint32) >> 16
        return bits.astype(np.uint16).view(np.uint8)
    raw = rng.integers(0, 256, size=(rows, nblk * nb), dtype=np.uint8)
    blocks = raw.reshape(-1, nb)
    for off in F16_FIELDS[name]:
        d = (rng.standard_normal((blocks.shape[0], 1)) * 0.05).astype(np.float16)
        blocks[:, off:off + 2] = d.view(np.uint8)
    if name == "IQ1_M":  # the fp16 scale is the top nibbles of the four u16 at byte 48
        d = (rng.standard_normal(blocks.shape[0]) * 0.05).astype(np.float16).view(np.uint16)
        sc = blocks[:, 48:56].copy().view(np.uint16)
        for k in range(4):
            sc[:, k] = (sc[:, k] & 0x0FFF) | (((d >> (4 * k)) & 0xF) << 12)
        blocks[:, 48:56] = sc.view(np.uint8)
    if name == "MXFP4":  # E8M0 exponents 0 and 1 (the subnormal branch) up to 2^12 · 6
        blocks[:, 0] = rng.integers(0, 140, blocks.shape[0], dtype=np.uint8)
        blocks[:3, 0] = (0, 1, 2)
    return raw


def _bits_equal(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def _ids(n: int = 20, seed: int = 7, vocab: int = 500) -> list[int]:
    return np.random.default_rng(seed).integers(0, vocab, n).tolist()


# -- kernels -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ALL_QTYPES)
def test_dequantize_bit_exact_vs_gguf(name):
    raw = random_rows(name)
    ref = gguf.quants.dequantize(raw, Q[name])
    assert _bits_equal(tk.dequantize(torch.from_numpy(raw), int(Q[name])).numpy(), ref)
    # a non-contiguous, oddly offset slice (as a slot part is) decodes the same
    wide = np.zeros((raw.shape[0], raw.shape[1] + 3), dtype=np.uint8)
    wide[:, 3:] = raw
    part = torch.from_numpy(wide)[:, 3:]
    assert _bits_equal(tk.dequantize(part, int(Q[name])).numpy(), ref)


@pytest.mark.parametrize("name", ["F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K",
                                  "IQ4_NL", "IQ4_XS", "IQ2_XXS", "IQ1_M", "TQ1_0", "MXFP4"])
def test_round_activations_bit_exact(name):
    x = (np.random.default_rng(3).standard_normal((5, 512)) * 3).astype(np.float32)
    x[1, :7] = 0.0
    x[2] = 0.0  # an all-zero row: scale 0
    got = tk.round_activations(torch.from_numpy(x), int(Q[name])).numpy()
    assert _bits_equal(got, round_activations(x, Q[name]))


def test_matmul_chunked_matches_whole_and_numba():
    from efedge import kernels

    raw = random_rows("Q4_K", rows=40)
    x = np.random.default_rng(1).standard_normal((3, 512)).astype(np.float32)
    rt = torch.from_numpy(raw)
    whole = tk.matmul(torch.from_numpy(x), rt, int(Q.Q4_K))
    chunked = tk.matmul(torch.from_numpy(x), rt, int(Q.Q4_K), chunk_bytes=7 * 512 * 4)
    torch.testing.assert_close(whole, chunked, rtol=1e-6, atol=1e-4)  # BLAS blocking differs
    ref = kernels.matmul(raw, int(Q.Q4_K), x)
    np.testing.assert_allclose(whole.numpy(), ref, rtol=1e-4, atol=1e-4)


def test_unsupported_qtype_is_a_clear_error():
    with pytest.raises(UnsupportedModelError, match="no decoder for NVFP4"):
        tk.dequantize(torch.zeros((1, 36), dtype=torch.uint8), int(Q.NVFP4))


def test_quantized_file_tensors_bit_exact(tiny_gguf):
    path = tiny_gguf("qwen3moe", "Q4_K_M")  # skipped without llama.cpp's quantizer
    gf = GGUFFile(path)
    try:
        seen = set()
        for name, ref in gf.tensors.items():
            if ref.qtype in seen or ref.qtype == int(Q.F32):
                continue
            seen.add(ref.qtype)
            raw = np.array(gf.raw(name))
            want = gguf.quants.dequantize(raw, Q(ref.qtype))
            got = tk.dequantize(torch.from_numpy(raw), ref.qtype).numpy()
            assert _bits_equal(got, want), name
        assert {int(Q.Q4_K), int(Q.Q6_K)} <= seen
    finally:
        gf.close()


# -- the forward pass on torch's CPU device vs the CPU path ----------------------------------

CONFIGS = [dict(),  # every expert resident
           dict(cache="35%", policy="ondemand", hybrid="off"),
           dict(cache="35%", policy="expertflow", hybrid="always", dense=False, ubatch=7)]


@pytest.mark.parametrize("arch", ["qwen3moe", "qwen2moe", "olmoe", "llama"])
def test_forward_matches_cpu_path(tiny_gguf, arch):
    path = tiny_gguf(arch, "F32")
    ids = _ids()
    with efedge.load(path) as m:
        ref = m.logits(ids)
    for kw in CONFIGS[:1] if arch == "llama" else CONFIGS:
        with load_cuda_model(path, device="cpu", n_ctx=64, **kw) as g:
            out = g.forward(ids, 0, g.new_kv_cache(64))
            assert _cos(out, ref).min() >= 0.99999, kw
            assert (out.argmax(-1) == ref.argmax(-1)).all(), kw
            last = g.forward(ids, 0, g.new_kv_cache(64), all_logits=False)
            assert last.shape == (1, out.shape[1]) and _cos(last[0], out[-1]) >= 0.99999
            s = g.counters
            if g.config.is_moe:
                assert s.hits + s.late + s.misses == s.expert_requests > 0
            if kw.get("hybrid") == "always":
                assert g.extra_stats()["hybrid_cpu_experts"] > 0


# every standard-attention MoE layout beyond the qwen / olmoe / mixtral family: granite's
# four multipliers (and llama-3 rope divisors), ungated shared experts, glm4moe's sigmoid
# routing with a selection bias, partial rope, optional qk norm and dense lead layer,
# ernie4_5-moe's softmax + selection bias and interleaved dense layers, bailingmoe's
# scaled weights, dots1's sigmoid routing with shared experts by count and hunyuan-moe's
# q / k norm after rope, qwen3vlmoe's interleaved M-RoPE (at base 10, where its unturned
# pairs show): routed on the host by the CPU path's own rule. The qwen3vlmoe file is seed
# 2: seed 0's holds a near tie in these prompts (a logit gap of 5e-4 between the 4th and
# 5th expert of the last token's last layer), which the last bits of the micro-batched
# computation (7 tokens at a time, against the CPU path's one batch) decide either way
# (it flipped on an AMD EPYC VM, not on earlier sessions' machines) — a property of that
# random model, not of the path
@pytest.mark.parametrize("arch,kw", [
    ("granitemoe", dict(rope_scaling="llama3")), ("granitemoeshared", {}),
    # (the plain glm4moe and ernie4_5-moe files run slow: their -qknorm / -interleave
    # variants hold everything they hold and more)
    pytest.param("glm4moe", {}, marks=pytest.mark.slow), ("glm4moe-qknorm", {}),
    pytest.param("ernie4_5-moe", {}, marks=pytest.mark.slow),
    ("ernie4_5-moe-interleave", {}), ("bailingmoe", {}), ("dots1", {}),
    ("hunyuan-moe", {}), ("qwen3vlmoe", dict(rope_base=10.0, seed=2))])
def test_more_architectures_match_cpu_path(tiny_gguf, arch, kw):
    path = tiny_gguf(arch, "F32", **kw)
    ids = _ids()
    with efedge.load(path) as m:
        ref = m.logits(ids)
    for conf in (CONFIGS[0], CONFIGS[-1]):
        with load_cuda_model(path, device="cpu", n_ctx=64, **conf) as g:
            out = g.forward(ids, 0, g.new_kv_cache(64))
            assert _cos(out, ref).min() >= 0.99999, conf
            assert (out.argmax(-1) == ref.argmax(-1)).all(), conf
            if conf:
                assert g.extra_stats()["hybrid_cpu_experts"] > 0
                # pre-gating ranks as the routers select (the selection bias included)
                sel = g.source.selection
                for il, b in enumerate(g.host.blocks):
                    if b.moe and b.exp_probs_b is not None:
                        assert np.array_equal(sel.select_bias[il], b.exp_probs_b)


def test_greedy_tokens_match_cpu_path(tiny_gguf):
    path = tiny_gguf("qwen3moe", "F32")
    prompt = _ids(6, seed=11)
    with efedge.load(path) as m:
        from efedge.generate import GenerationResult

        res = GenerationResult([], "length")
        "".join(m.stream(prompt, max_tokens=10, temperature=0, result=res))
    with load_cuda_model(path, device="cpu", cache="35%", policy="expertflow",
                         hybrid="off") as g:
        assert g.generate_greedy(prompt, len(res.tokens)) == res.tokens
        c = g.counters
        assert c.tokens_prompt == len(prompt) and c.tokens_generated >= len(res.tokens) - 1
        # each decoded token's pass start was planned on layer 0's input (the host's
        # embedding, normalised), as on the CPU path
        pol = g.source.policy
        assert pol.layer_input_wired and pol.first_inputs >= len(res.tokens) - 2


@pytest.mark.parametrize("arch", ["qwen3moe", "glm4moe"])
def test_quantized_forward_close_to_cpu_path(tiny_gguf, arch):
    path = tiny_gguf(arch, "Q4_K_M")
    ids = _ids()
    with efedge.load(path) as m:
        ref = m.logits(ids)
    with load_cuda_model(path, device="cpu", cache="50%", policy="ondemand", dense=False,
                         hybrid="off") as g:
        out = g.forward(ids, 0, g.new_kv_cache(32))
    cos = _cos(out, ref)
    # 8-bit activation rounding turns last-bit differences of the sums into the odd flipped
    # routing choice on a random-weight model; most positions agree to 1e-4
    assert np.median(cos) >= 0.9999 and cos.min() >= 0.99


@pytest.mark.parametrize("quant", ["IQ2_XXS", "IQ1_M/IQ3_S", "TQ1_0"])
def test_low_bit_forward_close_to_cpu_path(tiny_gguf, quant):
    """Random-block IQ / TQ files (no llama.cpp needed) through the torch decoders, with
    experts streamed through half-size VRAM slots: the CPU path's logits."""
    path = tiny_gguf("qwen3moe", quant)
    ids = _ids()
    with efedge.load(path) as m:
        ref = m.logits(ids)
    with load_cuda_model(path, device="cpu", cache="50%", policy="ondemand", dense=False,
                         hybrid="off") as g:
        out = g.forward(ids, 0, g.new_kv_cache(32))
        assert g.counters.misses > 0
    cos = _cos(out, ref)
    # 8-bit activations as above; the sums' order, and so which activations round the
    # other way, depends on the CPU's vector width (median 0.99984 for IQ1_M/IQ3_S where
    # torch and numba use AVX-512, ≥ 0.9999 with AVX2): a wrong decoder is far below
    assert np.median(cos) >= 0.9995 and cos.min() >= 0.99


# -- gpt-oss: sink attention, sliding window, biased experts, MXFP4 ------------------------

def _greedy_cpu(path, prompt: list[int], n: int) -> list[int]:
    from efedge.generate import GenerationResult

    with efedge.load(path) as m:
        res = GenerationResult([], "length")
        "".join(m.stream(prompt, max_tokens=n, temperature=0, result=res))
    return res.tokens


def _oss_prompt(n: int = 20) -> list[int]:
    from gguf_tools.tiny_archs import OSS_WINDOW

    assert n > OSS_WINDOW  # the sliding-window layers must drop keys
    return _ids(n)


OSS_CONFIGS = [dict(),  # every expert resident
               dict(cache="35%", policy="expertflow", hybrid="off"),
               # micro-batches of 7 start past the window: keys before it are skipped
               dict(cache="40%", policy="expertflow", hybrid="always", dense=False, ubatch=7)]


@pytest.mark.parametrize("kw", [{}, dict(rope_scaling="yarn", rope_base_swa=5000.0, n_layer=2)],
                         ids=["plain", "yarn-swa-base"])
def test_gpt_oss_forward_matches_cpu_path(tiny_gguf, kw):
    """gpt-oss on the torch path: q / k / v / output biases, sinks, the sliding window
    (its own rope base and YaRN on those layers in the second file), the router bias and
    the experts' biases and clamped SwiGLU, on the GPU and in hybrid CPU misses."""
    path = tiny_gguf("gpt-oss", "F32", **kw)
    ids = _oss_prompt()
    with efedge.load(path) as m:
        ref = m.logits(ids)
    for cfg in OSS_CONFIGS if not kw else OSS_CONFIGS[:1]:
        with load_cuda_model(path, device="cpu", n_ctx=64, **cfg) as g:
            out = g.forward(ids, 0, g.new_kv_cache(64))
            assert _cos(out, ref).min() >= 0.99999, cfg
            assert (out.argmax(-1) == ref.argmax(-1)).all(), cfg
            s = g.counters
            assert s.hits + s.late + s.misses == s.expert_requests > 0
            if cfg.get("cache"):
                assert s.misses > 0
            if cfg.get("hybrid") == "always":
                assert g.extra_stats()["hybrid_cpu_experts"] > 0


def test_gpt_oss_greedy_tokens_match_cpu_path(tiny_gguf):
    path = tiny_gguf("gpt-oss", "F32")
    prompt = _ids(6, seed=11)
    want = _greedy_cpu(path, prompt, 10)  # 16 positions: past the window of 8
    for hybrid in ("off", "always"):  # decode misses on the GPU, then on the CPU
        with load_cuda_model(path, device="cpu", cache="40%", policy="expertflow",
                             hybrid=hybrid, n_ctx=32) as g:
            assert g.generate_greedy(prompt, len(want)) == want, hybrid


def test_gpt_oss_mxfp4_close_to_cpu_path(tiny_gguf):
    """gpt-oss as its checkpoints ship (MXFP4_MOE: MXFP4 experts, Q8_0 attention), the
    experts streamed through half-size slots and decoded by the torch MXFP4 decoder."""
    path = tiny_gguf("gpt-oss", "MXFP4_MOE")  # skipped without llama.cpp's quantizer
    ids = _oss_prompt()
    with efedge.load(path) as m:
        ref = m.logits(ids)
    with load_cuda_model(path, device="cpu", cache="50%", policy="ondemand", dense=False,
                         hybrid="off", n_ctx=32) as g:
        assert int(Q.MXFP4) in g.store.qtypes(0)
        out = g.forward(ids, 0, g.new_kv_cache(32))
        assert g.counters.misses > 0
    cos = _cos(out, ref)
    # as test_quantized_forward_close_to_cpu_path: 8-bit activation rounding turns
    # last-bit differences into the odd flipped rounding; most positions agree to 1e-4
    assert np.median(cos) >= 0.9999 and cos.min() >= 0.999
    # the top token too, but for a near-tie the rounding can decide (one of the 20
    # positions where torch and numba use AVX-512)
    assert (out.argmax(-1) == ref.argmax(-1)).mean() >= 0.9


# -- memory planning -----------------------------------------------------------------------

def test_vram_budget_refuses_what_does_not_fit(tiny_gguf):
    path = tiny_gguf("qwen3moe", "F16")
    with pytest.raises(CacheBudgetError, match="weights.*must all be on the device"):
        load_cuda_model(path, device="cpu", vram=1 << 20)
    # each part's error says what shrinks it (the scratch: neither cache= nor n_ctx)
    from efedge.gpu.emulate import VramBudget

    for part, remedy in (("scratch", "does not depend on cache= or n_ctx"),
                         ("kv_cache", "lower n_ctx"), ("expert_cache", "lower cache=")):
        with pytest.raises(CacheBudgetError, match=f"{part} needs .*{remedy}"):
            VramBudget(total=1 << 20).take(part, 2 << 20)
    with pytest.raises(CacheBudgetError, match="does not fit"):
        load_cuda_model(path, device="cpu", vram="256MiB", reserve=0, cache="1GiB")
    with pytest.raises(CacheBudgetError, match="not a share"):
        load_cuda_model(path, device="cpu", vram="50%")
    with load_cuda_model(path, device="cpu", vram="256MiB", reserve=0, n_ctx=32) as g:
        rep = g.extra_stats()["vram"]
        assert rep["emulated"] and g.budget.used <= rep["budget_bytes"] == 256 << 20
        assert rep["expert_cache_bytes"] > 0 and rep["weights_bytes"] > 0
        with pytest.raises(CacheBudgetError, match="planned"):
            g.new_kv_cache(64)


def test_attention_the_gpu_path_lacks_is_refused_by_name(tiny_gguf):
    """An attention kind the torch path has no code for (every architecture efedge runs
    has one today: standard, deepseek2's latent attention, gpt-oss's sinks) is refused by
    name, on any device, instead of computing another model."""
    import dataclasses

    path = tiny_gguf("qwen3moe", "F32")
    gf = GGUFFile(path)
    try:
        cfg = config_from_gguf(gf)
        cfg = dataclasses.replace(cfg, spec=dataclasses.replace(cfg.spec, attention="other"))
        with pytest.raises(UnsupportedModelError,
                           match="does not run architecture 'qwen3moe' yet .*'other'"):
            load_cuda_model(gf, device="cpu", config=cfg)
    finally:
        gf.close()


def test_devices_are_checked(tiny_gguf):
    path = tiny_gguf("qwen3moe", "F16")
    with pytest.raises(UnsupportedModelError, match="mps"):
        load_cuda_model(path, device="mps")
    if not HAS_CUDA:
        with pytest.raises(UnsupportedModelError, match="no GPU"):
            load_cuda_model(path, device="cuda")
    before = threading.active_count()
    with pytest.raises(efedge.EfedgeError, match="unknown cache policy"):
        load_cuda_model(path, device="cpu", cache="30%", policy="nonsense")
    assert threading.active_count() == before  # no transfer worker left behind
    # a resident or dense model builds no hybrid scheduler: the mode is checked anyway
    for kw in ({}, dict(cache="30%"), dict(cache="100%")):
        with pytest.raises(efedge.errors.ArgumentError, match="hybrid mode .* got 'of'"):
            load_cuda_model(path, device="cpu", hybrid="of", **kw)
    with pytest.raises(efedge.errors.ArgumentError, match="hybrid mode"):
        load_cuda_model(tiny_gguf("qwen3", "F32"), device="cpu", hybrid=None)
    assert threading.active_count() == before


def test_preload_retries_a_failed_expert_and_names_a_lasting_failure(tiny_gguf, monkeypatch):
    """Every expert resident: a read that fails on the worker through all its retries is
    tried once more on the loading thread, as a demand load would be (before, the load
    failed with no expert named — or, when it was the last load to end, returned with
    that expert missing from the "resident" cache); a lasting failure names the expert."""
    from efedge.experts import file_read, transfer

    path = tiny_gguf("qwen3moe", "F16")
    ids = _ids(8)
    with load_cuda_model(path, device="cpu", n_ctx=16) as g:
        ref = g.forward(ids, 0, g.new_kv_cache(16))
        target = int(g.store.offsets[1, 5, 0])  # expert 5 of layer 1: its gate's offset
    monkeypatch.setattr(file_read, "available", lambda: False)  # reads by _pread
    pread = transfer.TransferEngine._pread
    failures = {"left": transfer.RETRIES}

    def flaky(self, buf, offset, fd=None):
        if offset == target and failures["left"] != 0:
            failures["left"] -= 1
            raise OSError(5, "injected EIO")
        return pread(self, buf, offset, fd)

    monkeypatch.setattr(transfer.TransferEngine, "_pread", flaky)
    with load_cuda_model(path, device="cpu", n_ctx=16) as g:
        assert failures["left"] == 0 and g.resident
        assert np.array_equal(g.forward(ids, 0, g.new_kv_cache(16)), ref)
        assert g.counters.misses == 0 and (g.source.cache.slot_pins == 0).all()
    failures["left"] = -1  # for good
    threads = threading.active_count()
    with pytest.raises(TransferError, match="expert 5 of layer 1 .*injected EIO"):
        load_cuda_model(path, device="cpu", n_ctx=16)
    assert threading.active_count() == threads


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc (Linux)")
def test_close_unmaps_the_file_and_stops_every_thread(tiny_gguf):
    """close() releases what it took at once, not when the model is collected: the
    file's descriptors and mapping (the host weights and the policy ↔ source cycle held
    views of it), the transfer workers and the hybrid pool. Twice is harmless; a closed
    model says so."""
    path = str(tiny_gguf("qwen3moe", "F32"))

    def held() -> int:
        fds = sum(os.path.realpath(f"/proc/self/fd/{f}") == os.path.realpath(path)
                  for f in os.listdir("/proc/self/fd") if os.path.exists(f"/proc/self/fd/{f}"))
        with open("/proc/self/maps") as f:
            return fds + sum(os.path.basename(path) in line for line in f)

    # the same session file may still be mapped by a model an earlier test dropped
    # without close(): collect those first, and count what this model takes beyond that
    gc.collect()
    base, threads = held(), threading.active_count()
    for kw in ({}, dict(cache="35%", policy="expertflow", hybrid="always")):
        g = load_cuda_model(path, device="cpu", n_ctx=16, **kw)
        kv = g.new_kv_cache(16)
        g.forward([1, 2, 3], 0, kv)
        assert held() > base
        g.close()
        g.close()
        assert held() == base, kw  # g is still referenced: nothing was left to the collector
        assert threading.active_count() == threads, kw
        with pytest.raises(efedge.EfedgeError, match="closed"):
            g.forward([1], 0, kv)
        with pytest.raises(efedge.EfedgeError, match="closed"):
            g.new_kv_cache(4)


def test_laptop_setup_scales_share_and_link():
    s = laptop_setup("rtx4060-laptop", "qwen3-30b-a3b", 100e3)
    assert 0.2 < s["share"] < 0.5
    per = s["link"].latency_s + 100e3 / s["link"].bytes_per_s  # one of our experts
    assert per == pytest.approx(10e-6 + 2.85e6 / 12.5e9, rel=1e-6)


# -- streams, events, ordering (instrumented backends on the CPU device) ---------------------

class RecordingBackend(DeviceBackend):
    """CPU backend that names its events and logs copies and stream waits in order."""

    def __init__(self):
        super().__init__("cpu")
        self.log: list[tuple] = []
        self._n = 0
        self._lock = threading.Lock()
        self._tls = threading.local()

    def new_stream(self):
        with self._lock:
            self._n += 1
            return f"copy-stream-{self._n}"

    @contextlib.contextmanager
    def use_stream(self, stream):
        self._tls.stream = stream
        try:
            yield
        finally:
            self._tls.stream = None

    def record(self, stream=None):
        ev = super().record(stream)
        ev = type("Ev", (), {"query": ev.query, "synchronize": ev.synchronize})()
        ev.torch_event = ("event", id(ev))
        with self._lock:
            self.log.append(("record", stream, ev.torch_event))
        return ev

    def wait(self, event, stream=None):
        with self._lock:
            self.log.append(("wait", stream, event.torch_event))

    def copy(self, dst, src):
        with self._lock:
            self.log.append(("copy", dst.data_ptr(), getattr(self._tls, "stream", None)))
        super().copy(dst, src)


def _parts(path, budget, backend, link=None, policy="ondemand", hybrid=None):
    gf = GGUFFile(path)
    cfg = config_from_gguf(gf)
    store = ExpertStore(gf, cfg.n_layer, cfg.n_expert)
    cache = GpuExpertCache(store, budget, cfg.n_expert_used, backend)
    counters = Counters()
    em = LinkEmulator(link) if link is not None else None
    engine = GpuTransferEngine(path, store, cache, counters, backend, em, workers=2)
    src = GpuStreamingExperts(store, cache, engine, make_policy(policy), counters,
                              n_active=cfg.n_expert_used, hybrid=hybrid)
    return gf, store, cache, src


def _drain(src, layer, experts, **kw):
    got = []
    for batch in src.acquire_batches(layer, np.asarray(experts), **kw):
        got.append(([e for e, _ in batch], time.perf_counter()))
    return got


def test_copy_into_a_slot_waits_for_its_last_reader(tiny_gguf):
    path = tiny_gguf("qwen3moe", "F16")
    be = RecordingBackend()
    gf = GGUFFile(path)
    per = ExpertStore(gf, 3, 16).expert_bytes(0)
    gf.close()
    gf, store, cache, src = _parts(path, 4 * per, be)  # 4 slots: every layer evicts all
    try:
        _drain(src, 0, [0, 1, 2, 3])
        reader = {s: cache.last_use[s].torch_event for s in range(cache.n_slots)}
        first_round = len(be.log)
        _drain(src, 1, [4, 5, 6, 7])
        ptr_slot = {cache.slot_tensor(s).data_ptr(): s for s in range(cache.n_slots)}
        later = be.log[first_round:]
        copies = [i for i, e in enumerate(later) if e[0] == "copy"]
        assert len(copies) == 4
        for i in copies:
            slot, stream = ptr_slot[later[i][1]], later[i][2]
            assert stream is not None and stream.startswith("copy-stream")
            # that copy stream waited for the slot's last reader before the copy
            assert ("wait", stream, reader[slot]) in later[:i], slot
            # and recorded the copy's completion event after it
            assert any(e[0] == "record" and e[1] == stream for e in later[i:])
        # the compute stream (None) never waits for a copy
        assert not any(e[0] == "wait" and e[1] is None for e in be.log)
    finally:
        src.close()
        gf.close()


def test_ready_experts_first_while_copies_are_in_flight(tiny_gguf):
    path = tiny_gguf("qwen3moe", "F16")
    gf0 = GGUFFile(path)
    per = ExpertStore(gf0, 3, 16).expert_bytes(0)
    gf0.close()
    link = Link("slow", per / 0.05, 0.0)  # 50 ms per expert
    gf, store, cache, src = _parts(path, 8 * per, DeviceBackend("cpu"), link=link)
    try:
        _drain(src, 0, [0, 1])  # resident now (~100 ms)
        c = src.counters
        c.reset()
        t0 = time.perf_counter()
        got = _drain(src, 0, [0, 1, 2, 3])
        assert sorted(got[0][0]) == [0, 1] and got[0][1] - t0 < 0.03  # no wait for 2 and 3
        assert sorted(e for b, _ in got for e in b) == [0, 1, 2, 3]
        assert got[-1][1] - t0 >= 0.09  # the two copies took the link's time
        assert (c.hits, c.misses, c.late) == (2, 2, 0)
        assert c.stall_s >= 0.05 and c.bytes_loaded == 2 * per
        # the meter reads the link (its busy time from each copy's start, not from a
        # booking this engine does not make: its link delays the copy's event instead)
        assert 0.5 * link.bytes_per_s < src.engine.bandwidth_ewma <= 1.1 * link.bytes_per_s
        # a prefetch still in flight when asked for is "late", and used
        assert src.prefetch(1, [9]) == 1
        got = _drain(src, 1, [9])
        assert c.late == 1 and c.prefetch_used == 1
        assert cache.slot_state[cache.where[1, 9]] == 2  # READY
    finally:
        src.close()
        gf.close()


def test_per_expert_acquire_gives_slot_views(tiny_gguf):
    path = tiny_gguf("qwen3moe", "F16")
    gf = GGUFFile(path)
    per = ExpertStore(gf, 3, 16).expert_bytes(0)
    gf.close()
    gf, store, cache, src = _parts(path, 6 * per, DeviceBackend("cpu"))
    try:
        got = dict(src.acquire(2, np.array([3, 7])))
        assert sorted(got) == [3, 7]
        gate, up, down = got[7]
        want = store.mapped(2, 7)
        assert np.array_equal(gate.numpy(), want.gate) and np.array_equal(down.numpy(), want.down)
        assert not cache.slot_pins.any()  # nothing left pinned
    finally:
        src.close()
        gf.close()


def test_delayed_event_and_link_emulator():
    em = LinkEmulator(Link("l", 1e6, 0.001))
    t0 = time.perf_counter()
    ev = em.delay(DeviceBackend("cpu").record(), 20_000, t0)  # 1 ms + 20 ms
    assert not ev.query()
    ev.synchronize()
    assert time.perf_counter() - t0 >= 0.02 and ev.query()
    # a second transfer queues behind the first on the shared link
    ready = em.reserve(20_000, t0)
    assert ready == pytest.approx(t0 + 0.042, abs=1e-6)
    assert isinstance(ev, DelayedEvent) and em.busy_s == pytest.approx(0.042)


class _FakeEngine:
    def __init__(self, bw, lat, backlog=0):
        self.bandwidth_ewma, self.latency_ewma, self._b = bw, lat, backlog

    def demand_backlog_bytes(self):
        return self._b


def test_hybrid_decision_from_measured_speeds(tiny_gguf):
    path = tiny_gguf("qwen3moe", "F16")
    gf = GGUFFile(path)
    store = ExpertStore(gf, 3, 16)
    nb = store.expert_bytes(0)
    try:
        h = HybridMisses(store, "auto", max_tokens=2)
        assert h.plan(0, [1, 2], {}, _FakeEngine(0.0, 0.0)) == []  # nothing measured yet
        assert h.unmeasured == 2
        h.s_per_byte = 1e-10  # CPU: 1 token of one expert = nb · 1e-10 s
        cpu1 = nb * 1e-10
        slow = _FakeEngine(nb / (3 * cpu1), 3 * cpu1)  # a copy takes 3× the CPU time
        # list scheduling on both resources: the 3rd would wait as long on the CPU as on
        # the link, so it is copied; the 4th is sooner on the CPU than behind that copy
        assert h.plan(0, [1, 2, 3, 4], {}, slow) == [1, 2, 4]
        assert h.plan(0, [5], {5: 3}, slow) == []  # more tokens than max_tokens
        fast = _FakeEngine(nb / (0.5 * cpu1), 0.5 * cpu1)
        assert h.plan(0, [6, 7], {}, fast) == []
        busy = _FakeEngine(nb / (0.5 * cpu1), 0.5 * cpu1, backlog=10 * nb)
        assert h.plan(0, [8], {}, busy) == [8]  # the link is backed up: the CPU is sooner
        st = h.stats()
        assert st["hybrid_cpu_experts"] == 4 and st["hybrid_copies_kept"] == 6
        # measured: calibrate and run update the CPU speed
        h.calibrate(0, repeats=1)
        assert h.s_per_byte > 0
        y = h.run(0, 1, np.ones((1, 256), dtype=np.float32))
        assert y.shape == (1, 256) and h.cpu_tokens == 1
        with pytest.raises(ValueError, match="hybrid mode"):
            HybridMisses(store, "sometimes")
    finally:
        gf.close()


def test_hybrid_auto_counts_and_keeps_parity(tiny_gguf):
    path = tiny_gguf("qwen3moe", "F16")
    ids = _ids(6)
    with efedge.load(path) as m:
        ref = m.logits(ids)
    with load_cuda_model(path, device="cpu", cache="30%", policy="ondemand", hybrid="auto",
                         link=Link("slow", 20e6, 1e-4), n_ctx=32) as g:
        out = g.forward(ids, 0, g.new_kv_cache(32))
        toks = g.generate_greedy(ids, 6)
        st = g.extra_stats()
    assert _cos(out, ref).min() >= 0.99999
    assert len(toks) == 6
    # decode misses over a 20 MB/s link are far slower than the CPU: some went there
    assert st["hybrid_cpu_experts"] > 0 and st["hybrid_cpu_tokens"] > 0
    assert st["hybrid_cpu_experts"] + st["hybrid_copies_kept"] >= 1


# -- CUDA ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ALL_QTYPES)
@pytest.mark.cuda
@needs_cuda
def test_cuda_dequantize_bit_exact(name):
    raw = random_rows(name, rows=64, row_len=1024, seed=5)
    ref = gguf.quants.dequantize(raw, Q[name])
    got = tk.dequantize(torch.from_numpy(raw).cuda(), int(Q[name])).cpu().numpy()
    assert _bits_equal(got, ref)


@pytest.mark.parametrize("name", ["F16", "BF16", "Q8_0", "Q4_K", "Q6_K", "IQ4_NL", "MXFP4"])
@pytest.mark.cuda
@needs_cuda
def test_cuda_round_activations_bit_exact(name):
    x = (np.random.default_rng(4).standard_normal((7, 1024)) * 2).astype(np.float32)
    got = tk.round_activations(torch.from_numpy(x).cuda(), int(Q[name])).cpu().numpy()
    assert _bits_equal(got, round_activations(x, Q[name]))


# the dots1 file is seed 3: seed 0's routes token 11 of these ids at a near tie (a gap of
# 2.8e-5 between the 4th and 5th selection scores of layer 0), which the H200 run of
# 2026-11-30 decided the other way in the micro-batched config (7 tokens at a time): row
# 11 at cosine 0.946 and the rows after it drifting. Seed 3's smallest gap over the
# prompt and the greedy steps is 3.9e-3. A property of that random model, not of the path
_CUDA_FILE_KW = {"dots1": dict(seed=3)}


@pytest.mark.parametrize("arch", ["qwen3moe", "qwen2moe", "olmoe", "mixtral", "glm4moe-qknorm",
                                  "granitemoeshared", "ernie4_5-moe-interleave", "dots1",
                                  "hunyuan-moe"])
@pytest.mark.cuda
@needs_cuda
def test_cuda_forward_matches_cpu_path(tiny_gguf, arch):
    path = tiny_gguf(arch, "F16", **_CUDA_FILE_KW.get(arch, {}))
    ids = _ids(24)
    with efedge.load(path) as m:
        ref = m.logits(ids)
    prompt = ids[:5]
    with efedge.load(path) as m:
        from efedge.generate import GenerationResult

        res = GenerationResult([], "length")
        "".join(m.stream(prompt, max_tokens=8, temperature=0, result=res))
    for kw in CONFIGS + [dict(cache="35%", policy="expertflow", link="2GB/s", hybrid="auto")]:
        with load_cuda_model(path, device="cuda", n_ctx=64, **kw) as g:
            out = g.forward(ids, 0, g.new_kv_cache(64))
            assert _cos(out, ref).min() >= 0.9999, kw
            assert (out.argmax(-1) == ref.argmax(-1)).all(), kw
            assert g.generate_greedy(prompt, len(res.tokens)) == res.tokens, kw


@pytest.mark.parametrize("quant", ["F32", "MXFP4_MOE"])
@pytest.mark.cuda
@needs_cuda
def test_cuda_gpt_oss_matches_cpu_path(tiny_gguf, quant):
    """test_gpt_oss_* on a real GPU: sinks, sliding window, biased experts, MXFP4."""
    path = tiny_gguf("gpt-oss", quant)
    ids = _oss_prompt(24)
    with efedge.load(path) as m:
        ref = m.logits(ids)
    prompt = ids[:5]
    want = _greedy_cpu(path, prompt, 8) if quant == "F32" else None
    for kw in OSS_CONFIGS + [dict(cache="35%", policy="expertflow", link="2GB/s",
                                  hybrid="auto")]:
        with load_cuda_model(path, device="cuda", n_ctx=64, **kw) as g:
            out = g.forward(ids, 0, g.new_kv_cache(64))
            cos = _cos(out, ref)
            if quant == "F32":
                assert cos.min() >= 0.9999, kw
                assert (out.argmax(-1) == ref.argmax(-1)).all(), kw
                assert g.generate_greedy(prompt, len(want)) == want, kw
            else:
                assert np.median(cos) >= 0.9999 and cos.min() >= 0.999, kw


@pytest.mark.cuda
@needs_cuda
def test_cuda_tf32_setting_does_not_leak_into_the_forward(tiny_gguf):
    path = tiny_gguf("qwen3moe", "F16")
    ids = _ids(16)
    with efedge.load(path) as m:
        ref = m.logits(ids)
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        with load_cuda_model(path, device="cuda", n_ctx=32) as g:
            out = g.forward(ids, 0, g.new_kv_cache(32))
        assert torch.backends.cuda.matmul.allow_tf32  # restored
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    assert _cos(out, ref).min() >= 0.9999


@pytest.mark.cuda
@needs_cuda
def test_cuda_streaming_under_pressure_equals_resident(tiny_gguf):
    """The smallest cache (every layer evicts) over an emulated link, many tokens: a copy
    that overwrote a slot the GPU was still reading would show here."""
    path = tiny_gguf("qwen3moe", "F16")
    ids = _ids(40, seed=3)
    with load_cuda_model(path, device="cuda", n_ctx=64) as g:
        ref = g.forward(ids, 0, g.new_kv_cache(64))
    gf = GGUFFile(path)
    per = ExpertStore(gf, 3, 16).expert_bytes(0)
    gf.close()
    for kw in [dict(policy="ondemand"), dict(policy="expertflow", link="4GB/s")]:
        with load_cuda_model(path, device="cuda", n_ctx=64, cache=4 * per, hybrid="off",
                             **kw) as g:
            out = g.forward(ids, 0, g.new_kv_cache(64))
            dec = [g.forward([t], i, kv) for kv in [g.new_kv_cache(64)] for i, t in
                   enumerate(ids)]
            st = g.extra_stats()
        assert _cos(out, ref).min() >= 0.99999, kw
        assert _cos(np.concatenate(dec), ref).min() >= 0.99999, kw
        assert st["max_batch"] >= 1 and g.counters.bytes_loaded > 0


@pytest.mark.cuda
@needs_cuda
def test_cuda_budget_is_honoured_and_staging_is_pinned(tiny_gguf):
    path = tiny_gguf("qwen3moe", "F16")
    with load_cuda_model(path, device="cuda", vram="700MiB", cache="40%", n_ctx=128,
                         policy="ondemand", hybrid="off") as g:
        g.generate_greedy(_ids(16), 16)
        st = g.extra_stats()
        assert g.source.engine._resources().staging.is_pinned()  # this thread's staging
    assert st["vram_peak_allocated_bytes"] <= 700 * 2**20 - st["vram"]["reserve_bytes"]
    assert st["vram"]["emulated"]


def test_cuda_marker_is_registered(pytestconfig):
    assert any(m.startswith("cuda") for m in pytestconfig.getini("markers"))


def test_reset_stats_zeroes_the_device_figures_and_bench_sees_the_policy(tiny_gguf,
                                                                         monkeypatch):
    """Model.reset_stats() zeroes the device figures that count as well as Counters (the
    hybrid decisions ran on from load: more CPU experts than misses after a reset); the
    policy table reads the GPU path's policy time (it read the CPU path's, None there)."""
    import efedge.gpu as gpu
    from efedge.policy_compare import compare_policies

    real = gpu.load_cuda_model
    monkeypatch.setattr(gpu, "load_cuda_model",
                        lambda *a, **kw: real(*a, **{**kw, "device": "cpu"}))
    path = tiny_gguf("qwen3moe", "F32")
    with efedge.load(path, device="cuda", cache="30%", policy="ondemand", hybrid="always",
                     n_ctx=64) as m:
        m.generate(list(range(5, 15)), max_tokens=4, temperature=0)
        assert m.stats()["device"]["hybrid_cpu_experts"] > 0
        m.reset_stats()
        dev = m.stats()["device"]
        assert dev["hybrid_cpu_experts"] == dev["hybrid_cpu_tokens"] == 0
        assert dev["copy_worker_s"] == 0.0 and dev["hybrid_wait_s"] == 0.0
        m.generate(list(range(20, 30)), max_tokens=4, temperature=0)
        s = m.stats()
        assert 0 < s["device"]["hybrid_cpu_experts"] <= s["misses"] + s["late"]
    rows = compare_policies(path, ["expertflow"], "30%", Link("fast", 2e9, 0.0),
                            list(range(5, 29)), 8, device="cuda")
    assert rows[0]["policy_overhead_pct"] > 0


def test_ling2_matches_cpu_path(tiny_gguf):
    """bailingmoe2 on the torch path: q / k / v as row views of the fused attn_qkv, per-head
    qk norm, partial rope, the dense first layer, grouped sigmoid routing with the
    selection bias (test_more_architectures_match_cpu_path's checks)."""
    test_more_architectures_match_cpu_path(tiny_gguf, "bailingmoe2", {})


def test_minimax_m2_matches_cpu_path(tiny_gguf):
    """minimax-m2 on the torch path: the q / k RMS norm over the whole projection, partial
    neox rope, GQA with heads wider than the model, sigmoid routing with the selection bias
    in every layer (test_more_architectures_match_cpu_path's checks)."""
    test_more_architectures_match_cpu_path(tiny_gguf, "minimax-m2", {})


@pytest.mark.cuda
@needs_cuda
def test_cuda_minimax_m2_matches_cpu_path(tiny_gguf):
    """The CUDA twin of test_minimax_m2_matches_cpu_path (test_cuda_forward_matches_cpu_path's
    checks: resident, streamed, hybrid misses, greedy tokens)."""
    test_cuda_forward_matches_cpu_path(tiny_gguf, "minimax-m2")


@pytest.mark.parametrize("arch,why", [("smallthinker", ""), ("phimoe", "biases.*")])
def test_cpu_only_architectures_are_refused_by_name(tiny_gguf, arch, why):
    """smallthinker's router on the layer's input, ReLU experts, NoPE and window layers,
    and phimoe's norm, attention-output and head biases, have no torch code: the torch path
    (on any device) and device="cuda" name the architecture (and for phimoe the biases)
    instead of computing another model."""
    path = tiny_gguf(arch, "F32")
    with pytest.raises(UnsupportedModelError,
                       match=f"does not run architecture '{arch}'.*{why}device='cpu'"):
        load_cuda_model(path, device="cpu")
    with pytest.raises(UnsupportedModelError, match=arch):
        efedge.load(path, device="cuda")


@pytest.mark.cuda
@needs_cuda
def test_cuda_ling2_matches_cpu_path(tiny_gguf):
    """The CUDA twin of test_ling2_matches_cpu_path (test_cuda_forward_matches_cpu_path's
    checks: resident, streamed, hybrid misses, greedy tokens)."""
    test_cuda_forward_matches_cpu_path(tiny_gguf, "bailingmoe2")
