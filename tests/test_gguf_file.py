"""GGUF reading: tensor references, per-expert slices, and named errors on bad files."""

from __future__ import annotations

import shutil
import struct

import gguf
import numpy as np
import pytest

import efedge
from efedge.config import config_from_gguf
from efedge.gguf_file import GGUFFile


@pytest.fixture(scope="module")
def moe_path(tiny_gguf):
    return tiny_gguf("qwen3moe", "Q4_K_M")


def test_tensor_refs_match_gguf_reader(moe_path):
    gf = GGUFFile(moe_path)
    reader = gguf.GGUFReader(moe_path)
    assert len(gf.tensors) == len(reader.tensors)
    for t in reader.tensors:
        ref = gf.tensors[t.name]
        assert ref.qtype == int(t.tensor_type)
        assert ref.shape == tuple(int(d) for d in t.shape)
        assert ref.offset == t.data_offset and ref.nbytes == t.n_bytes
        assert gf.raw(t.name).tobytes() == np.asarray(t.data).tobytes()
    gf.close()


def test_expert_slices_are_the_per_expert_bytes(moe_path):
    gf = GGUFFile(moe_path)
    cfg = config_from_gguf(gf)
    name = "blk.1.ffn_down_exps.weight"
    stacked = gf.raw(name)  # [E, rows, row_bytes]
    slices = gf.expert_slices(name)
    assert len(slices) == cfg.n_expert
    with open(moe_path, "rb") as fh:
        for s in slices:
            fh.seek(s.offset)
            assert fh.read(s.nbytes) == stacked[s.expert].tobytes()
            assert (s.rows, s.row_len) == (cfg.n_embd, cfg.n_ff_exp)
    gf.close()


def test_held_tensors_are_the_mapped_bytes(moe_path, monkeypatch):
    """efedge.held copies tensors into memory; raw() then serves the copies (read-only,
    the same bytes), and a model loads onto them unless use_mmap=True, with the same
    logits. Where they would not fit, nothing is copied and the mapping serves."""
    from efedge import held

    gf = GGUFFile(moe_path)
    mapped = {n: gf.raw(n).copy() for n in gf.tensors}
    expert = "blk.0.ffn_up_exps.weight"
    assert held.hold(gf, lambda n: n != expert) > 0
    assert expert not in gf._held and len(gf._held) == len(gf.tensors) - 1
    for n, a in mapped.items():
        v = gf.raw(n)
        assert v.shape == a.shape and np.array_equal(v, a)
        assert not v.flags.writeable
    assert gf.raw("token_embd.weight").ctypes.data % 64 == 0
    gf.close()
    monkeypatch.setattr(held, "available_bytes", lambda: 1000)
    gf = GGUFFile(moe_path)
    assert held.hold(gf) == 0 and gf._held == {}
    gf.close()
    monkeypatch.undo()
    ids = [1, 2, 3, 4]
    with efedge.load(moe_path) as a, efedge.load(moe_path, use_mmap=True) as b:
        assert held.fits(1) is (held.available_bytes() is not None)
        assert (len(a._gf._held) > 0) is held.fits(1) and b._gf._held == {}
        assert np.array_equal(a.logits(ids), b.logits(ids))
        for cache in ("resident", "auto"):  # every expert resident: all of them held
            with efedge.load(moe_path, cache=cache) as c:
                assert set(c._gf._held) == set(a._gf._held)
        with efedge.load(moe_path, cache="50%") as c:  # the experts stay in the file
            assert set(c._gf._held) == {n for n in a._gf._held if "_exps." not in n}


def _copy(src, dst_dir, name="m.gguf"):
    dst = dst_dir / name
    shutil.copy(src, dst)
    return dst


def test_truncated_file_names_the_tensor(moe_path, tmp_path):
    data = open(moe_path, "rb").read()
    path = tmp_path / "trunc.gguf"
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(efedge.ModelFormatError, match="tensor .* past the end"):
        efedge.load(path)


@pytest.mark.parametrize("cut", [0, 3, 10, 23, 100, 2000])
def test_truncated_header_is_a_format_error(moe_path, tmp_path, cut):
    path = tmp_path / "cut.gguf"
    path.write_bytes(open(moe_path, "rb").read()[:cut])
    with pytest.raises(efedge.ModelFormatError):
        efedge.load(path)


