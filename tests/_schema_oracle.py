"""A validator for the JSON Schema subset efedge takes, as its grammar writes instances
(tests/test_json_schema.py checks the grammar against it), and random instances of a
schema written with random whitespace."""

from __future__ import annotations

import json
import random
import re


# -- a validator of the subset, as the grammar writes it -------------------------------------
def _pairs(pairs):
    return Obj(pairs)


class Obj(dict):
    """A decoded object that remembers its key order."""

    def __init__(self, pairs):
        super().__init__(pairs)
        self.pairs = list(pairs)  # duplicates included (a dict keeps the last)
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
    if listed != sorted(set(listed)) or any(k not in props for k in v.order[:n_listed]):
        return False  # the listed ones first, each once, in the schema's order
    # other keys may repeat: a grammar cannot remember which of them it wrote (llama.cpp's
    # schema grammars are the same); every value is checked
    others = v.pairs[n_listed:]
    if others and (extra is False or not all(_escape_free(k) for k, _ in others)):
        return False
    return all(k in v for k in s.get("required", [])) and \
        all(valid(v[k], props[k], root) for k in v.order[:n_listed]) and \
        all(valid(x, extra, root) for _, x in others)


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
    ws = lambda: rng.choice(["", "", " ", "\n  ", "\n\t", "\n"])  # noqa: E731
    if isinstance(v, Lit):
        return json.dumps(v.value, ensure_ascii=False, separators=(",", ":"))
    if isinstance(v, dict):
        return "{" + ws() + ",".join(
            json.dumps(k, ensure_ascii=False) + ws() + ":" + ws() + dump(x, rng, ascii_) + ws()
            for k, x in v.items()) + "}"
    if isinstance(v, list):
        return "[" + ws() + ",".join(dump(x, rng, ascii_) + ws() for x in v) + "]"
    return json.dumps(v, ensure_ascii=ascii_)


def ws_ok(text: str, max_indent: int = 20) -> bool:
    """Whether every run of whitespace outside strings is one the grammars write: one
    space, or a newline and at most max_indent spaces or tabs."""
    i, n, in_str = 0, len(text), False
    while i < n:
        c = text[i]
        if in_str:
            if c == "\\":
                i += 1
            elif c == '"':
                in_str = False
            i += 1
            continue
        if c == '"':
            in_str = True
            i += 1
            continue
        if c in " \t\r\n":
            j = i
            while j < n and text[j] in " \t\r\n":
                j += 1
            run = text[i:j]
            if not (run == " " or (run[0] == "\n" and len(run) <= 1 + max_indent
                                   and all(ch in " \t" for ch in run[1:]))):
                return False
            i = j
            continue
        i += 1
    return True


_NUMBER = re.compile(r"-?(0|[1-9][0-9]*)(?:\.([0-9]+))?(?:[eE][+-]?([0-9]+))?")


def numbers_ok(text: str, max_digits: int = 20, max_exp: int = 2) -> bool:
    """Whether every number outside strings has at most max_digits digits before the point
    and after it and max_exp in its exponent, as the grammars write them."""
    for part in re.split(r'"(?:[^"\\]|\\.)*"', text):  # the text between strings
        for m in _NUMBER.finditer(part):
            whole, frac, exp = m.group(1), m.group(2) or "", m.group(3) or ""
            if len(whole) > max_digits or len(frac) > max_digits or len(exp) > max_exp:
                return False
    return True


def form_ok(text: str) -> bool:
    """Whitespace and numbers as the grammars write them (ws_ok, numbers_ok)."""
    return ws_ok(text) and numbers_ok(text)


def oracle(text: str, s) -> bool:
    if text != text.strip(" \t\r\n") or not form_ok(text):
        return False  # no whitespace around the value, and only the runs written inside
    try:
        v = json.loads(text, object_pairs_hook=_pairs)
    except ValueError:
        return False
    return valid(v, s, s)
