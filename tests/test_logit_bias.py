"""logit_bias: the sampler's first step (as in llama.cpp's chain), the API keyword, the
server's two request forms (OpenAI's object, llama.cpp's pairs), `-l TOKEN_ID(+/-)BIAS`
on the command line, and greedy output equal to llama.cpp's with the same bias."""

from __future__ import annotations

import argparse
import math
import subprocess
import sys

import numpy as np
import pytest
from _http import post_json, running_server

import efedge
from efedge.cli.common import logit_bias_arg
from efedge.errors import SamplingError
from efedge.generate import GenerationResult
from efedge.sampling import Sampler, SamplingParams

PLAIN = dict(top_k=0, top_p=1.0, min_p=0.0)


def softmax(x):
    x = np.asarray(x, np.float64)
    e = np.exp(x - x.max())
    return e / e.sum()


def test_bias_is_added_before_the_penalties_and_bans_with_minus_inf():
    logits = [2.0, 1.0, -1.0, 0.5]
    s = Sampler(SamplingParams(temperature=1.0, repeat_penalty=2.0, seed=0, **PLAIN,
                               logit_bias={1: 1.5, 3: -math.inf, 2: -0.5}))
    ids, probs = s.distribution(np.array(logits, np.float32), [1, 2])
    # token 1: 1 + 1.5 = 2.5 > 0, then divided by the penalty; token 2: -1 - 0.5, then
    # multiplied; token 3 banned (not a candidate at all)
    want = softmax([2.0, 1.25, -3.0])
    got = dict(zip(ids.tolist(), probs.tolist(), strict=True))
    assert sorted(got) == [0, 1, 2]
    assert [got[i] for i in range(3)] == pytest.approx(want.tolist(), rel=1e-6)
    draws = {s(np.array(logits, np.float32), []) for _ in range(300)}
    assert 3 not in draws and draws == {0, 1, 2}


def test_bias_moves_greedy_and_leaves_the_input_alone():
    x = np.array([2.0, 1.5, 0.0], np.float32)
    x.setflags(write=False)
    assert Sampler(SamplingParams(temperature=0))(x, []) == 0
    assert Sampler(SamplingParams(temperature=0, logit_bias={2: 2.5}))(x, []) == 2
    assert Sampler(SamplingParams(temperature=0, logit_bias={0: -math.inf}))(x, []) == 1
    # float64 logits keep their precision
    y = np.array([1e-9, 0.0], np.float64)
    assert Sampler(SamplingParams(temperature=0, logit_bias={1: 5e-10}))(y, []) == 0
    with pytest.raises(SamplingError, match="every logit is -inf"):
        Sampler(SamplingParams(temperature=0, logit_bias={0: -math.inf, 1: -math.inf,
                                                          2: -math.inf}))(x, [])


@pytest.mark.parametrize("bias, words", [
    ({-1: 1.0}, "token id -1"), ({True: 1.0}, "token id True"), ({"5": 1.0}, "token id '5'"),
    ({1: math.nan}, "finite number or -inf"), ({1: math.inf}, "finite number or -inf"),
    ({1: "x"}, "finite number or -inf"), ([(1, 2.0)], "mapping")])
def test_bad_biases_are_named(bias, words):
    with pytest.raises(SamplingError, match="logit_bias") as exc:
        SamplingParams(logit_bias=bias).validate()
    assert words in str(exc.value)


def test_an_id_past_the_vocabulary_is_named():
    with pytest.raises(SamplingError, match=r"token id 9 is outside the vocabulary \[0, 3\)"):
        Sampler(SamplingParams(logit_bias={9: 1.0}))(np.zeros(3, np.float32), [])


@pytest.fixture(scope="module")
def model(tiny_gguf):
    with efedge.load(tiny_gguf("qwen3moe", "F32"), n_ctx=256) as m:
        yield m


def _greedy(m, prompt, n, **kw):
    r = GenerationResult([], "")
    m.generate(prompt, max_tokens=n, temperature=0, result=r, **kw)
    return list(r.tokens)


