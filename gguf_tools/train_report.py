"""After training: export, check against llama.cpp, measure, and write the model card."""

from __future__ import annotations

import csv
import json
import shutil
import time
from pathlib import Path

import numpy as np

from gguf_tools import corpus
from gguf_tools.export import compare_with_llama, quantize, write_gguf
from gguf_tools.train_eval import evaluate, llama_bits_per_byte, llama_greedy, token_byte_lengths

FIB_PROMPT = "def fib(n):"


def export(args, work: Path, model, tok, command: str) -> tuple[Path, Path, str]:
    """Write the shipped file; return (shipped path, F32 file for the exactness check,
    file type)."""
    extra = {"efedge.training.command": command,
             "efedge.training.corpus": "python stdlib sources + pydoc_data topics "
                                       "(gguf_tools/corpus.py), sha1(name) % 20 == 0 held out"}
    f32 = write_gguf(work / "model-f32.gguf", model, tok, ftype="f32", extra=extra)
    ftype = args.ftype
    if ftype in ("auto", "f16", "q8_0"):
        f16 = write_gguf(work / "model-f16.gguf", model, tok, ftype="f16", extra=extra)
        if ftype == "auto":
            ftype = "f16" if f16.stat().st_size <= args.max_mb * 1e6 else "q8_0"
    src = {"f32": f32, "f16": work / "model-f16.gguf"}.get(ftype)
    if ftype == "q8_0":
        src = quantize(work / "model-f16.gguf", work / "model-q8_0.gguf", "Q8_0")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, out)
    return out, f32, ftype


def llama_checks(out: Path, f32: Path, model, tok, eval_ids: np.ndarray) -> dict:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return {"skipped": "llama_cpp is not installed"}
    from gguf_tools.export import llama_tokenize

    eot = tok.token_to_id(corpus.EOT)
    T = model.a.n_ctx
    # Four fixed held-out snippets of one context each, spread over the held-out stream.
    starts = np.linspace(0, len(eval_ids) - T - 1, 4).astype(np.int64)
    snippets = [[int(i) for i in eval_ids[s:s + T]] for s in starts]
    res = {"exact_file": compare_with_llama(f32, model, snippets)}
    if f32.stat().st_size != out.stat().st_size:
        res["shipped_file"] = compare_with_llama(out, model, snippets)
    text = corpus.heldout_sample()
    ours = tok.encode(text, add_special_tokens=False).ids
    res["tokenizer_identical"] = llama_tokenize(out, text) == ours
    bpb, n = llama_bits_per_byte(out, text, eot, T)
    res["sample_bits_per_byte"] = bpb
    res["sample_tokens"] = n
    res["greedy_prompt"] = FIB_PROMPT
    res["greedy"] = llama_greedy(out, FIB_PROMPT, 64)
    return res


def write_curve(path: Path, log: list[dict]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["step", "tokens", "seconds", "lr", "train_loss", "heldout_loss", "aux_loss"])
        for r in log:
            w.writerow([r["step"], r["tokens"], r["seconds"], f"{r['lr']:.3e}",
                        f"{r['train_loss']:.4f}", f"{r['heldout_loss']:.4f}",
                        f"{r['aux_loss']:.4f}"])


def finish(args, work: Path, model, state: dict, tok, train_ids: np.ndarray,
           eval_ids: np.ndarray, command: str) -> dict:
    t0 = time.time()
    ta = {**vars(args), **state.get("train_args", {})}
    out, f32, ftype = export(args, work, model, tok, command)
    res: dict = {"command": command, "file": str(out), "file_bytes": out.stat().st_size,
                 "ftype": ftype, "model_args": model.a.to_dict(),
                 "n_params": sum(p.numel() for p in model.parameters()),
                 "steps": state["step"], "train_seconds": state["elapsed"],
                 "tokens_seen": state["step"] * ta["batch"] * model.a.n_ctx,
                 **{k: ta[k] for k in ("seed", "batch", "lr", "aux", "threads", "warmup",
                                       "wd", "clip", "min_lr_ratio")},
                 "vocab": tok.get_vocab_size(), "log": state["log"],
                 "train_tokens": int(len(train_ids))}
    print(f"wrote {out} ({ftype}, {res['file_bytes'] / 1e6:.1f} MB)", flush=True)
    res["llama_cpp"] = llama_checks(out, f32, model, tok, eval_ids)
    print("llama.cpp:", json.dumps(res["llama_cpp"], indent=1), flush=True)
    if not args.no_eval:
        blen = token_byte_lengths(tok, corpus.SPECIAL_TOKENS)
        res["heldout"] = evaluate(model, eval_ids, blen, max_tokens=args.eval_tokens)
        print("held-out:", json.dumps(res["heldout"], indent=1), flush=True)
    res["eval_seconds"] = time.time() - t0
    (work / "results.json").write_text(json.dumps(res, indent=1), encoding="utf-8")
    write_curve(out.parent / (out.stem + "_loss_curve.csv" if out.stem != "demo"
                              else "loss_curve.csv"), state["log"])
    card = Path(args.card) if args.card else out.parent / (
        "MODEL_CARD.md" if out.stem == "demo" else out.stem + "_MODEL_CARD.md")
    card.write_text(model_card(res), encoding="utf-8")  # µ, ≈, …: not in cp1252
    print(f"wrote {card}", flush=True)
    return res


