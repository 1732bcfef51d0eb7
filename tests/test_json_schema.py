"""JSON-schema structured outputs: the schema grammar (efedge/json_schema.py on
efedge/grammar.py) against Python's json plus a validator of the supported subset written
here, and format={schema} end to end — the API, the server's response_format json_schema
and `efedge run --format FILE.json`."""

from __future__ import annotations

import json
import random
import threading
import urllib.error
import urllib.request

import pytest

import efedge
from efedge.cli import main as cli_main
from efedge.errors import ArgumentError
from efedge.generate import GenerationResult
from efedge.grammar import Matcher
from efedge.json_grammar import MAX_DIGITS
from efedge.json_schema import compile_schema
from efedge.server import make_server

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


# -- a validator of the subset, as the grammar writes it -------------------------------------
def _pairs(pairs):
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError("duplicate key")
    return Obj(pairs)


class Obj(dict):
    """A decoded object that remembers its key order."""

    def __init__(self, pairs):
        super().__init__(pairs)
        self.order = [k for k, _ in pairs]


def _escape_free(key: str) -> bool:
    return all(ord(c) >= 0x20 and c not in '"\\' for c in key)


def _same(a, b) -> bool:
    """JSON equality: types matter (1 is not true)."""
    if type(a) is bool or type(b) is bool or a is None or b is None:
        return type(a) is type(b) and a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a == b
    return type(a) is type(b) and a == b


def valid(v, s, root) -> bool:
    """v (from json.loads with _pairs) is an instance of s as the grammar writes one:
    properties in the schema's order, others after them and without escapes; integers
    without a fraction or exponent; oneOf taken as anyOf."""
    if s is True or s == {}:
        return True
    s = {k: x for k, x in s.items() if k not in ("title", "description", "default", "$schema")}
    if "$ref" in s:
        ref = s["$ref"]
        if ref == "#":
            return valid(v, root, root)
        _, where, name = ref.split("/")
        return valid(v, root[where][name.replace("~1", "/").replace("~0", "~")], root)
    for key in ("anyOf", "oneOf"):
        if key in s:
            return any(valid(v, sub, root) for sub in s[key])
    if "const" in s:
        return _same(v, s["const"])
    if "enum" in s:
        return any(_same(v, e) for e in s["enum"])
    t = s.get("type")
    types = [t] if isinstance(t, str) else t
    if types is None:
        types = ["object"] if {"properties", "required", "additionalProperties"} & s.keys() \
            else ["array"] if {"items", "minItems", "maxItems"} & s.keys() else None
    if types is None:
        return True
    return any(_valid_typed(v, ty, s, root) for ty in types)


def _valid_typed(v, t, s, root) -> bool:
    if t == "null":
        return v is None
    if t == "boolean":
        return type(v) is bool
    if t == "integer":
        return type(v) is int
    if t == "number":
        return type(v) in (int, float)
    if t == "string":
        return isinstance(v, str) and s.get("minLength", 0) <= len(v) <= s.get(
            "maxLength", len(v))
    if t == "array":
        return isinstance(v, list) and s.get("minItems", 0) <= len(v) <= s.get(
            "maxItems", len(v)) and all(valid(x, s.get("items", True), root) for x in v)
    assert t == "object"
    if not isinstance(v, Obj):
        return False
    props, extra = s.get("properties", {}), s.get("additionalProperties", True)
    names = list(props)
    listed = [names.index(k) for k in v.order if k in props]
    n_listed = len(listed)
    if listed != sorted(listed) or any(k not in props for k in v.order[:n_listed]):
        return False  # the listed ones first, in the schema's order
    others = v.order[n_listed:]
    if others and (extra is False or not all(_escape_free(k) for k in others)):
        return False
    return all(k in v for k in s.get("required", [])) and \
        all(valid(v[k], props[k], root) for k in v.order[:n_listed]) and \
        all(valid(v[k], extra, root) for k in others)


# -- instances, written with random whitespace ------------------------------------------------
class Lit:
    """An enum / const value: written compactly, as the grammar writes it."""

    def __init__(self, value):
        self.value = value


def instance(s, root, rng: random.Random, depth: int = 0):
    if s is True or s == {}:
        return _any(rng, depth)
    if "$ref" in s:
        ref = s["$ref"]
        if ref == "#":
            return instance(root, root, rng, depth + 1)
        _, where, name = ref.split("/")
        return instance(root[where][name.replace("~1", "/")], root, rng, depth)
    for key in ("anyOf", "oneOf"):
        if key in s:
            return instance(rng.choice(s[key]), root, rng, depth)
    if "const" in s:
        return Lit(s["const"])
    if "enum" in s:
        return Lit(rng.choice(s["enum"]))
    t = s.get("type") or ("object" if "properties" in s or "additionalProperties" in s
                          else "array" if "items" in s else None)
    if t is None:
        return _any(rng, depth)
    t = rng.choice(t) if isinstance(t, list) else t
    if t == "object":
        props = s.get("properties", {})
        out = {k: instance(sub, root, rng, depth + 1) for k, sub in props.items()
               if k in s.get("required", []) or (depth < 3 and rng.random() < 0.6)}
        extra = s.get("additionalProperties", True)
        if extra is not False:
            for i in range(rng.randint(0, 2)):
                out[rng.choice(["x", "extra key", "nam", "named", "é"]) + str(i)] = \
                    instance(extra, root, rng, depth + 1)
        return out
    if t == "array":
        lo = s.get("minItems", 0)
        hi = s.get("maxItems", lo + (3 if depth < 3 else 0))
        return [instance(s.get("items", True), root, rng, depth + 1)
                for _ in range(rng.randint(lo, hi))]
    if t == "string":
        lo, hi = s.get("minLength", 0), s.get("maxLength", 12)
        pool = 'ab "\\\t\n\x01/é日' if "maxLength" in s else 'ab "\\\t\n\x01/é日😀'
        return "".join(rng.choice(pool) for _ in range(rng.randint(lo, hi)))
    return {"integer": lambda: rng.choice([0, -7, 42, 10 ** 15, -10 ** 18]),
            "number": lambda: rng.choice([0, -3, 2.5, -0.125, 3e-7, 1e30, 0.1 + 0.2]),
            "boolean": lambda: rng.random() < 0.5, "null": lambda: None}[t]()