def test_api_ban_and_vocab_check(model):
    prompt = [1, 2, 3, 4]
    base = _greedy(model, prompt, 8)
    banned = _greedy(model, prompt, 8, logit_bias={base[0]: -math.inf})
    assert banned[0] != base[0] and base[0] not in banned
    # numpy keys and values are taken; JSON mode and logprobs see the biased chain
    assert _greedy(model, prompt, 8, logit_bias={np.int64(base[0]): np.float32(-1e4)}) == banned
    with pytest.raises(SamplingError, match=f"0..{model.n_vocab - 1}"):
        model.generate(prompt, max_tokens=1, logit_bias={model.n_vocab: 1.0})
    r = GenerationResult([], "")
    model.generate(prompt, max_tokens=3, temperature=0, result=r, logprobs=1,
                   logit_bias={base[0]: -math.inf})
    # log probabilities stay the model's own (before the bias), as for the penalties
    assert r.logprobs[0].token == banned[0]
    assert r.logprobs[0].top[0][0] == base[0]


@pytest.mark.requires_llama_cpp
def test_greedy_with_a_bias_matches_llama_cpp(tiny_gguf, model):
    import llama_ref

    path = tiny_gguf("qwen3moe", "F32")
    prompt = [5, 9, 2, 7, 11]
    base = _greedy(model, prompt, 6)
    bias = {base[0]: -math.inf, base[1]: -3.0, 17: 2.0}
    ours = _greedy(model, prompt, 6, logit_bias=bias)
    llm = llama_ref.llama(path, 256)
    llm.reset()
    out = llm.create_completion(prompt, max_tokens=6, temperature=0.0, logit_bias=bias)
    assert ours != base
    # (llama-cpp-python leaves out bytes of a character cut short: compare without them)
    assert (llm.detokenize(ours).decode(errors="ignore")
            == out["choices"][0]["text"].replace("\ufffd", ""))


def test_server_takes_both_forms_and_names_bad_ones(model):
    base = _greedy(model, [1, 2, 3, 4], 4)
    with running_server(model) as srv:
        def call(path, body):
            return post_json(srv, path, body)
        body = {"prompt": [1, 2, 3, 4], "max_tokens": 4, "temperature": 0}
        for form in ({str(base[0]): -100}, [[base[0], False]]):
            status, got = call("/v1/completions", dict(body, logit_bias=form))
            assert status == 200, got
            text = got["choices"][0]["text"]
            assert text == model.detokenize(_greedy(model, [1, 2, 3, 4], 4,
                                                   logit_bias={base[0]: -math.inf}))
        for bad, code in [({"x": 1}, "invalid_value"), ({"5": 101}, "invalid_value"),
                          ({"5": True}, "invalid_value"), ({"-5": 1}, "invalid_value"),
                          ([[1, 2, 3]], "invalid_type"), ("5", "invalid_type"),
                          # a pair's string is a text in llama.cpp (the ids of "5"), never
                          # the id 5
                          ([["5", 1]], "invalid_value"),
                          ({str(model.n_vocab): 1}, "invalid_value")]:
            status, got = call("/v1/chat/completions",
                               {"messages": [{"role": "user", "content": "hi"}],
                                "max_tokens": 1, "logit_bias": bad})
            assert status == 400 and got["error"]["code"] == code, (bad, got)
            assert got["error"]["param"] == "logit_bias", got


@pytest.mark.parametrize("text, want", [("15043+1", (15043, 1.0)), ("7-0.5", (7, -0.5)),
                                        ("3-inf", (3, -math.inf)), ("3+.25", (3, 0.25))])
def test_cli_form(text, want):
    assert logit_bias_arg(text) == want


@pytest.mark.parametrize("text", ["3+inf", "x+1", "3", "3*1", "-3+1", "3+1e5", ""])
def test_cli_form_refused(text):
    with pytest.raises(argparse.ArgumentTypeError, match="TOKEN_ID"):
        logit_bias_arg(text)


def test_cli_run_bans_a_token(tiny_gguf, model):
    path = str(tiny_gguf("qwen3moe", "F32"))
    args = [sys.executable, "-m", "efedge", "run", path, "-p", "hello", "-n", "4", "--temp", "0"]
    plain = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert plain.returncode == 0, plain.stderr
    first = _greedy(model, "hello", 1)[0]  # (the command's prompt, BOS added as there)
    biased = subprocess.run(args + ["-l", f"{first}-inf"], capture_output=True, text=True,
                            timeout=300)
    assert biased.returncode == 0, biased.stderr
    assert biased.stdout != plain.stdout
    bad = subprocess.run(args + ["-l", f"{model.n_vocab}+1"], capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode == 1 and "logit_bias" in bad.stderr
