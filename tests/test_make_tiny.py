"""gguf_tools.make_tiny / gguf_tools.quantize: the files parse, carry the keys and tensors
llama.cpp needs, and llama.cpp runs them with well-spread logits."""

from __future__ import annotations

from collections import Counter

import gguf
import numpy as np
import pytest

from gguf_tools import make_tiny
from gguf_tools.make_tiny import ARCHS, write_tiny

ALL_ARCHS = list(ARCHS)
# layouts llama.cpp 0.3.36 loads (not ernie4_5-moe-interleave: see test_ernie_layouts)
# llama.cpp 0.3.36 cannot load these (make_tiny.ARCHS says why)
LLAMA_CPP_ARCHS = [a for a in ARCHS if a not in ("ernie4_5-moe-interleave", "deepseek2-lite")]
# Llama-shaped layouts (q / k / v, one FFN per layer); tiny_archs writes the others
STD_ARCHS = [a for a in ARCHS if "plan" not in ARCHS[a]]
D, L, E, K, F_EXP, F, HD = 256, 3, 16, 4, 256, 512, 64  # the "test" preset


def _reader(path) -> tuple[gguf.GGUFReader, dict, dict]:
    r = gguf.GGUFReader(path)
    kv = {k: f.contents() for k, f in r.fields.items()}
    tensors = {t.name: t for t in r.tensors}
    return r, kv, tensors


def _shape(t) -> tuple[int, ...]:
    return tuple(int(x) for x in t.shape)


@pytest.mark.parametrize("arch", STD_ARCHS)
def test_float_file_has_the_expected_keys_and_tensors(tiny_gguf, arch):
    _, kv, ts = _reader(tiny_gguf(arch, "F32"))
    a = ARCHS[arch]["gguf_arch"]
    hd = ARCHS[arch].get("defaults", {}).get("head_dim", HD)  # qwen3vlmoe: 128
    assert kv["general.architecture"] == a
    n_vocab = len(kv["tokenizer.ggml.tokens"])
    assert kv["tokenizer.ggml.model"] == "gpt2" and n_vocab >= 259
    n_kv = D // hd if arch == "olmoe" else 2
    assert kv[f"{a}.embedding_length"] == D and kv[f"{a}.block_count"] == L
    assert kv[f"{a}.attention.head_count"] == 4 and kv[f"{a}.attention.head_count_kv"] == n_kv
    assert _shape(ts["token_embd.weight"]) == (D, n_vocab)
    assert _shape(ts["output.weight"]) == (D, n_vocab)
    assert _shape(ts["output_norm.weight"]) == (D,)
    moe = ARCHS[arch]["moe"]
    for i in range(L):
        b = f"blk.{i}."
        assert _shape(ts[b + "attn_q.weight"]) == (D, 4 * hd)
        assert _shape(ts[b + "attn_k.weight"]) == (D, n_kv * hd)
        assert _shape(ts[b + "attn_output.weight"]) == (4 * hd, D)
        assert (b + "attn_q.bias" in ts) == arch.startswith("qwen2")
        if moe:
            assert kv[f"{a}.expert_count"] == E and kv[f"{a}.expert_used_count"] == K
            assert _shape(ts[b + "ffn_gate_inp.weight"]) == (D, E)
            assert _shape(ts[b + "ffn_gate_exps.weight"]) == (D, F_EXP, E)
            assert _shape(ts[b + "ffn_up_exps.weight"]) == (D, F_EXP, E)
            assert _shape(ts[b + "ffn_down_exps.weight"]) == (F_EXP, D, E)
            assert b + "ffn_gate.weight" not in ts
        else:
            assert f"{a}.expert_count" not in kv
            assert _shape(ts[b + "ffn_down.weight"]) == (F, D)
    if arch == "qwen2moe":
        assert kv["qwen2moe.expert_feed_forward_length"] == F_EXP
        assert kv["qwen2moe.expert_shared_feed_forward_length"] == 256
        assert _shape(ts["blk.0.ffn_gate_inp_shexp.weight"]) == (D,)
        assert _shape(ts["blk.0.ffn_down_shexp.weight"]) == (256, D)
        assert _shape(ts["blk.0.attn_k.bias"]) == (2 * hd,)
    if arch in ("qwen3", "qwen3moe", "qwen3vlmoe"):
        assert _shape(ts["blk.0.attn_q_norm.weight"]) == (hd,)
        assert _shape(ts["blk.0.attn_k_norm.weight"]) == (hd,)
        assert kv[f"{a}.attention.key_length"] == hd
    if arch in ("qwen3moe", "qwen3vlmoe"):
        assert kv[f"{a}.expert_feed_forward_length"] == F_EXP
    if arch == "qwen3vlmoe":  # Qwen3-VL's head size, M-RoPE sections and deepstack count
        assert hd == 128 and kv["qwen3vlmoe.rope.dimension_count"] == 128
        assert kv["qwen3vlmoe.rope.dimension_sections"] == [24, 20, 20, 0]
        assert kv["qwen3vlmoe.n_deepstack_layers"] == 3
    if arch == "olmoe":
        assert _shape(ts["blk.0.attn_q_norm.weight"]) == (D,)
        assert _shape(ts["blk.0.attn_k_norm.weight"]) == (D,)
    if arch in ("mixtral", "olmoe"):
        assert kv[f"{a}.feed_forward_length"] == F_EXP
    if arch == "bailingmoe":  # shared experts counted in units of the experts' width
        assert kv["bailingmoe.expert_feed_forward_length"] == F_EXP
        assert kv["bailingmoe.expert_shared_count"] == 1
        assert kv["bailingmoe.expert_weights_norm"] is True
        assert kv["bailingmoe.expert_weights_scale"] == 2.0
        assert _shape(ts["blk.2.ffn_gate_shexp.weight"]) == (D, F_EXP)
        assert "blk.0.ffn_gate_inp_shexp.weight" not in ts  # ungated


