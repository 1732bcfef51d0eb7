"""JSON mode (`format="json"`, the server's `response_format: {"type": "json_object"}`):
generation that can only write one JSON object. (A JSON schema as the format:
efedge.json_schema; `constraint_for` below picks the constraint for either.)

JSON mode is the grammar of any object (efedge.json_grammar's `any_object`: strings with
their escapes and well-formed UTF-8, numbers, true / false / null, nested objects and
arrays; the top level an object, as OpenAI's JSON mode gives, starting with its "{"),
checked as a schema's grammar is (efedge.json_schema.SchemaConstraint): the sampler asks
about the token it drew, and about the others only when that one does not fit
(efedge.sampling.Sampler.sample_where), so a step costs one check when the model writes
JSON anyway. Generation ends as the object closes. Whitespace and numbers are bounded as
json_grammar says (a small model, greedy, wrote twenty newlines between every two tokens
under a plain byte cap).
"""

from __future__ import annotations

import functools


@functools.cache
def json_object_grammar():
    """The compiled grammar of one JSON object (made once per process)."""
    from efedge.json_grammar import JsonGrammar

    g = JsonGrammar()
    return g.compile(g.any_object())


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
    from efedge.json_schema import SchemaConstraint, compile_schema

    if isinstance(value, str):
        grammar = json_object_grammar()
    else:
        grammar = value if isinstance(value, Compiled) else compile_schema(value)
    return SchemaConstraint(grammar, tokenizer)
