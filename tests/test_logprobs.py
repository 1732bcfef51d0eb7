"""Log probabilities: `logprobs=` on generate / stream / chat, Model.prompt_logprobs, and
the server's `logprobs` / `top_logprobs` (completions and chat, streaming and not, with
echo and stop strings), checked against the log-softmax of the model's logits and of
llama.cpp's."""

from __future__ import annotations

import json

import numpy as np
import pytest
from _http import post, running_server, sse_chunks
from conftest import requires_llama_cpp

import efedge
from efedge import api_scoring
from efedge.errors import ArgumentError
from efedge.generate import GenerationResult
from efedge.logprobs import sequence_logprobs

PROMPT = "The quick brown fox jumps over"
TOL = 1e-3  # decode's kernels against the batched ones (whole-sequence logits)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    top = x.max(-1, keepdims=True)
    return x - top - np.log(np.exp(x - top).sum(-1, keepdims=True))


@pytest.fixture(scope="module")
def model_path(tiny_gguf):
    return tiny_gguf("qwen3moe", "F32")


@pytest.fixture(scope="module")
def model(model_path):
    with efedge.load(model_path) as m:
        yield m


def _generate(model, prompt=PROMPT, n=8, top=3, **kw):
    r = GenerationResult([], "")
    text = model.generate(prompt, max_tokens=n, temperature=0, result=r, logprobs=top, **kw)
    return text, r


def test_generated_logprobs_are_the_models_distribution(model, monkeypatch):
    """Each generated token's entry: the log-softmax of the logits generation saw, the top
    alternatives in order (the greedy token first), text offsets where each token's text
    starts; and within TOL of the whole sequence's logits evaluated at once."""
    from efedge import generate

    rows = []
    real = generate.token_logprob

    def spy(row, *a):
        rows.append(np.array(row))
        return real(row, *a)

    monkeypatch.setattr(generate, "token_logprob", spy)
    text, r = _generate(model, top=4)
    monkeypatch.undo()
    assert len(r.logprobs) == len(r.tokens) == len(rows) == 8
    ids = model.tokenize(PROMPT)
    # (at once: generation's decode kernels sum in another order than the batched ones)
    whole = log_softmax(model.logits(ids + r.tokens))
    for i, e in enumerate(r.logprobs):
        row = log_softmax(rows[i])
        assert e.token == r.tokens[i]
        assert e.logprob == pytest.approx(row[e.token], abs=1e-9)
        assert [t for t, _ in e.top] == list(np.argsort(-row, kind="stable")[:4])
        assert [v for _, v in e.top] == pytest.approx(np.sort(row)[::-1][:4].tolist(),
                                                      abs=1e-9)
        assert e.top[0][0] == e.token  # greedy
        assert e.logprob == pytest.approx(whole[len(ids) - 1 + i, e.token], abs=TOL)
    pieces = [model.tokenizer.token_bytes(t).decode("utf-8", "replace") for t in r.tokens]
    offsets = np.cumsum([0] + [len(p) for p in pieces])[:-1].tolist()
    if "".join(pieces) == text:  # every token a whole character: offsets are exact
        assert [e.offset for e in r.logprobs] == offsets


def test_sampling_settings_do_not_change_logprobs(model):
    """The log probabilities are the model's, before temperature, top-k and penalties:
    the same tokens give the same values however they were chosen."""
    _, greedy = _generate(model, top=0)
    assert all(e.top == [] for e in greedy.logprobs)
    r = GenerationResult([], "")
    model.generate(PROMPT, max_tokens=8, temperature=1.5, top_k=3, repeat_penalty=1.3,
                   seed=7, result=r, logprobs=0)
    ids = model.tokenize(PROMPT)
    ref = log_softmax(model.logits(ids + r.tokens))
    got = [e.logprob for e in r.logprobs]
    want = [ref[len(ids) - 1 + i, t] for i, t in enumerate(r.tokens)]
    assert got == pytest.approx(want, abs=TOL)


