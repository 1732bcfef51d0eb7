"""The pieces of JSON as grammar rules (efedge.grammar), for the schema compiler
(efedge.json_schema) to put together: whitespace, strings (with length limits), numbers,
literals, any value, object keys outside a set of names.

What these rules write is a subset of RFC 8259 chosen so a model cannot run on forever
inside one piece and so every output reads back as what the schema asked for:
* whitespace between tokens is one space, or a newline and at most MAX_INDENT spaces or
  tabs, as in JSON mode, and there is none before or after the top-level value;
* numbers have at most MAX_DIGITS digits before the point and after it and
  MAX_EXP_DIGITS in the exponent (so they read back finite); integers are written without
  a fraction or exponent;
* strings are well-formed UTF-8 (checked byte by byte: a token may end inside a
  character); with a length limit, characters are counted as Python and JSON Schema count
  them (code points), so a \\uD8xx-\\uDFxx escape, half of a pair, is not written there.
"""

from __future__ import annotations

from efedge.grammar import Grammar

MAX_INDENT = 20  # whitespace between tokens: "", " ", or "\n" and at most this many " \t"
# digits of a number before the point and after it, and in its exponent: bounded so a
# model cannot write digits forever, and every number reads back finite (at most 1e119)
MAX_DIGITS, MAX_EXP_DIGITS = 20, 2

_CONT = range(0x80, 0xC0)
# well-formed UTF-8 of two to four bytes (RFC 3629 §4): lead bytes, then the tail's ranges
_UTF8 = [(range(0xC2, 0xE0), [_CONT]),
         ((0xE0,), [range(0xA0, 0xC0), _CONT]),
         ([*range(0xE1, 0xED), 0xEE, 0xEF], [_CONT, _CONT]),
         ((0xED,), [range(0x80, 0xA0), _CONT]),
         ((0xF0,), [range(0x90, 0xC0), _CONT, _CONT]),
         (range(0xF1, 0xF4), [_CONT, _CONT, _CONT]),
         ((0xF4,), [range(0x80, 0x90), _CONT, _CONT])]
_ASCII = [b for b in range(0x20, 0x80) if b not in b'"\\']  # unescaped in a string
_HEX = b"0123456789abcdefABCDEF"


def _escape_free(name: str) -> bool:
    return all(ord(ch) >= 0x20 and ch not in '"\\' for ch in name)


