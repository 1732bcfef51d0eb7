"""A small context-free grammar over bytes and an incremental matcher for it: what
schema-constrained generation (efedge.json_schema) checks each drawn token against.

A grammar is a list of rules; a rule is a list of alternatives; an alternative is a
sequence of elements, each a byte set (a 256-byte table of 0/1 flags) or the id of a
rule. This is the shape of llama.cpp's GBNF grammars, and the matcher follows the same
published algorithm: the state after a prefix is the set of parser stacks that can have
read it. A stack holds positions in the flattened alternatives, bottom first; its top is
always a byte set (the next byte it can take), the positions below are where to go on once
the rule above them ends. Reading a byte keeps the stacks whose top takes it, steps past
that byte set and expands rule references until each stack's top is a byte set again. The
empty stack means the whole grammar has been read.

Expanding a position never depends on the stack below it until the position's rule can
end, so each position's expansion is worked out once when the grammar is compiled
(`Compiled.clo`): the stack suffixes it can push, and whether it can also end without
reading a byte. A step is then a few tuple concatenations per live stack.

Rules are never left-recursive in the grammars efedge builds (JSON nests through "{" and
"["); a rule that could reach itself without reading a byte is a GrammarError at compile
time rather than an endless expansion at run time.
"""

from __future__ import annotations

from collections.abc import Iterable


class GrammarError(ValueError):
    """A grammar the matcher cannot run (left recursion)."""


class AmbiguousGrammarError(GrammarError):
    """More than MAX_STACKS ways to have read the bytes so far (see advance)."""


# The most parser stacks a matcher keeps. A grammar whose alternatives can read the same
# bytes in two ways at every nesting level (a JSON schema's anyOf of two arrays of itself)
# doubles its stacks at each level: 4.7 million by the nineteenth "[", seconds a byte and
# growing memory — a generation that never ends. Ordinary ambiguity grows far slower
# (an array of anything-or-itself: 682 stacks forty levels deep), so past this many the
# matcher stops with an error instead.
MAX_STACKS = 8192


class Grammar:
    """A grammar under construction: rules are made, then given alternatives."""

    def __init__(self) -> None:
        self.rules: list[list[list]] = []
        self._sets: dict[bytes, bytes] = {}

    def rule(self, *alts: list) -> int:
        """A new rule with these alternatives (more may be added); its id."""
        self.rules.append([list(a) for a in alts])
        return len(self.rules) - 1

    def add(self, rule: int, alt: list) -> None:
        self.rules[rule].append(list(alt))

    def byteset(self, values: Iterable[int]) -> bytes:
        """The table of a set of byte values (shared between equal sets)."""
        table = bytearray(256)
        for v in values:
            table[v] = 1
        key = bytes(table)
        return self._sets.setdefault(key, key)

    def literal(self, data: bytes) -> list:
        """The elements that read exactly `data`."""
        return [self.byteset((b,)) for b in data]

    def compile(self, start: int) -> Compiled:
        return Compiled(self.rules, start)


class Compiled:
    """A grammar flattened for the matcher. `term[p]` is position p's byte set (None for a
    rule reference or the end of an alternative); `clo[p]` is (suffixes, can_end): the
    stack suffixes position p expands to, each ending at a byte set, and whether p can
    reach the end of its alternative without reading a byte."""

    def __init__(self, rules: list[list[list]], start: int):
        # every rule's alternatives laid end to end, each closed by an end marker (None);
        # a synthetic first alternative "start END" is the root
        code: list = [start, None]
        alt_starts: list[list[int]] = []
        for alts in rules:
            starts = []
            for alt in alts:
                starts.append(len(code))
                code.extend(alt)
                code.append(None)
            alt_starts.append(starts)
        self.term = [c if isinstance(c, bytes) else None for c in code]
        # the same sets as bit masks, so the first bytes any stack takes are one OR away
        masks = {t: sum(1 << b for b in range(256) if t[b]) for t in set(self.term) if t}
        self.mask = [masks.get(t, 0) for t in self.term]
        self._code, self._alt_starts = code, alt_starts
        self.clo: list = [None] * len(code)
        self._busy: set[int] = set()
        for p in range(len(code) - 1, -1, -1):  # back to front: continuations come first
            self._closure(p)
        del self._code, self._alt_starts, self._busy
        self.start = list(dict.fromkeys(self.clo[0][0]))  # the initial stacks
        self.start_accepts = self.clo[0][1]

    def _closure(self, p: int):
        done = self.clo[p]
        if done is not None:
            return done
        c = self._code[p]
        if c is None:
            res = ((), True)
        elif isinstance(c, bytes):
            res = (((p,),), False)
        else:
            if p in self._busy:
                raise GrammarError(f"rule {c} can reach itself without reading a byte")
            self._busy.add(p)
            # where to resume once rule c ends (nothing to push when p ends its alternative)
            resume = (p + 1,) if self._code[p + 1] is not None else ()
            suffixes: dict[tuple, None] = {}
            can_skip = False
            for a in self._alt_starts[c]:
                sub, empty = self._closure(a)
                for s in sub:
                    suffixes[resume + s] = None
                can_skip |= empty
            can_end = False
            if can_skip:  # rule c can read nothing: what follows it starts here too
                after = self._closure(p + 1)  # (only now: it may expand rule c itself)
                for s in after[0]:
                    suffixes[s] = None
                can_end = after[1]
            self._busy.discard(p)
            res = (tuple(suffixes), can_end)
        self.clo[p] = res
        return res


def advance(g: Compiled, stacks: list[tuple], data: bytes) -> list[tuple]:
    """The stacks after reading `data` from `stacks` (empty: `data` does not fit)."""
    term, clo = g.term, g.clo
    for byte in data:
        out: dict[tuple, None] = {}
        for st in stacks:
            if not st or not term[st[-1]][byte]:
                continue
            base, p = st[:-1], st[-1] + 1
            while True:
                sufs, can_end = clo[p]
                for s in sufs:
                    out[base + s] = None
                if not can_end:
                    break
                if not base:
                    out[()] = None  # the whole grammar read
                    break
                base, p = base[:-1], base[-1]
        if not out:
            return []
        if len(out) > MAX_STACKS:
            raise AmbiguousGrammarError(
                f"more than {MAX_STACKS} ways to read the output so far: the grammar's "
                f"alternatives read the same text in more than one way, nested")
        stacks = list(out)
    return stacks


class Matcher:
    """The state of one output: the stacks that can have read the bytes fed so far."""

    __slots__ = ("g", "stacks")

    def __init__(self, g: Compiled) -> None:
        self.g = g
        self.stacks: list[tuple] = list(g.start) + ([()] if g.start_accepts else [])

    def after(self, data: bytes) -> list[tuple]:
        """The stacks after `data` (empty if it does not fit); the state is unchanged."""
        return advance(self.g, self.stacks, data) if data else []

    def first_bytes(self) -> int:
        """The bytes that may come next, as a mask (bit b: byte b)."""
        mask = 0
        for st in self.stacks:
            if st:
                mask |= self.g.mask[st[-1]]
        return mask

    def feed(self, data: bytes) -> bool:
        nxt = self.after(data)
        if nxt:
            self.stacks = nxt
        return bool(nxt)

    @property
    def accepting(self) -> bool:
        """What was fed is a complete sentence of the grammar (it might go on)."""
        return () in self.stacks

    @property
    def done(self) -> bool:
        """Complete, and nothing more may follow."""
        return self.stacks == [()]
