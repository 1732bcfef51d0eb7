"""efedge's forward pass against llama.cpp (llama-cpp-python) on the same GGUF files.

F32/F16: max|Δ| / std(logits) ≤ 2e-2 and identical argmax at every position.
Quantized: cosine ≥ 0.995 and argmax agreement ≥ 90% (llama.cpp quantizes activations to
8 bits for its dot products, so near-tied routing can flip; efedge computes exactly).
"""

from __future__ import annotations

import numpy as np
import pytest

import efedge

pytest.importorskip("llama_cpp")
import llama_ref  # noqa: E402  (tests/ is on sys.path under pytest)

ARCHS = ["llama", "mixtral", "qwen2moe", "qwen3moe", "olmoe", "qwen2", "qwen3"]
FLOAT_QUANTS = ["F32", "F16"]
QUANTS = ["Q8_0", "Q4_0", "Q4_K_M", "Q6_K", "Q2_K", "IQ4_NL"]
N_TOKENS = 32


def _tokens(n_vocab: int, n: int = N_TOKENS, seed: int = 7) -> list[int]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, n_vocab, size=n).tolist()


def _compare(path):
    with efedge.load(path) as m:
        ids = _tokens(m.n_vocab)
        ours = m.logits(ids)
    ref = llama_ref.llama_logits(path, ids)
    assert ours.shape == ref.shape
    assert np.isfinite(ours).all()
    return ours, ref


def _assert_float_match(path) -> None:
    """Every position within 2% of the logits' spread, but for at most one of the 32:
    on random weights the 8th and 9th expert can be a near-tie that the last bits of a
    float sum decide, and llama.cpp's sums depend on the CPU it was built for (built on
    a CPU with AVX-512, its plain kernels flip one expert of the tiny glm4moe F16 file
    at one position, which moves that position's logits by a whole spread)."""
    _assert_float_close(*_compare(path))


def _assert_float_close(ours: np.ndarray, ref: np.ndarray) -> None:
    """_assert_float_match's rule on two [positions, vocab] logit arrays."""
    rel = np.abs(ours - ref).max(-1) / ref.std()
    close = rel <= 2e-2
    assert (~close).sum() <= 1, f"max|Δ|/std per position: {np.round(rel, 3)}"
    assert (ours.argmax(-1) == ref.argmax(-1))[close].all()


def _assert_quantized_match(path) -> None:
    _assert_close_quantized(*_compare(path))


def _assert_close_quantized(ours: np.ndarray, ref: np.ndarray) -> None:
    """8-bit activations turn last-bit differences into the odd flipped rounding (and, on
    random weights, a flipped expert): logits close, the top token mostly the same."""
    cos = (ours * ref).sum(-1) / (np.linalg.norm(ours, axis=-1) * np.linalg.norm(ref, axis=-1))
    agree = (ours.argmax(-1) == ref.argmax(-1)).mean()
    assert cos.min() >= 0.995, f"min cosine {cos.min():.5f}"
    assert agree >= 0.9, f"argmax agreement {agree:.2f}"


def _assert_greedy_match(path) -> None:
    with efedge.load(path) as m:
        prompt = _tokens(m.n_vocab, 8, seed=3)
        ours = _greedy_ids(m, prompt, 32)
    assert ours == llama_ref.llama_greedy(path, prompt, 32)


@pytest.mark.parametrize("quant", FLOAT_QUANTS)
@pytest.mark.parametrize("arch", ARCHS)
def test_float_logits_match_llama_cpp(tiny_gguf, arch, quant):
    _assert_float_match(tiny_gguf(arch, quant))


@pytest.mark.parametrize("quant", QUANTS)
@pytest.mark.parametrize("arch", ARCHS)
def test_quantized_logits_match_llama_cpp(tiny_gguf, arch, quant):
    _assert_quantized_match(tiny_gguf(arch, quant))


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_continuation_matches_llama_cpp(tiny_gguf, arch):
    _assert_greedy_match(tiny_gguf(arch, "F32"))


def _greedy_ids(m: efedge.Model, prompt: list[int], n: int) -> list[int]:
    """Greedy ids through the same prefill / decode path that generate() uses (EOG ignored,
    as llama_greedy does)."""
    session = m._session
    session.reset()
    logits = session.prefill(prompt)
    out = []
    for _ in range(n):
        tok = int(np.argmax(logits))
        out.append(tok)
        logits = session.decode(tok)
    return out


def resident_and_streamed(path, ids: list[int], n_greedy: int, cache: str = "50%"):
    """(resident logits, greedy ids), then the same through an expert cache of `cache`,
    and that model's stats and expert store: a streamed run must repeat the resident one
    bit for bit."""
    with efedge.load(path) as m:
        resident = m.logits(ids), _greedy_ids(m, ids[:8], n_greedy)
    with efedge.load(path, cache=cache) as m:
        streamed = m.logits(ids), _greedy_ids(m, ids[:8], n_greedy)
        return resident, streamed, m.stats(), m._tf.store


# -- issue 10: granitemoe, deepseek2, gpt-oss; glm4moe ------------------------------------
# Each at F32 / F16 and at the quant type its real checkpoints use (Q4_K_M; gpt-oss: MXFP4
# experts with Q8_0 elsewhere, llama.cpp's MXFP4_MOE). The variants at F32 only: granite
# with a shared expert, DeepSeek-V3-style routing (sigmoid, selection bias, groups), the
# legacy unsplit attn_kv_b layout and GLM-4.5's per-head qk norm (glm4moe is Air-shaped:
# none). tests/test_glm4moe.py adds glm4moe through the expert cache.
NEW_ARCHS = ["granitemoe", "deepseek2", "gpt-oss", "glm4moe", "ernie4_5-moe", "bailingmoe"]
NEW_FLOAT = [(a, q) for a in NEW_ARCHS for q in FLOAT_QUANTS] + [
    ("granitemoeshared", "F32"), ("deepseek2-v3", "F32"), ("deepseek2-legacy", "F32"),
    ("glm4moe-qknorm", "F32")]
NEW_QUANT = [("granitemoe", "Q4_K_M"), ("deepseek2", "Q4_K_M"), ("gpt-oss", "MXFP4_MOE"),
             ("glm4moe", "Q4_K_M"), ("ernie4_5-moe", "Q4_K_M"), ("bailingmoe", "Q4_K_M")]


@pytest.mark.parametrize("arch, quant", NEW_FLOAT)
def test_new_arch_float_logits_match_llama_cpp(tiny_gguf, arch, quant):
    _assert_float_match(tiny_gguf(arch, quant))


@pytest.mark.parametrize("arch, quant", NEW_QUANT)
def test_new_arch_quantized_logits_match_llama_cpp(tiny_gguf, arch, quant):
    _assert_quantized_match(tiny_gguf(arch, quant))


@pytest.mark.parametrize("arch", NEW_ARCHS + ["glm4moe-qknorm"])
def test_new_arch_greedy_continuation_matches_llama_cpp(tiny_gguf, arch):
    _assert_greedy_match(tiny_gguf(arch, "F32"))


@pytest.mark.parametrize("arch", ["deepseek2", "gpt-oss", "glm4moe", "ernie4_5-moe",
                                  "bailingmoe"])
def test_new_arch_expert_cache_is_exact(tiny_gguf, arch):
    """Through a small expert cache the logits are the resident ones bit for bit: the
    dense leading layer and the shared experts (deepseek2, glm4moe, ernie4_5-moe,
    bailingmoe) are never cache traffic, the expert biases (gpt-oss) stay resident beside
    the router."""
    path = tiny_gguf(arch, "F32")
    ids = _tokens(512, 24, seed=5)
    with efedge.load(path) as m:
        want = m.logits(ids)
    with efedge.load(path, cache="30%", policy="expertflow") as m:
        got = m.logits(ids)
        store, stats = m._tf.store, m.stats()
    assert np.array_equal(got, want)
    dense = [il for il in range(m.config.n_layer) if not m.config.is_moe_layer(il)]
    assert all(store.expert_bytes(il) == 0 for il in dense)
    assert dense == ([0] if arch in ("deepseek2", "glm4moe", "ernie4_5-moe") else [])
    per_expert = store.expert_bytes(store.moe_layers[0])  # one size: an F32 file
    assert stats["bytes_loaded"] > 0 and stats["bytes_loaded"] % per_expert == 0


# -- ernie4_5-moe (dense lead, selection bias, ungated shared expert, interleaved layers)
# -- and bailingmoe (ungated shared experts, routing weights renormalised and scaled) ----
@pytest.mark.parametrize("quant", ["F16", "Q4_K_M"])
@pytest.mark.parametrize("arch", ["ernie4_5-moe", "bailingmoe"])
def test_streamed_matches_llama_cpp(tiny_gguf, arch, quant):
    """Resident and through an expert cache of half the experts (expertflow), logits equal
    llama.cpp's (the tolerances above) and each other bit for bit; greedy decode (the
    fused one-token path, the routing redone after the kernel's router) gives the same
    tokens either way: llama.cpp's at F16; on the K-quant, where a near tie (a top-2 gap
    of 0.02 against 0.1 of 8-bit rounding) may pick another token, llama.cpp's argmax on
    the same tokens agrees at ≥ 90% of the steps, the quantized rule."""
    _assert_streamed_match(tiny_gguf(arch, quant), quant)


