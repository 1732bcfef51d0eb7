"""`efedge inspect MODEL [--json]`: what the file holds and how much of it is experts."""

from __future__ import annotations

import argparse
import json
from collections import Counter

from efedge.cli.common import model_arg, user_path
from efedge.config import config_from_gguf
from efedge.gguf_file import GGUFFile


def add_parser(sub) -> None:
    p = sub.add_parser("inspect", help="describe a GGUF model file",
                       description="Architecture, layers, experts and their byte sizes.")
    p.add_argument("model", nargs="?", default=None,
                   help="GGUF model file (default: the embedded demo model)")
    p.add_argument("-m", "--model", dest="model_flag", default=None, help=argparse.SUPPRESS)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=main)


def describe(path) -> dict:
    gf = GGUFFile(path)
    try:
        cfg = config_from_gguf(gf)
        types = Counter(t.qtype_name for t in gf.tensors.values())
        tensor_bytes = sum(t.nbytes for t in gf.tensors.values())
        # the MTP blocks after the trunk (glm4moe's nextn layers): in the file, never read
        mtp = tuple(f"blk.{il}." for il in range(cfg.n_layer, cfg.n_layer + cfg.n_nextn))
        mtp_bytes = sum(t.nbytes for t in gf.tensors.values() if t.name.startswith(mtp))
        layers = []
        expert_bytes = 0
        for il in range(cfg.n_layer):
            if not cfg.is_moe_layer(il):
                continue  # dense models, deepseek2's leading dense layers
            parts = {p: gf.tensor(f"blk.{il}.ffn_{p}_exps.weight") for p in ("gate", "up", "down")}
            per_expert = sum(t.nbytes // cfg.n_expert for t in parts.values())
            expert_bytes += per_expert * cfg.n_expert
            layers.append({"layer": il, "experts": cfg.n_expert, "bytes_per_expert": per_expert,
                           "quant_types": {p: t.qtype_name for p, t in parts.items()}})
        return {
            "path": str(gf.path), "files": [str(p) for p in gf.paths],
            "architecture": cfg.arch, "name": gf.get("general.name"),
            "file_bytes": gf.file_size, "tensor_bytes": tensor_bytes, "n_tensors": len(gf.tensors),
            "layers": cfg.n_layer, "embedding_length": cfg.n_embd, "heads": cfg.n_head,
            "kv_heads": cfg.n_head_kv, "head_dim": cfg.head_dim, "vocab": cfg.n_vocab,
            "context_length": cfg.n_ctx_train, "experts": cfg.n_expert,
            "experts_used": cfg.n_expert_used, "expert_ffn": cfg.n_ff_exp,
            "shared_expert_ffn": cfg.n_ff_shexp, "expert_bytes": expert_bytes,
            "expert_share": expert_bytes / gf.file_size if gf.file_size else 0.0,
            "non_expert_bytes": tensor_bytes - expert_bytes - mtp_bytes,
            "mtp_layers": cfg.n_nextn, "mtp_bytes": mtp_bytes,
            "active_expert_bytes_per_token": sum(
                lay["bytes_per_expert"] * cfg.n_expert_used for lay in layers),
            "quant_types": dict(types.most_common()), "expert_layers": layers,
            "dense_layers": [il for il in range(cfg.n_layer) if not cfg.is_moe_layer(il)]
            if cfg.is_moe else [],
            "features": _features(cfg) | ({"selection_bias": True} if any(
                f"blk.{il}.exp_probs_b.bias" in gf.tensors for il in range(cfg.n_layer))
                else {}),
        }
    finally:
        gf.close()


def _features(c) -> dict:
    """The architecture's quirks that change the arithmetic (issue 10's archs)."""
    out: dict = {"attention": c.spec.attention, "rope": c.spec.rope_style}
    if c.spec.scales:
        out.update(embedding_scale=c.embd_scale, residual_scale=c.residual_scale,
                   attention_scale=c.attn_scale, logit_scale=c.logit_scale)
    if c.spec.qk_norm == "head_post":  # hunyuan-moe
        out["qk_norm"] = "per head, after rope"
    elif c.spec.qk_norm == "full":  # olmoe, minimax-m2: one RMS over all heads
        out["qk_norm"] = "over the whole q / k projection"
    if c.spec.attention != "mla" and c.rope_dim < c.head_dim:  # glm4moe: half of each head
        out["rope_dims"] = f"{c.rope_dim} of {c.head_dim}"
    if c.spec.norm_bias:  # phimoe
        out["norms"] = "RMS + bias"
    if c.spec.rope_factors == "longrope":  # phimoe: llama.cpp's choice by the context
        out["rope_factors"] = (f"LongRoPE: long above a context of {c.rope_scaling.n_ctx_orig}"
                               ", else short")
    if c.rope_sections:  # qwen3vl*: text only, the 4th section's pairs unturned
        out["rope"] = f"imrope (interleaved M-RoPE) sections {list(c.rope_sections)}, text only"
    if c.spec.attention == "mla":
        out.update(q_lora_rank=c.q_lora_rank, kv_lora_rank=c.kv_lora_rank,
                   rope_dims=c.rope_dim)
    if c.swa_chunked:  # llama4: chunked attention, NoPE layers
        out.update(attention_chunk=c.sliding_window,
                   chunked_layers=f"{c.swa_pattern - 1} of every {c.swa_pattern}",
                   nope_layers=f"every {c.nope_step}th", kq_norm=c.kq_norm)
    elif c.sliding_window:
        out.update(sliding_window=c.sliding_window, swa_layers="every other (even) layer")
    if c.swa_layers:  # mimo2: the pattern array, per-layer heads, the value scale
        out.update(swa_layers=[il for il in range(c.n_layer) if c.is_swa_layer(il)])
        if c.head_counts:
            out["heads_per_layer"] = [list(h) for h in c.head_counts]
        if c.value_scale:
            out["value_scale"] = round(c.value_scale, 6)
    if c.swa_dense_first:  # smallthinker
        out.update(swa_layers=f"il % {c.swa_pattern} != 0")
    if c.nope_step and c.nope_first:  # (llama4's are named above)
        out.update(nope_layers=f"il % {c.nope_step} == 0")
    if c.spec.iswa_std:  # afmoe
        out.update(swa_layers=f"il % {c.swa_pattern} < {c.swa_pattern - 1}",
                   nope_layers=f"(il + 1) % {c.nope_step} == 0",
                   attention_gate=True, post_norms=True)
    if c.spec.router_input != "ffn":  # smallthinker: experts known an attention ahead
        out.update(router_input="the layer's input, before attention")
    r = c.rope_scaling
    if r.kind != "none" and r.freq_scale != 1.0:
        out["rope_scaling"] = f"{r.kind} x{1.0 / r.freq_scale:g}" + (
            f" (original context {r.n_ctx_orig})" if r.kind == "yarn" else "")
    if c.is_moe:
        out["routing"] = c.gating if c.spec.routing != "softmax" else "softmax"
        if c.expert_weights_norm:
            out["expert_weights_norm"] = True
        if c.moe_layer_step > 1:  # ernie4_5-moe: experts every step-th layer
            out["moe_layer_step"] = c.moe_layer_step
        if c.expert_weights_scale:
            out["expert_weights_scale"] = c.expert_weights_scale
        if c.n_expert_groups > 1:
            out["expert_groups"] = f"{c.n_group_used} of {c.n_expert_groups}"
        if c.spec.expert_bias:
            out["expert_biases"] = True
        if c.spec.expert_act != "silu":
            out["expert_activation"] = c.spec.expert_act
    return out


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def main(args: argparse.Namespace) -> int:
    from efedge.demo import demo_model_path

    model = model_arg(args)
    info = describe(user_path(model) if model else demo_model_path())
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"model          {info['path']}")
    if len(info["files"]) > 1:
        print(f"files          {len(info['files'])} shards of a split GGUF, "
              f"{_mib(info['file_bytes'])} in all")
    print(f"architecture   {info['architecture']}  ({info['name'] or 'unnamed'})")
    print(f"layers         {info['layers']}  width {info['embedding_length']}  heads "
          f"{info['heads']} (kv {info['kv_heads']}, dim {info['head_dim']})  vocab {info['vocab']}")
    print(f"context        {info['context_length']}")
    feats = {k: v for k, v in info["features"].items()
             if (k, v) not in (("attention", "standard"), ("routing", "softmax"))}
    if feats:
        print("features       " + ", ".join(f"{k} {v}" for k, v in feats.items()))
    if info["dense_layers"]:
        print(f"dense layers   {info['dense_layers']} (no routed experts)")
    if info["experts"]:
        print(f"experts        {info['experts']} per layer, {info['experts_used']} active, "
              f"ffn {info['expert_ffn']}" +
              (f", shared ffn {info['shared_expert_ffn']}" if info["shared_expert_ffn"] else ""))
        print(f"expert bytes   {_mib(info['expert_bytes'])} = {info['expert_share']:.1%} of "
              f"the file; {_mib(info['active_expert_bytes_per_token'])} active per token")
        sizes = Counter((lay["bytes_per_expert"], tuple(lay["quant_types"].values()))
                        for lay in info["expert_layers"])
        for (nb, qts), n in sizes.items():
            print(f"  {n:>3} layers  {nb / 2**10:.1f} KiB per expert  (gate/up/down "
                  f"{'/'.join(qts)})")
    print(f"file           {_mib(info['file_bytes'])}, {info['n_tensors']} tensors, "
          f"non-expert {_mib(info['non_expert_bytes'])}" + (
              f", {info['mtp_layers']} MTP layer(s) {_mib(info['mtp_bytes'])} (not run)"
              if info["mtp_layers"] else ""))
    print("quant types    " + ", ".join(f"{k}×{v}" for k, v in info["quant_types"].items()))
    return 0
