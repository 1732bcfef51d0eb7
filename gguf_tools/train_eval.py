"""Held-out figures for a trained ``MoELM``: bits per byte, routing health and pre-gating recall.

* bits per byte: the held-out token stream is cut into non-overlapping windows of n_ctx + 1
  tokens; every token after the first of a window is predicted once. Total nats (control
  tokens included) / ln 2 / UTF-8 bytes of the predicted tokens (control tokens count 0 bytes).
* routing health: per layer, how many of the N*K held-out assignments each expert received.
* pre-gating recall@K at distance d: layer l+d's router applied to the residual stream that
  *enters* layer l, RMS-normalised with layer l+d's ffn_norm, compared with the top-K layer
  l+d really chose: |predicted ∩ actual| / K, averaged over tokens and over l. Chance is K/E.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from gguf_tools.train_model import MoELM, rms_norm


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte → printable character table (what ByteLevel tokens are spelled in)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def token_byte_lengths(tok, specials: tuple[str, ...]) -> np.ndarray:
    """UTF-8 byte length of every token id (0 for control tokens)."""
    dec = {c: b for b, c in bytes_to_unicode().items()}
    vocab = tok.get_vocab(with_added_tokens=True)
    out = np.zeros(len(vocab), dtype=np.int64)
    for piece, i in vocab.items():
        out[i] = 0 if piece in specials else sum(1 for ch in piece if ch in dec)
    return out


@torch.no_grad()
def heldout_loss(model: MoELM, ids: np.ndarray, n_windows: int = 16) -> float:
    """Mean next-token loss (nats) on ``n_windows`` fixed windows spread over ``ids``."""
    T = model.a.n_ctx
    starts = np.linspace(0, len(ids) - T - 2, n_windows).astype(np.int64)
    x = torch.from_numpy(np.stack([ids[s:s + T + 1] for s in starts]).astype(np.int64))
    was = model.training
    model.eval()
    logits, _, _ = model(x[:, :-1])
    model.train(was)
    return float(torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), x[:, 1:].reshape(-1)))


@torch.no_grad()
def evaluate(model: MoELM, ids: np.ndarray, byte_len: np.ndarray, *, batch: int = 8,
             max_tokens: int = 0, max_distance: int = 4) -> dict:
    """All held-out figures on the token stream ``ids`` (see the module docstring)."""
    a = model.a
    L, E, K, T = a.n_layer, a.n_expert, a.n_expert_used, a.n_ctx
    if max_tokens:
        ids = ids[:max_tokens + 1]
    n_win = (len(ids) - 1) // T
    wins = torch.from_numpy(np.stack([ids[i * T:i * T + T + 1] for i in range(n_win)])
                            .astype(np.int64))
    model.eval()
    nats = 0.0
    nbytes = 0
    counts = np.zeros((L, E), dtype=np.int64)
    dmax = min(max_distance, L - 1)
    hit = np.zeros(dmax + 1)       # summed recall per distance
    pairs = np.zeros(dmax + 1)     # token·layer pairs per distance
    for b0 in range(0, n_win, batch):
        x = wins[b0:b0 + batch]
        logits, routing, hidden = model(x[:, :-1], keep_hidden=True)
        tgt = x[:, 1:]
        logp = torch.log_softmax(logits.float(), dim=-1)
        nats -= float(logp.gather(-1, tgt[..., None]).sum())
        nbytes += int(byte_len[tgt.numpy()].sum())
        actual = []
        for li, (_, idx) in enumerate(routing):
            counts[li] += np.bincount(idx.reshape(-1).numpy(), minlength=E)
            actual.append(torch.zeros(idx.shape[0], E).scatter_(1, idx, 1.0))
        for li in range(L):
            h = hidden[li].reshape(-1, a.n_embd)
            for d in range(1, dmax + 1):
                if li + d >= L:
                    break
                blk = model.blk[li + d]
                _, _, pred = blk.route(rms_norm(h, blk.ffn_norm, a.norm_eps))
                got = actual[li + d].gather(1, pred).sum(1) / K
                hit[d] += float(got.sum())
                pairs[d] += got.shape[0]
    share = counts / counts.sum(1, keepdims=True)
    return {
        "heldout_tokens": int(n_win * T),
        "heldout_bytes": nbytes,
        "heldout_nats_per_token": nats / (n_win * T),
        "bits_per_byte": nats / math.log(2) / nbytes,
        "experts_used_per_layer": [int(c) for c in (counts > 0).sum(1)],
        "max_expert_share_per_layer": [float(s) for s in share.max(1)],
        "min_expert_share_per_layer": [float(s) for s in share.min(1)],
        "recall_at_k": {d: float(hit[d] / pairs[d]) for d in range(1, dmax + 1)},
        "recall_chance": K / E,
    }


def _llama(path, **kw):
    """llama_cpp.Llama on ggml's plain CPU kernels (its AMX path crashes on small MoE
    files: efedge/cli/llama_plain.py), quiet."""
    from efedge.cli.llama_plain import plain_llama

    return plain_llama(path, verbose=False, **kw)


def llama_bits_per_byte(path, text: str, eot_id: int, n_ctx: int) -> tuple[float, int]:
    """Bits per byte of ``text`` under llama.cpp: <|endoftext|> (the document separator)
    then the text's tokens, in windows of ``n_ctx`` + 1 tokens like ``evaluate``; every
    token of the text is predicted once. Returns (bpb, number of text tokens)."""
    llm = _llama(path, vocab_only=True)
    ids = [eot_id] + llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
    llm.close()
    llm = _llama(path, logits_all=True, n_ctx=n_ctx + 1, n_batch=n_ctx + 1, n_threads=2)
    nats = 0.0
    try:
        for s in range(0, len(ids) - 1, n_ctx):
            win = ids[s:s + n_ctx + 1]
            llm.reset()
            llm.eval(win)
            sc = np.array(llm.scores[:len(win) - 1], dtype=np.float64)
            m = sc.max(-1, keepdims=True)
            logp = sc - m - np.log(np.exp(sc - m).sum(-1, keepdims=True))
            nats -= logp[np.arange(len(win) - 1), win[1:]].sum()
    finally:
        llm.close()
    return float(nats / math.log(2) / len(text.encode("utf-8"))), len(ids) - 1


def llama_greedy(path, prompt: str, n: int = 64) -> str:
    """Greedy continuation of ``prompt`` by llama.cpp."""
    llm = _llama(path, n_ctx=256, n_threads=2)
    try:
        out = llm.create_completion(prompt, max_tokens=n, temperature=0.0, top_k=1,
                                    top_p=1.0, min_p=0.0, repeat_penalty=1.0)
        return out["choices"][0]["text"]
    finally:
        llm.close()