def test_deepseek2_and_gpt_oss_layouts(tiny_gguf):
    from gguf_tools.tiny_archs import DS_DIMS, OSS_WINDOW

    x = DS_DIMS
    _, kv, ts = _reader(tiny_gguf("deepseek2", "F32"))
    assert kv["deepseek2.leading_dense_block_count"] == x["dense_lead"] == 1
    assert kv["deepseek2.attention.head_count_kv"] == 1  # the MLA cache: one latent head
    assert kv["deepseek2.attention.key_length"] == x["kv_lora"] + x["rope"]
    assert kv["deepseek2.attention.key_length_mla"] == x["nope"] + x["rope"]
    assert _shape(ts["blk.1.attn_k_b.weight"]) == (x["nope"], x["kv_lora"], 4)
    assert _shape(ts["blk.0.ffn_gate.weight"]) == (D, F)  # dense first layer
    assert "blk.0.ffn_gate_exps.weight" not in ts
    assert _shape(ts["blk.1.ffn_up_shexp.weight"]) == (D, F_EXP * x["n_shared"])
    _, kv, ts = _reader(tiny_gguf("deepseek2-v3", "F32"))
    assert kv["deepseek2.expert_gating_func"] == 2 and kv["deepseek2.expert_group_count"] == 4
    assert _shape(ts["blk.1.exp_probs_b.bias"]) == (E,)
    _, kv, ts = _reader(tiny_gguf("gpt-oss", "F32"))
    assert kv["gpt-oss.attention.sliding_window"] == OSS_WINDOW
    assert _shape(ts["blk.0.attn_sinks.weight"]) == (4,)
    assert _shape(ts["blk.0.ffn_down_exps.bias"]) == (D, E)
    assert _shape(ts["blk.0.post_attention_norm.weight"]) == (D,)


