"""JSON-schema structured outputs: the schema grammar (efedge/json_schema.py on
efedge/grammar.py) against Python's json plus a validator of the supported subset written
here, and format={schema} end to end — the API, the server's response_format json_schema
and `efedge run --format FILE.json`."""

from __future__ import annotations

import json
import random

import pytest
from _http import post_json, running_server

import efedge
from efedge.cli import main as cli_main
from efedge.errors import ArgumentError
from efedge.generate import GenerationResult
from efedge.grammar import Matcher
from efedge.json_grammar import MAX_DIGITS
from efedge.json_schema import compile_schema
from tests._schema_oracle import dump, instance, numbers_ok, oracle

ANY = {}
SCHEMAS = {
    "person": {
        "type": "object", "title": "a person", "$schema": "https://json-schema.org/draft/2020-12",
        "properties": {
            "name": {"type": "string", "minLength": 1, "maxLength": 8, "description": "x"},
            "age": {"type": "integer", "default": 3},
            "email": {"type": ["string", "null"]},
            "tags": {"type": "array", "items": {"type": "string"}, "minItems": 1,
                     "maxItems": 3},
            "pet": {"type": "object", "properties": {"kind": {"enum": ["cat", "dog"]},
                                                     "legs": {"type": "number"}},
                    "required": ["legs"], "additionalProperties": False}},
        "required": ["name", "pet"], "additionalProperties": False},
    "open": {"type": "object", "properties": {"id": {"type": "integer"},
                                              "ok": {"type": "boolean"}},
             "required": ["ok"]},  # additionalProperties absent: other keys allowed
    "extra_schema": {"properties": {"a": {"const": 1}},
                     "additionalProperties": {"type": "array", "maxItems": 2}},
    "enums": {"type": "array", "items": {"enum": [1, 12, "a", "ab", None, True,
                                                  {"k": [1, 2]}, [], 2.5, "é"]}},
    "union": {"anyOf": [{"type": "integer"}, {"type": "string", "maxLength": 3},
                        {"type": "object", "properties": {"x": {"oneOf": [
                            {"type": "null"}, {"type": "array", "items": {"type": "boolean"},
                                               "maxItems": 0}]}}, "required": ["x"],
                         "additionalProperties": False}]},
    "refs": {"$defs": {"point": {"type": "object",
                                 "properties": {"x": {"type": "number"},
                                                "y": {"type": "number"}},
                                 "required": ["x", "y"], "additionalProperties": False},
                       "a/b": {"const": "slash"}},
             "definitions": {"color": {"enum": ["red", "green"]}},
             "type": "object", "additionalProperties": False,
             "properties": {"from": {"$ref": "#/$defs/point"}, "to": {"$ref": "#/$defs/point"},
                            "c": {"$ref": "#/definitions/color"}, "s": {"$ref": "#/$defs/a~1b"}},
             "required": ["from", "to"]},
    "tree": {"type": "object", "properties": {
        "v": {"type": "integer"}, "kids": {"type": "array", "items": {"$ref": "#"}}},
        "required": ["v"], "additionalProperties": False},
    "any": ANY,
    "number": {"type": "number"},
    "strings": {"type": "array", "items": {"type": "string", "minLength": 2, "maxLength": 4},
                "minItems": 2, "maxItems": 4},
}


def feed(schema, data: bytes) -> Matcher | None:
    m = Matcher(compile_schema(schema))
    return m if m.feed(data) else None


@pytest.mark.parametrize("name", SCHEMAS)
def test_every_prefix_of_an_instance_is_accepted_and_complete_only_when_valid(name):
    s, rng = SCHEMAS[name], random.Random(name)
    for _ in range(60):
        text = dump(instance(s, s, rng), rng, rng.random() < 0.5)
        assert oracle(text, s), text  # the generator and the validator agree
        data = text.encode()
        m = Matcher(compile_schema(s))
        for i, b in enumerate(data):
            try:  # complete exactly where the bytes so far are an instance (a number can be)
                want = oracle(data[:i].decode(), s)
            except UnicodeDecodeError:  # inside a character
                want = False
            assert m.accepting == want, (text, i)
            assert m.feed(bytes([b])), (text, i, data[:i + 1])
        assert m.accepting, text
        # done unless a number could go on (an integer 0 cannot: no leading zeros; nor one
        # whose last part has all the digits it may)
        goes_on = text[-1].isdigit() and numbers_ok(text + "1") and \
            not (name == "union" and text.lstrip("-") == "0")
        assert m.done == (not goes_on), text


