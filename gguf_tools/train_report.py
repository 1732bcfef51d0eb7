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
    """Write the shipped file; return (shipped path, F16/F32 path for the exactness check,
    file type)."""
    extra = {"efedge.training.command": command,
             "efedge.training.corpus": "python stdlib sources + pydoc_data topics "
                                       "(gguf_tools/corpus.py), sha1(name) % 20 == 0 held out"}
    ftype = args.ftype
    full = work / "model-f32.gguf" if ftype == "f32" else work / "model-f16.gguf"
    write_gguf(full, model, tok, ftype="f32" if ftype == "f32" else "f16", extra=extra)
    if ftype == "auto":
        ftype = "f16" if full.stat().st_size <= args.max_mb * 1e6 else "q8_0"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if ftype == "q8_0":
        quantize(full, work / "model-q8_0.gguf", "Q8_0")
        shutil.copyfile(work / "model-q8_0.gguf", out)
    else:
        shutil.copyfile(full, out)
    return out, full, ftype


def llama_checks(out: Path, full: Path, model, tok, eval_ids: np.ndarray) -> dict:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return {"skipped": "llama_cpp is not installed"}
    from gguf_tools.export import llama_tokenize

    eot = tok.token_to_id(corpus.EOT)
    snippet = [int(i) for i in eval_ids[1000:1000 + model.a.n_ctx]]
    res = {"exact_file": compare_with_llama(full, model, snippet)}
    if full.stat().st_size != out.stat().st_size:  # shipped quantized
        res["shipped_file"] = compare_with_llama(out, model, snippet)
    text = corpus.heldout_sample()
    ours = tok.encode(text, add_special_tokens=False).ids
    res["tokenizer_identical"] = llama_tokenize(out, text) == ours
    bpb, n = llama_bits_per_byte(out, text, eot, model.a.n_ctx)
    res["sample_bits_per_byte"] = bpb
    res["sample_tokens"] = n
    res["greedy_prompt"] = FIB_PROMPT
    res["greedy"] = llama_greedy(out, FIB_PROMPT, 64)
    return res


def write_curve(path: Path, log: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "tokens", "seconds", "lr", "train_loss", "heldout_loss", "aux_loss"])
        for r in log:
            w.writerow([r["step"], r["tokens"], r["seconds"], f"{r['lr']:.3e}",
                        f"{r['train_loss']:.4f}", f"{r['heldout_loss']:.4f}",
                        f"{r['aux_loss']:.4f}"])


def finish(args, work: Path, model, state: dict, tok, eval_ids: np.ndarray,
           command: str) -> dict:
    t0 = time.time()
    out, full, ftype = export(args, work, model, tok, command)
    res: dict = {"command": command, "file": str(out), "file_bytes": out.stat().st_size,
                 "ftype": ftype, "model_args": model.a.to_dict(),
                 "n_params": sum(p.numel() for p in model.parameters()),
                 "steps": state["step"], "train_seconds": state["elapsed"],
                 "tokens_seen": state["step"] * args.batch * model.a.n_ctx,
                 "seed": args.seed, "batch": args.batch, "lr": args.lr, "aux": args.aux,
                 "vocab": tok.get_vocab_size(), "log": state["log"]}
    print(f"wrote {out} ({ftype}, {res['file_bytes'] / 1e6:.1f} MB)", flush=True)
    res["llama_cpp"] = llama_checks(out, full, model, tok, eval_ids)
    print("llama.cpp:", json.dumps(res["llama_cpp"], indent=1), flush=True)
    if not args.no_eval:
        blen = token_byte_lengths(tok, corpus.SPECIAL_TOKENS)
        res["heldout"] = evaluate(model, eval_ids, blen, max_tokens=args.eval_tokens)
        print("held-out:", json.dumps(res["heldout"], indent=1), flush=True)
    res["eval_seconds"] = time.time() - t0
    (work / "results.json").write_text(json.dumps(res, indent=1))
    write_curve(out.parent / (out.stem + "_loss_curve.csv" if out.stem != "demo"
                              else "loss_curve.csv"), state["log"])
    card = Path(args.card) if args.card else out.parent / (
        "MODEL_CARD.md" if out.stem == "demo" else out.stem + "_MODEL_CARD.md")
    card.write_text(model_card(res))
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
        f"({res['tokens_seen']:,} tokens), {res['train_seconds'] / 60:.1f} min wall clock on "
        f"a shared 2-core CPU (torch 2.13.0, 2 threads)",
        f"* AdamW (β 0.9/0.95, weight decay 0.1 on matrices), peak LR {res['lr']}, warmup then "
        f"cosine to 10%, gradient clipping 1.0, load-balancing loss weight {res['aux']} "
        "(Switch/OLMoE: E · Σ f_e P_e, mean over layers)",
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
        ex = lc["exact_file"]
        out += [
            "## llama.cpp (llama-cpp-python 0.3.36)", "",
            f"* logits of the un-quantized export vs the torch model on {ex['n_tokens']} "
            f"held-out tokens: max|Δ|/std {ex['max_rel']:.2e}, argmax agreement "
            f"{ex['argmax_agree']:.3f}",
        ]
        if "shipped_file" in lc:
            sf = lc["shipped_file"]
            out.append(f"* shipped file vs torch: max|Δ|/std {sf['max_rel']:.2e}, argmax "
                       f"agreement {sf['argmax_agree']:.3f}")
        out += [
            f"* tokenization of the held-out sample identical to `tokenizers`: "
            f"{lc['tokenizer_identical']}",
            f"* bits per byte of `corpus.heldout_sample()` ({lc['sample_tokens']} tokens) "
            f"from llama.cpp logits: {lc['sample_bits_per_byte']:.3f}",
            f"* greedy continuation of `{lc['greedy_prompt']}`:", "",
            "```python", lc["greedy_prompt"] + lc["greedy"], "```", "",
        ]
    return "\n".join(out) + "\n"

