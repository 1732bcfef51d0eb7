"""Perplexity (efedge/perplexity.py, `efedge perplexity`) as llama-perplexity measures it:
chunks of n_ctx from an empty cache, BOS first where the vocab adds one, the second half
scored — checked against the log-softmax of the model's own logits and of llama.cpp's,
through an expert cache, and the command's output and errors."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from conftest import requires_llama_cpp

import efedge
from efedge import api_scoring
from efedge.cli import main as cli_main
from efedge.corpus import heldout_text
from efedge.errors import ArgumentError
from efedge.perplexity import perplexity

N_CTX = 24


@pytest.fixture(scope="module")
def text() -> str:
    return heldout_text()[:4000]


@pytest.fixture(scope="module", params=["bpe", "spm"])  # spm: the vocab adds a BOS
def model_path(request, tiny_gguf):
    return tiny_gguf("qwen3moe", "F32", vocab_kind=request.param)


def reference(chunk_logits, ids, n_ctx: int, n_chunks: int, bos: int | None) -> float:
    """llama-perplexity's figure from the logits of each chunk (chunk_logits(ids) →
    [len(ids), n_vocab])."""
    nll, count = 0.0, 0
    first = n_ctx // 2
    for i in range(n_chunks):
        chunk = list(ids[i * n_ctx:(i + 1) * n_ctx])
        if bos is not None:
            chunk[0] = bos
        x = chunk_logits(chunk).astype(np.float64)
        top = x.max(-1, keepdims=True)
        ls = x - top - np.log(np.exp(x - top).sum(-1, keepdims=True))
        for j in range(first, n_ctx - 1):
            nll -= ls[j, chunk[j + 1]]
            count += 1
    return math.exp(nll / count)


def test_perplexity_is_llama_perplexitys_figure(model_path, text, monkeypatch):
    """The figure from the model's own logits chunk by chunk, whatever the evaluation's
    batching (PROMPT_CHUNK small: context-only batches skip the output head)."""
    with efedge.load(model_path, n_ctx=N_CTX) as m:
        ids = m.tokenize(text)
        bos = m.tokenizer.bos_id if m.tokenizer.add_bos else None
        assert (bos is not None) == ("spm" in model_path.name)
        want = reference(m.logits, ids, N_CTX, 3, bos)
        r = perplexity(m, text, n_chunks=3)
        assert r.ppl == pytest.approx(want, rel=1e-9)
        assert (r.n_ctx, r.n_chunks, r.n_tokens) == (N_CTX, 3, len(ids))
        assert r.n_scored == 3 * (N_CTX - 1 - N_CTX // 2) and len(r.running) == 3
        assert r.running[-1] == r.ppl and 0 < r.ppl_err < r.ppl
        monkeypatch.setattr(api_scoring, "PROMPT_CHUNK", 5)  # 24 = 5+5+5+5+4; first = 12
        assert perplexity(m, ids, n_chunks=3).ppl == r.ppl  # token ids as they are
        # numpy's integers are integers (as max_tokens takes them); they were refused
        assert perplexity(m, ids, n_chunks=np.int64(3)).ppl == r.ppl
        # every chunk by default (on the first 1000 characters: the whole text's ~90
        # chunks took ~30 s of a 2-core CI run)
        full = perplexity(m, text[:1000])
        assert full.n_chunks == len(m.tokenize(text[:1000])) // N_CTX > 3


def test_prompt_logprobs_from_first_are_the_tail_of_all(model_path, monkeypatch):
    with efedge.load(model_path) as m:
        ids = m.tokenize("the cat sat on the mat and then the dog came in too")
        whole = m.prompt_logprobs(ids, 2)
        for chunk in (256, 4, 3):
            monkeypatch.setattr(api_scoring, "PROMPT_CHUNK", chunk)
            for first in (0, 1, 5, len(ids) - 2, len(ids) - 1):
                assert m.prompt_logprobs(ids, 2, first=first) == whole[first:], (chunk, first)
        assert m.prompt_logprobs(ids, 2, first=np.int32(5)) == whole[5:]
        for bad in (-1, len(ids), 1.0, True):
            with pytest.raises(ArgumentError, match="first"):
                m.prompt_logprobs(ids, first=bad)


def test_an_expert_cache_gives_the_same_perplexity(model_path, text):
    with efedge.load(model_path, n_ctx=N_CTX) as m:
        want = perplexity(m, text, n_chunks=2).ppl
    with efedge.load(model_path, n_ctx=N_CTX, cache="40%") as m:
        assert perplexity(m, text, n_chunks=2).ppl == want
        assert m.stats()["misses"] > 0


@requires_llama_cpp
def test_perplexity_matches_llama_cpp(model_path, text):
    from llama_ref import llama_logits

    with efedge.load(model_path, n_ctx=N_CTX) as m:
        ids = m.tokenize(text)
        bos = m.tokenizer.bos_id if m.tokenizer.add_bos else None
        got = perplexity(m, text, n_chunks=4).ppl
    want = reference(lambda c: llama_logits(model_path, c), ids, N_CTX, 4, bos)
    assert got == pytest.approx(want, rel=1e-2)


def test_short_texts_and_bad_arguments_are_refused(model_path, text):
    with efedge.load(model_path, n_ctx=N_CTX) as m:
        n = len(m.tokenize("a short text"))
        with pytest.raises(ArgumentError, match=f"has {n} tokens.*needs at least {2 * N_CTX}"):
            perplexity(m, "a short text")
        for bad in (0, -2, 1.5, True):
            with pytest.raises(ArgumentError, match="n_chunks"):
                perplexity(m, text, n_chunks=bad)
    with efedge.load(model_path, n_ctx=3) as m, pytest.raises(ArgumentError, match="at least"):
        perplexity(m, text)


def test_perplexity_command(model_path, text, tmp_path, capsys):
    f = tmp_path / "text.txt"
    f.write_text(text, encoding="utf-8")
    args = ["perplexity", str(model_path), "-f", str(f), "-c", str(N_CTX), "--chunks", "2"]
    assert cli_main(args) == 0
    out, err = capsys.readouterr()
    with efedge.load(model_path, n_ctx=N_CTX) as m:
        r = perplexity(m, text, n_chunks=2)
    assert out == (f"[1]{r.running[0]:.4f},[2]{r.running[1]:.4f},\n"
                   f"Final estimate: PPL = {r.ppl:.4f} +/- {r.ppl_err:.5f}\n")
    assert "seconds per pass" in err and "2 chunks of 24" in err
    assert cli_main(args + ["--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["ppl"] == r.ppl and d["running"] == r.running and d["n_scored"] == r.n_scored
    # errors: one line, status 1, nothing on stdout
    assert cli_main(["perplexity", str(model_path), "-f", str(tmp_path / "nope.txt")]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("efedge: error: cannot read text file") and \
        err.count("\n") == 1
    short = tmp_path / "short.txt"
    short.write_text("too short", encoding="utf-8")
    assert cli_main(["perplexity", str(model_path), "-f", str(short), "-c", "16"]) == 1
    out, err = capsys.readouterr()
    assert "needs at least 32" in err and "Traceback" not in err