def _curve_table(log: list[dict], rows: int = 12) -> str:
    if len(log) > rows:
        pick = sorted({round(i * (len(log) - 1) / (rows - 1)) for i in range(rows)})
        log = [log[i] for i in pick]
    lines = ["| step | tokens | minutes | train loss | held-out loss |",
             "|---:|---:|---:|---:|---:|"]
    for r in log:
        lines.append(f"| {r['step']} | {r['tokens']:,} | {r['seconds'] / 60:.1f} | "
                     f"{r['train_loss']:.3f} | {r['heldout_loss']:.3f} |")
    return "\n".join(lines)


def _threads(n: int) -> str:
    if n == 1:
        return ("1 thread: two OpenMP threads spin-wait on each other on a loaded machine "
                "and ran a step 3-10x slower")
    return f"{n} threads"


def model_card(res: dict) -> str:
    a = res["model_args"]
    h = res.get("heldout")
    lc = res.get("llama_cpp", {})
    out = [
        "# efedge demo MoE", "",
        "A small Mixture-of-Experts language model trained on the CPU from text that ships with",
        "every Python installation. It is the default model of `efedge.load()` and the source",
        "of real routing traces. Not a useful assistant: it writes Python-looking text.", "",
        "## Training", "",
        f"    {res['command']}", "",
        f"* seed {res['seed']}, {res['steps']} steps of {res['batch']} × {a['n_ctx']} tokens "
        f"({res['tokens_seen']:,} tokens, {res['tokens_seen'] / res['train_tokens']:.2f} "
        f"epochs), {res['train_seconds'] / 60:.1f} min wall clock on a 2-core CPU shared "
        f"with other jobs (torch 2.13.0, {_threads(res['threads'])})",
        f"* AdamW (β 0.9/0.95, weight decay {res['wd']} on matrices), peak LR {res['lr']}, "
        f"{res['warmup']} warmup steps, then cosine to {res['min_lr_ratio']:.0%} of the peak "
        f"over the budget, gradient clipping {res['clip']}, load-balancing loss weight "
        f"{res['aux']} (Switch/OLMoE: E · Σ f_e P_e, mean over layers)",
        "* with `--minutes` the schedule follows the wall clock, so a rerun takes as many "
        "steps as the machine allows; `--steps N` instead gives a step-based schedule that "
        "does not depend on the machine's speed",
        "* corpus (`gguf_tools/corpus.py`): the interpreter's standard library `*.py` sources "
        "(without test suites, idlelib, turtledemo, ensurepip, encodings, site-packages) "
        "and the `pydoc_data` topics written as ChatML exchanges; a document is held out when "
        "`int(sha1(name), 16) % 20 == 0` (name = relative path, or "
        "`pydoc_data/topics.py:{key}`). Documents are separated by `<|endoftext|>`.",
        f"* tokenizer: byte-level BPE (`tokenizers`, vocabulary {res['vocab']}) trained on the "
        "training split; special tokens `<|endoftext|>` (bos/pad), `<|im_start|>`, "
        "`<|im_end|>` (eos/eot); GGUF `tokenizer.ggml.model = gpt2`, `pre = gpt-2`, "
        "no BOS added, ChatML chat template.", "",
        "## Architecture", "",
        f"`qwen3moe`: {a['n_layer']} layers, width {a['n_embd']}, {a['n_head']} query heads / "
        f"{a['n_head_kv']} KV heads of {a['head_dim']}, per-head q/k RMSNorm, neox rope "
        f"(base {a['rope_base']:g}), RMSNorm eps {a['norm_eps']:g}; every layer is MoE: "
        f"{a['n_expert']} SwiGLU experts of width {a['n_ff_exp']}, top-{a['n_expert_used']} "
        "of a softmax router, weights renormalised to sum 1; separate output head; "
        f"context {a['n_ctx']}. {res['n_params'] / 1e6:.2f}M parameters; file "
        f"`{Path(res['file']).name}` {res['file_bytes'] / 1e6:.1f} MB ({res['ftype']}, "
        "router and norms F32).", "",
        "## Use and limits", "",
        "* Prompts are plain text (no BOS is added; training windows start anywhere in a "
        "document). Generation ends at `<|im_end|>` (eos/eot); llama.cpp also ends at "
        "`<|endoftext|>`.",
        "* It has seen about two million tokens of one library's code: expect plausible "
        "Python shapes, not correct programs, and nothing beyond the standard library's "
        "vocabulary. The ChatML exchanges in training are the pydoc topics only.",
        "* Its purpose is routing with real structure for efedge's expert cache and "
        "predictor (see the recall figures), at a size that ships in the package.", "",
        "## Loss curve", "",
        "Train loss = mean over the steps since the previous row; held-out loss on 16 fixed "
        "held-out windows (nats/token). Full curve: `loss_curve.csv`.", "",
        _curve_table(res["log"]), "",
    ]
    if h:
        out += [
            "## Held-out figures (torch, whole held-out split)", "",
            f"* **bits per byte {h['bits_per_byte']:.3f}** ({h['heldout_tokens']:,} tokens, "
            f"{h['heldout_bytes']:,} bytes, {h['heldout_nats_per_token']:.3f} nats/token; "
            "windows of the context length, control tokens count 0 bytes)",
            f"* experts used per layer: {h['experts_used_per_layer']} of {a['n_expert']}",
            "* largest share of assignments per layer: "
            + ", ".join(f"{s:.1%}" for s in h["max_expert_share_per_layer"])
            + f" (uniform {1 / a['n_expert']:.1%}); smallest: "
            + ", ".join(f"{s:.2%}" for s in h["min_expert_share_per_layer"]),
            f"* pre-gating recall@{a['n_expert_used']} (router of layer l+d on the "
            "RMS-normalised residual entering layer l, averaged over l; chance "
            f"{h['recall_chance']:.3f}): "
            + ", ".join(f"d={d}: {r:.3f}" for d, r in h["recall_at_k"].items()), "",
        ]
    if lc and "skipped" not in lc:
        out += [
            "## llama.cpp (llama-cpp-python 0.3.36)", "",
            f"Torch vs llama.cpp on 4 held-out snippets of {a['n_ctx']} tokens (Δ/std: max "
            "absolute difference over the vocabulary / std of the torch logits, per "
            "position). *Same routing*: torch "
            "replays the experts llama.cpp chose (read from its graph through the eval "
            "callback), which checks the arithmetic. *Free*: each picks its own experts; with "
            "64 experts the 8th and 9th router probabilities are often within 1e-6, so the "
            "last bit of rounding (llama.cpp keeps K/V in F16) sometimes swaps the 8th "
            "expert, which moves that position's logits far more than the arithmetic "
            "differs (the free max).", "",
            "| file | positions | same routing: max Δ/std | router prob: max abs Δ | "
            "identical expert sets | free: median / 99th pct / max Δ/std | "
            "argmax agreement |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for label, key in (("F32 export", "exact_file"), ("shipped file", "shipped_file")):
            if key in lc:
                r = lc[key]
                out.append(f"| {label} | {r['n_tokens']} | {r['same_routing_max_rel']:.1e} | "
                           f"{r['router_prob_max_abs_diff']:.1e} | "
                           f"{r['routing_identical']:.2%} | {r['free_median_rel']:.1e} / "
                           f"{r['free_p99_rel']:.1e} / {r['free_max_rel']:.1e} | "
                           f"{r['argmax_agree']:.4f} |")
        out += [
            "",
            f"* tokenization of the held-out sample identical to `tokenizers`: "
            f"{lc['tokenizer_identical']}",
            f"* bits per byte of `corpus.heldout_sample()` ({lc['sample_tokens']} tokens) "
            f"from llama.cpp logits: {lc['sample_bits_per_byte']:.3f} "
            "(`tests/test_demo_model.py` checks ≤ 2.5)",
            f"* greedy continuation (64 tokens) of `{lc['greedy_prompt']}`:", "",
            "```python", lc["greedy_prompt"] + lc["greedy"], "```", "",
        ]
    return "\n".join(out) + "\n"

