"""JSON mode (`format="json"`, the server's `response_format: {"type": "json_object"}`):
generation that can only write one JSON object. (A JSON schema as the format:
efedge.json_schema; `constraint_for` below picks the constraint for either.)

`JsonPrefix` follows the bytes generated so far with a pushdown automaton of RFC 8259's
grammar (strings with their escapes, numbers, true / false / null, nested objects and
arrays; the top level an object, as OpenAI's JSON mode gives, starting with its "{") and
says whether a token's bytes may come next. The sampler asks it only about the token it
drew, and about the others only when that one does not fit
(efedge.sampling.Sampler.sample_where), so a step costs one check when the model writes
JSON anyway. Generation ends as the object closes.

Bytes of 0x80 and up are taken inside strings without checking their UTF-8 (a token may
end inside a character; the text decoder turns a broken sequence into U+FFFD, which is
still a valid string character). Whitespace between tokens is one space, or a newline and
at most MAX_INDENT spaces or tabs — the form llama.cpp's JSON grammar allows — or a
model could pad forever (a small model, greedy, wrote twenty newlines between every two
tokens under a plain byte cap).
"""

from __future__ import annotations

MAX_INDENT = 20  # whitespace between tokens: "", " ", or "\n" and at most this many " \t"
# digits of a number before the point and after it, and in its exponent: bounded so a
# model cannot write digits forever, and every number reads back finite (at most 1e119)
MAX_DIGITS, MAX_EXP_DIGITS = 20, 2
_WS = frozenset(b" \t\n\r")
_DIGITS = frozenset(b"0123456789")
_HEX = frozenset(b"0123456789abcdefABCDEF")
_ESCAPES = frozenset(b'"\\/bfnrt')
_LITERALS = {ord("t"): b"rue", ord("f"): b"alse", ord("n"): b"ull"}

# modes: what the next byte may be
(TOP, VALUE, ARRAY_FIRST, OBJ_FIRST, OBJ_KEY, COLON, AFTER_VALUE, STRING, ESCAPE, HEX,
 LITERAL, N_MINUS, N_ZERO, N_INT, N_DOT, N_FRAC, N_E, N_ESIGN, N_EXP, DONE) = range(20)
_NUMBER_ENDS = frozenset((N_ZERO, N_INT, N_FRAC, N_EXP))  # a number may stop here