def test_stop_string_tokens_are_left_out(model):
    """A stop string cuts the text: the tokens that made it have no entries; the others
    all start inside the returned text."""
    full, _ = _generate(model, n=12)
    stop = full[len(full) // 2:len(full) // 2 + 3]
    cut = full[:full.index(stop)]
    text, r = _generate(model, n=12, stop=[stop])
    assert text == cut and r.finish_reason == "stop"
    assert len(r.logprobs) < len(r.tokens)
    assert all(e.offset < len(text) for e in r.logprobs)
    joined = "".join(model.tokenizer.token_bytes(e.token).decode("utf-8", "replace")
                     for e in r.logprobs)
    assert joined.startswith(text[:1]) and len(joined) >= len(text)


def test_stream_and_chat_take_logprobs(model):
    r1, r2 = GenerationResult([], ""), GenerationResult([], "")
    "".join(model.stream(PROMPT, max_tokens=5, temperature=0, result=r1, logprobs=1))
    _, want = _generate(model, n=5, top=1)
    assert [(e.token, e.logprob, e.top) for e in r1.logprobs] == \
        [(e.token, e.logprob, e.top) for e in want.logprobs]
    model.chat([{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0, result=r2,
               logprobs=2)
    assert len(r2.logprobs) == len(r2.tokens) and all(len(e.top) == 2 for e in r2.logprobs)
    r3 = GenerationResult([], "")
    model.generate(PROMPT, max_tokens=3, temperature=0, result=r3)
    assert r3.logprobs is None  # not asked for


@pytest.mark.parametrize("bad", [-1, 21, True, 1.5, "3"])
def test_bad_logprobs_values_are_refused(model, bad):
    with pytest.raises(ArgumentError, match="logprobs"):
        model.generate(PROMPT, max_tokens=1, logprobs=bad)
    with pytest.raises(ArgumentError, match="top_n"):
        model.prompt_logprobs([1, 2, 3], bad)


def test_prompt_logprobs_in_chunks_equal_the_whole_prompt(model, monkeypatch):
    """prompt_logprobs evaluates PROMPT_CHUNK tokens at a time: the values are the whole
    sequence's, bit for bit, and a generation from the same prompt afterwards is
    unchanged."""
    ids = model.tokenize(PROMPT * 2)
    logits = model.logits(ids)
    whole = sequence_logprobs(logits, ids, 2)
    ref = log_softmax(logits)
    for i, e in enumerate(whole):
        assert e.token == ids[i + 1]
        assert e.logprob == pytest.approx(ref[i, ids[i + 1]], abs=1e-9)
        assert [t for t, _ in e.top] == list(np.argsort(-ref[i], kind="stable")[:2])
    for chunk in (len(ids) - 1, 7, 5, 4, 2):
        monkeypatch.setattr(api_scoring, "PROMPT_CHUNK", chunk)
        assert model.prompt_logprobs(ids, 2) == whole, chunk  # the same logits, bit for bit
    text, _ = _generate(model, prompt=ids, n=6)
    monkeypatch.setattr(api_scoring, "PROMPT_CHUNK", 256)
    model.logits([1])  # a fresh cache
    assert _generate(model, prompt=ids, n=6)[0] == text
    assert model.prompt_logprobs(ids[:1]) == []


@requires_llama_cpp
def test_logprobs_match_llama_cpp(model, model_path):
    """The same values from llama.cpp's logits of the same file (its echo logprobs in
    llama-cpp-python pair each token with the row after it, so the logits are the
    reference, not create_completion)."""
    from llama_ref import llama_logits

    text, r = _generate(model, top=0)
    ids = model.tokenize(PROMPT)
    ref = log_softmax(llama_logits(model_path, ids + r.tokens))
    prompt = model.prompt_logprobs(ids)
    got = np.array([e.logprob for e in prompt + r.logprobs])
    seq = ids + r.tokens
    want = np.array([ref[i, seq[i + 1]] for i in range(len(seq) - 1)])
    assert np.abs(got - want).max() < 2e-2 * ref.std(), np.abs(got - want).max()


# -- the server ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(model):
    with running_server(model) as srv:
        yield srv


def test_completions_logprobs_with_echo(server, model):
    """OpenAI's completions shape: tokens, token_logprobs (None for the first prompt
    token), top_logprobs (text → logprob), text_offset into the returned text; the prompt's
    entries are prompt_logprobs', the generated ones generate()'s."""
    body = {"prompt": PROMPT, "max_tokens": 6, "temperature": 0, "logprobs": 2, "echo": True}
    status, text = post(server, "/v1/completions", body)
    assert status == 200
    choice = json.loads(text)["choices"][0]
    lp = choice["logprobs"]
    ids = model.tokenize(PROMPT)
    gen_text, r = _generate(model, n=6, top=2)
    assert choice["text"] == PROMPT + gen_text
    n = len(ids) + len(r.tokens)
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == \
        len(lp["text_offset"]) == n
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    want = [e.logprob for e in model.prompt_logprobs(ids, 2)] + [e.logprob for e in r.logprobs]
    assert lp["token_logprobs"][1:] == pytest.approx(want, abs=1e-6)
    assert all(len(d) <= 2 and max(d.values()) >= lp["token_logprobs"][i + 1] - 1e-6
               for i, d in enumerate(lp["top_logprobs"][1:]))
    offs = lp["text_offset"]
    assert offs == sorted(offs) and offs[len(ids)] == len(PROMPT)
    assert [o - len(PROMPT) for o in offs[len(ids):]] == [e.offset for e in r.logprobs]
    # streamed: the same records, spread over the chunks
    status, text = post(server, "/v1/completions", dict(body, stream=True))
    chunks = sse_chunks(text)
    streamed = {k: sum((c["choices"][0]["logprobs"][k] for c in chunks), [])
                for k in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}
    assert streamed == lp
    # without echo: only the generated tokens; logprobs 0: no alternatives
    status, text = post(server, "/v1/completions", dict(body, echo=False, logprobs=0))
    lp0 = json.loads(text)["choices"][0]["logprobs"]
    assert lp0["token_logprobs"] == pytest.approx([e.logprob for e in r.logprobs], abs=1e-6)
    assert lp0["top_logprobs"] == [{}] * len(r.tokens)
    assert lp0["text_offset"][0] == 0
    # not asked for: null
    status, text = post(server, "/v1/completions", {"prompt": PROMPT, "max_tokens": 2})
    assert json.loads(text)["choices"][0]["logprobs"] is None


def test_chat_logprobs_and_stop(server, model):
    """OpenAI's chat shape (content: token, logprob, bytes, top_logprobs), streaming and
    not alike; a stop string's tokens left out."""
    msgs = [{"role": "user", "content": "Tell me about the fox"}]
    body = {"messages": msgs, "max_tokens": 8, "temperature": 0, "logprobs": True,
            "top_logprobs": 3}
    status, text = post(server, "/v1/chat/completions", body)
    choice = json.loads(text)["choices"][0]
    content = choice["logprobs"]["content"]
    r = GenerationResult([], "")
    reply = model.chat(msgs, max_tokens=8, temperature=0, result=r, logprobs=3)
    assert choice["message"]["content"] == reply
    assert [c["logprob"] for c in content] == pytest.approx([e.logprob for e in r.logprobs],
                                                             abs=1e-6)
    for c, e in zip(content, r.logprobs, strict=True):
        assert bytes(c["bytes"]) == model.tokenizer.token_bytes(e.token)
        assert [bytes(t["bytes"]) for t in c["top_logprobs"]] == \
            [model.tokenizer.token_bytes(t) for t, _ in e.top]
    status, text = post(server, "/v1/chat/completions", dict(body, stream=True))
    chunks = sse_chunks(text)
    streamed = sum((c["choices"][0]["logprobs"]["content"] for c in chunks
                    if c["choices"] and c["choices"][0]["logprobs"] is not None), [])
    assert streamed == content
    # a stop string: its tokens have no entries
    stop = reply[len(reply) // 2:len(reply) // 2 + 2]
    status, text = post(server, "/v1/chat/completions", dict(body, stop=[stop]))
    choice = json.loads(text)["choices"][0]
    cut = choice["message"]["content"]
    assert cut == reply[:reply.index(stop)] and choice["finish_reason"] == "stop"
    kept = choice["logprobs"]["content"]
    assert len(kept) < len(content) and kept == content[:len(kept)]