def test_glm4moe_layout(tiny_gguf):
    """GLM-4.5-Air's layout: attention biases, half-turned rope, post_attention_norm, a dense
    first block, sigmoid routing with a selection bias and a shared expert, and one MTP
    block (with its nextn.* tensors) counted in block_count; -qknorm adds GLM-4.5's
    per-head q / k norms."""
    from gguf_tools.tiny_archs import GLM_DIMS

    _, kv, ts = _reader(tiny_gguf("glm4moe", "F32"))
    assert kv["glm4moe.block_count"] == L + 1 and kv["glm4moe.nextn_predict_layers"] == 1
    assert kv["glm4moe.rope.dimension_count"] == HD // 2  # partial rotary
    assert kv["glm4moe.attention.key_length"] == HD
    assert kv["glm4moe.leading_dense_block_count"] == GLM_DIMS["dense_lead"] == 1
    assert kv["glm4moe.expert_gating_func"] == 2 and kv["glm4moe.expert_weights_norm"]
    assert kv["glm4moe.expert_shared_count"] == 1
    assert kv["glm4moe.expert_feed_forward_length"] == F_EXP
    assert _shape(ts["blk.0.ffn_gate.weight"]) == (D, F) and "blk.0.ffn_gate_inp.weight" not in ts
    assert _shape(ts["blk.1.exp_probs_b.bias"]) == (E,)
    assert _shape(ts["blk.1.ffn_up_shexp.weight"]) == (D, F_EXP)
    assert _shape(ts["blk.2.attn_k.bias"]) == (2 * HD,)
    assert _shape(ts["blk.2.post_attention_norm.weight"]) == (D,)
    assert "blk.2.ffn_norm.weight" not in ts and "blk.0.attn_q_norm.weight" not in ts
    assert _shape(ts[f"blk.{L}.nextn.eh_proj.weight"]) == (2 * D, D)  # the MTP block
    assert _shape(ts[f"blk.{L}.ffn_gate_exps.weight"]) == (D, F_EXP, E)
    assert not any(".nextn." in n for n in ts if not n.startswith(f"blk.{L}."))
    _, _, ts = _reader(tiny_gguf("glm4moe-qknorm", "F32"))
    assert _shape(ts["blk.0.attn_q_norm.weight"]) == (HD,)
    assert _shape(ts["blk.0.attn_k_norm.weight"]) == (HD,)
def test_ernie_layouts(tiny_gguf):
    _, kv, ts = _reader(tiny_gguf("ernie4_5-moe", "F32"))
    assert kv["general.architecture"] == "ernie4_5-moe"
    assert kv["ernie4_5-moe.leading_dense_block_count"] == 1
    assert kv["ernie4_5-moe.interleave_moe_layer_step"] == 1
    assert kv["ernie4_5-moe.expert_shared_feed_forward_length"] == 256
    assert _shape(ts["blk.0.ffn_gate.weight"]) == (D, F)  # dense first layer
    assert "blk.0.ffn_gate_exps.weight" not in ts and "blk.0.exp_probs_b.bias" not in ts
    for i in (1, 2):
        assert _shape(ts[f"blk.{i}.ffn_gate_exps.weight"]) == (D, F_EXP, E)
        assert _shape(ts[f"blk.{i}.exp_probs_b.bias"]) == (E,)
        assert _shape(ts[f"blk.{i}.ffn_up_shexp.weight"]) == (D, 256)
        assert f"blk.{i}.ffn_gate_inp_shexp.weight" not in ts  # ungated
    _, kv, ts = _reader(tiny_gguf("ernie4_5-moe-interleave", "F32", n_layer=5))
    assert kv["ernie4_5-moe.interleave_moe_layer_step"] == 2
    assert kv["ernie4_5-moe.leading_dense_block_count"] == 0
    moe = [f"blk.{i}.ffn_gate_exps.weight" in ts for i in range(5)]
    assert moe == [False, True, False, True, False]
    assert all(f"blk.{i}.ffn_down.weight" in ts for i in (0, 2, 4))
    assert not any(n.endswith(("_shexp.weight", "exp_probs_b.bias")) for n in ts)


