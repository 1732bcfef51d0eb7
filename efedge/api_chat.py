"""Model's chat (a mixin of efedge.api.Model): the chat template in use, a conversation
rendered to token ids (tools and tool calls included: efedge/tool_calls.py), and chat()
on top of the generation of efedge/api_generation.py.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

from efedge.errors import ArgumentError, UnsupportedModelError
from efedge.generate import GenerationResult
from efedge.reasoning import is_harmony_template
from efedge.tool_calls import (
    HARMONY_FORCED,
    check_template,
    check_tools,
    forced_call_grammar,
    parse_tool_calls,
    render_messages,
    resolve_choice,
)


class ChatMixin:
    def chat_template(self, tools: bool = False):
        """The ChatTemplate chat_prompt renders with: the one given at load
        (chat_template=), else the GGUF's — for a prompt with tools its
        `tokenizer.chat_template.tool_use` variant where the file has one — else chatml."""
        from efedge.chat_template import ChatTemplate, get_template

        tok = self.tokenizer
        # every template writes the model's own BOS / EOS text: the tokenizer's ids, the
        # vocab's defaults where the file names none (SentencePiece: 1 and 2), as llama.cpp
        # renders them — the ids in the file alone left a Llama-2 template's later turns
        # without their BOS in a file that relies on the defaults
        texts = {"bos_token": self._token_text(tok.bos_id),
                 "eos_token": self._token_text(tok.eos_id)}
        with self._lock:
            if self._template is None:
                if self._chat_template_name is not None:
                    self._template = get_template(self._chat_template_name, **texts)
                else:
                    self._template = (ChatTemplate.from_metadata(self._gf.metadata, **texts)
                                      or get_template("chatml"))
            if not tools or self._chat_template_name is not None:
                return self._template
            if self._tool_template is None:
                self._tool_template = ChatTemplate.from_metadata(
                    self._gf.metadata, name="tool_use", **texts) or self._template
            return self._tool_template

    def chat_prompt(self, messages: list[dict], add_generation_prompt: bool = True,
                    tools: list[dict] | None = None,
                    template_kwargs: dict | None = None) -> list[int]:
        """Token ids of a conversation rendered with the model's chat template; `tools`
        (OpenAI's list) are rendered by the template. Assistant messages may carry
        `tool_calls` (arguments a JSON string or an object) and `role: "tool"` messages
        their results (efedge.tool_calls.render_messages). `template_kwargs` become
        template variables (`{"enable_thinking": False}` for Qwen3's templates; llama.cpp's
        chat_template_kwargs)."""
        tools = check_tools(tools)
        tok = self.tokenizer
        tpl = self.chat_template(tools=tools is not None)
        text = tpl.render(render_messages(messages),
                          add_generation_prompt=add_generation_prompt, tools=tools,
                          **check_template_kwargs(template_kwargs))
        # as llama.cpp: a BOS the template writes first (an EOS it writes last) is dropped
        # where the vocab adds one, and then the vocab's are added, so the prompt starts
        # with exactly one BOS whether the template writes it or not (never two)
        if tok.add_bos and tpl.bos_token and text.startswith(tpl.bos_token):
            text = text[len(tpl.bos_token):]
        if tok.add_eos and tpl.eos_token and text.endswith(tpl.eos_token):
            text = text[:-len(tpl.eos_token)]
        return self.tokenize(text, add_special=True, parse_special=True)

    def _token_text(self, tid: int | None) -> str:
        """A special token's text as the vocab stores it, as templates from the file get
        it ("" when the vocab has none)."""
        return "" if tid is None else self.tokenizer.piece(tid)

    def chat(self, messages: list[dict], *, stream: bool = False, max_tokens: int = 512,
             stop=None, result: GenerationResult | None = None,
             cancel: threading.Event | None = None, logprobs: int | None = None,
             format: str | dict | None = None, tools: list[dict] | None = None,  # noqa: A002
             tool_choice: str | dict = "auto", template_kwargs: dict | None = None,
             **sampling) -> str | Iterator[str]:
        """Reply to a conversation ([{"role": ..., "content": ...}, ...]); `result`,
        `logprobs` and `format` as for stream().

        `tools` (OpenAI's [{"type": "function", "function": {"name", "description",
        "parameters"}}]) are rendered by a chat template in the Hermes <tool_call> format
        (efedge.tool_calls; another template is an UnsupportedModelError). The reply is
        still text; `result.tool_calls` receives the calls parsed from it
        (efedge.tool_calls.parse_tool_calls). `tool_choice`: "auto" (the model decides),
        "none" (no tools rendered), "required" (exactly one call of an offered tool) or
        {"type": "function", "function": {"name": N}} (one call of N), the last two by
        constraining the output to the call's grammar, its arguments an instance of the
        tool's parameters schema. `template_kwargs` as for chat_prompt(). A thinking
        model's reasoning stays in the text: efedge.reasoning.split_reasoning separates
        it."""
        if isinstance(messages, list | tuple) and not messages:
            raise ArgumentError("messages is empty: a conversation needs at least one message")
        tools = check_tools(tools)
        mode, names = resolve_choice(tool_choice, tools)
        shown = tools if mode != "none" else None
        if shown is not None:
            check_template(self.chat_template(tools=True))
        if mode == "forced" and is_harmony_template(self.chat_template(tools=True).source):
            raise UnsupportedModelError(HARMONY_FORCED)
        if mode == "forced":
            if format is not None:
                raise ArgumentError("format= cannot be combined with a forced tool_choice")
            format = forced_call_grammar(tools, names)  # noqa: A001
        ids = self._prompt_ids(self.chat_prompt(messages, tools=shown,
                                                template_kwargs=template_kwargs))
        result = result if result is not None else GenerationResult([], "length")
        it = self._stream_ids(ids, max_tokens, stop, sampling, result, cancel, logprobs,
                              format)
        if shown is not None:
            it = _parsing_calls(it, result, shown)
        return it if stream else "".join(it)


# the variables a chat template gets from efedge itself, which template_kwargs may not set
_RESERVED = frozenset({"messages", "tools", "documents", "add_generation_prompt",
                       "bos_token", "eos_token"})


def check_template_kwargs(kw: dict | None) -> dict:
    """template_kwargs: None or {name: value} with names that are not efedge's own."""
    if kw is None:
        return {}
    if not isinstance(kw, dict) or not all(isinstance(k, str) for k in kw):
        raise ArgumentError("template_kwargs must be a dict of variable name to value")
    taken = sorted(_RESERVED & kw.keys())
    if taken:
        raise ArgumentError(f"template_kwargs cannot set {', '.join(taken)}: efedge passes "
                            "those itself")
    if isinstance(kw.get("enable_thinking"), str):  # "false" is true to a template's test
        raise ArgumentError("template_kwargs: enable_thinking must be true or false, not a "
                            "string (as llama-server refuses it)")
    return kw


def _parsing_calls(it: Iterator[str], result: GenerationResult,
                   tools: list[dict]) -> Iterator[str]:
    """The pieces of `it`; once it ends, result.tool_calls holds the calls of the reply."""
    parts = []
    try:
        for piece in it:
            parts.append(piece)
            yield piece
    finally:
        it.close()
    result.tool_calls = parse_tool_calls("".join(parts), tools)[1]