def _any(rng, depth):
    r = rng.random()
    if depth > 2 or r < 0.5:
        return rng.choice([0, 1.5, -2e-5, True, False, None, "", "s p", "é\"\\"])
    if r < 0.75:
        return [_any(rng, depth + 1) for _ in range(rng.randint(0, 2))]
    return {rng.choice("abc") + str(i): _any(rng, depth + 1) for i in range(rng.randint(0, 2))}


def dump(v, rng: random.Random, ascii_: bool) -> str:
    ws = lambda: rng.choice(["", "", " ", "\n  ", "\t", "\r\n      "])  # noqa: E731
    if isinstance(v, Lit):
        return json.dumps(v.value, ensure_ascii=False, separators=(",", ":"))
    if isinstance(v, dict):
        return "{" + ws() + ",".join(
            json.dumps(k, ensure_ascii=False) + ws() + ":" + ws() + dump(x, rng, ascii_) + ws()
            for k, x in v.items()) + "}"
    if isinstance(v, list):
        return "[" + ws() + ",".join(dump(x, rng, ascii_) + ws() for x in v) + "]"
    return json.dumps(v, ensure_ascii=ascii_)


def oracle(text: str, s) -> bool:
    if text != text.strip(" \t\r\n"):
        return False  # no whitespace around the value
    try:
        v = json.loads(text, object_pairs_hook=_pairs)
    except ValueError:
        return False
    return valid(v, s, s)


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
        # done unless a number could go on (an integer 0 cannot: no leading zeros)
        goes_on = text[-1].isdigit() and not (name == "union" and text.lstrip("-") == "0")
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
    assert feed(s, b'{' + b" " * 20 + b'"ok":true}').done
    assert feed(s, b'{' + b" " * 21) is None
    short = feed({"type": "integer"}, b"9" * (MAX_DIGITS - 1))
    assert short.accepting and not short.done  # may end (an end-of-text token) or go on
    assert feed({"type": "integer"}, b"9" * MAX_DIGITS).done
    assert feed({"type": "integer"}, b"9" * (MAX_DIGITS + 1)) is None
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


def test_generated_outputs_follow_the_schema(demo):
    """Greedy and sampled: a finished output is an instance; one cut by max_tokens is the
    beginning of one. Schemas whose instances are short (bounded whitespace, an enum, at most
    MAX_DIGITS digits) always finish."""
    finished = 0
    for schema in GENERATED:
        for prompt in ("A JSON record of a user:", "{"):
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
    assert finished >= 20
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
    srv = make_server(demo, "127.0.0.1", 0)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()

    def post(path, body):
        req = urllib.request.Request(srv.url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def fmt(schema):
        return {"type": "json_schema",
                "json_schema": {"name": "x", "schema": schema, "strict": True}}

    messages = [{"role": "user", "content": "a color as JSON"}]
    try:
        status, body = post("/v1/chat/completions", {
            "messages": messages, "max_tokens": 160, "temperature": 0,
            "response_format": fmt(COLOR)})
        assert status == 200
        content = body["choices"][0]["message"]["content"]
        assert content == demo.chat(messages, max_tokens=160, temperature=0, format=COLOR)
        assert oracle(content, COLOR)
        # llama.cpp's server's form: the schema beside the type
        status, body = post("/v1/completions", {
            "prompt": "{", "max_tokens": 160, "temperature": 0.8, "seed": 2,
            "response_format": {"type": "json_schema", "schema": COLOR}})
        assert status == 200 and body["choices"][0]["finish_reason"] == "stop"
        assert oracle(body["choices"][0]["text"], COLOR)
        for schema, code, words in [
                ({"type": "string", "pattern": "x"}, "unsupported", "keyword 'pattern'"),
                ({"type": "array", "minItems": 2, "maxItems": 1}, "invalid_value",
                 "maxItems 1 is below minItems 2")]:
            status, body = post("/v1/chat/completions", {"messages": messages,
                                                         "response_format": fmt(schema)})
            assert status == 400 and body["error"]["code"] == code
            assert body["error"]["param"] == "response_format" and words in \
                body["error"]["message"]
        status, body = post("/v1/completions", {"prompt": "x", "response_format": {
            "type": "json_schema", "json_schema": {"name": "no schema"}}})
        assert status == 400 and body["error"]["code"] == "invalid_value"
    finally:
        srv.shutdown()
        srv.server_close()
        t.join(timeout=10)


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