def test_dots_hunyuan_layouts(tiny_gguf):
    """dots1 as dots.llm1 (multi-head, a dense first block, per-head q / k norms,
    sigmoid routing with a selection bias, weights renormalised and scaled, 2 shared
    experts of the routed width); hunyuan-moe as Hunyuan-A13B (experts in every block,
    per-head q / k norms, an ungated shared expert of its own width, the experts' width in
    feed_forward_length, rope scaling "none" as the converter writes it)."""
    from gguf_tools.tiny_archs import DOTS_DIMS

    x = DOTS_DIMS
    _, kv, ts = _reader(tiny_gguf("dots1", "F32"))
    assert kv["dots1.attention.head_count_kv"] == kv["dots1.attention.head_count"] == 4
    assert kv["dots1.leading_dense_block_count"] == x["dense_lead"] == 1
    assert kv["dots1.expert_gating_func"] == 2 and kv["dots1.expert_weights_norm"]
    assert kv["dots1.expert_weights_scale"] == x["weights_scale"] == 2.5
    assert kv["dots1.expert_shared_count"] == x["n_shared"] == 2
    assert kv["dots1.expert_feed_forward_length"] == F_EXP
    assert kv["dots1.rope.dimension_count"] == kv["dots1.attention.key_length"] == HD
    assert _shape(ts["blk.0.ffn_gate.weight"]) == (D, F) and "blk.0.ffn_gate_inp.weight" not in ts
    assert _shape(ts["blk.0.attn_k.weight"]) == (D, 4 * HD)
    assert _shape(ts["blk.0.attn_q_norm.weight"]) == (HD,)
    for i in (1, 2):
        assert _shape(ts[f"blk.{i}.exp_probs_b.bias"]) == (E,)
        assert _shape(ts[f"blk.{i}.ffn_up_shexp.weight"]) == (D, 2 * F_EXP)
        assert f"blk.{i}.ffn_gate_inp_shexp.weight" not in ts  # ungated
    _, kv, ts = _reader(tiny_gguf("hunyuan-moe", "F32"))
    assert kv["hunyuan-moe.feed_forward_length"] == F_EXP  # the experts' width
    assert kv["hunyuan-moe.expert_feed_forward_length"] == F_EXP
    assert kv["hunyuan-moe.expert_shared_feed_forward_length"] == 2 * F_EXP
    assert kv["hunyuan-moe.rope.scaling.type"] == "none"
    assert kv["hunyuan-moe.attention.head_count_kv"] == 2
    for i in range(L):
        assert _shape(ts[f"blk.{i}.ffn_gate_exps.weight"]) == (D, F_EXP, E)
        assert _shape(ts[f"blk.{i}.ffn_down_shexp.weight"]) == (2 * F_EXP, D)
        assert _shape(ts[f"blk.{i}.attn_k_norm.weight"]) == (HD,)
        assert f"blk.{i}.ffn_gate_inp_shexp.weight" not in ts
        assert f"blk.{i}.exp_probs_b.bias" not in ts
    with pytest.raises(ValueError, match="n_head_kv == n_head"):
        make_tiny.resolve_config("dots1", n_head_kv=2)


@pytest.mark.requires_llama_cpp
def test_llama_cpp_cannot_load_dots1_with_fewer_kv_heads(tiny_gguf, tmp_path):
    """llama.cpp 0.3.36 sizes dots1's attn_k / attn_v by head_count: a GQA file fails to
    load (tests/test_gguf_file.py: efedge refuses it by name). When this fails, llama.cpp
    has learnt GQA for dots1: drop ArchSpec.mha_only for it."""
    from llama_ref import llama_logits

    cfg = make_tiny.resolve_config("dots1")
    cfg["n_head_kv"] = 2
    path = tmp_path / "gqa.gguf"
    make_tiny._write_float(path, cfg, "F32", 0, "gqa")
    with pytest.raises(ValueError, match="Failed to load model"):
        llama_logits(path, [1, 2, 3])


