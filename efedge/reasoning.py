"""A reply's reasoning apart from its answer: the `<think>…</think>` part that thinking
models (Qwen3, DeepSeek-R1 and its distills, GLM-4.5, gpt-oss's templates for it …) write
first, as llama-server's `--reasoning-format deepseek` separates it (`reasoning_content`
in OpenAI's chat answers, `thinking` in Ollama's).

gpt-oss writes OpenAI's harmony format instead: messages on channels,
`<|channel|>analysis<|message|>…<|end|><|start|>assistant<|channel|>final<|message|>…`;
the analysis channel is the reasoning and the final channel the answer (as llama-server
and Ollama split gpt-oss's replies); a reply that starts with a harmony header is read so.

The reasoning is the text between a `<think>` that opens the reply (after whitespace) and
the first `</think>`; when the chat template already opened it (Qwen3's thinking
templates end the prompt with "<think>\\n"), from the reply's start. Whitespace around the
reasoning and between it and the answer is dropped. A reply cut short inside the
reasoning is all reasoning. Streaming, a piece that might be the start of a tag is held
back until the next one tells. With `tags` the reasoning keeps its tags around it
(`--reasoning-format deepseek-legacy`, streamed: llama-server leaves it in the content).
"""

from __future__ import annotations

import re

from efedge.generate import prefix_tail

OPEN, CLOSE = "<think>", "</think>"
# gpt-oss's harmony format: a reply is messages "<|channel|>NAME<|message|>TEXT<|end|>", each
# after the first opened by "<|start|>assistant" (the tokenizer writes these tokens out, as
# llama.cpp renders them). The analysis channel is the reasoning, final the answer.
H_CHANNEL, H_MESSAGE, H_END, H_START = "<|channel|>", "<|message|>", "<|end|>", "<|start|>"
_H_OPENERS = (H_CHANNEL, H_START)
_H_BODY_ENDS = (H_END, H_START, H_CHANNEL)  # (a model that skips <|end|>: the next header)


def is_harmony_template(template: str) -> bool:
    """Whether a chat template writes gpt-oss's harmony channels (its replies are split
    by channel, not by <think> tags)."""
    return H_CHANNEL in template and H_MESSAGE in template


def _harmony_kind(header: str) -> str:
    """What a harmony message's text is, from its header: "reasoning" (the analysis
    channel), "content" (final, or commentary for the user), or "raw" (a message to a
    recipient: a tool call, given out whole as a "call" piece)."""
    if re.search(r"\bto=", header):
        return "raw"
    m = re.search(re.escape(H_CHANNEL) + r"\s*(\w+)", header)
    return "reasoning" if m is not None and m.group(1) == "analysis" else "content"


def prompt_opens_thinking(prompt_text: str) -> bool:
    """Whether a rendered prompt ends inside a <think> block the template opened."""
    return prompt_text.rfind(OPEN) > prompt_text.rfind(CLOSE) and \
        prompt_text.rstrip().endswith(OPEN)


