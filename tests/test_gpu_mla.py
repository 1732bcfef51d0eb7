"""deepseek2 (multi-head latent attention) on the torch path: efedge/gpu/mla.py and the
deepseek2 parts of the device forward, against the CPU path on tiny random files.

Layouts covered: split attn_k_b / attn_v_b with a q lora (deepseek2, deepseek2-v3's
sigmoid routing with selection bias and groups), legacy attn_kv_b with YaRN, and the
V2-Lite form without q lora (written here: make_tiny does not list it, as llama.cpp
loads it only at 26 or 27 layers). Everything runs on torch's CPU device; the `cuda`
twin at the end runs on a GPU (scripts/gpu_check.sh).
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import efedge  # noqa: E402
from efedge.errors import UnsupportedModelError  # noqa: E402
from efedge.gpu import load_cuda_model  # noqa: E402
from efedge.gpu.model import GpuKVCache  # noqa: E402

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs an NVIDIA GPU with a CUDA build of torch")
STREAMED = dict(cache="40%", policy="expertflow", hybrid="off", dense=False, ubatch=7)
HYBRID = dict(cache="40%", policy="expertflow", hybrid="always")


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def _ids(n: int = 20, seed: int = 7) -> list[int]:
    return np.random.default_rng(seed).integers(0, 500, n).tolist()


@pytest.fixture(scope="module")
def lite_gguf(tmp_path_factory):
    """deepseek2 as DeepSeek-V2-Lite: attn_q without q lora, split attn_k_b / attn_v_b,
    YaRN."""
    from gguf_tools import make_tiny

    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(make_tiny.ARCHS, "deepseek2-lite",
                   dict(make_tiny.ARCHS["deepseek2"], q_lora=False))
        path = tmp_path_factory.mktemp("mla") / "deepseek2-lite-F32.gguf"
        return make_tiny.write_tiny(path, "deepseek2-lite", "F32", rope_scaling="yarn")


def _file(tiny_gguf, lite_gguf, variant: str):
    if variant == "lite":
        return lite_gguf
    arch, _, rope = variant.partition("+")
    return tiny_gguf(arch, "F32", **({"rope_scaling": rope} if rope else {}))


# (variant, the configurations it runs): each layout at least once resident and streamed
CASES = [("deepseek2", [dict(), STREAMED, HYBRID]),
         ("deepseek2-v3", [dict(), HYBRID]),
         ("deepseek2-legacy+yarn", [dict(), STREAMED]),
         ("lite", [dict(), STREAMED])]


@pytest.mark.parametrize("variant, configs", CASES, ids=[c[0] for c in CASES])
def test_deepseek2_forward_matches_cpu_path(tiny_gguf, lite_gguf, variant, configs):
    path = _file(tiny_gguf, lite_gguf, variant)
    ids = _ids()
    with efedge.load(path) as m:
        ref = m.logits(ids)
    for kw in configs:
        with load_cuda_model(path, device="cpu", n_ctx=64, **kw) as g:
            out = g.forward(ids, 0, g.new_kv_cache(64))
            assert _cos(out, ref).min() >= 0.99999, kw
            assert (out.argmax(-1) == ref.argmax(-1)).all(), kw
            # prefill then one token at a time: the cache written by one is read by the next
            kv = g.new_kv_cache(64)
            steps = [g.forward(ids[:12], 0, kv)] + [g.forward([t], 12 + i, kv)
                                                    for i, t in enumerate(ids[12:])]
            assert _cos(np.concatenate(steps), ref).min() >= 0.99999, kw
            s = g.counters
            assert s.hits + s.late + s.misses == s.expert_requests > 0
            if kw:
                assert not g.resident and s.misses > 0, kw
            if kw.get("hybrid") == "always":
                assert g.extra_stats()["hybrid_cpu_experts"] > 0


def test_deepseek2_greedy_tokens_match_cpu_path(tiny_gguf):
    path = tiny_gguf("deepseek2-v3", "F32")
    prompt = _ids(6, seed=11)
    with efedge.load(path) as m:
        from efedge.generate import GenerationResult

        res = GenerationResult([], "length")
        "".join(m.stream(prompt, max_tokens=10, temperature=0, result=res))
    with load_cuda_model(path, device="cpu", cache="40%", policy="expertflow",
                         hybrid="off") as g:
        assert g.generate_greedy(prompt, len(res.tokens)) == res.tokens


def test_deepseek2_quantized_forward_close_to_cpu_path(tiny_gguf):
    path = tiny_gguf("deepseek2", "Q4_K_M")  # skipped without llama.cpp's quantizer
    ids = _ids()
    with efedge.load(path) as m:
        ref = m.logits(ids)
    # dense=False: every matrix (the per-head k_b / v_b stacks too) decoded per call
    with load_cuda_model(path, device="cpu", cache="50%", policy="ondemand", dense=False,
                         hybrid="off", n_ctx=32) as g:
        out = g.forward(ids, 0, g.new_kv_cache(32))
        assert g.counters.misses > 0
    cos = _cos(out, ref)
    # as for qwen3moe: 8-bit activation rounding flips the odd routing choice
    assert np.median(cos) >= 0.9999 and cos.min() >= 0.99


@pytest.mark.parametrize("dense", [True, False])
def test_deepseek2_memory_plan_counts_the_latent_attention(tiny_gguf, dense):
    """The plan's weights are what the device holds (the MLA matrices and per-head stacks
    included); the KV cache is the latent one: one head of kv_lora + rope, kv_lora."""
    path = tiny_gguf("deepseek2", "Q4_K_M")
    with load_cuda_model(path, device="cpu", n_ctx=48, dense=dense, hybrid="off") as g:
        rep, c = g.budget.report(), g.config
        assert rep["weights_bytes"] == g.extra_stats()["weight_bytes_on_device"]
        names = {m.name for a in g._tf.mla if a is not None for m in a.matrices()}
        assert "blk.1.attn_k_b.weight" in names and "blk.2.attn_q_b.weight" in names
        assert (c.n_head_kv, c.head_dim, c.v_head_dim) == (1, c.kv_lora_rank + c.rope_dim,
                                                           c.kv_lora_rank)
        kv = g.new_kv_cache(48)
        held = sum(t.numel() * t.element_size() for t in (kv.k, kv.v))
        assert rep["kv_cache_bytes"] == held == GpuKVCache.bytes_for(
            c.n_layer, 48, 1, c.kv_lora_rank + c.rope_dim, c.kv_lora_rank)


def test_deepseek2_attention_temperature_is_refused_by_name(tmp_path, monkeypatch):
    """Query temperature scaling (Mistral-Large-3 style files) is computed by neither path."""
    from gguf_tools import make_tiny, tiny_archs

    meta = tiny_archs.deepseek2_metadata

    def with_temperature(w, cfg, a):
        meta(w, cfg, a)
        w.add_float32("deepseek2.attention.temperature_scale", 0.1)

    monkeypatch.setattr(tiny_archs, "deepseek2_metadata", with_temperature)
    path = make_tiny.write_tiny(tmp_path / "ds-temp.gguf", "deepseek2", "F32", n_layer=2)
    with pytest.raises(UnsupportedModelError, match="temperature_scale"):
        load_cuda_model(path, device="cpu")


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("variant", ["deepseek2-v3", "deepseek2-legacy+yarn", "lite"])
def test_cuda_deepseek2_forward_matches_cpu_path(tiny_gguf, lite_gguf, variant):
    path = _file(tiny_gguf, lite_gguf, variant)
    ids = _ids(24)
    prompt = ids[:5]
    with efedge.load(path) as m:
        from efedge.generate import GenerationResult

        ref = m.logits(ids)
        res = GenerationResult([], "length")
        "".join(m.stream(prompt, max_tokens=8, temperature=0, result=res))
    for kw in [dict(), dict(STREAMED, hybrid="auto", link="2GB/s")]:
        with load_cuda_model(path, device="cuda", n_ctx=64, **kw) as g:
            out = g.forward(ids, 0, g.new_kv_cache(64))
            assert _cos(out, ref).min() >= 0.9999, kw
            assert (out.argmax(-1) == ref.argmax(-1)).all(), kw
            assert g.generate_greedy(prompt, len(res.tokens)) == res.tokens, kw