def test_llama4_layouts(tiny_gguf):
    """Scout-shaped (16 experts, one used, experts in every layer, rope_freqs) and
    Maverick-shaped (128 experts, experts every other layer) llama4 files, 4 layers each;
    both with an ungated shared expert of the experts' width and no window key (llama.cpp
    fixes the chunks at 8192)."""
    _, kv, ts = _reader(tiny_gguf("llama4", "F32"))
    assert kv["general.architecture"] == "llama4" and kv["llama4.block_count"] == 4
    assert kv["llama4.expert_count"] == 16 and kv["llama4.expert_used_count"] == 1
    assert kv["llama4.interleave_moe_layer_step"] == 1
    assert "llama4.attention.sliding_window" not in kv
    assert _shape(ts["rope_freqs.weight"]) == (HD // 2,)
    for i in range(4):
        assert _shape(ts[f"blk.{i}.ffn_gate_exps.weight"]) == (D, F_EXP, 16)
        assert _shape(ts[f"blk.{i}.ffn_down_shexp.weight"]) == (F_EXP, D)
        assert f"blk.{i}.ffn_gate_inp_shexp.weight" not in ts  # ungated
    _, kv, ts = _reader(tiny_gguf("llama4-maverick", "F32"))
    assert kv["llama4.expert_count"] == 128 and kv["llama4.interleave_moe_layer_step"] == 2
    assert [f"blk.{i}.ffn_gate_exps.weight" in ts for i in range(4)] == [False, True] * 2
    assert _shape(ts["blk.0.ffn_gate.weight"]) == (D, F) and "rope_freqs.weight" not in ts


@pytest.mark.requires_llama_cpp
def test_llama_cpp_cannot_load_interleaved_ernie(tiny_gguf):
    """llama.cpp 0.3.36 gives every ernie4_5-moe layer past the dense lead expert
    tensors when it loads (its graph then runs the interleave rule): a file with dense
    layers between MoE ones is refused. When this fails, llama.cpp has learnt it: move the
    interleaved file into the parity tests."""
    from llama_ref import llama_logits

    with pytest.raises(ValueError, match="Failed to load model"):
        llama_logits(tiny_gguf("ernie4_5-moe-interleave", "F32", n_layer=5), [1, 2, 3])


def test_f16_holds_the_f32_weights_rounded(tiny_gguf):
    _, _, t32 = _reader(tiny_gguf("qwen2moe", "F32"))
    _, _, t16 = _reader(tiny_gguf("qwen2moe", "F16"))
    w = t16["blk.1.ffn_up_exps.weight"]
    assert w.tensor_type == gguf.GGMLQuantizationType.F16
    np.testing.assert_array_equal(
        w.data, t32["blk.1.ffn_up_exps.weight"].data.astype(np.float16))
    # 1-D tensors and the router stay F32, as convert_hf_to_gguf writes them
    for name in ("blk.1.ffn_gate_inp.weight", "blk.1.ffn_norm.weight", "blk.1.attn_q.bias"):
        assert t16[name].tensor_type == gguf.GGMLQuantizationType.F32


def test_seed_and_overrides(tmp_path):
    a = write_tiny(tmp_path / "a.gguf", "qwen3moe", seed=1, n_layer=1, n_expert=8,
                   n_expert_used=2)
    b = write_tiny(tmp_path / "b.gguf", "qwen3moe", seed=1, n_layer=2, n_expert=8,
                   n_expert_used=2)
    c = write_tiny(tmp_path / "c.gguf", "qwen3moe", seed=2, n_layer=1, n_expert=8,
                   n_expert_used=2)
    _, kv, ta = _reader(a)
    _, _, tb = _reader(b)
    _, _, tc = _reader(c)
    assert kv["qwen3moe.block_count"] == 1 and kv["qwen3moe.expert_used_count"] == 2
    assert _shape(ta["blk.0.ffn_down_exps.weight"]) == (F_EXP, D, 8)
    name = "blk.0.attn_q.weight"
    np.testing.assert_array_equal(ta[name].data, tb[name].data)  # per-tensor streams
    assert not np.array_equal(ta[name].data, tc[name].data)


def test_bad_arguments_are_named(tmp_path):
    with pytest.raises(ValueError, match="unknown arch"):
        write_tiny(tmp_path / "x.gguf", "gpt9")
    with pytest.raises(ValueError, match="unknown preset"):
        write_tiny(tmp_path / "x.gguf", "llama", preset="huge")
    with pytest.raises(TypeError, match="n_layers"):
        write_tiny(tmp_path / "x.gguf", "llama", n_layers=2)
    with pytest.raises(ValueError, match="n_head_kv == n_head"):
        write_tiny(tmp_path / "x.gguf", "olmoe", n_head_kv=2)
    assert not list(tmp_path.iterdir())


def test_preset_sizes():
    def n_params(preset):
        cfg = make_tiny.resolve_config("qwen3moe", preset)
        return sum(int(np.prod(t.shape)) for t in make_tiny.tensor_plan(cfg, cfg["n_vocab"]))

    assert 20e6 < n_params("small") < 40e6  # ~60 MB at F16
    assert 0.8e9 < n_params("bench") < 0.9e9  # ~480 MB at Q4_0


def test_ensure_default_model(tmp_path, monkeypatch):
    monkeypatch.setenv("EFEDGE_CACHE", str(tmp_path))
    path = make_tiny.ensure_default_model()
    assert path == tmp_path / "tiny-qwen3moe-f16.gguf" and path.is_file()
    mtime = path.stat().st_mtime_ns
    assert make_tiny.ensure_default_model().stat().st_mtime_ns == mtime  # written once
    _, kv, _ = _reader(path)
    assert kv["general.architecture"] == "qwen3moe"


def test_cli(tmp_path, capsys):
    out = tmp_path / "cli.gguf"
    assert make_tiny.main(["--arch", "mixtral", "--out", str(out), "--layers", "1",
                           "--experts", "4", "--experts-used", "2", "--seed", "3"]) == 0
    assert str(out) in capsys.readouterr().out
    _, kv, _ = _reader(out)
    assert kv["llama.expert_count"] == 4 and kv["llama.block_count"] == 1


def test_cli_refuses_what_the_quantizer_cannot_write_in_one_line(tmp_path, capsys):
    """deepseek2-lite (no q lora) through llama.cpp's quantizer at a layer count it does
    not take as V2-Lite (26 or 27): a one-line error before anything is written (it was
    the quantizer's RuntimeError traceback, found by an audit); an unknown type too."""
    out = tmp_path / "lite.gguf"
    assert make_tiny.main(["--arch", "deepseek2-lite", "--quant", "Q4_K_M", "--out",
                           str(out), "--layers", "2"]) == 2
    err = capsys.readouterr().err
    assert "make_tiny: error:" in err and "26 or 27 layers" in err and "Traceback" not in err
    assert make_tiny.main(["--arch", "mixtral", "--quant", "Q9_Z", "--out", str(out)]) == 2
    assert "make_tiny: error:" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


# --- llama.cpp ---------------------------------------------------------------------------


@pytest.mark.requires_llama_cpp
@pytest.mark.parametrize("arch", LLAMA_CPP_ARCHS)
def test_llama_cpp_runs_it(tiny_gguf, arch):
    from llama_ref import llama_logits

    ids = np.random.default_rng(0).integers(0, 512, 16).tolist()
    logits = llama_logits(tiny_gguf(arch, "F32"), ids)
    assert logits.shape == (16, 512) and logits.dtype == np.float32
    assert np.isfinite(logits).all()
    assert logits.std(axis=-1).min() >= 0.5
    assert len(set(logits.argmax(-1).tolist())) >= 8  # not one token everywhere


@pytest.mark.requires_llama_cpp
@pytest.mark.parametrize("quant, want", [("Q4_K_M", {"Q4_K", "Q6_K"}), ("IQ4_NL", {"IQ4_NL"})])
def test_llama_cpp_quantizer(tiny_gguf, quant, want):
    from llama_ref import llama_logits

    path = tiny_gguf("qwen3moe", quant)
    r, kv, ts = _reader(path)
    types = Counter(t.tensor_type.name for t in r.tensors)
    assert want <= set(types), types
    assert kv["general.file_type"] == getattr(gguf.LlamaFileType, f"MOSTLY_{quant}")
    assert ts["blk.0.ffn_gate_inp.weight"].tensor_type.name == "F32"  # never quantized
    ids = list(range(10, 26))
    ref = llama_logits(tiny_gguf("qwen3moe", "F32"), ids)
    got = llama_logits(path, ids)
    cos = (ref * got).sum(-1) / np.linalg.norm(ref, axis=-1) / np.linalg.norm(got, axis=-1)
    assert cos.min() > 0.8, cos  # a random model is noise-sensitive


@pytest.mark.requires_llama_cpp
def test_quantize_errors(tiny_gguf, tmp_path):
    from gguf_tools.quantize import known_types, quantize

    assert {"Q4_K_M", "IQ4_NL", "Q8_0", "F16"} <= set(known_types())
    with pytest.raises(ValueError, match="unknown quantization type 'Q4_K_X'"):
        quantize(tiny_gguf("qwen3moe", "F32"), tmp_path / "x.gguf", "Q4_K_X")
    with pytest.raises(FileNotFoundError):
        quantize(tmp_path / "missing.gguf", tmp_path / "x.gguf", "Q8_0")


@pytest.mark.requires_llama_cpp
def test_greedy_continuation_and_tokenizer(tiny_gguf):
    from llama_ref import llama_detokenize, llama_greedy, llama_logits, llama_tokenize

    path = tiny_gguf("mixtral", "F32")
    prompt = [5, 99, 300, 42]
    out = llama_greedy(path, prompt, 6)
    assert len(out) == 6 and all(0 <= t < 512 for t in out)
    assert llama_greedy(path, prompt, 6) == out  # fresh sequence each call
    # the greedy tokens are the argmax of the full-sequence logits
    logits = llama_logits(path, prompt + out[:-1])
    assert logits[len(prompt) - 1:].argmax(-1).tolist() == out
    ids = llama_tokenize(path, "hello world")
    assert ids and llama_detokenize(path, ids) == b"hello world"


# -- random blocks of the low-bit types (llama.cpp's quantizer needs an imatrix for them) --
@pytest.mark.parametrize("quant", ["IQ2_XXS", "IQ1_M/IQ3_S", "TQ2_0/F16"])
def test_random_block_files(tiny_gguf, quant):
    from gguf_tools.random_quant import RANDOM_TYPES, file_type, parse_spec

    experts, other = parse_spec(quant)
    r, kv, ts = _reader(tiny_gguf("qwen3moe", quant))
    assert kv["general.file_type"] == file_type((experts, other))
    for name, t in ts.items():
        want = ("F32" if len(t.shape) < 2 or name == "token_embd.weight"
                or "ffn_gate_inp" in name else experts if "_exps." in name else other)
        assert t.tensor_type.name == want, name
        if want in RANDOM_TYPES:  # valid blocks, finite, about the float model's spread
            w = gguf.quants.dequantize(t.data, t.tensor_type)
            assert np.isfinite(w).all() and w.shape[-1] == int(t.shape[0])
            fan_in = int(t.shape[0])
            scale = 2.0 if name == "output.weight" else (
                make_tiny.QK_GAIN if "attn_q." in name or "attn_k." in name else 1.0)
            assert abs(w.std() / (scale / np.sqrt(fan_in)) - 1) < 0.1, name
    # a tensor does not depend on the other side of the spec
    _, _, ts2 = _reader(tiny_gguf("qwen3moe", experts))
    key = "blk.1.ffn_down_exps.weight"
    assert np.array_equal(ts[key].data, ts2[key].data)


def test_random_block_spec_errors():
    from gguf_tools.random_quant import parse_spec

    assert parse_spec("Q4_K_M") is None and parse_spec("F16") is None
    assert parse_spec("iq1_s") == ("IQ1_S", "IQ1_S")
    with pytest.raises(ValueError, match="Q4_K"):
        parse_spec("IQ1_S/Q4_K")


def test_ling2_layout(tiny_gguf):
    """Ling-mini-2.0's layout at test size: one fused attn_qkv per layer, per-head q / k
    norms, half of each head rotated, a dense first layer, sigmoid routing with a selection
    bias and expert groups, two shared experts of half the experts' width (the key gives
    one expert's width: llama.cpp multiplies it by the count), one trailing MTP block."""
    from gguf_tools.tiny_archs import LING2_DIMS as x

    _, kv, ts = _reader(tiny_gguf("bailingmoe2", "F32"))
    a = "bailingmoe2."
    assert kv[a + "block_count"] == L + 1 and kv[a + "nextn_predict_layers"] == 1
    assert kv[a + "rope.dimension_count"] == HD // 2
    assert kv[a + "leading_dense_block_count"] == x["dense_lead"] == 1
    assert kv[a + "expert_gating_func"] == 2 and kv[a + "expert_group_count"] == 4
    assert kv[a + "expert_shared_count"] == 2
    assert kv[a + "expert_shared_feed_forward_length"] == F_EXP // 2
    assert _shape(ts["blk.0.attn_qkv.weight"]) == (D, 4 * HD + 2 * 2 * HD)
    assert "blk.0.attn_q.weight" not in ts
    assert _shape(ts["blk.0.attn_q_norm.weight"]) == (HD,)
    assert _shape(ts["blk.0.ffn_gate.weight"]) == (D, F)
    assert _shape(ts["blk.1.exp_probs_b.bias"]) == (E,)
    assert _shape(ts["blk.1.ffn_up_shexp.weight"]) == (D, F_EXP)
    assert _shape(ts[f"blk.{L}.nextn.eh_proj.weight"]) == (2 * D, D)


def test_smallthinker_layout(tiny_gguf):
    """SmallThinker-21B's layout at test size: the converter's keys (the experts' width as
    feed_forward_length too, a gating function), a sliding window with pattern 2 (so the
    window's layers and the NoPE layer come from different rules), no shared expert, no
    attention output bias (llama.cpp 0.3.36 refuses a file with one)."""
    from gguf_tools.make_tiny import ST_SWA

    _, kv, ts = _reader(tiny_gguf("smallthinker", "F32"))
    a = "smallthinker."
    assert kv[a + "expert_gating_func"] == 2 and kv[a + "feed_forward_length"] == F_EXP
    assert kv[a + "expert_feed_forward_length"] == F_EXP
    assert kv[a + "attention.sliding_window"] == ST_SWA[0]
    assert kv[a + "attention.sliding_window_pattern"] == ST_SWA[1] == 2
    assert kv[a + "rope.dimension_count"] == HD
    assert _shape(ts["blk.0.ffn_gate_inp.weight"]) == (D, E)
    assert "blk.0.attn_output.bias" not in ts and "blk.0.ffn_up_shexp.weight" not in ts
    _, kv, _ = _reader(tiny_gguf("smallthinker-softmax", "F32"))
    assert kv[a + "expert_gating_func"] == 1 and a + "attention.sliding_window" not in kv


def test_minimax_m2_layout(tiny_gguf):
    """MiniMax-M2's layout at test size: the converter's keys (the experts' width under
    both feed_forward_length and expert_feed_forward_length, sigmoid gating, half of each
    head rotated), heads of 128 so that heads × head size is twice the width (as the real
    48 × 128 over 3072), GQA, the q / k norms as wide as the q / k projections, a selection
    bias in every layer, no shared expert and no dense layer."""
    from gguf_tools.tiny_archs import MINIMAX_DIMS

    _, kv, ts = _reader(tiny_gguf("minimax-m2", "F32"))
    a, hd = "minimax-m2.", 128
    assert kv[a + "expert_gating_func"] == 2
    assert kv[a + "feed_forward_length"] == kv[a + "expert_feed_forward_length"] == F_EXP
    assert kv[a + "attention.key_length"] == kv[a + "attention.value_length"] == hd
    assert kv[a + "rope.dimension_count"] == int(hd * MINIMAX_DIMS["rope_frac"]) == 64
    assert kv[a + "attention.head_count"] == 4 and kv[a + "attention.head_count_kv"] == 2
    for i in range(L):
        b = f"blk.{i}."
        assert _shape(ts[b + "attn_q.weight"]) == (D, 4 * hd) and 4 * hd == 2 * D
        assert _shape(ts[b + "attn_q_norm.weight"]) == (4 * hd,)
        assert _shape(ts[b + "attn_k_norm.weight"]) == (2 * hd,)
        assert _shape(ts[b + "exp_probs_b.bias"]) == (E,)
        assert _shape(ts[b + "ffn_gate_exps.weight"]) == (D, F_EXP, E)
        assert b + "ffn_up_shexp.weight" not in ts and b + "ffn_gate.weight" not in ts


def test_phimoe_layout(tiny_gguf):
    """phimoe as Phi-3.5-MoE: biases on every norm, on q / k / v, the attention output and
    the head; 16 experts of feed_forward_length, top 2; LongRoPE's long and short factors
    with the converter's attn_factor and original context (half the context here)."""
    from gguf_tools.tiny_phimoe import phimoe_attn_factor

    _, kv, ts = _reader(tiny_gguf("phimoe", "F32"))
    assert kv["phimoe.feed_forward_length"] == F_EXP and kv["phimoe.expert_used_count"] == 2
    assert "phimoe.expert_feed_forward_length" not in kv
    assert kv["phimoe.rope.scaling.original_context_length"] == 256
    assert abs(kv["phimoe.rope.scaling.attn_factor"] - phimoe_attn_factor(512)) < 1e-6
    assert "phimoe.rope.scaling.type" not in kv  # as the converter writes it
    for name, shape in (("output_norm.bias", (D,)), ("output.bias", (512,)),
                        ("rope_factors_long.weight", (HD // 2,)),
                        ("rope_factors_short.weight", (HD // 2,))):
        assert _shape(ts[name]) == shape
    for i in range(L):
        b = f"blk.{i}."
        for n in ("attn_norm.bias", "ffn_norm.bias", "attn_output.bias"):
            assert _shape(ts[b + n]) == (D,)
        assert _shape(ts[b + "attn_q.bias"]) == (4 * HD,)
        assert _shape(ts[b + "attn_k.bias"]) == (2 * HD,)
        assert _shape(ts[b + "ffn_gate_exps.weight"]) == (D, F_EXP, E)