@pytest.mark.parametrize("name", SCHEMAS)
def test_mutated_instances_agree_with_the_validator(name):
    """Random one-character changes: a complete instance exactly when json reads one that
    the validator takes."""
    s, rng = SCHEMAS[name], random.Random(name + "m")
    checked = valid_seen = 0
    for _ in range(1500):
        text = dump(instance(s, s, rng), rng, rng.random() < 0.5)
        if not text:
            continue
        i = rng.randrange(len(text))
        mut = text[:i] + rng.choice('{}[],:"0123456789.eE+-tfnrulab \\x\n') + text[i + 1:]
        m = feed(s, mut.encode())
        want = oracle(mut, s)
        assert (m is not None and m.accepting) == want, (text, mut)
        checked += 1
        valid_seen += want
    assert checked > 1000 and 0 < valid_seen < checked


@pytest.mark.parametrize("name, good, bad", [
    ("person", ['{"name":"a","pet":{"legs":4}}', '{"name":"abcdefgh","age":-1,"pet":{"kind":'
                '"cat","legs":0.5}}'],
     ['{"pet":{"legs":4}}', '{"name":"","pet":{"legs":4}}', '{"name":"abcdefghi","pet":{}}',
      '{"name":"a","pet":{"legs":4},"x":1}', '{"pet":{"legs":4},"name":"a"}',
      '{"name":"a","tags":[],"pet":{"legs":4}}', '{"name":"a","pet":{"legs":4,"kind":"cat"}}',
      '{"name":"a","age":1.0,"pet":{"legs":4}}']),
    ("open", ['{"ok":true,"zz":[1,{"a":null}]}', '{"id":1,"ok":false,"i":1,"d":2}'],
     ['{"ok":true,"ok":true}', '{"ok":true,"id":1}', '{"ok":true,"o\\u006b":1}']),
    ("enums", ['[1,12,"ab",{"k":[1,2]},[],2.5,"é",null,true]'],
     ['[13]', '[{"k":[1]}]', '["b"]', '[false]', '[{"k": [1,2]}]']),
    ("union", ['7', '"abc"', '{"x":null}', '{"x":[]}'], ['"abcd"', '{"x":[true]}', '{}', '7.5']),
    ("tree", ['{"v":1,"kids":[{"v":2,"kids":[{"v":3}]},{"v":4}]}'], ['{"v":1,"kids":[{}]}']),
    ("refs", ['{"from":{"x":1,"y":2},"to":{"x":0,"y":-1e3},"c":"red","s":"slash"}'],
     ['{"from":{"x":1,"y":2}}', '{"from":{"x":1},"to":{"x":0,"y":0}}']),
    ("strings", ['["ab","\\u00e9\\n"]', '["日本","abcd","ab","ab"]'],
     ['["ab"]', '["a","ab"]', '["abcde","ab"]', '["ab","\\ud83d\\ude00"]']),
])
def test_chosen_cases(name, good, bad):
    s = SCHEMAS[name]
    for text in good:
        assert oracle(text, s) and feed(s, text.encode()).accepting, text
    for text in bad:
        m = feed(s, text.encode())
        assert m is None or not m.accepting, text


def test_limits_on_whitespace_and_digits():
    s = SCHEMAS["open"]
    assert feed(s, b'{\n' + b" " * 20 + b'"ok":\n\ttrue}').done  # a newline, indentation
    assert feed(s, b'{\n' + b" " * 21) is None
    for pad in (b"  ", b"\n\n", b"\t", b"\r\n", b" \n"):  # one space, or a newline first
        assert feed(s, b'{' + pad + b'"ok":true}') is None, pad
    assert feed(s, b'{ "ok": true}').done
    short = feed({"type": "integer"}, b"9" * (MAX_DIGITS - 1))
    assert short.accepting and not short.done  # may end (an end-of-text token) or go on
    assert feed({"type": "integer"}, b"9" * MAX_DIGITS).done
    assert feed({"type": "integer"}, b"9" * (MAX_DIGITS + 1)) is None
    # an exponent of two digits at most: every number reads back finite (1e100 would not
    # after 20 digits; 1e309 is inf)
    assert feed({"type": "number"}, b"-1.5e+99").done
    assert feed({"type": "number"}, b"1e100") is None
    assert feed({"type": "string"}, b'"' + b" " * 300 + b'"').done  # text, not padding


