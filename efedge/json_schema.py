"""Structured outputs (`format={JSON schema}`, the server's `response_format`
`json_schema`, `efedge run --format FILE.json`): generation that can only write an
instance of a JSON schema.

The schema is compiled into a byte grammar (efedge.grammar, with JSON's pieces from
efedge.json_grammar), and `SchemaConstraint` checks each drawn token against it (JSON
mode's grammar too): the sampler asks about the token it drew and about the others only
when that one does not fit (efedge.sampling.Sampler.sample_where).

The subset of JSON Schema taken (anything else is an ArgumentError naming the keyword,
never ignored): `type` (a name or a list of names), `properties`, `required`,
`additionalProperties` (false, true, absent = true, or a schema), `items`, `minItems` /
`maxItems`, `minLength` / `maxLength`, `enum`, `const`, `anyOf` / `oneOf` (both a union:
oneOf's "exactly one" is not enforced), `$ref` to `#`, `#/$defs/NAME` or
`#/definitions/NAME` (recursion through an object or array included), and the annotations
`description`, `title`, `$schema`, `$comment`, `default`, `examples`, which are ignored.

Objects are written with their properties in the schema's order, the required ones always
and the optional ones when the model chooses; keys the schema does not name
(additionalProperties not false) only after those, written without escapes and never one
of the named keys, so no named key is written twice. Such other keys may repeat among
themselves: a grammar cannot remember which it wrote (llama.cpp's schema grammars allow the
same), and JSON readers keep the last value.
"""

from __future__ import annotations

import functools
import json

from efedge.errors import ArgumentError
from efedge.grammar import AmbiguousGrammarError, Compiled, GrammarError, Matcher
from efedge.json_grammar import JsonGrammar
from efedge.tokenizer import lone_surrogate

ANNOTATIONS = frozenset(("description", "title", "$schema", "$comment", "default",
                         "examples"))
# keyword → the type it applies to
_TYPED = {"properties": "object", "required": "object", "additionalProperties": "object",
          "items": "array", "minItems": "array", "maxItems": "array",
          "minLength": "string", "maxLength": "string"}
_OTHER = frozenset(("type", "enum", "const", "anyOf", "oneOf", "$ref", "$defs",
                    "definitions"))
SUPPORTED = ANNOTATIONS | _OTHER | frozenset(_TYPED)
TYPES = ("object", "array", "string", "number", "integer", "boolean", "null")
MAX_COUNT = 4096  # the largest minItems / maxItems / minLength / maxLength taken


def _fail(path: str, msg: str):
    raise ArgumentError(f"format: JSON schema at {path}: {msg}")


def _count(schema: dict, key: str, path: str) -> int | None:
    v = schema.get(key)
    if v is None:
        return None
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        _fail(path, f"{key} must be a non-negative integer, got {json.dumps(v)[:40]}")
    if v > MAX_COUNT:
        _fail(path, f"{key} above {MAX_COUNT} is not supported, got {v}")
    return v


def _canonical(schema) -> str:
    """One text for equal schemas (keys in any order)."""
    return json.dumps(schema, sort_keys=True)


def _literal(value) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"),
                      allow_nan=False).encode("utf-8")