def test_bad_magic_and_version(moe_path, tmp_path):
    path = _copy(moe_path, tmp_path)
    with open(path, "r+b") as fh:
        fh.write(b"GGUX")
    with pytest.raises(efedge.ModelFormatError, match="magic"):
        efedge.load(path)
    path = _copy(moe_path, tmp_path, "v.gguf")
    with open(path, "r+b") as fh:
        fh.seek(4)
        fh.write(struct.pack("<I", 99))
    with pytest.raises(efedge.ModelFormatError, match="version 99"):
        efedge.load(path)


def test_absurd_counts_are_refused_before_parsing(moe_path, tmp_path):
    path = _copy(moe_path, tmp_path)
    with open(path, "r+b") as fh:
        fh.seek(8)
        fh.write(struct.pack("<Q", 2**62))
    with pytest.raises(efedge.ModelFormatError, match="tensors"):
        efedge.load(path)


def _rewrite(src, dst, *, arch=None, drop_key=None, set_key=None, qtype_of=None,
             split_max_tensors=0, tensor_map=None):
    """Copy a GGUF file through GGUFWriter with one change (split_max_tensors: written as
    llama.cpp's gguf-split shards beside dst instead; tensor_map: (name, data) → the
    [(name, data)] written in its place, float tensors)."""
    r = gguf.GGUFReader(src)
    old_arch = r.get_field("general.architecture").contents()
    w = gguf.GGUFWriter(dst, arch or old_arch, split_max_tensors=split_max_tensors)
    for key, field in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or key == drop_key:
            continue
        if set_key and key == set_key[0]:
            continue
        val = field.contents()
        vtype = field.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            w.add_array(key, val)
        else:
            w.add_key_value(key, val, vtype)
    if set_key:  # a uint32, or an array for a list
        (w.add_array if isinstance(set_key[1], list) else w.add_uint32)(*set_key)
    for t in r.tensors:
        if tensor_map is not None:
            for name, data in tensor_map(t.name, np.asarray(t.data)):
                w.add_tensor(name, data)
            continue
        w.add_tensor(t.name, np.asarray(t.data), raw_shape=np.asarray(t.data).shape,
                     raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def test_unknown_architecture_is_named(tiny_gguf, tmp_path):
    src = tiny_gguf("qwen3moe", "F32")
    path = _rewrite(src, tmp_path / "arch.gguf", arch="mamba9")
    with pytest.raises(efedge.UnsupportedModelError, match="mamba9"):
        efedge.load(path)


def test_missing_key_is_named(tiny_gguf, tmp_path):
    src = tiny_gguf("qwen3moe", "F32")
    path = _rewrite(src, tmp_path / "key.gguf", drop_key="qwen3moe.expert_count")
    with pytest.raises(efedge.ModelFormatError, match="qwen3moe.expert_count"):
        efedge.load(path)


def test_architecture_list_names_what_loads():
    """The supported list names each general.architecture as files spell it (a module
    name cannot hold the '.' / '-' of some), and each of them resolves."""
    from efedge import archs

    names = archs.available()
    assert {"gpt-oss", "ernie4_5-moe", "qwen3moe"} <= set(names)
    assert all(archs.get(n).name == n for n in names)
    with pytest.raises(efedge.UnsupportedModelError, match="ernie4_5-moe"):
        archs.get("ernie4-5-moe")


@pytest.mark.parametrize("change, match", [
    (dict(drop_key="ernie4_5-moe.interleave_moe_layer_step"),
     "required metadata key 'ernie4_5-moe.interleave_moe_layer_step' is missing"),
    (dict(set_key=("ernie4_5-moe.interleave_moe_layer_step", 0)), "must be at least 1"),
    # step 2: layer 2 would be dense, but the file gives it experts
    (dict(set_key=("ernie4_5-moe.interleave_moe_layer_step", 2)), "blk.2.ffn_gate.weight"),
])
def test_ernie_interleave_key_is_checked(tiny_gguf, tmp_path, change, match):
    path = _rewrite(tiny_gguf("ernie4_5-moe", "F32"), tmp_path / "e.gguf", **change)
    with pytest.raises(efedge.ModelFormatError, match=match):
        efedge.load(path)


@pytest.mark.parametrize("arch, key", [("bailingmoe", "expert_shared_count"),
                                       ("ernie4_5-moe", "expert_shared_feed_forward_length")])
def test_shared_expert_without_width_is_named(tiny_gguf, tmp_path, arch, key):
    """Shared-expert tensors whose width key is missing are an error, not left out (which
    would run a different model; llama.cpp refuses such files too)."""
    path = _rewrite(tiny_gguf(arch, "F32"), tmp_path / "s.gguf", drop_key=f"{arch}.{key}")
    with pytest.raises(efedge.ModelFormatError, match="shexp.*" + key):
        efedge.load(path)


# dots1 / hunyuan-moe: the keys llama.cpp requires (dots1's gating function too: llama.cpp
# reads it as optional, then aborts building the graph without it)
DH_REQUIRED = [("dots1", k) for k in (
    "attention.layer_norm_rms_epsilon", "leading_dense_block_count",
    "expert_feed_forward_length", "expert_shared_count", "expert_gating_func")] + [
    ("hunyuan-moe", k) for k in ("attention.layer_norm_rms_epsilon", "feed_forward_length",
                                 "expert_feed_forward_length")]


@pytest.mark.parametrize("arch, key", DH_REQUIRED)
def test_dots_hunyuan_required_keys_are_named(tiny_gguf, tmp_path, arch, key):
    path = _rewrite(tiny_gguf(arch, "F32"), tmp_path / "k.gguf", drop_key=f"{arch}.{key}")
    with pytest.raises(efedge.ModelFormatError,
                       match=f"required metadata key '{arch}.{key}' is missing"):
        efedge.load(path)


def test_dots1_without_a_gating_function_is_named(tiny_gguf, tmp_path):
    """expert_gating_func 0 (none) is what a file without the key gives llama.cpp, which
    then aborts building the graph: refused by name."""
    path = _rewrite(tiny_gguf("dots1", "F32"), tmp_path / "g.gguf",
                    set_key=("dots1.expert_gating_func", 0))
    with pytest.raises(efedge.ModelFormatError, match="'dots1.expert_gating_func' is 0"):
        efedge.load(path)


def test_dots1_with_fewer_kv_heads_is_named(tiny_gguf, tmp_path):
    """llama.cpp sizes dots1's attn_k / attn_v by head_count: a file declaring fewer kv
    heads is one it cannot load (efedge could compute it, with no reference to hold it
    to), refused naming both keys."""
    path = _rewrite(tiny_gguf("dots1", "F32"), tmp_path / "kv.gguf",
                    set_key=("dots1.attention.head_count_kv", 2))
    with pytest.raises(efedge.ModelFormatError, match="head_count_kv.*head_count"):
        efedge.load(path)


def test_shape_mismatch_is_named(tiny_gguf, tmp_path):
    src = tiny_gguf("qwen3moe", "F32")
    path = _rewrite(src, tmp_path / "shape.gguf", set_key=("qwen3moe.embedding_length", 512))
    with pytest.raises(efedge.ModelFormatError, match="tensor"):
        efedge.load(path)


def test_inspect_reports_expert_bytes(moe_path):
    from efedge.cli.inspect import describe

    info = describe(moe_path)
    assert info["architecture"] == "qwen3moe"
    assert info["experts"] == 16 and info["experts_used"] == 4
    gf = GGUFFile(moe_path)
    want = sum(gf.tensor(f"blk.{i}.ffn_{p}_exps.weight").nbytes
               for i in range(info["layers"]) for p in ("gate", "up", "down"))
    gf.close()
    assert info["expert_bytes"] == want
    assert 0 < info["expert_share"] < 1
    qts = {q for lay in info["expert_layers"] for q in lay["quant_types"].values()}
    assert qts <= {"Q4_K", "Q5_K", "Q6_K", "Q8_0"}


def test_inspect_names_the_low_bit_types(tiny_gguf):
    """efedge inspect on an IQ1_M-experts / IQ3_S-rest file: the types by name, the expert
    bytes from their block sizes (56 and 110 bytes per 256 weights)."""
    from efedge.cli.inspect import describe

    info = describe(tiny_gguf("qwen3moe", "IQ1_M/IQ3_S"))
    assert info["quant_types"].keys() == {"F32", "IQ1_M", "IQ3_S"}
    assert all(set(lay["quant_types"].values()) == {"IQ1_M"} for lay in info["expert_layers"])
    d, f, e = 256, 256, 16
    assert info["expert_bytes"] == info["layers"] * 3 * e * (d * f // 256) * 56


def test_inspect_names_the_dots_hunyuan_quirks(tiny_gguf):
    from efedge.cli.inspect import describe

    f = describe(tiny_gguf("dots1", "F32"))["features"]
    assert f["routing"] == "sigmoid" and f["selection_bias"] and f["expert_weights_norm"]
    assert f["expert_weights_scale"] == 2.5 and "qk_norm" not in f
    info = describe(tiny_gguf("hunyuan-moe", "F32"))
    assert info["dense_layers"] == [] and info["features"]["routing"] == "softmax"
    assert info["features"]["qk_norm"] == "per head, after rope"


def test_minimax_m2_selection_bias_is_required(tiny_gguf, tmp_path):
    """llama.cpp requires exp_probs_b in every minimax-m2 layer (its loader fails without
    one): a file without it is refused naming the tensor, not routed without the bias."""
    src = tiny_gguf("minimax-m2", "F32")
    path = _rewrite(src, tmp_path / "nobias.gguf", tensor_map=lambda name, data: (
        [] if name == "blk.1.exp_probs_b.bias" else [(name, data)]))
    with pytest.raises(efedge.ModelFormatError, match="blk.1.exp_probs_b.bias"):
        efedge.load(path)


def test_inspect_names_the_minimax_m2_quirks(tiny_gguf):
    from efedge.cli.inspect import describe

    info = describe(tiny_gguf("minimax-m2", "F32"))
    f = info["features"]
    assert info["dense_layers"] == [] and f["qk_norm"] == "over the whole q / k projection"
    assert f["rope"] == "neox" and f["rope_dims"] == "64 of 128"
    assert f["routing"] == "sigmoid" and f["selection_bias"] and f["expert_weights_norm"]
    assert "expert_weights_scale" not in f


def test_inspect_names_qwen3vl_and_phimoe_quirks(tiny_gguf):
    from efedge.cli.inspect import describe

    f = describe(tiny_gguf("qwen3vlmoe", "F32"))["features"]
    assert f["rope"] == "imrope (interleaved M-RoPE) sections [24, 20, 20, 0], text only"
    f = describe(tiny_gguf("phimoe", "F32"))["features"]
    assert f["norms"] == "RMS + bias" and f["routing"] == "softmax"
    assert f["rope_factors"] == "LongRoPE: long above a context of 256, else short"


def _split(src, out_dir, max_tensors: int = 12) -> list:
    """src rewritten by gguf-py as llama.cpp's gguf-split shards; returns their paths."""
    _rewrite(src, out_dir / "big.gguf", split_max_tensors=max_tensors)
    return sorted(out_dir.glob("big-*-of-*.gguf"))


def test_a_split_gguf_runs_from_its_first_shard(tiny_gguf, tmp_path):
    """llama.cpp's gguf-split shards (how large models ship): loaded from the first, the
    others found beside it; logits bit-identical to the single file's, resident and
    streamed (with a layer's gate, up and down in different shards), and llama.cpp's on
    the same shards."""
    from llama_ref import llama_logits

    src = tiny_gguf("qwen3moe", "F32")
    shards = _split(src, tmp_path)
    assert len(shards) > 2
    ids = list(range(5, 40))
    with efedge.load(src) as m:
        ref = m.logits(ids)
    for kw in ({}, {"cache": "30%", "policy": "expertflow"},
               {"cache": "30%", "policy": "ondemand", "link": "200MB/s"}):
        with efedge.load(shards[0], **kw) as m:
            assert np.array_equal(m.logits(ids), ref), kw
            store = m._experts.store
            assert store.paths == shards
            # parts of one layer in two shards: the reads take each from its own file
            assert any(len(set(row)) > 1 for row in store.shard.tolist()), store.shard
            eng = getattr(m._experts, "engine", None)  # (none when resident)
            if eng is not None and eng.reads_direct:  # … directly too, none failing
                assert eng._direct_failures == 0 and m.stats()["bytes_loaded"] > 0
    gf = GGUFFile(shards[0])
    assert gf.paths == shards and gf.file_size == sum(p.stat().st_size for p in shards)
    gf.close()
    from efedge.cli.inspect import describe

    assert describe(shards[0])["files"] == [str(p) for p in shards]
    lref = llama_logits(shards[0], ids)
    assert np.abs(ref - lref).max() / lref.std() < 2e-2


def test_split_gguf_errors_name_the_shard(tiny_gguf, tmp_path):
    shards = _split(tiny_gguf("qwen3moe", "F32"), tmp_path)
    n = len(shards)
    with pytest.raises(efedge.ModelFormatError,
                       match=rf"shard 2 of {n} of a split GGUF: load the first one, "
                             rf"big-00001-of-{n:05d}.gguf"):
        efedge.load(shards[1])
    shutil.copy(shards[0], tmp_path / "renamed.gguf")
    with pytest.raises(efedge.ModelFormatError, match="cannot be found"):
        efedge.load(tmp_path / "renamed.gguf")
    shards[-1].unlink()
    with pytest.raises(efedge.ModelFormatError,
                       match=rf"shard {n} of {n} .* is missing \({shards[-1].name}"):
        efedge.load(shards[0])
    with open(shards[1], "r+b") as fh:  # a truncated shard is named, with its tensor
        fh.truncate(shards[1].stat().st_size - 100)
    with pytest.raises(efedge.ModelFormatError, match=rf"{shards[1].name}: tensor .* past the end"):
        efedge.load(shards[0])


@pytest.mark.parametrize("arch, key", [
    ("bailingmoe2", "expert_gating_func"), ("bailingmoe2", "expert_shared_count"),
    ("bailingmoe2", "expert_feed_forward_length"), ("smallthinker", "expert_gating_func"),
    ("smallthinker", "expert_feed_forward_length"), ("minimax-m2", "expert_gating_func"),
    ("minimax-m2", "feed_forward_length"), ("minimax-m2", "expert_feed_forward_length"),
    ("minimax-m2", "attention.layer_norm_rms_epsilon"),
    ("qwen3vlmoe", "rope.dimension_sections"),
    ("qwen3vlmoe", "attention.layer_norm_rms_epsilon"),
    ("phimoe", "attention.layer_norm_rms_epsilon"), ("phimoe", "feed_forward_length")])
def test_required_keys_are_named(tiny_gguf, tmp_path, arch, key):
    """Keys llama.cpp requires (no default: the gating function decides softmax or
    sigmoid — llama.cpp's smallthinker and minimax-m2 graphs abort without one —,
    bailingmoe2's count sizes its shared experts, minimax-m2's feed_forward_length its
    experts; llama.cpp fails to load a minimax-m2 file without any of these four) are
    refused by name."""
    path = _rewrite(tiny_gguf(arch, "F32"), tmp_path / "r.gguf", drop_key=f"{arch}.{key}")
    with pytest.raises(efedge.ModelFormatError,
                       match=f"required metadata key '{arch}.{key}' is missing"):
        efedge.load(path)


@pytest.mark.parametrize("change, match", [
    # llama.cpp: "wrong array length; expected 4, got 3" (the converter pads to 4)
    (dict(set_key=("qwen3vlmoe.rope.dimension_sections", [24, 20, 20])), "invalid value"),
    # ggml takes each pair's sector modulo the sum (llama.cpp aborts on all zeros) and
    # asserts it fits the head
    (dict(set_key=("qwen3vlmoe.rope.dimension_sections", [0, 0, 0, 0])), "must sum to"),
    (dict(set_key=("qwen3vlmoe.rope.dimension_sections", [64, 64, 1, 0])), "must sum to"),
    # llama.cpp's graph asserts that the whole head turns
    (dict(set_key=("qwen3vlmoe.rope.dimension_count", 64)), "must equal the head size")])
def test_qwen3vl_rope_sections_are_checked(tiny_gguf, tmp_path, change, match):
    path = _rewrite(tiny_gguf("qwen3vlmoe", "F32"), tmp_path / "q.gguf", **change)
    with pytest.raises(efedge.ModelFormatError, match="qwen3vlmoe.rope.dimension_.*" + match):
        efedge.load(path)


@pytest.mark.parametrize("name", ["output.bias", "output.weight", "output_norm.bias",
                                  "blk.1.attn_norm.bias", "blk.1.ffn_norm.bias",
                                  "blk.1.attn_output.bias"])
def test_phimoe_required_tensors_are_named(tiny_gguf, tmp_path, name):
    """The biases llama.cpp's phimoe loader requires, and its untied head: a file without
    one is refused naming the tensor, not run without it."""
    path = _rewrite(tiny_gguf("phimoe", "F32"), tmp_path / "p.gguf",
                    tensor_map=lambda n, d: [] if n == name else [(n, d)])
    with pytest.raises(efedge.ModelFormatError, match=name.replace(".", r"\.")):
        efedge.load(path)


def test_mrope_sections_are_refused_for_other_archs(tiny_gguf, tmp_path):
    """A section key on an arch efedge runs with plain rope (a vision variant under a text
    arch's name) is refused by name, not run as plain rope."""
    path = _rewrite(tiny_gguf("qwen3moe", "F32"), tmp_path / "m.gguf",
                    set_key=("qwen3moe.rope.dimension_sections", [24, 20, 20, 0]))
    with pytest.raises(efedge.UnsupportedModelError, match="M-RoPE"):
        efedge.load(path)


def test_ling2_fused_qkv_shape_is_checked(tiny_gguf, tmp_path):
    """attn_qkv holds q, k and v rows for the heads the metadata gives: one kv head more
    and it no longer fits (named, not split at the wrong rows)."""
    path = _rewrite(tiny_gguf("bailingmoe2", "F32"), tmp_path / "b.gguf",
                    set_key=("bailingmoe2.attention.head_count_kv", 4))
    with pytest.raises(efedge.ModelFormatError, match="attn_qkv.weight"):
        efedge.load(path)


@pytest.mark.parametrize("arch", ["smallthinker", "minimax-m2"])
def test_fused_qkv_gives_the_split_logits(tiny_gguf, tmp_path, arch):
    """llama.cpp's create_tensor_qkv takes one attn_qkv where a file has it: the same
    weights fused into it give the split file's logits bit for bit (row views; llama.cpp's
    own logits are equal too, checked for minimax-m2 when it was added)."""
    src = tiny_gguf(arch, "F32")
    t = {x.name: np.asarray(x.data) for x in gguf.GGUFReader(src).tensors}

    def fuse(name, data):  # attn_q → attn_qkv (q, k, v rows); attn_k / attn_v dropped
        b = name[:-len("attn_q.weight")]
        if name.endswith("attn_q.weight"):
            return [(b + "attn_qkv.weight", np.concatenate(
                [data, t[b + "attn_k.weight"], t[b + "attn_v.weight"]]))]
        return [] if name.endswith(("attn_k.weight", "attn_v.weight")) else [(name, data)]

    _rewrite(src, tmp_path / "fused.gguf", tensor_map=fuse)
    ids = list(range(1, 17))
    with efedge.load(src) as m:
        want = m.logits(ids)
    with efedge.load(tmp_path / "fused.gguf") as m:
        assert np.array_equal(m.logits(ids), want)


@pytest.mark.requires_llama_cpp
def test_an_attention_output_bias_is_refused_unless_llama_cpp_ignores_it(tiny_gguf, tmp_path):
    """llama.cpp adds a llama file's attn_output.bias (efedge's attention has none: run
    without it the logits were ~4 spreads off, silently); ernie4_5-moe's it loads and never
    adds, so efedge ignores it there too — the same logits as without it."""
    import llama_ref
    from test_parity import _copy_with

    for arch, refused in (("mixtral", True), ("ernie4_5-moe", False)):
        src = tiny_gguf(arch, "F32")
        with efedge.load(src) as m:
            d = m.config.n_embd
            ids = list(range(1, 9))
            plain = m.logits(ids)
        dst = tmp_path / f"{arch}-bo.gguf"
        _copy_with(src, dst, {f"blk.{i}.attn_output.bias": np.full(d, 0.5, np.float32)
                              for i in range(m.config.n_layer)})
        if refused:
            with pytest.raises(efedge.UnsupportedModelError, match="attn_output.bias"):
                efedge.load(dst)
            # llama.cpp does add it: the file is another model than the plain one
            assert not np.allclose(llama_ref.llama_logits(dst, ids), plain, atol=1e-2)
        else:
            with efedge.load(dst) as m:
                np.testing.assert_array_equal(m.logits(ids), plain)
            np.testing.assert_allclose(llama_ref.llama_logits(dst, ids),
                                       llama_ref.llama_logits(src, ids), atol=1e-5)