@pytest.mark.parametrize("schema, message", [
    ({"type": "string", "pattern": "a"}, "keyword 'pattern' is not supported"),
    ({"allOf": [{}]}, "keyword 'allOf'"),
    ({"type": "string", "format": "date"}, "keyword 'format'"),
    ({"type": "object", "properties": {"n": {"type": "integer", "minimum": 0}}},
     "at #/properties/n: keyword 'minimum'"),
    ({"$ref": "#/properties/a"}, "$ref '#/properties/a' is not supported"),
    ({"$ref": "#/$defs/nope", "$defs": {}}, "no such definition"),
    ({"type": "array", "items": [{}]}, "items as an array"),
    ({"type": "float"}, "type 'float' is not a JSON Schema type"),
    ({"type": "array", "minItems": 3, "maxItems": 2}, "maxItems 2 is below minItems 3"),
    ({"type": "string", "minLength": 3, "maxLength": 2}, "maxLength 2 is below minLength 3"),
    ({"enum": []}, "enum must be a non-empty array"),
    ({"type": "object", "required": ["a"]}, "required names 'a'"),
    ({"enum": ["a"], "maxLength": 1}, "enum together with maxLength"),
    ({"anyOf": [{}], "type": "string"}, "anyOf together with type"),
    ({"properties": {"a": {"$defs": {}}}}, "$defs must be an object at the top"),
    ({"properties": {"a": False}}, "the schema false"),
    ({"$ref": "#"}, "left recursion"),
    ({"type": "string", "items": {}}, "items applies to arrays"),
    ({"type": "string", "maxLength": 10 ** 6}, "maxLength above"),
    ({"type": "string", "minLength": -1}, "minLength must be a non-negative integer"),
    ({"oneOf": []}, "oneOf must be a non-empty array"),
    ({"type": "integer", "enum": ["a"]}, "no value of enum/const has type"),
    ({"additionalProperties": {"type": "strin"}}, "#/additionalProperties: type 'strin'"),
])
def test_what_is_outside_the_subset_is_refused_naming_the_keyword(schema, message):
    with pytest.raises(ArgumentError) as exc:
        compile_schema(schema)
    assert message in str(exc.value)


def test_large_and_deep_schemas():
    """Long repetitions compile without deep recursion; nesting past Python's recursion
    limit is an ArgumentError, not a RecursionError."""
    m = Matcher(compile_schema({"type": "array", "items": {"type": "string", "maxLength":
                                                           4096}, "maxItems": 4096}))
    assert m.feed(b'["' + b"x" * 4096 + b'"' + b',""' * 4095 + b"]") and m.done
    assert not m.feed(b",")
    deep: dict = {}
    for _ in range(5000):
        deep = {"type": "array", "items": deep}
    with pytest.raises(ArgumentError, match="nests too deeply"):
        compile_schema(deep)


def _nested_arrays(second_items: dict) -> dict:
    """Arrays of arrays, any depth: the anyOf's second branch reads them too."""
    return {"$defs": {"a": {"anyOf": [{"type": "array", "items": {"$ref": "#/$defs/a"}},
                                      {"type": "array", "items": second_items}]}},
            "$ref": "#/$defs/a"}


def test_twin_branches_do_not_multiply_the_matchers_stacks():
    """Two equal anyOf branches read every "[" two ways: their stacks doubled at each level
    (4.7 million by the nineteenth). Twins are one branch now."""
    m = Matcher(compile_schema(_nested_arrays({"$ref": "#/$defs/a"})))
    assert m.feed(b"[" * 12) and len(m.stacks) <= 36
    assert m.feed(b"]" * 12) and m.done


def test_a_schema_too_ambiguous_to_follow_is_an_error(demo):
    """Branches that differ but read the same arrays still double the stacks by the level;
    past grammar.MAX_STACKS the generation stops with an error naming the cause, in
    milliseconds, where it ground on for seconds a byte and more memory each."""
    schema = _nested_arrays({"anyOf": [{"$ref": "#/$defs/a"}, {"type": "integer"}]})
    bracket = demo.tokenize("[", add_special=False)
    assert len(bracket) == 1
    with pytest.raises(ArgumentError, match="too ambiguous"):
        demo.generate("x", max_tokens=16, temperature=0, format=schema,
                      logit_bias={bracket[0]: 100.0})


@pytest.fixture(scope="module")
def demo():
    with efedge.load() as m:
        yield m


COLOR = {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}},
         "required": ["color"], "additionalProperties": False}
GENERATED = [SCHEMAS["person"], SCHEMAS["union"], SCHEMAS["refs"], SCHEMAS["open"],
             SCHEMAS["strings"], COLOR, {"type": "integer"}]
SAMPLING = [{"temperature": 0}, {"temperature": 0.9, "seed": 3},
            {"temperature": 1.2, "top_k": 0, "min_p": 0.0, "seed": 11}]


@pytest.mark.parametrize("every", [False, pytest.param(True, marks=pytest.mark.slow)],
                         ids=["half", "all"])