def _type_of(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "integer" if value.is_integer() else "number"
    return {str: "string", list: "array", dict: "object"}.get(type(value), "?")


class _Compiler:
    def __init__(self, root) -> None:
        self.root = root
        self.g = JsonGrammar()
        self.refs: dict[str, int] = {}

    def schema(self, s, path: str) -> int:
        """The rule of the values schema `s` takes."""
        if s is True or s == {}:
            return self.g.value()
        if s is False:
            _fail(path, "the schema false takes no value")
        if not isinstance(s, dict):
            _fail(path, f"a schema must be an object or a boolean, got {json.dumps(s)[:40]}")
        for key in s:
            if key not in SUPPORTED:
                _fail(path, f"keyword {key!r} is not supported (supported: "
                            f"{', '.join(sorted(SUPPORTED))})")
        for key in ("$defs", "definitions"):
            if key in s and (path != "#" or not isinstance(s[key], dict)):
                _fail(path, f"{key} must be an object at the top of the schema")
        rest = [k for k in s if k not in ANNOTATIONS and k not in ("$defs", "definitions")]
        for only in ("$ref", "anyOf", "oneOf", "enum", "const"):
            if only in s:
                others = [k for k in rest if k != only and not (
                    k == "type" and only in ("enum", "const"))]
                if others:
                    _fail(path, f"{only} together with {others[0]} is not supported")
        if "$ref" in s:
            return self.ref(s["$ref"], path)
        for key in ("anyOf", "oneOf"):
            if key in s:
                subs = s[key]
                if not isinstance(subs, list) or not subs:
                    _fail(path, f"{key} must be a non-empty array of schemas")
                # a branch equal to an earlier one adds only another way to read the same
                # text: nested, such twins double the matcher's stacks at every level
                first: dict[str, int] = {}
                for i, sub in enumerate(subs):
                    first.setdefault(_canonical(sub), i)
                return self.g.rule(*([self.schema(subs[i], f"{path}/{key}/{i}")]
                                     for i in first.values()))
        types = self.types(s, path)
        if "enum" in s or "const" in s:
            return self.constants(s, types, path)
        if types is None:  # no type, nothing that implies one
            return self.g.value()
        return self.g.rule(*([self.typed(t, s, path)] for t in types))

    def types(self, s: dict, path: str) -> list[str] | None:
        t = s.get("type")
        if t is None:
            implied = list(dict.fromkeys(_TYPED[k] for k in s if k in _TYPED))
            return implied or None
        names = [t] if isinstance(t, str) else t
        if not isinstance(names, list) or not names or not all(
                isinstance(n, str) for n in names):
            _fail(path, f"type must be a type name or a non-empty array of them, got "
                        f"{json.dumps(t)[:60]}")
        for n in names:
            if n not in TYPES:
                _fail(path, f"type {n!r} is not a JSON Schema type ({', '.join(TYPES)})")
        for k in s:
            # a keyword for another type would be ignored by the types given: say so
            if k in _TYPED and _TYPED[k] not in names:
                _fail(path, f"{k} applies to {_TYPED[k]}s, but type is {json.dumps(t)}")
        return list(dict.fromkeys(names))

    def constants(self, s: dict, types: list[str] | None, path: str) -> int:
        if "enum" in s and "const" in s:
            _fail(path, "enum together with const is not supported")
        values = s["enum"] if "enum" in s else [s["const"]]
        if not isinstance(values, list) or not values:
            _fail(path, "enum must be a non-empty array")
        if types is not None:
            ok = set(types) | ({"integer"} if "number" in types else set())
            values = [v for v in values if _type_of(v) in ok]
            if not values:
                _fail(path, f"no value of enum/const has type {json.dumps(s['type'])}")
        try:
            return self.g.literals([_literal(v) for v in values])
        except ValueError:
            _fail(path, "enum/const values must be finite JSON values")

    def ref(self, ref, path: str) -> int:
        if not isinstance(ref, str):
            _fail(path, "$ref must be a string")
        if ref in self.refs:
            return self.refs[ref]
        parts = ref.split("/")
        if ref == "#":
            target = self.root
        elif len(parts) == 3 and parts[0] == "#" and parts[1] in ("$defs", "definitions"):
            name = parts[2].replace("~1", "/").replace("~0", "~")
            defs = self.root.get(parts[1]) if isinstance(self.root, dict) else None
            if not isinstance(defs, dict) or name not in defs:
                _fail(path, f"$ref {ref!r}: no such definition")
            target = defs[name]
        else:
            _fail(path, f"$ref {ref!r} is not supported (only '#', '#/$defs/NAME' and "
                        f"'#/definitions/NAME')")
        r = self.refs[ref] = self.g.rule()  # made first: a recursive use finds it
        self.g.add(r, [self.schema(target, ref)])
        return r

    def typed(self, t: str, s: dict, path: str) -> int:
        g = self.g
        if t == "object":
            return self.object(s, path)
        if t == "array":
            return self.array(s, path)
        if t == "string":
            lo, hi = _count(s, "minLength", path) or 0, _count(s, "maxLength", path)
            if hi is not None and hi < lo:
                _fail(path, f"maxLength {hi} is below minLength {lo}")
            return g.string(lo, hi)
        if t == "number":
            return g.number()
        if t == "integer":
            return g.integer()
        if t == "boolean":
            return g.literals([b"true", b"false"])
        return g.rule(g.literal(b"null"))

    def array(self, s: dict, path: str) -> int:
        g = self.g
        items = s.get("items", True)
        if isinstance(items, list):
            _fail(path, "items as an array (tuple validation) is not supported")
        lo, hi = _count(s, "minItems", path) or 0, _count(s, "maxItems", path)
        if hi is not None and hi < lo:
            _fail(path, f"maxItems {hi} is below minItems {lo}")
        open_, close = g.literal(b"["), g.literal(b"]")
        if hi == 0:
            return g.rule([*open_, g.ws(), *close])
        item = self.schema(items, f"{path}/items")
        ws = g.ws()
        later = [*g.literal(b","), ws, item, ws]  # every value is followed by its ws
        some = [item, ws, *g.repeat(later, max(lo - 1, 0), None if hi is None else hi - 1)]
        r = g.rule([*open_, ws, *some, *close])
        if lo == 0:
            g.add(r, [*open_, ws, *close])
        return r

    def object(self, s: dict, path: str) -> int:
        g = self.g
        props = s.get("properties", {})
        if not isinstance(props, dict):
            _fail(path, "properties must be an object")
        required = s.get("required", [])
        if not isinstance(required, list) or not all(isinstance(n, str) for n in required):
            _fail(path, "required must be an array of strings")
        for n in required:
            if n not in props:
                _fail(path, f"required names {n!r}, which is not in properties")
        extra = s.get("additionalProperties", True)
        ws = g.ws()
        # each member: key ws ":" ws value ws, so "," and "}" follow whitespace at most once
        members = [[*g.literal(_literal(name)), ws, *g.literal(b":"), ws,
                    self.schema(sub, f"{path}/properties/{name}"), ws]
                   for name, sub in props.items()]
        tail = {}
        if extra is not False:
            value = self.schema(extra, f"{path}/additionalProperties")
            more = [g.key_not_in(list(props)), ws, *g.literal(b":"), ws, value, ws]
            star = g.repeat([*g.literal(b","), ws, *more], 0, None)
            tail[False] = g.rule([], [*more, *star])
            tail[True] = g.rule(star)
        else:
            tail[False] = tail[True] = g.rule([])
        # rest[k, written]: properties k.. in order, "," before each once one is written
        need = set(required)
        names = list(props)
        rest: dict[tuple[int, bool], int] = {}
        for k in range(len(names), -1, -1):
            for written in (False, True):
                if k == len(names):
                    rest[k, written] = tail[written]
                    continue
                take = ([*g.literal(b","), ws] if written else []) + members[k] + \
                    [rest[k + 1, True]]
                r = g.rule(take)
                if names[k] not in need:
                    g.add(r, [rest[k + 1, written]])
                rest[k, written] = r
        return g.rule([*g.literal(b"{"), ws, rest[0, False], *g.literal(b"}")])


@functools.lru_cache(maxsize=32)
def _compiled(text: str) -> Compiled:
    root = json.loads(text)
    c = _Compiler(root)
    try:
        return c.g.compile(c.schema(root, "#"))
    except GrammarError:
        raise ArgumentError("format: JSON schema: a $ref reaches itself without writing "
                            "anything in between (left recursion)") from None
    except RecursionError:
        raise ArgumentError("format: JSON schema nests too deeply") from None


def compile_schema(schema) -> Compiled:
    """The grammar of a schema (a dict, or True for any value); an ArgumentError naming
    the keyword for what is not supported. Compiled grammars are kept for reuse."""
    if not isinstance(schema, dict | bool):
        raise ArgumentError(f"format: a JSON schema must be an object, got "
                            f"{type(schema).__name__}")
    try:
        text = json.dumps(schema, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ArgumentError(f"format: the JSON schema is not JSON: {exc}") from None
    except RecursionError:
        raise ArgumentError("format: JSON schema nests too deeply") from None
    # a lone surrogate (JSON's "\ud800", in a property name, an enum or a pattern) has no
    # UTF-8, and the grammar's literals are UTF-8 bytes: name it here, not as an encoding
    # error deep in the compiler
    if "\\ud" in text:  # (ensure_ascii writes every surrogate so; most schemas have none)
        bad = lone_surrogate(json.dumps(schema, ensure_ascii=False))
        if bad is not None:
            raise ArgumentError(f"format: the JSON schema has a lone surrogate "
                                f"{bad.group()!r} (half of a UTF-16 pair: not valid Unicode)")
    return _compiled(text)


class SchemaConstraint:
    """The constraint generate_tokens applies for a schema: which token ids may come next,
    following the tokens accepted so far. Special tokens never fit, but an end-of-generation
    token does once the output is a complete instance (a top-level number could go on:
    the model ends it so)."""

    def __init__(self, grammar: Compiled, tokenizer) -> None:
        self._tok = tokenizer
        self.matcher = Matcher(grammar)
        self._next: tuple[int, list] | None = None  # the last token allowed, its stacks
        # the next byte's possible values, made at the second check of a step: when the
        # drawn token does not fit, the sampler asks about many others, most of which
        # fail at their first byte
        self._first: int | None = None
        self._checks = 0

    def allows(self, tid: int) -> bool:
        tok = self._tok
        if tid in tok.eog_ids:
            return self.matcher.accepting
        if tok.is_special(tid):
            return False
        data = tok.token_bytes(tid)
        self._checks += 1
        if self._checks > 1:
            if self._first is None:
                self._first = self.matcher.first_bytes()
            if not data or not (self._first >> data[0]) & 1:
                return False
        after = self._after(data)
        if after:
            self._next = (tid, after)  # accept() follows allows() for the drawn token
        return bool(after)

    def _after(self, data: bytes) -> list:
        try:
            return self.matcher.after(data)
        except AmbiguousGrammarError as exc:
            raise ArgumentError(f"format: the JSON schema is too ambiguous to follow: {exc} "
                                "(anyOf / oneOf branches that match the same values, "
                                "recursively): make its branches exclusive") from None

    def accept(self, tid: int) -> None:
        if self._next is not None and self._next[0] == tid:
            self.matcher.stacks = self._next[1]
        else:
            after = self._after(self._tok.token_bytes(tid))
            if not after:
                raise ValueError(f"token {tid} does not continue the output the schema asks "
                                 "for")
            self.matcher.stacks = after
        self._next, self._first, self._checks = None, None, 0

    @property
    def done(self) -> bool:
        return self.matcher.done