def _assert_streamed_match(path, quant: str) -> None:
    """test_streamed_matches_llama_cpp's checks on one file (F32 and F16: the float
    tolerances, other types the quantized rule)."""
    ids = _tokens(512)
    ref = llama_ref.llama_logits(path, ids)
    prompt = _tokens(512, 8, seed=3)
    got, greedy = {}, {}
    for cache in (None, "50%"):
        with efedge.load(path, cache=cache) as m:
            got[cache] = m.logits(ids)
            greedy[cache] = _greedy_ids(m, prompt, 24)
            if cache:
                s = m.stats()
                # requests that needed a load (what on-demand loading would load): a miss,
                # or a prefetch that served one — smallthinker asks for every layer's
                # experts before its attention, so when those land in time none misses
                assert s["misses"] + s["prefetch_used"] > 0 and s["bytes_loaded"] > 0
    assert np.array_equal(got[None], got["50%"])
    assert greedy[None] == greedy["50%"]
    ours = got[None]
    if quant in ("F32", "F16"):
        # (one position may be a near-tied expert that llama.cpp's sums decide the
        # other way: this AVX2-only EPYC's build flips one in the bailingmoe F16 file)
        _assert_float_close(ours, ref)
        assert greedy[None] == llama_ref.llama_greedy(path, prompt, 24)
    else:
        cos = (ours * ref).sum(-1) / (np.linalg.norm(ours, axis=-1)
                                      * np.linalg.norm(ref, axis=-1))
        assert cos.min() >= 0.995 and (ours.argmax(-1) == ref.argmax(-1)).mean() >= 0.9
        steps = llama_ref.llama_logits(path, prompt + greedy[None])[len(prompt) - 1:-1]
        assert (steps.argmax(-1) == np.array(greedy[None])).mean() >= 0.9


def test_ernie_selection_bias_decides(tiny_gguf):
    """The tiny file's exp_probs_b changes which experts run: routing without it is off
    from llama.cpp by far more than the tolerance (so the parity tests see the bias)."""
    path = tiny_gguf("ernie4_5-moe", "F32")
    ids = _tokens(512)
    ref = llama_ref.llama_logits(path, ids)
    with efedge.load(path) as m:
        assert all(b.exp_probs_b is not None for b in m._tf.blocks if b.moe)
        for b in m._tf.blocks:
            b.exp_probs_b = None
        off = m.logits(ids)
    assert np.abs(off - ref).max() / ref.std() > 0.1


@pytest.mark.parametrize("change", [dict(expert_weights_scale=0.0),
                                    dict(expert_weights_norm=False)])
def test_bailing_routing_weights_decide(tiny_gguf, change):
    """The tiny bailingmoe file's weights norm and scale both show in the logits: either
    one dropped is off from llama.cpp by far more than the tolerance."""
    import dataclasses

    path = tiny_gguf("bailingmoe", "F32")
    ids = _tokens(512)
    ref = llama_ref.llama_logits(path, ids)
    with efedge.load(path) as m:
        assert m.config.expert_weights_norm and m.config.expert_weights_scale == 2.0
        m._tf.cfg = dataclasses.replace(m._tf.cfg, **change)
        off = m.logits(ids)
    assert np.abs(off - ref).max() / ref.std() > 0.1