def test_generated_outputs_follow_the_schema(demo, every):
    """Greedy and sampled: a finished output is an instance; one cut by max_tokens is the
    beginning of one. Schemas whose instances are short (bounded whitespace, an enum, at most
    MAX_DIGITS digits) always finish. The default run takes one of the two prompts per
    schema, in turn (the 42 generations of both took ~60 s of a 2-core CI run)."""
    finished = 0
    prompts = ("A JSON record of a user:", "{")
    for i, schema in enumerate(GENERATED):
        for prompt in prompts if every else (prompts[i % 2],):
            for kw in SAMPLING:
                r = GenerationResult([], "")
                text = demo.generate(prompt, max_tokens=160, format=schema, result=r, **kw)
                if r.finish_reason == "stop":
                    assert oracle(text, schema), (schema, text)
                    finished += 1
                else:
                    assert r.finish_reason == "length" and len(r.tokens) == 160
                    data = b"".join(demo.tokenizer.token_bytes(t) for t in r.tokens)
                    assert feed(schema, data) is not None, (schema, text)
                if schema in (COLOR, {"type": "integer"}):
                    assert r.finish_reason == "stop", (schema, text)
    assert finished >= (20 if every else 10)
    streamed = "".join(demo.stream("{", max_tokens=160, temperature=0, format=COLOR))
    assert streamed == demo.generate("{", max_tokens=160, temperature=0, format=COLOR)
    reply = demo.chat([{"role": "user", "content": "a color as JSON"}], max_tokens=160,
                      temperature=0, format=COLOR)
    assert oracle(reply, COLOR), reply


def test_the_api_refuses_bad_formats(demo):
    with pytest.raises(ArgumentError, match="keyword 'pattern'"):
        demo.generate("x", max_tokens=1, format={"type": "string", "pattern": "x"})
    with pytest.raises(ArgumentError, match="keyword 'not'"):
        demo.chat([{"role": "user", "content": "x"}], format={"not": {}})
    with pytest.raises(ArgumentError, match="format must be"):
        demo.generate("x", max_tokens=1, format=[{"type": "string"}])


def test_response_format_json_schema_on_the_server(demo):
    def fmt(schema):
        return {"type": "json_schema",
                "json_schema": {"name": "x", "schema": schema, "strict": True}}

    messages = [{"role": "user", "content": "a color as JSON"}]
    with running_server(demo) as srv:
        status, body = post_json(srv, "/v1/chat/completions", {
            "messages": messages, "max_tokens": 160, "temperature": 0,
            "response_format": fmt(COLOR)})
        assert status == 200
        content = body["choices"][0]["message"]["content"]
        assert content == demo.chat(messages, max_tokens=160, temperature=0, format=COLOR)
        assert oracle(content, COLOR)
        # llama.cpp's server's form: the schema beside the type
        status, body = post_json(srv, "/v1/completions", {
            "prompt": "{", "max_tokens": 160, "temperature": 0.8, "seed": 2,
            "response_format": {"type": "json_schema", "schema": COLOR}})
        assert status == 200 and body["choices"][0]["finish_reason"] == "stop"
        assert oracle(body["choices"][0]["text"], COLOR)
        for schema, code, words in [
                ({"type": "string", "pattern": "x"}, "unsupported", "keyword 'pattern'"),
                ({"type": "array", "minItems": 2, "maxItems": 1}, "invalid_value",
                 "maxItems 1 is below minItems 2")]:
            status, body = post_json(srv, "/v1/chat/completions", {"messages": messages,
                                                         "response_format": fmt(schema)})
            assert status == 400 and body["error"]["code"] == code
            assert body["error"]["param"] == "response_format" and words in \
                body["error"]["message"]
        status, body = post_json(srv, "/v1/completions", {"prompt": "x", "response_format": {
            "type": "json_schema", "json_schema": {"name": "no schema"}}})
        assert status == 400 and body["error"]["code"] == "invalid_value"


def test_run_format_schema_file(tmp_path, capsys):
    path = tmp_path / "schema.json"
    path.write_text(json.dumps(COLOR))
    assert cli_main(["run", "-p", "{", "-n", "160", "--temp", "0", "--format",
                     str(path)]) == 0
    out = capsys.readouterr().out
    assert out.endswith("\n") and oracle(out[:-1], COLOR), out
    path.write_text(json.dumps({"type": "object", "propertyNames": {}}))
    assert cli_main(["run", "-p", "{", "--format", str(path)]) == 1
    assert "keyword 'propertyNames'" in capsys.readouterr().err
    path.write_text("{not json")
    assert cli_main(["run", "-p", "{", "--format", str(path)]) == 1
    assert "is not JSON" in capsys.readouterr().err


def test_the_structured_output_example_runs():
    """examples/structured_output.py on the demo model: a schema answer that parses, a
    forced tool call, a log-likelihood (the README points users at it)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH")) if p)
    r = subprocess.run([sys.executable, str(root / "examples" / "structured_output.py")],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("answer: {") and "(cut)" not in lines[0], r.stdout
    assert any(line.startswith("tool call: get_weather {'city': ") for line in lines)
    assert lines[-1].startswith("log-likelihood of a sentence: -")
