"""A reply's reasoning apart from its answer: the `<think>…</think>` part that thinking
models (Qwen3, DeepSeek-R1 and its distills, GLM-4.5, gpt-oss's templates for it …) write
first, as llama-server's `--reasoning-format deepseek` separates it (`reasoning_content`
in OpenAI's chat answers, `thinking` in Ollama's).

The reasoning is the text between a `<think>` that opens the reply (after whitespace) and
the first `</think>`; when the chat template already opened it (Qwen3's thinking
templates end the prompt with "<think>\\n"), from the reply's start. Whitespace around the
reasoning and between it and the answer is dropped. A reply cut short inside the
reasoning is all reasoning. Streaming, a piece that might be the start of a tag is held
back until the next one tells. With `tags` the reasoning keeps its tags around it
(`--reasoning-format deepseek-legacy`, streamed: llama-server leaves it in the content).
"""

from __future__ import annotations

from efedge.generate import prefix_tail

OPEN, CLOSE = "<think>", "</think>"


def prompt_opens_thinking(prompt_text: str) -> bool:
    """Whether a rendered prompt ends inside a <think> block the template opened."""
    return prompt_text.rfind(OPEN) > prompt_text.rfind(CLOSE) and \
        prompt_text.rstrip().endswith(OPEN)


class ReasoningSplitter:
    """push(piece) → [(kind, text)], kind "reasoning" or "content"; finish() → the rest.
    `tags`: the reasoning's pieces come with "<think>" before the first and "</think>"
    after the last (whitespace around it dropped all the same; a reply cut short inside
    it closed too, as llama-server closes it; nothing at all when it is empty)."""

    def __init__(self, opened: bool = False, tags: bool = False):
        self.state = "think" if opened else "start"
        self.buf = ""
        self.tags = tags
        self.fresh = True  # no reasoning text given out yet: its leading whitespace goes

    def push(self, piece: str) -> list[tuple[str, str]]:
        self.buf += piece
        out: list[tuple[str, str]] = []
        while True:
            if self.state == "start":  # may open with <think>
                s = self.buf.lstrip()
                if not s or (OPEN.startswith(s) and s != OPEN):
                    return out  # whitespace, or a tag that may be starting: wait
                if s.startswith(OPEN):
                    self.buf, self.state = s[len(OPEN):], "think"
                else:
                    self.state = "content"
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
        if self.state == "think":
            out: list[tuple[str, str]] = []
            self._reason(out, rest.strip() if self.fresh else rest.rstrip(), close=True)
            return out
        if self.state == "after":
            return []
        return [("content", rest)] if rest else []


def split_reasoning(text: str, opened: bool = False) -> tuple[str | None, str]:
    """(reasoning or None, answer) of a whole reply; `opened`: the prompt opened <think>
    (prompt_opens_thinking)."""
    sp = ReasoningSplitter(opened)
    parts = sp.push(text) + sp.finish()
    reasoning = "".join(t for k, t in parts if k == "reasoning")
    content = "".join(t for k, t in parts if k == "content")
    started = opened or text.lstrip().startswith(OPEN)
    return (reasoning if started else None), content
