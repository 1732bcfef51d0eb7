"""Fill-in-the-middle (code infilling): the prompt llama.cpp's server builds for /infill.

Code models trained for FIM (Qwen2.5-Coder, Qwen3-Coder, DeepSeek-Coder-V2, Granite code,
CodeLlama, GLM-4.5 …) mark the text before and after a gap with tokens of their vocab
(efedge.tokenizer finds them as llama.cpp does: `tokenizer.ggml.fim_*_token_id`, else by
their text) and write the middle after the middle marker. Layout (llama.cpp's server,
after the repository-level pattern of the Qwen2.5-Coder report):

    [FIM_REP]myproject\\n                       (when the vocab has a repo marker)
    [FIM_SEP]filename0\\n extra chunk 0 …        (each input_extra chunk; without a file
                                               separator, "\\n\\n--- snippet ---\\n\\n")
    [FIM_SEP]filename\\n                        (when the vocab has a file separator)
    [BOS] [FIM_PRE]prefix prompt [FIM_SUF]suffix [FIM_MID]

(`prompt`, the start of the middle if the editor has one, follows the prefix: where
llama.cpp's code puts it, whatever its comment says. Its special tokens' texts are read
as the tokens, as llama-server reads them; the other parts are plain text.)

The parts are cut to fit as llama.cpp cuts them: the prefix keeps its last 3/4 of a batch
of tokens (2048, llama.cpp's default, or less where the context is smaller), the suffix its
first 1/4 less the prompt and two markers, and the extra chunks (their last tokens) what
the context leaves beside a batch and twice the tokens to generate (but never the last
token of the context: room for the answer's first, at least).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from efedge.errors import ArgumentError, UnsupportedModelError

# llama.cpp's default logical batch (n_batch), which sizes the prefix and suffix it keeps
FIM_BATCH = 2048
_SNIPPET = "\n\n--- snippet ---\n\n"  # the chunk separator without a file-separator token


@dataclass(frozen=True)
class ExtraChunk:
    """One file of context beside the one being edited (llama.cpp's input_extra)."""

    text: str
    filename: str = "tmp"


def fim_markers(tokenizer) -> tuple[int, int, int]:
    """(pre, suf, mid) token ids; UnsupportedModelError when the vocab lacks one."""
    ids = tokenizer.fim_ids
    missing = [n for n in ("pre", "suf", "mid") if ids.get(n) is None]
    if missing:
        raise UnsupportedModelError(
            "this model has no fill-in-the-middle tokens (" + ", ".join(
                f"tokenizer.ggml.fim_{n}_token_id" for n in missing) + " not set, and no "
            "token such as <|fim_prefix|> / <fim-prefix> / <PRE> in its vocab): infilling "
            "needs a code model trained for it")
    return ids["pre"], ids["suf"], ids["mid"]


def _chunks(extra: Sequence[ExtraChunk | dict] | None) -> list[ExtraChunk]:
    out = []
    for i, c in enumerate(extra or ()):
        if isinstance(c, dict):
            text, name = c.get("text", ""), c.get("filename", "tmp")
            if not isinstance(text, str) or not isinstance(name, str):
                raise ArgumentError(f"extra[{i}]: text and filename must be strings")
            c = ExtraChunk(text, name)
        elif not isinstance(c, ExtraChunk):
            raise ArgumentError(f"extra[{i}] must be {{'text': …, 'filename': …}}, got "
                                f"{type(c).__name__}")
        out.append(c)
    return out


def infill_ids(tokenizer, prefix: str, suffix: str = "", *, prompt: str = "",
               extra: Sequence[ExtraChunk | dict] | None = None, n_ctx: int = 4096,
               n_predict: int = 0, n_batch: int = FIM_BATCH) -> list[int]:
    """The token ids of an infill request (module docstring). `prompt` starts the middle;
    `n_predict` (0: none asked for) leaves room for the answer when extra chunks are cut."""
    for name, v in (("prefix", prefix), ("suffix", suffix), ("prompt", prompt)):
        if not isinstance(v, str):
            raise ArgumentError(f"{name} must be a string, got {type(v).__name__}")
    pre, suf, mid = fim_markers(tokenizer)
    ids = tokenizer.fim_ids

    def enc(text: str) -> list[int]:
        return tokenizer.encode(text, add_special=False, parse_special=False)

    extra_ids: list[int] = []
    if ids.get("rep") is not None:
        extra_ids += [ids["rep"], *enc("myproject\n")]
    for chunk in _chunks(extra):
        if ids.get("sep") is not None:
            extra_ids += [ids["sep"], *enc(chunk.filename + "\n")]
        else:
            extra_ids += enc(_SNIPPET)
        extra_ids += enc(chunk.text)
    if ids.get("sep") is not None:
        extra_ids += [ids["sep"], *enc("filename\n")]

    # (llama-server reads special tokens in the prompt, not in the parts around it)
    prefix_ids, suffix_ids = enc(prefix), enc(suffix)
    prompt_ids = tokenizer.encode(prompt, add_special=False, parse_special=True)
    # a context smaller than a batch and the answer: the batch shrinks so that the prompt
    # (at most a batch + the markers) leaves room for the answer — unless no context could
    # hold that answer: then it runs until the context is full, after a full prompt (the
    # batch shrank to 8 tokens, the prefix cut to 6)
    n_predict = n_predict if n_predict < n_ctx else 0
    n_batch = max(8, min(n_batch, n_ctx - max(0, n_predict) - 4))
    n_prefix = min(len(prefix_ids), 3 * (n_batch // 4))
    n_suffix = min(len(suffix_ids), max(0, n_batch // 4 - (2 + len(prompt_ids))))
    head = [tokenizer.bos_id] if tokenizer.add_bos and tokenizer.bos_id is not None else []
    # llama.cpp's budget for the extra files counts neither the markers nor a BOS, so with
    # no n_predict (0, 1) a full prefix, suffix and extra filled the context: they keep
    # room for the answer's first token, at least
    n_fim = n_prefix + len(prompt_ids) + n_suffix + 3 + len(head)
    n_extra = min(max(0, n_ctx - n_batch - 2 * max(0, n_predict)), len(extra_ids),
                  max(0, n_ctx - n_fim - max(1, n_predict)))
    return (extra_ids[len(extra_ids) - n_extra:] + head
            + [pre, *prefix_ids[len(prefix_ids) - n_prefix:], *prompt_ids]
            + [suf, *suffix_ids[:n_suffix]] + [mid])


class IndentStop:
    """llama-server's `n_indent` for code completion: the reply ends at the first line after
    its first newline that is indented less than `n_indent` (spaces and tabs before its
    first other character; an empty line counts as 0), from that character on. The
    first line goes on the cursor's: never checked. push(piece) → the text to give out (a
    line's leading whitespace held back until its first other character tells);
    `stopped` once the limit is hit; finish() → what is held back."""

    def __init__(self, n_indent: int):
        self.n_indent = n_indent
        self.line_start = False  # at the start of a line after a newline: indentation next
        self.held = ""  # that line's whitespace so far
        self.stopped = False

    def push(self, piece: str) -> str:
        out = []
        for ch in piece:
            if self.stopped:
                break
            if self.line_start:
                if ch in " \t":
                    self.held += ch
                    continue
                out.append(self.held)
                if len(self.held) < self.n_indent:  # (as llama-server: its indentation kept)
                    self.stopped = True
                    break
                self.held, self.line_start = "", False
            out.append(ch)
            self.line_start = ch == "\n"
        return "".join(out)

    def finish(self) -> str:
        rest, self.held = ("" if self.stopped else self.held), ""
        return rest