def _copy_with(src, dst, extra: dict, keys: dict | None = None) -> None:
    """Copy a GGUF file, metadata and tensors, adding the float32 tensors in `extra` and
    the metadata `keys` (uint32, float32 for a float, bool for a bool, an array for a
    list; replacing a key the file has)."""
    import gguf

    r = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(dst, r.get_field("general.architecture").contents())
    for key, field in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or key in (keys or {}):
            continue
        if field.types[0] == gguf.GGUFValueType.ARRAY:
            w.add_array(key, field.contents())
        else:
            w.add_key_value(key, field.contents(), field.types[0])
    for t in r.tensors:
        w.add_tensor(t.name, np.asarray(t.data), raw_shape=np.asarray(t.data).shape,
                     raw_dtype=t.tensor_type)
    for key, val in (keys or {}).items():
        add = (w.add_bool if isinstance(val, bool) else w.add_float32 if isinstance(val, float)
               else w.add_array if isinstance(val, list) else w.add_uint32)  # list: int32s
        add(key, val)
    for name, data in extra.items():
        w.add_tensor(name, data.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("arch", ["ernie4_5-moe", "bailingmoe"])
def test_optional_attention_biases_match_llama_cpp(tiny_gguf, tmp_path, arch):
    """llama.cpp adds a q / k / v bias wherever a file has one, for every arch with
    standard attention (create_tensor_qkv, build_qkv); efedge too, each on its own: here
    q and k biases, no v bias. Prefill and greedy decode against llama.cpp."""
    src = tiny_gguf(arch, "F32")
    rng = np.random.default_rng(4)
    extra = {}
    for il in range(3):
        extra[f"blk.{il}.attn_q.bias"] = 0.5 * rng.standard_normal(256)  # 4 heads × 64
        extra[f"blk.{il}.attn_k.bias"] = 0.5 * rng.standard_normal(128)  # 2 kv heads × 64
    path = tmp_path / "bias.gguf"
    _copy_with(src, path, extra)
    ids = _tokens(512)
    ref, plain = llama_ref.llama_logits(path, ids), llama_ref.llama_logits(src, ids)
    assert np.abs(ref - plain).max() / ref.std() > 0.1  # the biases change the model
    prompt = _tokens(512, 8, seed=3)
    with efedge.load(path) as m:
        ours = m.logits(ids)
        greedy = _greedy_ids(m, prompt, 24)
    assert np.abs(ours - ref).max() / ref.std() <= 2e-2
    assert (ours.argmax(-1) == ref.argmax(-1)).all()
    assert greedy == llama_ref.llama_greedy(path, prompt, 24)


def test_ernie_expert_groups_match_llama_cpp(tiny_gguf, tmp_path):
    """llama.cpp reads expert_group_count / expert_group_used_count for every arch and
    then picks experts from the best groups only: an ernie4_5-moe file with 4 groups of 4
    experts, 2 used, selection bias included, gives llama.cpp's logits and tokens."""
    src, path = tiny_gguf("ernie4_5-moe", "F32"), tmp_path / "groups.gguf"
    _copy_with(src, path, {}, {"ernie4_5-moe.expert_group_count": 4,
                               "ernie4_5-moe.expert_group_used_count": 2})
    ids = _tokens(512)
    ref = llama_ref.llama_logits(path, ids)
    assert np.abs(ref - llama_ref.llama_logits(src, ids)).max() / ref.std() > 0.1
    prompt = _tokens(512, 8, seed=3)
    with efedge.load(path) as m:
        assert (m.config.n_expert_groups, m.config.n_group_used) == (4, 2)
        ours = m.logits(ids)
        greedy = _greedy_ids(m, prompt, 24)
    assert np.abs(ours - ref).max() / ref.std() <= 2e-2
    assert (ours.argmax(-1) == ref.argmax(-1)).all()
    assert greedy == llama_ref.llama_greedy(path, prompt, 24)


def _dense_as_moe(src, dst, layers: tuple[int, ...]) -> None:
    """Rewrite an ernie4_5-moe-interleave file so that llama.cpp loads it: the dense FFNs
    of `layers` become MoE layers whose experts are all that FFN (a zero router: uniform
    probabilities; the k weights renormalised to 1, so the layer computes the FFN), the
    interleave step 1 and the dense lead 1 (layer 0 stays dense)."""
    import gguf

    r = gguf.GGUFReader(src)
    arch = "ernie4_5-moe"
    w = gguf.GGUFWriter(dst, arch)
    step, lead = f"{arch}.interleave_moe_layer_step", f"{arch}.leading_dense_block_count"
    for key, field in r.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", step, lead):
            continue
        if field.types[0] == gguf.GGUFValueType.ARRAY:
            w.add_array(key, field.contents())
        else:
            w.add_key_value(key, field.contents(), field.types[0])
    w.add_interleave_moe_layer_step(1)
    w.add_leading_dense_block_count(1)
    n_expert = r.get_field(f"{arch}.expert_count").contents()
    for t in r.tensors:
        data = np.asarray(t.data)
        il = int(t.name.split(".")[1]) if t.name.startswith("blk.") else -1
        part = t.name.split(".")[2] if il >= 0 else ""
        if il in layers and part in ("ffn_gate", "ffn_up", "ffn_down"):
            if part == "ffn_gate":
                w.add_tensor(f"blk.{il}.ffn_gate_inp.weight",
                             np.zeros((n_expert, data.shape[1]), np.float32))
            w.add_tensor(f"blk.{il}.{part}_exps.weight",
                         np.ascontiguousarray(np.broadcast_to(data, (n_expert, *data.shape))))
        else:
            w.add_tensor(t.name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_ernie_interleaved_matches_llama_cpp_through_an_equivalent_file(tiny_gguf, tmp_path):
    """llama.cpp 0.3.36 cannot load dense layers between MoE ones, but it loads the same
    model with those dense FFNs written as MoE layers whose experts all equal them: its
    logits and greedy tokens on that file are the reference for efedge's interleaved
    file (prefill and the fused decode of a dense layer inside a MoE model)."""
    src = tiny_gguf("ernie4_5-moe-interleave", "F32", n_layer=5, n_ff=256)  # n_ff = n_ff_exp
    dst = tmp_path / "dense-as-moe.gguf"
    _dense_as_moe(src, dst, (2, 4))
    ids = _tokens(512)
    ref = llama_ref.llama_logits(dst, ids)
    prompt = _tokens(512, 8, seed=3)
    with efedge.load(src) as m:
        assert [m.config.is_moe_layer(i) for i in range(5)] == [False, True, False, True,
                                                                False]
        ours = m.logits(ids)
        greedy = _greedy_ids(m, prompt, 24)
    assert np.abs(ours - ref).max() / ref.std() <= 2e-2
    assert (ours.argmax(-1) == ref.argmax(-1)).all()
    assert greedy == llama_ref.llama_greedy(dst, prompt, 24)


@pytest.mark.parametrize("policy", ["ondemand", "expertflow", "fixed:2", "next-layer"])
def test_ernie_interleaved_dense_layers_stream_exactly(tiny_gguf, policy):
    """interleave_moe_layer_step 2 over 5 layers: experts in layers 1 and 3, dense FFNs in
    0, 2 and 4 (llama.cpp 0.3.36 cannot load this layout: tests/test_make_tiny.py). The
    dense layers between MoE layers are no cache traffic, the policies' layer stream
    skips them, and prefill and decode through the cache give the resident bits."""
    path = tiny_gguf("ernie4_5-moe-interleave", "F32", n_layer=5)
    ids = _tokens(512, 24, seed=5)
    prompt = _tokens(512, 6, seed=2)
    with efedge.load(path) as m:
        assert [m.config.is_moe_layer(i) for i in range(5)] == [False, True, False, True,
                                                                False]
        want = m.logits(ids)
        want_greedy = _greedy_ids(m, prompt, 16)
        s = m._session
        s.reset()
        s.prefill(ids[:23])
        decoded = s.decode(ids[23])  # the fused one-token path against the T-token one
    rel = np.abs(decoded.reshape(-1) - want[23]).max() / want.std()
    assert rel <= 1e-3, rel
    with efedge.load(path, cache="30%", policy=policy) as m:
        src, targets = m._experts, []
        plain = src.prefetch

        def prefetch(layer, experts, *a, **kw):  # what the policy asks for, and where
            targets.append(layer)
            return plain(layer, experts, *a, **kw)

        src.prefetch = prefetch
        plain_plan = src.prefetch_plan

        def prefetch_plan(plan, *a):  # expertflow's plans, issued in one call
            targets.extend(plan.layer[:plan.n].tolist())
            return plain_plan(plan, *a)

        src.prefetch_plan = prefetch_plan
        if policy == "expertflow":  # τ from the layers that have experts, not a 0 mean
            assert src.policy._mean_bytes == m._tf.store.expert_bytes(1)
        assert np.array_equal(m.logits(ids), want)
        assert _greedy_ids(m, prompt, 16) == want_greedy
        st, store = m.stats(), m._tf.store
    assert store.moe_layers == [1, 3]
    assert all(store.expert_bytes(il) == 0 for il in (0, 2, 4))
    assert st["hits"] + st["late"] + st["misses"] == st["expert_requests"] > 0
    assert st["bytes_loaded"] % store.expert_bytes(1) == 0
    assert set(targets) <= {1, 3}  # the look-ahead steps over the dense layers
    if policy == "expertflow":  # … and reaches the next MoE layer two layers on
        assert st["prefetch_issued"] > 0 and st["prefetch_used"] > 0


# -- rope scaling (llama.cpp applies it to every architecture) ---------------------------
# YaRN as DeepSeek-V2(-Lite) (with yarn_log_multiplier: scores scaled by mscale²), gpt-oss
# (cos / sin scaled by mscale; here also its own rope base on the sliding-window layers)
# and qwen3moe files carry it; linear scaling with an attn_factor; llama-3's
# rope_freqs.weight. The tiny files put YaRN's ramp mid-way through the rope dims.
ROPE_CASES = [("deepseek2", dict(rope_scaling="yarn")),
              ("gpt-oss", dict(rope_scaling="yarn", rope_base_swa=5000.0)),
              ("qwen3moe", dict(rope_scaling="yarn")),
              ("mixtral", dict(rope_scaling="linear")),
              ("mixtral", dict(rope_scaling="llama3"))]


def _case_id(case) -> str:
    return f"{case[0]}-{case[1]['rope_scaling']}"


@pytest.mark.parametrize("arch, kw", ROPE_CASES, ids=[_case_id(c) for c in ROPE_CASES])
def test_rope_scaling_logits_match_llama_cpp(tiny_gguf, arch, kw):
    _assert_float_match(tiny_gguf(arch, "F32", n_layer=2, **kw))


@pytest.mark.parametrize("arch, kw", ROPE_CASES[:3], ids=[_case_id(c) for c in ROPE_CASES[:3]])
def test_rope_scaling_greedy_matches_llama_cpp(tiny_gguf, arch, kw):
    _assert_greedy_match(tiny_gguf(arch, "F32", n_layer=2, **kw))


def test_unsupported_rope_scaling_is_refused(tmp_path, monkeypatch):
    """A rope scaling type efedge does not compute (longrope) is named, not ignored."""
    import gguf

    from gguf_tools import make_tiny

    plain = make_tiny._write_rope_scaling

    def longrope(w, cfg, arch):
        plain(w, cfg, arch)
        w.add_rope_scaling_type(gguf.RopeScalingType.LONGROPE)

    monkeypatch.setattr(make_tiny, "_write_rope_scaling", longrope)
    path = make_tiny.write_tiny(tmp_path / "longrope.gguf", "gpt-oss", "F32", n_layer=1)
    with pytest.raises(efedge.UnsupportedModelError, match="rope.scaling.type.*longrope"):
        efedge.load(path)


@pytest.mark.parametrize("arch", ["deepseek2", "gpt-oss", "glm4moe", "ernie4_5-moe",
                                  "bailingmoe"])
def test_cache_aware_routing_is_refused_for_non_softmax_routing(tiny_gguf, arch):
    """Cache-aware routing swaps experts by router probability: deepseek2's and gpt-oss's
    routing has no such single probability, so asking for it is refused by name."""
    path = tiny_gguf(arch, "F32")
    with pytest.raises(efedge.UnsupportedModelError, match="cache-aware.*" + arch):
        efedge.load(path, cache="30%", routing="cache-aware")


# -- prompts at an offset, and long prompts ----------------------------------------------
# A chat turn prefills only what is new: T > 1 tokens at a position > 0 (the cached prefix
# reused), through every attention kind (fused, deepseek2's MLA, gpt-oss's sinks with the
# sliding window crossed). The last logits equal llama.cpp's for the whole sequence.
@pytest.mark.parametrize("arch", ["qwen3moe", "deepseek2", "gpt-oss", "glm4moe",
                                  "ernie4_5-moe"])
def test_prefill_at_an_offset_matches_llama_cpp(tiny_gguf, arch):
    path = tiny_gguf(arch, "F32")
    ids = _tokens(512, 40, seed=9)
    ref = llama_ref.llama_logits(path, ids)
    with efedge.load(path) as m:
        s = m._session
        s.reset()
        got = {n: s.prefill(ids[:n]) for n in (5, 17, 40, 12, 33)}  # grow, shrink, regrow
    for n, row in got.items():
        rel = np.abs(row - ref[n - 1]).max() / ref.std()
        assert rel <= 2e-2 and row.argmax() == ref[n - 1].argmax(), f"n={n}: {rel:.3g}"


@pytest.mark.parametrize("arch", ["qwen3moe", "deepseek2", "gpt-oss", "granitemoe", "glm4moe"])
def test_long_prompt_matches_llama_cpp(tiny_gguf, arch):
    """1000 tokens (past every tile of 8, 256 and llama.cpp's batch of 512), then greedy
    decode. A random model has a few near-tied routings in 1000 positions (a gap of 1e-5
    between the k-th and k+1-th router logit), where 1e-6 of rounding picks another expert:
    those rows may differ, no more than 1% of them."""
    path = tiny_gguf(arch, "F32", n_ctx=2048)
    ids = _tokens(512, 1000, seed=11)
    ref = llama_ref.llama_logits(path, ids, n_ctx=1100)
    with efedge.load(path, n_ctx=1100) as m:
        ours = m.logits(ids)
        greedy = _greedy_ids(m, ids[:513], 12)
    rel = np.abs(ours - ref).max(-1) / ref.std()
    assert (rel > 2e-2).mean() <= 0.01, f"rows off: {np.flatnonzero(rel > 2e-2)}"
    assert (ours.argmax(-1) == ref.argmax(-1)).mean() >= 0.99
    assert greedy == llama_ref.llama_greedy(path, ids[:513], 12, n_ctx=1100)


# -- the low-bit IQ1 / IQ2 / IQ3 and ternary types ----------------------------------------
# What users download for models larger than their memory (unsloth's dynamic quants of
# DeepSeek, Qwen3-235B, GLM). llama.cpp's quantizer wants an importance matrix for most of
# them, so these files hold random valid blocks (gguf_tools.random_quant): every matrix of
# the type, or "experts/the rest". Same tolerance as the other quantized files; through a
# half-size expert cache the logits are the resident ones bit for bit.
LOW_BIT = ["IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ1_S", "IQ1_M", "TQ1_0",
           "TQ2_0", "IQ1_S/IQ3_S"]
LOW_BIT_ARCHS = [("mixtral", "IQ2_XXS"), ("qwen2moe", "IQ1_M/IQ3_XXS"),
                 ("deepseek2", "IQ2_S/IQ3_S"), ("gpt-oss", "IQ2_XXS"), ("olmoe", "TQ2_0/IQ2_XS"),
                 ("glm4moe", "IQ1_M/IQ3_S"), ("ernie4_5-moe", "IQ1_S/IQ2_S"),
                 ("bailingmoe", "IQ2_XS/IQ3_XXS")]


def _assert_low_bit_match(path) -> None:
    _assert_quantized_match(path)
    ids = _tokens(512, 24, seed=5)
    with efedge.load(path) as m:
        want = m.logits(ids)
    with efedge.load(path, cache="50%", policy="expertflow") as m:
        got = m.logits(ids)
        stats = m.stats()
    assert np.array_equal(got, want)
    assert stats["bytes_loaded"] > 0 and stats["misses"] + stats["late"] > 0


@pytest.mark.parametrize("quant", LOW_BIT)
def test_low_bit_logits_match_llama_cpp(tiny_gguf, quant):
    _assert_low_bit_match(tiny_gguf("qwen3moe", quant))


@pytest.mark.parametrize("arch, quant", LOW_BIT_ARCHS)
def test_low_bit_other_archs_match_llama_cpp(tiny_gguf, arch, quant):
    _assert_low_bit_match(tiny_gguf(arch, quant))


@pytest.mark.parametrize("quant", LOW_BIT)
def test_low_bit_greedy_matches_llama_cpp(tiny_gguf, quant):
    """32 greedy tokens equal llama.cpp's up to the first near tie. 8-bit activations turn
    the last-bit differences of the float path (a few positions of a random model differ by
    ~3e-5 even at F32) into the odd flipped rounding (K-quant files too: max|Δ|/std up to
    ~0.05 at single positions), so over 32 steps a continuation can reach a step whose top
    two logits llama.cpp itself separates by less than that; there either token is right
    and the continuations part (IQ2_XXS and IQ1_S here: gaps of 0.5% and 1.8% of the
    logits' std, at steps 6 and 8)."""
    path = tiny_gguf("qwen3moe", quant)
    with efedge.load(path) as m:
        prompt = _tokens(m.n_vocab, 8, seed=3)
        ours = _greedy_ids(m, prompt, 32)
    ref = llama_ref.llama_greedy(path, prompt, 32)
    if ours == ref:
        return
    i = next(i for i, (a, b) in enumerate(zip(ours, ref, strict=True)) if a != b)
    logits = llama_ref.llama_logits(path, prompt + ref[:i])
    top = np.sort(logits[-1])[::-1]
    assert top[0] - top[1] < 0.03 * logits.std(), (
        f"greedy tokens part at step {i} where llama.cpp's top-2 gap is {top[0] - top[1]:.3g}")


@pytest.mark.parametrize("tied", [False, True], ids=["output", "tied"])
def test_low_bit_embeddings_match_llama_cpp(tmp_path, monkeypatch, tied):
    """token_embd itself in a low-bit type (rows looked up by dequantizing them) and, with
    no output.weight, the output head too."""
    from gguf_tools import make_tiny, random_quant

    plain = random_quant.tensor_type

    def with_embd(spec, name, *args):
        return spec[1] if name == "token_embd.weight" else plain(spec, name, *args)

    monkeypatch.setattr(random_quant, "tensor_type", with_embd)
    path = make_tiny.write_tiny(tmp_path / "embd.gguf", "qwen3moe", "IQ2_XS/IQ3_XXS",
                                tied=tied)
    import gguf

    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    assert types["token_embd.weight"] == "IQ3_XXS" and ("output.weight" in types) != tied
    _assert_low_bit_match(path)


# -- gpt-oss's experts in one kernel call (moe_ffn_oai / decode_ffn_oai) -------------------
def _prefill_and_decode(m: efedge.Model, prompt: list[int], n: int):
    """(prompt logits [T, V], greedy ids, the decode steps' logits [n, V])."""
    want = m.logits(prompt)
    session = m._session
    session.reset()
    logits = session.prefill(prompt)
    ids, steps = [], []
    for _ in range(n):
        tok = int(np.argmax(logits))
        ids.append(tok)
        logits = session.decode(tok)
        steps.append(np.array(logits, np.float32).reshape(-1))
    return want, ids, np.stack(steps)


@pytest.mark.parametrize("budget", ["25%", "100%"])
def test_gpt_oss_mxfp4_streamed_equals_resident_and_llama_cpp(tiny_gguf, budget):
    """gpt-oss with MXFP4 experts (llama.cpp's MXFP4_MOE): the resident experts (every
    expert of a layer in one kernel call, prefill and decode) and the expert cache at
    25% / 100% of the expert bytes (experts as the cache hands them out) give the same
    logits bit for bit, prompt and every decode step; the greedy tokens are llama.cpp's."""
    path = tiny_gguf("gpt-oss", "MXFP4_MOE")
    with efedge.load(path) as m:
        prompt = _tokens(m.n_vocab, 12, seed=9)
        want = _prefill_and_decode(m, prompt, 16)
    with efedge.load(path, cache=budget, policy="expertflow") as m:
        got = _prefill_and_decode(m, prompt, 16)
        loaded = m.stats()["bytes_loaded"]
    assert np.array_equal(got[0], want[0])
    assert got[1] == want[1]
    assert np.array_equal(got[2], want[2])
    assert loaded > 0
    _assert_greedy_until_tie(want[1], want[2], llama_ref.llama_greedy(path, prompt, 16))


def _assert_greedy_until_tie(ours: list[int], steps: np.ndarray, ref: list[int]) -> None:
    """Quantized greedy runs: our tokens are llama.cpp's until a step where llama.cpp's
    token is tied with ours in our logits (within 2% of their std). llama.cpp sums the
    MXFP4 products in another order; on a random tiny model a decode step's top two
    logits can be closer than that (seen: 0.006 apart, std 2)."""
    # steps[i]: the logits after token i, which choose token i + 1
    for i, (a, b) in enumerate(zip(ours, ref, strict=True)):
        if a != b:
            assert i > 0, "the first token differs"
            row = steps[i - 1]
            assert row[a] - row[b] <= 0.02 * row.std(), (i, a, b, float(row[a] - row[b]))
            return


@pytest.mark.parametrize("arch,quant", [("deepseek2-lite", "F32"), ("deepseek2-v3", "F32"),
                                        ("deepseek2-legacy", "F32"), ("deepseek2", "Q4_K_M")])
def test_one_token_decode_steps_equal_the_batched_forward(tiny_gguf, arch, quant):
    """deepseek2's fused one-token latent attention (kernels.decode_mla: with and without
    the q lora, V3 routing, the legacy attn_kv_b layout, quantized rows) against the
    T-token path on the same
    sequence: the logits after every decode step are the batched forward's rows up to
    float summation order, which the f16 rounding of attention weights can turn into a
    last-place step (~1e-3 of the spread at most, as the batched path decoding one token
    at a time shows too); a quantized file is held to what llama.cpp's logits are (its
    8-bit activations flip on last-bit differences). A wrong kernel is off by O(1)."""
    path = tiny_gguf(arch, quant)
    ids = _tokens(512, 28, seed=17)
    with efedge.load(path) as m:
        whole = m.logits(ids)
        s = m._session
        s.reset()
        rows = [np.asarray(s.prefill(ids[:3])).reshape(-1)]
        rows += [np.asarray(s.decode(t)).reshape(-1) for t in ids[3:]]
    got, ref = np.stack(rows), whole[2:]
    if quant != "F32":  # as the quantized files are held to llama.cpp's logits
        _assert_close_quantized(got, ref)
        return
    rel = np.abs(got - ref).max(-1) / ref.std()
    assert (rel <= 5e-3).all(), f"steps off: {np.flatnonzero(rel > 5e-3)} {rel.max():.3g}"
    assert (got.argmax(-1) == ref.argmax(-1)).all()


@pytest.mark.parametrize("arch", ["gpt-oss", "deepseek2", "deepseek2-legacy", "qwen2moe"])
def test_one_token_decode_steps_match_llama_cpp(tiny_gguf, arch):
    """The fused one-token step of the layouts whose decode differs most from prefill:
    gpt-oss's (sinks, the sliding window crossed, biases, router top-k then softmax, the
    experts' kernel), deepseek2's (latent attention on one row, then the K experts and the
    shared expert in the fused kernels; split and legacy MLA caches), qwen2moe's gated
    shared expert beside resident experts: every decode step's logits are llama.cpp's
    for the same sequence."""
    from gguf_tools.tiny_archs import OSS_WINDOW

    _assert_decode_steps_match(tiny_gguf(arch, "F32"), OSS_WINDOW + 24)


def _assert_decode_steps_match(path, n: int) -> None:
    """n random tokens, the first 4 prefilled, then one decode step each: every step's
    logits are llama.cpp's for the same sequence (max|Δ|/std ≤ 2e-2, the same argmax)."""
    ids = _tokens(512, n, seed=13)
    ref = llama_ref.llama_logits(path, ids)[3:-1]  # the logits after ids[3] .. ids[-2]
    with efedge.load(path) as m:
        s = m._session
        s.reset()
        rows = [np.asarray(s.prefill(ids[:4])).reshape(-1)]
        rows += [np.asarray(s.decode(t)).reshape(-1) for t in ids[4:-1]]
    got = np.stack(rows)
    rel = np.abs(got - ref).max(-1) / ref.std()
    assert (rel <= 2e-2).all(), f"steps off: {np.flatnonzero(rel > 2e-2)} {rel.max():.3g}"
    assert (got.argmax(-1) == ref.argmax(-1)).all()


def _assert_torch_path_matches_cpu(path, cache: str) -> None:
    """device="cuda"'s path on torch's CPU device: resident, and streamed through `cache`
    with every miss computed on the host (hybrid), the CPU path's logits (cosine ≥
    0.99999, same argmax)."""
    pytest.importorskip("torch")
    from efedge.gpu import load_cuda_model

    ids = _tokens(512, 20, seed=3)
    with efedge.load(path) as m:
        ref = m.logits(ids)
    for conf in (dict(), dict(cache=cache, policy="expertflow", hybrid="always", dense=False,
                               ubatch=7)):
        with load_cuda_model(path, device="cpu", n_ctx=64, **conf) as g:
            out = g.forward(ids, 0, g.new_kv_cache(64))
            cos = (out * ref).sum(-1) / (np.linalg.norm(out, axis=-1)
                                         * np.linalg.norm(ref, axis=-1))
            assert cos.min() >= 0.99999 and (out.argmax(-1) == ref.argmax(-1)).all(), conf
            if conf:
                assert g.extra_stats()["hybrid_cpu_experts"] > 0


# -- the K-quant mixes with integer kernels (Q5_K_M, Q3_K_M / Q3_K_L, Q2_K, IQ4_XS) -------
# What users download for big MoEs on small machines. Each file holds its type in the
# experts (checked: llama.cpp's quantizer falls back to other types for rows it cannot
# split), and both the prefill product and the decode row kernels meet it.
INT_MIXES = {"Q5_K_M": "Q5_K", "Q3_K_M": "Q3_K", "Q3_K_L": "Q3_K", "Q2_K": "Q2_K",
             "IQ4_XS": "IQ4_XS"}


@pytest.mark.parametrize("quant", list(INT_MIXES))
def test_k_mix_prefill_and_decode_match_llama_cpp(tiny_gguf, quant):
    from efedge.gguf_file import GGUFFile

    path = tiny_gguf("qwen3moe", quant)
    f = GGUFFile(path)
    try:
        types = {t.qtype_name for n, t in f.tensors.items() if "_exps" in n}
    finally:
        f.close()
    assert INT_MIXES[quant] in types, types
    _assert_quantized_match(path)  # prefill
    ids = _tokens(512, 24, seed=13)
    ref = llama_ref.llama_logits(path, ids)
    with efedge.load(path) as m:
        s = m._session
        s.reset()
        s.prefill(ids[:4])
        ours = np.stack([s.decode(t) for t in ids[4:]])  # positions 4 .. 23
    ref = ref[4:]
    cos = (ours * ref).sum(-1) / (np.linalg.norm(ours, axis=-1) * np.linalg.norm(ref, axis=-1))
    assert cos.min() >= 0.995, f"decode: min cosine {cos.min():.5f}"
    assert (ours.argmax(-1) == ref.argmax(-1)).mean() >= 0.9


# -- dots1 (dots.llm1) and hunyuan-moe (Hunyuan-A13B) -----------------------------------
# dots1: dense first layer, per-head qk norm before rope, sigmoid routing with a selection
# bias, weights renormalised and scaled by 2.5, two shared experts. hunyuan-moe: the qk
# norm after rope, softmax top-k renormalised, an ungated shared expert of its own width.
# The dots1 files are seed 3: seed 0's hold a near tie of the sigmoid selection scores in
# these prompts (a gap of 3e-4 between the 4th and 5th expert), which the last bits of the
# F16 sums decide either way — a property of that random model, not of the arithmetic.
DH_KW = {"dots1": dict(seed=3), "hunyuan-moe": {}}


@pytest.mark.parametrize("quant", ["F32", "F16", "Q4_K_M"])
@pytest.mark.parametrize("arch", list(DH_KW))
def test_dots_hunyuan_resident_and_streamed_match_llama_cpp(tiny_gguf, arch, quant):
    """Logits and greedy tokens against llama.cpp, resident and through an expert cache of
    half the experts (bitwise the resident logits): _assert_streamed_match."""
    _assert_streamed_match(tiny_gguf(arch, quant, **DH_KW[arch]), quant)


@pytest.mark.parametrize("part", ["gating", "selection_bias", "weights_norm",
                                  "weights_scale"])
def test_dots1_routing_parts_decide(tiny_gguf, part):
    """Each part of the tiny dots1 file's routing shows in the logits: computed without it
    (softmax instead of sigmoid, no exp_probs_b, no renormalising, no 2.5 scale) they are
    off from llama.cpp by far more than the tolerance."""
    import dataclasses

    path = tiny_gguf("dots1", "F32", **DH_KW["dots1"])
    ids = _tokens(512)
    ref = llama_ref.llama_logits(path, ids)
    with efedge.load(path) as m:
        c = m.config
        assert (c.gating, c.expert_weights_norm, c.expert_weights_scale) == ("sigmoid", True,
                                                                               2.5)
        assert c.n_dense_lead == 1 and c.n_ff_shexp == 2 * c.n_ff_exp
        change = {"gating": dict(gating="softmax"), "weights_norm": dict(
            expert_weights_norm=False), "weights_scale": dict(expert_weights_scale=0.0)}
        if part == "selection_bias":
            assert all(b.exp_probs_b is not None for b in m._tf.blocks if b.moe)
            for b in m._tf.blocks:
                b.exp_probs_b = None
        else:
            m._tf.cfg = dataclasses.replace(c, **change[part])
        off = m.logits(ids)
    assert np.abs(off - ref).max() / ref.std() > 0.1


# -- bailingmoe2 (Ling 2.0: fused attn_qkv, per-head qk norm, partial neox rope, a dense
# first layer, sigmoid routing with a selection bias and expert groups, weights norm and
# scale, shared experts sized width × count, one trailing MTP layer) -----------------------
@pytest.mark.parametrize("quant", FLOAT_QUANTS)
def test_ling2_float_logits_match_llama_cpp(tiny_gguf, quant):
    _assert_float_match(tiny_gguf("bailingmoe2", quant))


def test_ling2_quantized_logits_match_llama_cpp(tiny_gguf):
    _assert_quantized_match(tiny_gguf("bailingmoe2", "Q4_K_M"))


def test_ling2_greedy_continuation_matches_llama_cpp(tiny_gguf):
    _assert_greedy_match(tiny_gguf("bailingmoe2", "F32"))


@pytest.mark.parametrize("quant", ["F16", "Q4_K_M"])
def test_ling2_streamed_matches_llama_cpp(tiny_gguf, quant):
    """Resident and through a 50% expert cache: llama.cpp's logits, the same bits either
    way, the same greedy tokens (test_streamed_matches_llama_cpp's checks)."""
    test_streamed_matches_llama_cpp(tiny_gguf, "bailingmoe2", quant)


def test_ling2_cache_aware_routing_is_refused(tiny_gguf):
    test_cache_aware_routing_is_refused_for_non_softmax_routing(tiny_gguf, "bailingmoe2")


def test_ling2_prefill_at_an_offset_matches_llama_cpp(tiny_gguf):
    test_prefill_at_an_offset_matches_llama_cpp(tiny_gguf, "bailingmoe2")


@pytest.mark.parametrize("change", ["exp_probs_b", "groups", "scale", "norm", "rope_dim"])
def test_ling2_quirks_decide(tiny_gguf, change):
    """Each quirk of the tiny bailingmoe2 file shows in the logits: without the selection
    bias, the expert groups, the weights scale or norm, or with the whole head rotated,
    efedge is off from llama.cpp by far more than the tolerance — so the parity tests
    above see every one of them. (The shared experts' width × count: the file's key
    says 128, its tensors hold 256, which the shape check refuses unless multiplied.)"""
    import dataclasses

    path = tiny_gguf("bailingmoe2", "F32")
    ids = _tokens(512)
    ref = llama_ref.llama_logits(path, ids)
    with efedge.load(path) as m:
        tf, c = m._tf, m.config
        assert c.n_layer == 3 and c.n_nextn == 1 and not c.is_moe_layer(0)
        assert c.rope_dim == c.head_dim // 2 and c.n_ff_shexp == 2 * (c.n_ff_exp // 2)
        assert (c.gating, c.n_expert_groups, c.expert_weights_scale) == ("sigmoid", 4, 2.5)
        blocks = [b for b in tf.blocks if b.moe]
        if change == "exp_probs_b":
            for b in blocks:
                b.exp_probs_b = None
        else:
            new = {"groups": dict(n_expert_groups=0), "scale": dict(expert_weights_scale=0.0),
                   "norm": dict(expert_weights_norm=False),
                   "rope_dim": dict(rope_dim=c.head_dim)}[change]
            tf.cfg = dataclasses.replace(c, **new)
            tf._rope.clear()
        off = m.logits(ids)
    assert np.abs(off - ref).max() / ref.std() > 0.1


def test_hunyuan_qk_norm_after_rope_decides(tiny_gguf, monkeypatch):
    """The tiny hunyuan-moe file's q / k norm sits after rope: the same weights with the
    norm before rope (Qwen3's place) are off from llama.cpp by far more than the
    tolerance, prefill and decode."""
    import dataclasses

    from efedge.archs import hunyuan_moe

    path = tiny_gguf("hunyuan-moe", "F32")
    ids = _tokens(512)
    ref = llama_ref.llama_logits(path, ids)
    monkeypatch.setattr(hunyuan_moe, "SPEC", dataclasses.replace(hunyuan_moe.SPEC,
                                                                 qk_norm="head"))
    with efedge.load(path) as m:
        off = m.logits(ids)
        s = m._session
        s.reset()
        s.prefill(ids[:4])
        step = np.asarray(s.decode(ids[4])).reshape(-1)
    assert np.abs(off - ref).max() / ref.std() > 0.1
    assert np.abs(step - ref[4]).max() / ref.std() > 0.1


def test_hunyuan_keys_llama_cpp_ignores(tiny_gguf, tmp_path):
    """Keys a hunyuan-moe file may carry that llama.cpp 0.3.36 reads but does not apply to
    this arch: the NTK alpha (the converter already folded it into rope.freq_base; only
    hunyuan-dense / -vl rescale the base by it), a weights scale (its routing reads no
    keys) and an experts' width key unlike the experts (it sizes them by
    feed_forward_length). Its logits with the keys are the plain file's, and efedge's are
    bit for bit its own."""
    src, path = tiny_gguf("hunyuan-moe", "F32"), tmp_path / "with.gguf"
    _copy_with(src, path, {}, {"hunyuan-moe.rope.scaling.alpha": 1000.0,
                               "hunyuan-moe.expert_weights_scale": 2.0,
                               "hunyuan-moe.expert_feed_forward_length": 512})
    ids = _tokens(512)
    assert np.array_equal(llama_ref.llama_logits(path, ids), llama_ref.llama_logits(src, ids))
    with efedge.load(src) as m:
        want = m.logits(ids)
    with efedge.load(path) as m:
        assert m.config.n_ff_exp == 256
        assert np.array_equal(m.logits(ids), want)


def test_dots_hunyuan_cache_aware_routing(tiny_gguf):
    """dots1 routes by sigmoid scores with a selection bias (no single router probability
    to swap by): cache-aware routing is refused by name. hunyuan-moe routes by softmax
    top-k: its fused one-token steps reroute to cached experts."""
    with pytest.raises(efedge.UnsupportedModelError, match="cache-aware.*dots1"):
        efedge.load(tiny_gguf("dots1", "F32", **DH_KW["dots1"]), cache="30%",
                    routing="cache-aware")
    ids = _tokens(512, 12, seed=5)
    steps = {}
    for routing in ("exact", "cache-aware"):
        with efedge.load(tiny_gguf("hunyuan-moe", "F32"), cache="30%", policy="ondemand",
                         routing=routing, routing_slack=0.5) as m:
            s = m._session
            s.prefill(ids[:4])
            steps[routing] = np.concatenate([s.decode(t) for t in ids[4:]])
            assert (m.stats()["substitutions"] > 0) == (routing == "cache-aware")
    assert not np.array_equal(steps["exact"], steps["cache-aware"])


# -- smallthinker (SmallThinker-21B-A3B: the router on the layer's input, before attention;
# ReLU experts; sigmoid / softmax gating, weights renormalised; NoPE and sliding-window
# layers when attention.sliding_window is set; -softmax: softmax gating, no window) -------
ST_ARCHS = ["smallthinker", "smallthinker-softmax"]


@pytest.mark.parametrize("quant", FLOAT_QUANTS)
@pytest.mark.parametrize("arch", ST_ARCHS)
def test_smallthinker_float_logits_match_llama_cpp(tiny_gguf, arch, quant):
    _assert_float_match(tiny_gguf(arch, quant))


def test_smallthinker_quantized_logits_match_llama_cpp(tiny_gguf):
    _assert_quantized_match(tiny_gguf("smallthinker", "Q4_K_M"))


@pytest.mark.parametrize("arch", ST_ARCHS)
def test_smallthinker_greedy_continuation_matches_llama_cpp(tiny_gguf, arch):
    _assert_greedy_match(tiny_gguf(arch, "F32"))


@pytest.mark.parametrize("quant", ["F16", "Q4_K_M"])
def test_smallthinker_streamed_matches_llama_cpp(tiny_gguf, quant):
    """Resident and through a 50% expert cache (each layer's experts asked for before its
    attention): llama.cpp's logits, the same bits either way, the same greedy tokens."""
    test_streamed_matches_llama_cpp(tiny_gguf, "smallthinker", quant)


def test_smallthinker_prefill_at_an_offset_matches_llama_cpp(tiny_gguf):
    test_prefill_at_an_offset_matches_llama_cpp(tiny_gguf, "smallthinker")


def test_smallthinker_cache_aware_routing_is_refused(tiny_gguf):
    test_cache_aware_routing_is_refused_for_non_softmax_routing(tiny_gguf, "smallthinker")


@pytest.mark.parametrize("change", ["relu", "router_input", "nope", "norm"])
def test_smallthinker_quirks_decide(tiny_gguf, change):
    """Each quirk of the tiny smallthinker file shows in the logits: SiLU experts instead of
    ReLU, the router on the FFN's input instead of the layer's, rope on the NoPE layer, or
    the weights not renormalised: each is off from llama.cpp by far more than the
    tolerance, so the parity tests above see them all."""
    import dataclasses

    path = tiny_gguf("smallthinker", "F32")
    ids = _tokens(512)
    ref = llama_ref.llama_logits(path, ids)
    with efedge.load(path) as m:
        tf, c = m._tf, m.config
        assert (c.nope_step, c.swa_pattern, c.sliding_window) == (4, 2, 4096)
        assert [c.is_nope_layer(i) for i in range(3)] == [True, False, False]
        assert [c.is_swa_layer(i) for i in range(3)] == [False, True, False]
        if change == "relu":
            for b in tf.blocks:
                b.experts.act, b.experts.act_args = 0, ()
        elif change == "router_input":
            tf.cfg = dataclasses.replace(c, spec=dataclasses.replace(c.spec, router_input="ffn"))
        elif change == "nope":
            tf.cfg = dataclasses.replace(c, nope_step=0)
            tf._rope.clear()
        else:
            tf.cfg = dataclasses.replace(c, expert_weights_norm=False)
        off = m.logits(ids)
    assert np.abs(off - ref).max() / ref.std() > 0.1


def test_smallthinker_window_prefill_and_decode_agree(tiny_gguf):
    """The sliding window (4096 in real use) shrunk to 6 positions: a prompt's logits from
    one prefill and token by token (the fused decode, its KV view starting at the window)
    agree, and differ from the whole-context ones — the window is applied on both paths."""
    import dataclasses

    path = tiny_gguf("smallthinker", "F32")
    ids = _tokens(512, 20, seed=4)
    with efedge.load(path) as m:
        full = m.logits(ids)
        m._tf.cfg = dataclasses.replace(m.config, sliding_window=6)
        windowed = m.logits(ids)
        s = m._session
        s.reset()
        steps = [s.prefill(ids[:1])] + [s.decode(t) for t in ids[1:]]
    steps = np.stack([np.asarray(r).reshape(-1) for r in steps])
    assert np.abs(steps - windowed).max() / windowed.std() <= 1e-3
    assert np.abs(windowed[:6] - full[:6]).max() / full.std() <= 1e-3  # nothing dropped yet
    assert np.abs(windowed[6:] - full[6:]).max() / full.std() > 0.1


@pytest.mark.slow
def test_smallthinker_window_matches_llama_cpp_past_4096(tiny_gguf):
    """Past llama.cpp's forced window of 4096 positions: a 4200-token prompt's last logits
    and a greedy decode beyond it equal llama.cpp's (the window's layers drop the oldest
    keys, the others keep them)."""
    path = tiny_gguf("smallthinker", "F32", n_ctx=8192)
    ids = _tokens(512, 4200, seed=12)
    ref = llama_ref.llama_logits(path, ids, n_ctx=4300)
    with efedge.load(path, n_ctx=4300) as m:
        s = m._session
        s.reset()
        last = s.prefill(ids[:4150])
        steps = [last] + [s.decode(t) for t in ids[4150:4199]]
    ours = np.stack([np.asarray(r).reshape(-1) for r in steps])
    want = ref[4149:4199]
    rel = np.abs(ours - want).max(-1) / want.std()
    # measured: 2e-4 at most; without the window the worst row is off by 0.97
    assert rel.max() <= 2e-2, np.round(rel, 3)
    assert (ours.argmax(-1) == want.argmax(-1)).all()


def test_smallthinker_early_requests_keep_the_bits(tiny_gguf):
    """Asking the cache for a layer's experts before its attention (the default) and when
    the layer runs give the same logits bit for bit; asked early, more of them are ready
    (or loading) when the layer asks."""
    path = tiny_gguf("smallthinker", "Q4_K_M")
    ids = _tokens(512, 24, seed=5)
    prompt = _tokens(512, 6, seed=2)
    out = {}
    for early in (True, False):
        with efedge.load(path, cache="50%", policy="ondemand", link="200MB/s") as m:
            m._tf.early_requests = early
            logits = m.logits(ids)
            greedy = _greedy_ids(m, prompt, 12)
            out[early] = (logits, greedy, m.stats())
    assert np.array_equal(out[True][0], out[False][0]) and out[True][1] == out[False][1]
    on, off = out[True][2], out[False][2]
    assert off["prefetch_issued"] == 0 < on["prefetch_issued"]
    assert on["misses"] < off["misses"]


# -- minimax-m2 (MiniMax-M2 / M2.1: the q / k RMS norm over the whole projection, not per
# head; neox rope on half of each head; GQA with heads × head size twice the width; every
# layer MoE, sigmoid routing with a selection bias in every layer, the k weights always
# renormalised and never scaled; no shared expert) ---------------------------------------
@pytest.mark.parametrize("quant", ["F32", "F16", "Q4_K_M"])
def test_minimax_m2_resident_and_streamed_match_llama_cpp(tiny_gguf, quant):
    """Logits and greedy tokens against llama.cpp, resident and through an expert cache of
    half the experts (bitwise the resident logits): _assert_streamed_match."""
    _assert_streamed_match(tiny_gguf("minimax-m2", quant), quant)


def test_minimax_m2_float_logits_every_position(tiny_gguf):
    """The F16 file position by position at the float tolerance (_assert_float_match)."""
    _assert_float_match(tiny_gguf("minimax-m2", "F16"))


def test_minimax_m2_prefill_at_an_offset_matches_llama_cpp(tiny_gguf):
    test_prefill_at_an_offset_matches_llama_cpp(tiny_gguf, "minimax-m2")


def test_minimax_m2_cache_aware_routing_is_refused(tiny_gguf):
    test_cache_aware_routing_is_refused_for_non_softmax_routing(tiny_gguf, "minimax-m2")


def _per_head_qk(prefill_qk):
    """prefill_qk whose whole-projection q / k norm (mode 2) is an RMS over each head
    instead, with the same weights: the per-head reading of minimax-m2's norm."""
    def per_head(q, k, v, qn, kn, mode, eps, cos, sin, neox, n_head, n_head_kv, hd, *rest):
        if mode == 2:
            def norm(x, w, n):
                x3 = x.reshape(x.shape[0], n, hd)
                r = 1.0 / np.sqrt((x3 * x3).mean(-1, keepdims=True) + eps)
                return np.ascontiguousarray((x3 * r).reshape(x.shape) * w, np.float32)
            q, k, mode = norm(q, qn, n_head), norm(k, kn, n_head_kv), 0
        return prefill_qk(q, k, v, qn, kn, mode, eps, cos, sin, neox, n_head, n_head_kv, hd,
                          *rest)
    return per_head


@pytest.mark.parametrize("change", ["per_head_qk_norm", "no_qk_norm", "rope_dim",
                                    "normal_rope", "exp_probs_b", "gating", "norm"])
def test_minimax_m2_quirks_decide(tiny_gguf, monkeypatch, change):
    """Each quirk of the tiny minimax-m2 file shows in the logits: the q / k norm taken per
    head (the same weights) or left out, the whole head rotated, adjacent pairs rotated
    instead of the halves, no selection bias, softmax gating, or the k weights not
    renormalised — each is off from llama.cpp by far more than the tolerance, so the
    parity tests above see them all."""
    import dataclasses

    from efedge.kernels import prefill

    path = tiny_gguf("minimax-m2", "F32")
    ids = _tokens(512)
    ref = llama_ref.llama_logits(path, ids)
    with efedge.load(path) as m:
        tf, c = m._tf, m.config
        assert (c.head_dim, c.rope_dim, c.n_head * c.head_dim) == (128, 64, 2 * c.n_embd)
        assert c.n_head_kv < c.n_head and all(b.moe for b in tf.blocks)
        assert (c.gating, c.expert_weights_norm, c.expert_weights_scale) == ("sigmoid", True,
                                                                               0.0)
        assert all(b.exp_probs_b is not None and b.qk_norm == "full" for b in tf.blocks)
        spec = c.spec
        if change == "per_head_qk_norm":
            monkeypatch.setattr(prefill, "prefill_qk", _per_head_qk(prefill.prefill_qk))
        elif change == "no_qk_norm":
            for b in tf.blocks:
                b.qk_norm = "none"
                b._decode_args(c)
        elif change == "exp_probs_b":
            for b in tf.blocks:
                b.exp_probs_b = None
        else:
            new = {"rope_dim": dict(rope_dim=c.head_dim),
                   "normal_rope": dict(spec=dataclasses.replace(spec, rope_style="normal")),
                   "gating": dict(gating="softmax"),
                   "norm": dict(expert_weights_norm=False)}[change]
            tf.cfg = dataclasses.replace(c, **new)
            tf._rope.clear()
        off = m.logits(ids)
    assert np.abs(off - ref).max() / ref.std() > 0.1


def test_minimax_m2_keys_llama_cpp_ignores(tiny_gguf, tmp_path):
    """Keys a minimax-m2 file may carry that llama.cpp 0.3.36 does not read for this arch
    (llama_model_minimax_m2::load_arch_hparams reads the norm epsilon, the experts' width
    and the gating function only; its graph renormalises the k weights always, and the
    weights scale it passes stays 0: none): a weights scale, expert_weights_norm false,
    and an experts' width unlike the experts (it sizes them by feed_forward_length). Its
    logits with the keys are the plain file's, and efedge's are bit for bit its own."""
    src, path = tiny_gguf("minimax-m2", "F32"), tmp_path / "with.gguf"
    _copy_with(src, path, {}, {"minimax-m2.expert_weights_scale": 2.5,
                               "minimax-m2.expert_weights_norm": False,
                               "minimax-m2.expert_feed_forward_length": 512})
    ids = _tokens(512)
    assert np.array_equal(llama_ref.llama_logits(path, ids), llama_ref.llama_logits(src, ids))
    with efedge.load(src) as m:
        want = m.logits(ids)
    with efedge.load(path) as m:
        c = m.config
        assert (c.n_ff_exp, c.expert_weights_norm, c.expert_weights_scale) == (256, True, 0.0)
        assert np.array_equal(m.logits(ids), want)


def test_minimax_m2_expert_groups_match_llama_cpp(tiny_gguf, tmp_path):
    """llama.cpp reads expert_group_count / _used_count for every arch and masks the
    selection to the best groups (the released MiniMax-M2 has none): with 4 groups of
    which 2 compete, efedge's logits still equal llama.cpp's, and differ from the
    ungrouped file's."""
    src, path = tiny_gguf("minimax-m2", "F32"), tmp_path / "groups.gguf"
    _copy_with(src, path, {}, {"minimax-m2.expert_group_count": 4,
                               "minimax-m2.expert_group_used_count": 2})
    ids = _tokens(512)
    ref = llama_ref.llama_logits(path, ids)
    with efedge.load(path) as m:
        assert (m.config.n_expert_groups, m.config.n_group_used) == (4, 2)
        ours = m.logits(ids)
    assert np.abs(ours - ref).max() / ref.std() <= 2e-2
    assert (ours.argmax(-1) == ref.argmax(-1)).all()
    assert np.abs(ref - llama_ref.llama_logits(src, ids)).max() / ref.std() > 0.1


# -- qwen3vlmoe (Qwen3-VL-30B-A3B's text model: qwen3moe with interleaved M-RoPE, head size
# 128 and the real files' sections [24, 20, 20, 0]) ---------------------------------------
@pytest.mark.parametrize("quant", FLOAT_QUANTS)
def test_qwen3vl_float_logits_match_llama_cpp(tiny_gguf, quant):
    _assert_float_match(tiny_gguf("qwen3vlmoe", quant))


def test_qwen3vl_quantized_logits_match_llama_cpp(tiny_gguf):
    _assert_quantized_match(tiny_gguf("qwen3vlmoe", "Q4_K_M"))


def test_qwen3vl_greedy_continuation_matches_llama_cpp(tiny_gguf):
    _assert_greedy_match(tiny_gguf("qwen3vlmoe", "F32"))


@pytest.mark.parametrize("quant", ["F16", "Q4_K_M"])
def test_qwen3vl_streamed_matches_llama_cpp(tiny_gguf, quant):
    """Resident and through a 50% expert cache: llama.cpp's logits, the same bits either
    way, the same greedy tokens (test_streamed_matches_llama_cpp's checks)."""
    _assert_streamed_match(tiny_gguf("qwen3vlmoe", quant), quant)


@pytest.mark.parametrize("sections", [[24, 20, 20, 0], [8, 8, 8, 8]])
def test_qwen3vl_imrope_decides(tiny_gguf, tmp_path, sections):
    """llama.cpp's IMROPE on text tokens: the pairs whose sector falls to the 4th section
    do not turn (pairs 61, 62 of the real sections; with [8, 8, 8, 8] the sector wraps
    every 32 pairs and 16 of the 64 do not). At rope base 10 those pairs turn fast under
    plain neox rope: efedge matches llama.cpp, prefill and one-token decode, and the same
    weights with every pair turned are off by far more than the tolerance. (At the real
    base, 5e6, the difference is below 1e-5 rad per position.)"""
    import dataclasses

    from efedge import rope

    path = tmp_path / "s.gguf"
    _copy_with(tiny_gguf("qwen3vlmoe", "F32", rope_base=10.0), path, {},
               {"qwen3vlmoe.rope.dimension_sections": sections})
    still = rope.imrope_fourth_pairs(tuple(sections), 64)
    assert still.nonzero()[0].tolist() == ([61, 62] if sections[0] == 24 else
                                           [*range(24, 32), *range(56, 64)])
    ids = _tokens(512)
    ref = llama_ref.llama_logits(path, ids)
    off = {}
    for plain in (False, True):
        with efedge.load(path) as m:
            assert m.config.rope_sections == tuple(sections)
            if plain:
                m._tf.cfg = dataclasses.replace(m.config, rope_sections=())
                m._tf._rope.clear()  # the tables the warm-up built
            ours = m.logits(ids)
            s = m._session
            s.reset()
            s.prefill(ids[:6])
            step = np.asarray(s.decode(ids[6])).reshape(-1)
        off[plain] = (np.abs(ours - ref).max() / ref.std(),
                      np.abs(step - ref[6]).max() / ref.std())
    assert max(off[False]) <= 2e-2 and min(off[True]) > 0.1, off


def test_qwen3vl_weights_scale_is_ignored(tiny_gguf, tmp_path):
    """An expert_weights_scale key changes nothing in llama.cpp 0.3.36's qwen3vlmoe (as
    for qwen3moe) and nothing here."""
    src, path = tiny_gguf("qwen3vlmoe", "F32"), tmp_path / "w.gguf"
    _copy_with(src, path, {}, {"qwen3vlmoe.expert_weights_scale": 2.0})
    ids = _tokens(512, 12)
    assert np.array_equal(llama_ref.llama_logits(path, ids), llama_ref.llama_logits(src, ids))
    with efedge.load(src) as m:
        want = m.logits(ids)
    with efedge.load(path) as m:
        assert np.array_equal(m.logits(ids), want)


# -- phimoe (Phi-3.5-MoE as llama.cpp's phi3 graph runs it: RMS norms with biases, q / k /
# v, attention-output and head biases, LongRoPE factors and attn_factor, softmax top-2
# renormalised; the tiny file's original context is 256 of its 512) -----------------------
@pytest.mark.parametrize("quant", FLOAT_QUANTS)
def test_phimoe_float_logits_match_llama_cpp(tiny_gguf, quant):
    _assert_float_match(tiny_gguf("phimoe", quant))


def test_phimoe_quantized_logits_match_llama_cpp(tiny_gguf):
    _assert_quantized_match(tiny_gguf("phimoe", "Q4_K_M"))


def test_phimoe_greedy_continuation_matches_llama_cpp(tiny_gguf):
    _assert_greedy_match(tiny_gguf("phimoe", "F32"))


@pytest.mark.parametrize("quant", ["F16", "Q4_K_M"])
def test_phimoe_streamed_matches_llama_cpp(tiny_gguf, quant):
    """Resident and through a 50% expert cache (decode on the T-token path): llama.cpp's
    logits, the same bits either way, the same greedy tokens."""
    _assert_streamed_match(tiny_gguf("phimoe", quant), quant)


def test_phimoe_short_factors_up_to_the_original_context(tiny_gguf):
    """llama.cpp divides theta by the short LongRoPE factors when its context, rounded up
    to a multiple of 256, is at most the original one (256 here), else by the long ones:
    at n_ctx 256 efedge matches llama.cpp at 256, and at 257 (rounded: 512) it takes the
    long factors, whose logits are off from the short ones by far more than the
    tolerance."""
    path = tiny_gguf("phimoe", "F32")
    ids = _tokens(512)
    ref = llama_ref.llama_logits(path, ids, n_ctx=256)
    with efedge.load(path, n_ctx=256) as m:
        short = m.logits(ids)
        assert np.array_equal(m._tf.rope_freqs, np.linspace(1.0, 1.5, 32, dtype=np.float32))
    with efedge.load(path, n_ctx=257) as m:
        long = m.logits(ids)
        assert m._tf.rope_freqs.max() == 8.0
    assert np.abs(short - ref).max() / ref.std() <= 2e-2
    assert (short.argmax(-1) == ref.argmax(-1)).all()
    assert np.abs(long - ref).max() / ref.std() > 0.1


@pytest.mark.parametrize("change", ["norm_bias", "attn_output_bias", "head_bias",
                                    "attn_factor", "renormalise"])
def test_phimoe_quirks_decide(tiny_gguf, change):
    """Each quirk of the tiny phimoe file shows in the logits: without the norms' biases,
    the attention output's or the head's bias, rope's attn_factor, or with the top-2
    weights left unnormalised, efedge is off from llama.cpp by far more than the
    tolerance, so the parity tests above see them all."""
    import dataclasses

    path = tiny_gguf("phimoe", "F32")
    ids = _tokens(512)
    ref = llama_ref.llama_logits(path, ids)
    with efedge.load(path) as m:
        tf, c = m._tf, m.config
        assert c.n_ff_exp == 256 and c.n_expert_used == 2 and not c.spec.fused_decode
        if change == "norm_bias":
            tf.output_norm_b = None
            for b in tf.blocks:
                b.attn_norm_b = b.ffn_norm_b = None
        elif change == "attn_output_bias":
            for b in tf.blocks:
                b.attn_output_b = None
        elif change == "head_bias":
            tf.output_b = None
        elif change == "attn_factor":
            tf.cfg = dataclasses.replace(c, rope_scaling=dataclasses.replace(
                c.rope_scaling, attn_factor=1.0))
            tf._rope.clear()
        else:
            tf.cfg = dataclasses.replace(c, spec=dataclasses.replace(c.spec, norm_topk=False))
        off = m.logits(ids)
    assert np.abs(off - ref).max() / ref.std() > 0.1



@pytest.mark.parametrize("arch", ["qwen3", "qwen3moe", "glm4moe"])
def test_decode_attention_sees_only_read_only_weights(tiny_gguf, arch):
    """numba compiles a kernel once per argument types, read-only or not included: a
    dense layer's empty router (qwen3) or one routed after the kernel (glm4moe's sigmoid)
    writable where real weights are read-only made decode_attn compile twice."""
    with efedge.load(tiny_gguf(arch, "F32")) as m:
        for blk in m._tf.blocks:
            raw = [a for a in blk.decode_args if isinstance(a, np.ndarray) and a.dtype == np.uint8]
            assert len(raw) == 5 and not any(a.flags.writeable for a in raw)
