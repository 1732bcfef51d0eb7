"""JSON mode: the grammar of one object (efedge/json_mode.py) against Python's json module,
the restricted draw (Sampler.sample_where), and format="json" end to end — the API, the
server's response_format and `efedge run --format json`."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from _http import post_json, running_server
from _schema_oracle import form_ok

import efedge
from efedge.cli import main as cli_main
from efedge.errors import ArgumentError, SamplingError
from efedge.generate import GenerationResult
from efedge.grammar import Matcher
from efedge.json_grammar import MAX_DIGITS, MAX_EXP_DIGITS, MAX_INDENT
from efedge.json_mode import json_object_grammar
from efedge.sampling import Sampler, SamplingParams


def accepts(text: str) -> tuple[bool, bool]:
    """(a valid prefix, a complete object)."""
    m = Matcher(json_object_grammar())
    data = text.encode("utf-8")
    ok = not data or m.feed(data)
    return ok, ok and m.done


def _random_value(rng: random.Random, depth: int = 0):
    r = rng.random()
    if depth > 3 or r < 0.3:
        return rng.choice([0, 7, -12, 2.5, -0.125, 3e-7, 1e99, True, False, None, "",
                           "plain", 'quote " and \\ slash', "tab\t nl\n ctl\x01", "é 日本 😀"])
    if r < 0.65:
        return {f"k{i}": _random_value(rng, depth + 1) for i in range(rng.randint(0, 3))}
    return [_random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]


def test_every_prefix_of_a_json_object_is_accepted_and_only_the_whole_is_done():
    rng = random.Random(0)
    for _ in range(300):
        text = json.dumps({"v": _random_value(rng)}, ensure_ascii=rng.random() < 0.5,
                          indent=rng.choice([None, 1, 2]))
        assert accepts(text) == (True, True), text
        for i in range(len(text)):
            assert accepts(text[:i]) == (True, False), (text, i)


@pytest.mark.parametrize("text", [
    '[1]', '"x"', '1', ' {}', '{a:1}', '{"a":01}', '{"a":1.}', '{"a":.5}', '{"a":+1}',
    '{"a":tru}', '{"a":1,}', '{"a" 1}', '{"a":"\x01"}', '{"a":"\\x"}', '{"a":"\\u12g4"}',
    '{}x', '{} ', '{"a":[1,]}', '{,}', '{"a":1}}', '{"a":1 2}', '{"a":-}', '{"a":1e}',
    '{"a":NaN}', '{"a":Infinity}', "{'a':1}", '{"a":[}', '{"a":{]}'])
def test_what_is_not_a_json_object_is_refused(text):
    """Not JSON, not an object (JSON mode writes one), padding around it, or what Python's
    json reads beyond the standard (NaN, Infinity)."""
    assert accepts(text) != (True, True)


def test_mutated_objects_agree_with_json_loads():
    """Random one-character mutations of valid objects: complete exactly when Python's
    json reads a dict from them and their whitespace is of the form JSON mode writes
    (leading whitespace and NaN aside, which it does not write)."""
    rng = random.Random(1)
    checked = 0
    for _ in range(4000):
        text = json.dumps({"v": _random_value(rng)}, indent=rng.choice([None, 1]))
        i = rng.randrange(len(text))
        m = text[:i] + rng.choice('{}[],:"0123456789.eE+-tfnrul \\ax\n') + text[i + 1:]
        if m[:1].isspace():
            continue
        try:
            want = isinstance(json.loads(m), dict) and form_ok(m)
        except json.JSONDecodeError:
            want = False
        assert accepts(m)[1] == want, m
        checked += 1
    assert checked > 3000


def test_numbers_have_bounded_digits_and_read_back_finite():
    """At most MAX_DIGITS digits before and after the point and MAX_EXP_DIGITS in the
    exponent: a model cannot write digits forever, and no number reads back as inf."""
    assert accepts('{"a": ' + "9" * MAX_DIGITS + "." + "9" * MAX_DIGITS + "e-99}") == \
        (True, True)
    for bad in ("9" * (MAX_DIGITS + 1), "0." + "1" * (MAX_DIGITS + 1), "1e100", "1E+" + "9" * 3):
        assert not accepts('{"a": ' + bad + "}")[0], bad
    big = json.loads('{"a": ' + "9" * MAX_DIGITS + "e+" + "9" * MAX_EXP_DIGITS + "}")["a"]
    assert big != float("inf")


def test_whitespace_between_tokens_is_one_space_or_a_newline_and_indentation():
    """As llama.cpp's JSON grammar writes it: a model cannot pad forever (the demo model,
    greedy, wrote twenty newlines between tokens under a plain 20-byte cap)."""
    assert accepts('{ "a": 1}') == (True, True)
    assert accepts('{\n' + " " * MAX_INDENT + '"a":\n\t\t1\n}') == (True, True)
    for bad in ('{' + "\n" + " " * (MAX_INDENT + 1), '{  "a":1}', '{\n\n"a":1}', '{\t"a":1}',
                '{\r\n"a":1}', '{ \n"a":1}'):
        assert not accepts(bad)[0], bad
    assert accepts('{"a": "' + " " * 100 + '\\n\\n"}') == (True, True)  # in a string: text


def test_sample_where_draws_from_the_restricted_distribution():
    logits = np.log(np.array([0.4, 0.3, 0.2, 0.1], dtype=np.float32))
    allowed = {1, 3}
    greedy = Sampler(SamplingParams(temperature=0))
    assert greedy.sample_where(logits, [], allowed.__contains__) == 1
    s = Sampler(SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=5))
    draws = [s.sample_where(logits, [], allowed.__contains__) for _ in range(4000)]
    assert set(draws) == allowed
    assert np.mean(np.array(draws) == 1) == pytest.approx(0.75, abs=0.03)  # 0.3 / 0.4
    # nothing the chain keeps is allowed (top-k 1): the most probable allowed token
    narrow = Sampler(SamplingParams(temperature=1.0, top_k=1, seed=1))
    assert narrow.sample_where(logits, [], {2, 3}.__contains__) == 2
    with pytest.raises(SamplingError, match="no token"):
        greedy.sample_where(logits, [], lambda t: False)


@pytest.fixture(scope="module")
def demo():
    with efedge.load() as m:
        yield m


PROMPTS = ["A JSON record of a user:", "Give me a JSON object describing a cat:", "{", "x = "]


def test_json_mode_writes_one_object(demo):
    """Greedy and sampled: a finished output is one JSON object, ending as it closes; one cut
    by max_tokens is a valid beginning of one."""
    finished = 0
    for prompt in PROMPTS:
        for kw in ({"temperature": 0}, {"temperature": 0.9, "seed": 3},
                   {"temperature": 1.2, "top_k": 0, "min_p": 0.0, "seed": 11}):
            r = GenerationResult([], "")
            text = demo.generate(prompt, max_tokens=160, format="json", result=r, **kw)
            if r.finish_reason == "stop":
                assert isinstance(json.loads(text), dict), text
                assert text.startswith("{") and text.endswith("}")
                finished += 1
            else:
                assert r.finish_reason == "length" and len(r.tokens) == 160
                assert accepts(text)[0], text
    assert finished >= 4
    streamed = "".join(demo.stream(PROMPTS[0], max_tokens=160, temperature=0, format="json"))
    assert streamed == demo.generate(PROMPTS[0], max_tokens=160, temperature=0,
                                     format="json")
    reply = demo.chat([{"role": "user", "content": "a cat as JSON"}], max_tokens=160,
                      temperature=0, format="json")
    assert reply.startswith("{")


def test_bad_format_values_are_refused(demo):
    # (JSON schemas: tests/test_json_schema.py)
    for bad in ("JSON", "yaml", 1):
        with pytest.raises(ArgumentError, match="format"):
            demo.generate("x", max_tokens=1, format=bad)


def test_response_format_json_object_on_the_server(demo):
    with running_server(demo) as srv:
        fmt = {"type": "json_object"}
        status, body = post_json(srv, "/v1/chat/completions", {
            "messages": [{"role": "user", "content": "a cat as JSON"}], "max_tokens": 160,
            "temperature": 0, "response_format": fmt})
        assert status == 200
        content = body["choices"][0]["message"]["content"]
        assert content == demo.chat([{"role": "user", "content": "a cat as JSON"}],
                                    max_tokens=160, temperature=0, format="json")
        status, body = post_json(srv, "/v1/completions", {"prompt": PROMPTS[0], "max_tokens": 160,
                                                "temperature": 0, "response_format": fmt})
        assert status == 200 and body["choices"][0]["finish_reason"] == "stop"
        assert isinstance(json.loads(body["choices"][0]["text"]), dict)
        status, body = post_json(srv, "/v1/chat/completions", {
            "messages": [{"role": "user", "content": "x"}],
            "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}})
        assert status == 400 and body["error"]["code"] == "invalid_value"  # no schema
        assert body["error"]["param"] == "response_format"
        status, body = post_json(srv, "/v1/completions", {"prompt": "x", "response_format": {
            "type": "xml"}})
        assert status == 400 and body["error"]["code"] == "invalid_value"


def test_run_format_json(capsys):
    assert cli_main(["run", "-p", PROMPTS[0], "-n", "160", "--temp", "0", "--format",
                     "json"]) == 0
    out = capsys.readouterr().out
    assert isinstance(json.loads(out), dict)
