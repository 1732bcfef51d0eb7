"""Train the demo Mixture-of-Experts model (qwen3moe) on the CPU and export it as GGUF.

    python -m gguf_tools.train --out efedge/data/demo.gguf --minutes 28

Steps: build the corpus (``gguf_tools.corpus``), train a byte-level BPE with ``tokenizers``,
tokenize, train ``MoELM`` with AdamW (cosine LR, warmup, clipping, Switch-style load-balancing
loss), export GGUF (F16 if it fits ``--max-mb``, else Q8_0 through llama.cpp's quantizer),
check it against llama.cpp, measure the held-out figures and write the model card.

Everything goes through ``--work`` (default /tmp/efedge-train/<shape>): tokenizer, token
streams, ``ckpt.pt`` (written every ``--ckpt-every`` seconds; a killed run resumes from it
unless ``--fresh``), ``log.csv`` and ``results.json``. Needs the extra ``train``
(torch==2.13.0, tokenizers) and, for the checks, llama-cpp-python.
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from gguf_tools import corpus
from gguf_tools.train_model import ModelArgs, MoELM, load_balance_loss


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m gguf_tools.train",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="GGUF file to write")
    ap.add_argument("--card", help="model card to write (default: MODEL_CARD.md beside --out)")
    ap.add_argument("--work", help="work folder (default /tmp/efedge-train/<shape>)")
    ap.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint")
    ap.add_argument("--export-only", action="store_true",
                    help="skip training: export and evaluate the checkpoint in --work")
    ap.add_argument("--no-eval", action="store_true", help="skip the held-out evaluation")
    g = ap.add_argument_group("model")
    g.add_argument("--vocab", type=int, default=4096)
    g.add_argument("--dim", type=int, default=256)
    g.add_argument("--layers", type=int, default=5)
    g.add_argument("--heads", type=int, default=4)
    g.add_argument("--kv-heads", type=int, default=2)
    g.add_argument("--head-dim", type=int, default=64)
    g.add_argument("--experts", type=int, default=64)
    g.add_argument("--top-k", type=int, default=8)
    g.add_argument("--ff", type=int, default=64, help="expert FFN width")
    g.add_argument("--ctx", type=int, default=512)
    g = ap.add_argument_group("training")
    g.add_argument("--steps", type=int, default=0, help="step budget (0: time budget only)")
    g.add_argument("--minutes", type=float, default=0.0, help="wall-clock budget")
    g.add_argument("--batch", type=int, default=4, help="sequences per step")
    g.add_argument("--lr", type=float, default=3e-3)
    g.add_argument("--min-lr-ratio", type=float, default=0.1)
    g.add_argument("--warmup", type=int, default=50, help="warmup steps")
    g.add_argument("--wd", type=float, default=0.1)
    g.add_argument("--clip", type=float, default=1.0)
    g.add_argument("--aux", type=float, default=0.01, help="load-balancing loss weight")
    g.add_argument("--seed", type=int, default=1234)
    # One thread by default: on a shared 2-core machine two OpenMP threads spin-wait on
    # each other and ran a step 3-10x slower than one (measured: 7-22 s vs 1.7-2.4 s).
    g.add_argument("--threads", type=int, default=1)
    g.add_argument("--eval-every", type=int, default=50, help="steps between held-out checks")
    g.add_argument("--ckpt-every", type=float, default=120.0, help="seconds")
    g.add_argument("--max-corpus-mb", type=float, default=32.0)
    g = ap.add_argument_group("export")
    g.add_argument("--ftype", default="auto", choices=("auto", "f16", "f32", "q8_0"))
    g.add_argument("--max-mb", type=float, default=40.0, help="auto: largest F16 file")
    g.add_argument("--eval-tokens", type=int, default=0, help="cap held-out tokens (0: all)")
    args = ap.parse_args(argv)
    if not args.steps and not args.minutes and not args.export_only:
        ap.error("give --steps and/or --minutes")
    return args


def model_args(args) -> ModelArgs:
    return ModelArgs(n_vocab=args.vocab, n_embd=args.dim, n_layer=args.layers,
                     n_head=args.heads, n_head_kv=args.kv_heads, head_dim=args.head_dim,
                     n_expert=args.experts, n_expert_used=args.top_k, n_ff_exp=args.ff,
                     n_ctx=args.ctx)


# ---------------------------------------------------------------- tokenizer and data

def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(corpus.SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  min_frequency=2, show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return tok


def prepare_data(args, work: Path):
    """(tokenizer, train ids, held-out ids): cached in ``work``. Each document is followed
    by <|endoftext|>; special tokens inside documents (the ChatML topics) are parsed."""
    from tokenizers import Tokenizer

    tok_path = work / "tokenizer.json"
    tr_path, ev_path = work / "train.npy", work / "eval.npy"
    if tok_path.exists() and tr_path.exists() and ev_path.exists():
        return Tokenizer.from_file(str(tok_path)), np.load(tr_path), np.load(ev_path)
    docs = corpus.build_corpus(int(args.max_corpus_mb * 1e6))
    train_docs = [d.text for d in docs if d.split == "train"]
    eval_docs = [d.text for d in docs if d.split == "eval"]
    t0 = time.time()
    tok = train_tokenizer(train_docs, args.vocab)
    eot = tok.token_to_id(corpus.EOT)

    def stream(texts):
        out = []
        for enc in tok.encode_batch(texts, add_special_tokens=False):
            out.extend(enc.ids)
            out.append(eot)
        return np.array(out, dtype=np.uint16)

    tr, ev = stream(train_docs), stream(eval_docs)
    tok.save(str(tok_path))
    np.save(tr_path, tr)
    np.save(ev_path, ev)
    print(f"tokenizer {tok.get_vocab_size()} tokens; train {len(tr):,} tokens "
          f"({sum(len(t.encode()) for t in train_docs) / len(tr):.2f} bytes/token), "
          f"held-out {len(ev):,} tokens; {time.time() - t0:.0f}s", flush=True)
    return tok, tr, ev


# ---------------------------------------------------------------- training

def lr_at(step: int, progress: float, args) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    cos = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * cos)


def make_optimizer(model: MoELM, args) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    other = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": args.wd},
                              {"params": other, "weight_decay": 0.0}],
                             lr=args.lr, betas=(0.9, 0.95), eps=1e-8)


def train(args, work: Path, train_ids: np.ndarray, eval_ids: np.ndarray,
          command: str) -> MoELM:
    from gguf_tools.train_eval import heldout_loss

    torch.manual_seed(args.seed)
    a = model_args(args)
    model = MoELM(a)
    opt = make_optimizer(model, args)
    gen = torch.Generator().manual_seed(args.seed)
    ckpt_path = work / "ckpt.pt"
    state = {"step": 0, "elapsed": 0.0, "log": [], "done": False, "command": command}
    if ckpt_path.exists() and not args.fresh:
        ck = torch.load(ckpt_path, weights_only=False)
        if ck["model_args"] != a.to_dict():
            sys.exit(f"{ckpt_path} holds another shape; use --fresh or another --work")
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        gen.set_state(ck["rng"])
        state = ck["state"]
        print(f"resumed at step {state['step']} ({state['elapsed']:.0f}s)", flush=True)

    def save():
        tmp = ckpt_path.with_suffix(".tmp")
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(),
                    "rng": gen.get_state(), "state": state, "model_args": a.to_dict(),
                    "args": vars(args)}, tmp)
        os.replace(tmp, ckpt_path)

    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters, {a}", flush=True)
    budget = args.minutes * 60
    data = torch.from_numpy(train_ids.astype(np.int64))
    T, B = a.n_ctx, args.batch
    model.train()
    t_start = time.time() - state["elapsed"]
    last_ckpt = time.time()
    run_ce = run_aux = 0.0
    run_n = 0
    lr, gnorm = 0.0, float("nan")  # for the last log row if no step is left to run
    while not state["done"]:
        step = state["step"]
        elapsed = time.time() - t_start
        progress = max(step / args.steps if args.steps else 0.0,
                       elapsed / budget if budget else 0.0)
        if progress >= 1.0:
            break
        lr = lr_at(step, progress, args)
        for grp in opt.param_groups:
            grp["lr"] = lr
        starts = torch.randint(0, len(data) - T - 1, (B,), generator=gen)
        x = torch.stack([data[s:s + T + 1] for s in starts.tolist()])
        logits, routing, _ = model(x[:, :-1])
        ce = F.cross_entropy(logits.reshape(-1, a.n_vocab), x[:, 1:].reshape(-1))
        aux = sum(load_balance_loss(p, i, a.n_expert) for p, i in routing) / a.n_layer
        opt.zero_grad(set_to_none=True)
        (ce + args.aux * aux).backward()
        gnorm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip))
        opt.step()
        state["step"] = step = step + 1
        run_ce += float(ce.detach())
        run_aux += float(aux.detach())
        run_n += 1
        if step % args.eval_every == 0 or step == 1:
            ev = heldout_loss(model, eval_ids)
            state["elapsed"] = time.time() - t_start
            row = {"step": step, "tokens": step * B * T, "seconds": round(state["elapsed"], 1),
                   "lr": lr, "train_loss": run_ce / run_n, "heldout_loss": ev,
                   "aux_loss": run_aux / run_n, "grad_norm": gnorm}
            state["log"].append(row)
            run_ce = run_aux = 0.0
            run_n = 0
            print(f"step {step:5d}  {row['seconds']:7.0f}s  lr {lr:.2e}  "
                  f"train {row['train_loss']:.3f}  held-out {ev:.3f}  aux {row['aux_loss']:.3f}"
                  f"  |g| {gnorm:.2f}  {row['tokens'] / max(1.0, row['seconds']):.0f} tok/s",
                  flush=True)
        if time.time() - last_ckpt > args.ckpt_every:
            state["elapsed"] = time.time() - t_start
            save()
            last_ckpt = time.time()
    state["elapsed"] = time.time() - t_start
    if not state["log"] or state["log"][-1]["step"] != state["step"]:
        ev = heldout_loss(model, eval_ids)
        state["log"].append({"step": state["step"], "tokens": state["step"] * B * T,
                             "seconds": round(state["elapsed"], 1), "lr": lr,
                             "train_loss": run_ce / max(1, run_n), "heldout_loss": ev,
                             "aux_loss": run_aux / max(1, run_n), "grad_norm": gnorm})
    state["done"] = True
    save()
    return model


def load_trained(args, work: Path) -> tuple[MoELM, dict]:
    ck = torch.load(work / "ckpt.pt", weights_only=False)
    model = MoELM(ModelArgs(**ck["model_args"]))
    model.load_state_dict(ck["model"])
    model.eval()
    state = dict(ck["state"])
    state["train_args"] = ck["args"]  # the options the weights were trained with
    return model, state


# ---------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    shape = f"L{args.layers}-d{args.dim}-E{args.experts}k{args.top_k}f{args.ff}-s{args.seed}"
    work = Path(args.work or f"/tmp/efedge-train/{shape}")
    work.mkdir(parents=True, exist_ok=True)
    command = "python -m gguf_tools.train " + shlex.join(sys.argv[1:] if argv is None else argv)
    tok, train_ids, eval_ids = prepare_data(args, work)
    if tok.get_vocab_size() != args.vocab:
        args.vocab = tok.get_vocab_size()
    if not args.export_only:
        train(args, work, train_ids, eval_ids, command)
    model, state = load_trained(args, work)

    from gguf_tools.train_report import finish
    # The card and the file record the command that trained the weights, also when this
    # run only re-exports them.
    finish(args, work, model, state, tok, train_ids, eval_ids, state.get("command", command))


if __name__ == "__main__":
    main()