class JsonPrefix:
    """The state after a valid prefix of one JSON object."""

    __slots__ = ("stack", "mode", "key", "rest", "hex_left", "ws", "digits")

    def __init__(self) -> None:
        self.stack: list[int] = []  # open containers: ord("{") / ord("[")
        self.mode = TOP
        self.key = False  # the string being read is an object key
        self.rest = b""  # LITERAL: the bytes still due
        self.hex_left = 0  # HEX: the \uXXXX digits still due
        self.ws = 0  # where in a whitespace run (_space)
        self.digits = 0  # digits of the number part being read (_number)

    @property
    def done(self) -> bool:
        """The object is complete: nothing more may be written."""
        return self.mode == DONE

    def copy(self) -> JsonPrefix:
        c = JsonPrefix.__new__(JsonPrefix)
        c.stack, c.mode, c.key, c.rest, c.hex_left, c.ws, c.digits = list(self.stack), \
            self.mode, self.key, self.rest, self.hex_left, self.ws, self.digits
        return c

    def allows(self, data: bytes) -> bool:
        """Whether `data` may come next (the state is not changed)."""
        return bool(data) and self.copy().feed(data)

    def feed(self, data: bytes) -> bool:
        """Advance over `data`; False (and the state is then undefined) if it breaks the
        grammar."""
        for b in data:
            if not self._byte(b):
                return False
        return True

    # -- the automaton ----------------------------------------------------------------------
    def _space(self, b: int) -> bool | None:
        """Whitespace between tokens: True taken, False refused, None: b is not
        whitespace. A run is one space, or a newline and up to MAX_INDENT spaces or tabs
        (llama.cpp's JSON grammar writes it so): `ws` 0 before a run, -1 after its
        space, 1 + the indentation after its newline."""
        if b not in _WS:
            self.ws = 0
            return None
        if self.ws == 0 and b in (ord(" "), ord("\n")):
            self.ws = -1 if b == ord(" ") else 1
            return True
        if self.ws > 0 and b in (ord(" "), ord("\t")) and self.ws <= MAX_INDENT:
            self.ws += 1
            return True
        return False

    def _open(self, b: int) -> None:
        self.stack.append(b)
        self.mode = OBJ_FIRST if b == ord("{") else ARRAY_FIRST

    def _value(self, b: int) -> bool:
        """The first byte of a value."""
        if b in (ord("{"), ord("[")):
            self._open(b)
        elif b == ord('"'):
            self.mode, self.key = STRING, False
        elif b == ord("-"):
            self.mode = N_MINUS
        elif b in _DIGITS:
            self.mode, self.digits = (N_ZERO if b == ord("0") else N_INT), 1
        elif b in _LITERALS:
            self.mode, self.rest = LITERAL, _LITERALS[b]
        else:
            return False
        return True

    def _end_value(self) -> None:
        self.mode = AFTER_VALUE if self.stack else DONE

    def _byte(self, b: int) -> bool:
        m = self.mode
        if m == STRING:
            if b == ord('"'):
                if self.key:
                    self.mode = COLON
                else:
                    self._end_value()
            elif b == ord("\\"):
                self.mode = ESCAPE
            elif b < 0x20:  # control characters must be escaped
                return False
            return True
        if m == ESCAPE:
            if b == ord("u"):
                self.mode, self.hex_left = HEX, 4
                return True
            if b in _ESCAPES:
                self.mode = STRING
                return True
            return False
        if m == HEX:
            if b not in _HEX:
                return False
            self.hex_left -= 1
            if self.hex_left == 0:
                self.mode = STRING
            return True
        if m == LITERAL:
            if b != self.rest[0]:
                return False
            self.rest = self.rest[1:]
            if not self.rest:
                self._end_value()
            return True
        if m >= N_MINUS and m <= N_EXP:
            if self._number(b):
                return True
            if m not in _NUMBER_ENDS:
                return False
            self._end_value()  # the number ended before b: b belongs to what follows
            return self._byte(b)
        if m == DONE:
            return False
        if m == TOP:  # the output starts with its "{" (no padding before it)
            if b != ord("{"):
                return False
            self._open(b)
            return True
        ws = self._space(b)
        if ws is not None:
            return ws
        if m == VALUE:
            return self._value(b)
        if m == ARRAY_FIRST:
            if b == ord("]"):
                self.stack.pop()
                self._end_value()
                return True
            return self._value(b)
        if m in (OBJ_FIRST, OBJ_KEY):
            if b == ord('"'):
                self.mode, self.key = STRING, True
                return True
            if m == OBJ_FIRST and b == ord("}"):
                self.stack.pop()
                self._end_value()
                return True
            return False
        if m == COLON:
            if b != ord(":"):
                return False
            self.mode = VALUE
            return True
        if m == AFTER_VALUE:
            top = self.stack[-1]
            if b == ord(","):
                self.mode = OBJ_KEY if top == ord("{") else VALUE
                return True
            if (b == ord("}") and top == ord("{")) or (b == ord("]") and top == ord("[")):
                self.stack.pop()
                self._end_value()
                return True
            return False
        return False

    def _number(self, b: int) -> bool:
        """A byte inside a number (-?(0|[1-9]d*)(.d+)?([eE][+-]?d+)?); False if b does not
        continue it."""
        m, digit = self.mode, b in _DIGITS
        if m == N_MINUS:
            if not digit:
                return False
            self.mode, self.digits = (N_ZERO if b == ord("0") else N_INT), 1
        elif m in (N_ZERO, N_INT):
            if digit and m == N_INT and self.digits < MAX_DIGITS:
                self.digits += 1
            elif b == ord("."):
                self.mode, self.digits = N_DOT, 0
            elif b in (ord("e"), ord("E")):
                self.mode, self.digits = N_E, 0
            else:
                return False
        elif m in (N_DOT, N_FRAC):
            if digit and self.digits < MAX_DIGITS:
                self.mode, self.digits = N_FRAC, self.digits + 1
            elif m == N_FRAC and b in (ord("e"), ord("E")):
                self.mode, self.digits = N_E, 0
            else:
                return False
        elif m in (N_E, N_ESIGN, N_EXP):
            if digit and self.digits < MAX_EXP_DIGITS:
                self.mode, self.digits = N_EXP, self.digits + 1
            elif m == N_E and b in (ord("+"), ord("-")):
                self.mode = N_ESIGN
            else:
                return False
        return True


class JsonConstraint:
    """The constraint generate_tokens applies in JSON mode: which token ids may come next
    (never a special token: an end-of-generation token would cut the object short, and the
    object's end ends the generation), following the tokens accepted so far."""

    def __init__(self, tokenizer) -> None:
        self._tok = tokenizer
        self.state = JsonPrefix()

    def allows(self, tid: int) -> bool:
        return not self._tok.is_special(tid) and self.state.allows(self._tok.token_bytes(tid))

    def accept(self, tid: int) -> None:
        if not self.state.feed(self._tok.token_bytes(tid)):
            raise ValueError(f"token {tid} does not continue the JSON output")

    @property
    def done(self) -> bool:
        return self.state.done


def check_format(value) -> str | dict | None:
    """A `format` argument: None (free text), "json" (JSON mode), a JSON schema (a dict,
    compiled now so an unsupported keyword is an error at call time) or a compiled grammar
    (efedge.grammar.Compiled: a forced tool call, efedge.tool_calls); anything else a
    clear error."""
    from efedge.errors import ArgumentError
    from efedge.grammar import Compiled

    if value is None or value == "json" or isinstance(value, Compiled):
        return value
    if isinstance(value, dict):
        from efedge.json_schema import compile_schema

        compile_schema(value)
        return value
    raise ArgumentError(f"format must be None, \"json\" or a JSON schema (a dict), got "
                        f"{value!r}")


def constraint_for(value, tokenizer):
    """The constraint generate_tokens applies for a `format` argument (None: none)."""
    from efedge.grammar import Compiled

    if check_format(value) is None:
        return None
    if isinstance(value, str):
        return JsonConstraint(tokenizer)
    from efedge.json_schema import SchemaConstraint, compile_schema

    grammar = value if isinstance(value, Compiled) else compile_schema(value)
    return SchemaConstraint(grammar, tokenizer)