class JsonGrammar(Grammar):
    """A Grammar with JSON's pieces, each made once and shared by every use."""

    def __init__(self) -> None:
        super().__init__()
        self._made: dict = {}

    def _once(self, key, make):
        if key not in self._made:
            self._made[key] = make()
        return self._made[key]

    # -- repetition ---------------------------------------------------------------------
    def repeat(self, elems: list, lo: int, hi: int | None) -> list:
        """Elements reading `elems` lo to hi times (hi None: no limit)."""
        out = list(elems) * lo
        if hi is None:
            out.append(self._star(elems))
        elif hi > lo:
            out.append(self._upto(elems, hi - lo))
        return out

    def _star(self, elems: list) -> int:
        def make():
            r = self.rule([])
            self.add(r, [*elems, r])  # tail recursion: the stack does not grow
            return r
        return self._once(("star", tuple(elems)), make)

    def _upto(self, elems: list, n: int) -> int:
        """0 to n times, as a chain of n optional rules (made from the shortest up, so a
        long chain needs no deep recursion)."""
        key = tuple(elems)
        shorter: list = []
        for k in range(1, n + 1):
            shorter = [self._once(("upto", key, k),
                                  lambda tail=shorter: self.rule([], [*elems, *tail]))]
        return shorter[0]

    # -- pieces -------------------------------------------------------------------------
    def ws(self) -> int:
        """Whitespace between tokens: none, one space, or a newline and 0 to MAX_INDENT
        spaces or tabs."""
        return self._once("ws", lambda: self.rule(
            [], self.literal(b" "),
            [*self.literal(b"\n"), self._upto([self.byteset(b" \t")], MAX_INDENT)]))

    def _char(self, escapes: bool, surrogates: bool) -> int:
        """One character of a string's contents."""
        def make():
            r = self.rule([self.byteset(_ASCII)])
            for leads, tail in _UTF8:
                self.add(r, [self.byteset(leads)] + [self.byteset(t) for t in tail])
            if escapes:
                self.add(r, [*self.literal(b"\\"), self.byteset(b'"\\/bfnrt')])
                first = _HEX if surrogates else bytes(h for h in _HEX if h not in b"dD")
                hexes = self.byteset(_HEX)
                self.add(r, [*self.literal(b"\\u"), self.byteset(first), hexes, hexes, hexes])
            return r
        return self._once(("char", escapes, surrogates), make)

    def string(self, lo: int = 0, hi: int | None = None) -> int:
        """A string of lo to hi characters."""
        def make():
            char = self._char(True, surrogates=lo == 0 and hi is None)
            quote = self.literal(b'"')
            return self.rule([*quote, *self.repeat([char], lo, hi), *quote])
        return self._once(("string", lo, hi), make)

    def integer(self) -> int:
        def make():
            digit = self.byteset(b"0123456789")
            r = self.rule()
            for sign in (b"", b"-"):
                self.add(r, self.literal(sign + b"0"))
                self.add(r, [*self.literal(sign), self.byteset(b"123456789"),
                             *self.repeat([digit], 0, MAX_DIGITS - 1)])
            return r
        return self._once("integer", make)

    def number(self) -> int:
        def make():
            digit = self.byteset(b"0123456789")
            frac = self.rule([], [*self.literal(b"."), *self.repeat([digit], 1, MAX_DIGITS)])
            exp = self.rule([], [self.byteset(b"eE"), self.rule([], self.literal(b"+"),
                                                                 self.literal(b"-")),
                                 *self.repeat([digit], 1, MAX_EXP_DIGITS)])
            return self.rule([self.integer(), frac, exp])
        return self._once("number", make)

    def literals(self, texts: list[bytes]) -> int:
        """Exactly one of `texts`, as a trie: one live stack however many there are."""
        texts = list(dict.fromkeys(texts))
        if len(texts) == 1:  # (no rule per byte: a long literal needs no deep recursion)
            return self.rule(self.literal(texts[0]))
        heads: dict[int, list[bytes]] = {}
        for t in texts:
            if t:
                heads.setdefault(t[0], []).append(t[1:])
        r = self.rule(*([[]] if b"" in texts else []))
        for b, rests in heads.items():
            self.add(r, [*self.literal(bytes((b,))), self.literals(rests)])
        return r

    def value(self) -> int:
        """Any JSON value."""
        if "value" in self._made:
            return self._made["value"]
        v = self._made["value"] = self.rule()  # (made before its parts: they nest it)
        ws, lit = self.ws(), self.literal
        arr = self.rule([*lit(b"["), ws, *lit(b"]")],
                        [*lit(b"["), ws, v, ws, self._star([*lit(b","), ws, v, ws]),
                         *lit(b"]")])
        for alt in ([self.any_object()], [arr], [self.string()], [self.number()],
                    lit(b"true"), lit(b"false"), lit(b"null")):
            self.add(v, alt)
        return v

    def any_object(self) -> int:
        """Any JSON object (JSON mode's output; an object inside any value)."""
        if "object" in self._made:
            return self._made["object"]
        obj = self._made["object"] = self.rule()  # (made before its parts: they nest it)
        ws, lit = self.ws(), self.literal
        member = [self.string(), ws, *lit(b":"), ws, self.value(), ws]
        self.add(obj, [*lit(b"{"), ws, *lit(b"}")])
        self.add(obj, [*lit(b"{"), ws, *member, self._star([*lit(b","), ws, *member]),
                       *lit(b"}")])
        return obj

    def key_not_in(self, names: list[str]) -> int:
        """An object key (with its quotes) that is none of `names`: written without escapes,
        so its bytes are its text and the names can be told apart from it character by
        character (a trie of the names; leaving the trie at any character makes a new
        key)."""
        trie: dict = {}
        for name in names:
            if _escape_free(name):
                node = trie
                for ch in name:
                    node = node.setdefault(ch, {})
                node[None] = {}  # a name ends here
        raw = self._char(False, False)
        rest = self.rule([*self.repeat([raw], 0, None), *self.literal(b'"')])
        return self.rule([*self.literal(b'"'), self._key_node(trie, rest)])

    def _key_node(self, node: dict, rest: int) -> int:
        r = self.rule()
        if None not in node:
            self.add(r, self.literal(b'"'))  # the key may end here: it is no name
        kids = [ch for ch in node if ch is not None]
        for ch in kids:
            self.add(r, [*self.literal(ch.encode()), self._key_node(node[ch], rest)])
        # any other character leaves the names behind: the rest is free
        used = {ch.encode()[0] for ch in kids}
        ascii_ = [b for b in _ASCII if b not in used]
        if ascii_:
            self.add(r, [self.byteset(ascii_), rest])
        for leads, tail in _UTF8:
            free = [b for b in leads if b not in used]
            if free:  # (a character sharing its first byte with a name's is not written)
                self.add(r, [self.byteset(free)] + [self.byteset(t) for t in tail] + [rest])
        return r