class ReasoningSplitter:
    """push(piece) → [(kind, text)], kind "reasoning" or "content" — or "call": a harmony
    message to a recipient, whole (header, <|message|>, text), for efedge.tool_calls to
    read (as written, it is content); finish() → the rest.
    `tags`: the reasoning's pieces come with "<think>" before the first and "</think>"
    after the last (whitespace around it dropped all the same; a reply cut short inside
    it closed too, as llama-server closes it; nothing at all when it is empty)."""

    def __init__(self, opened: bool = False, tags: bool = False):
        self.state = "think" if opened else "start"
        self.buf = ""
        self.tags = tags
        self.fresh = True  # no reasoning text given out yet: its leading whitespace goes
        self.thought = opened  # the reply opened a reasoning part (<think> or analysis)
        self.h_kind = ""  # the harmony message being read: reasoning / content / raw
        self.h_header = self.h_raw = ""

    def push(self, piece: str) -> list[tuple[str, str]]:
        self.buf += piece
        out: list[tuple[str, str]] = []
        while True:
            if self.state == "start":  # may open with <think>, or a harmony header
                s = self.buf.lstrip()
                if not s or any(t.startswith(s) and s != t for t in (OPEN, *_H_OPENERS)):
                    return out  # whitespace, or a tag that may be starting: wait
                if s.startswith(OPEN):
                    self.buf, self.state, self.thought = s[len(OPEN):], "think", True
                elif s.startswith(_H_OPENERS):
                    self.buf, self.state = s, "h_head"
                else:
                    self.state = "content"
            elif self.state == "h_head":  # a harmony header, up to <|message|>
                i = self.buf.find(H_MESSAGE)
                if i < 0:
                    return out
                self.h_header, self.buf = self.buf[:i], self.buf[i + len(H_MESSAGE):]
                self.h_kind, self.state = _harmony_kind(self.h_header), "h_body"
                self.h_raw = ""
                if self.h_kind == "reasoning":
                    self.thought = True
            elif self.state == "h_body":  # its text, up to <|end|> or the next header
                ends = [(i, t) for t in _H_BODY_ENDS if (i := self.buf.find(t)) >= 0]
                if ends:
                    i, t = min(ends)
                    self._h_text(out, self.buf[:i], close=True)
                    self.buf = self.buf[i + (len(t) if t == H_END else 0):]
                    self.state = "h_next"
                    continue
                keep = max(prefix_tail(self.buf, t) for t in _H_BODY_ENDS)
                self._h_text(out, self.buf[:len(self.buf) - keep])
                self.buf = self.buf[len(self.buf) - keep:]
                return out
            elif self.state == "h_next":  # between messages: another header, or stray text
                s = self.buf.lstrip()
                if not s or any(t.startswith(s) and s != t for t in _H_OPENERS):
                    return out
                self.buf = s
                self.state = "h_head" if s.startswith(_H_OPENERS) else "content"
            elif self.state == "think":
                if self.fresh:
                    self.buf = self.buf.lstrip()
                i = self.buf.find(CLOSE)
                if i >= 0:
                    self._reason(out, self.buf[:i].rstrip(), close=True)
                    self.buf, self.state = self.buf[i + len(CLOSE):], "after"
                    continue
                # give out all but a tag that may be starting and trailing whitespace
                # (dropped if the tag follows, given out if more reasoning does)
                head = self.buf[:len(self.buf) - prefix_tail(self.buf, CLOSE)].rstrip()
                self._reason(out, head)
                self.buf = self.buf[len(head):]
                return out
            elif self.state == "after":  # whitespace between the reasoning and the answer
                self.buf = self.buf.lstrip()
                if not self.buf:
                    return out
                self.state = "content"
            else:
                if self.buf:
                    out.append(("content", self.buf))
                    self.buf = ""
                return out

    def _h_text(self, out: list, text: str, close: bool = False) -> None:
        """Text of the harmony message being read, as its kind says."""
        if self.h_kind == "reasoning":
            if self.fresh:
                text = text.lstrip()
            if close and not self.tags:
                text = text.rstrip()
            # (tagged: each analysis message opens and closes its own <think> part)
            self._reason(out, text, close=close)
            if close and self.tags:
                self.fresh = True
        elif self.h_kind == "raw":  # whole, at its end: a tool call (efedge.tool_calls)
            self.h_raw += text
            if close:
                out.append(("call", self.h_header + H_MESSAGE + self.h_raw))
        elif text:
            out.append(("content", text))

    def _reason(self, out: list, text: str, close: bool = False) -> None:
        """Give out reasoning text; `close`: the reasoning ends with it."""
        if self.tags:
            text = (OPEN if self.fresh and text else "") + text + \
                (CLOSE if close and (text or not self.fresh) else "")
        if text:
            out.append(("reasoning", text))
            self.fresh = False

    def finish(self) -> list[tuple[str, str]]:
        """What is held back, once the reply has ended."""
        rest, self.buf = self.buf, ""
        out: list[tuple[str, str]] = []
        if self.state == "think":
            self._reason(out, rest.strip() if self.fresh else rest.rstrip(), close=True)
            return out
        if self.state == "h_body":  # the reply ended inside a message (a call ends at
            self._h_text(out, rest, close=True)  # <|call|>, which ends the generation)
            return out
        if self.state in ("after", "h_head", "h_next"):
            return []  # (a header cut short says nothing)
        return [("content", rest)] if rest else []


def split_reasoning(text: str, opened: bool = False) -> tuple[str | None, str]:
    """(reasoning or None, answer) of a whole reply; `opened`: the prompt opened <think>
    (prompt_opens_thinking)."""
    sp = ReasoningSplitter(opened)
    parts = sp.push(text) + sp.finish()
    reasoning = "".join(t for k, t in parts if k == "reasoning")
    content = "".join(t for k, t in parts if k != "reasoning")
    return (reasoning if sp.thought else None), content


def is_harmony_reply(text: str) -> bool:
    """Whether a reply starts with a harmony header (gpt-oss)."""
    return text.lstrip().startswith(_H_OPENERS)
