"""llama.cpp (llama-cpp-python) as the reference for tests: logits, greedy tokens, token ids.

Import from a test: ``from llama_ref import llama_logits, llama_greedy, llama_tokenize``.
Guard such tests with ``@pytest.mark.requires_llama_cpp`` (see conftest.py): this module
imports ``llama_cpp`` lazily, so importing it never fails.

Llama objects are cached per (path, n_ctx) within the process, so asking for the logits
of many prompts on one file loads it once. Every call starts a fresh sequence at pos 0.
"""

from __future__ import annotations

import os
from functools import lru_cache

import numpy as np

N_THREADS = 2


def _key(path: str | os.PathLike) -> str:
    return os.path.realpath(os.fspath(path))


def make_llama(path: str | os.PathLike, **kw):
    """``llama_cpp.Llama(path, **kw)`` computing with ggml's plain CPU kernels
    (efedge/cli/llama_plain.py: llama.cpp's AMX path crashes on the tiny test files
    where the CPU has AMX; the plain kernels are the products efedge reproduces, and on
    a CPU without AMX, where the tests passed before, what llama.cpp ran anyway for all
    but its Q4_0 / IQ4_NL repacks)."""
    from efedge.cli.llama_plain import plain_llama

    return plain_llama(path, **kw)


@lru_cache(maxsize=4)
def _model(path: str, n_ctx: int, mtime_ns: int):
    return make_llama(path, logits_all=True, n_ctx=n_ctx, n_threads=N_THREADS,
                      n_threads_batch=N_THREADS, verbose=False)


@lru_cache(maxsize=8)
def _vocab(path: str, mtime_ns: int):
    from llama_cpp import Llama

    return Llama(path, vocab_only=True, verbose=False)


def llama(path: str | os.PathLike, n_ctx: int = 512):
    """The cached ``llama_cpp.Llama`` for ``path`` (logits for every position)."""
    p = _key(path)
    return _model(p, n_ctx, os.stat(p).st_mtime_ns)


def llama_logits(path: str | os.PathLike, tokens: list[int], n_ctx: int = 512) -> np.ndarray:
    """llama.cpp's logits for ``tokens`` from position 0: float32 [len(tokens), n_vocab]."""
    tokens = [int(t) for t in tokens]
    if not 0 < len(tokens) <= n_ctx:
        raise ValueError(f"need 1..{n_ctx} tokens, got {len(tokens)}")
    m = llama(path, n_ctx)
    m.reset()
    m.eval(tokens)
    return np.array(m.scores[: len(tokens)], dtype=np.float32)


def llama_greedy(path: str | os.PathLike, prompt_tokens: list[int], n: int,
                 n_ctx: int = 512) -> list[int]:
    """``n`` greedy tokens after ``prompt_tokens`` (argmax of the last logits each step)."""
    prompt = [int(t) for t in prompt_tokens]
    if not prompt or len(prompt) + n > n_ctx:
        raise ValueError(f"prompt of {len(prompt)} + {n} tokens does not fit n_ctx {n_ctx}")
    m = llama(path, n_ctx)
    m.reset()
    m.eval(prompt)
    out: list[int] = []
    for i in range(n):
        tok = int(np.argmax(m.scores[m.n_tokens - 1]))
        out.append(tok)
        if i + 1 < n:
            m.eval([tok])
    return out


def llama_tokenize(path: str | os.PathLike, text: str, add_bos: bool = False,
                   special: bool = False) -> list[int]:
    """llama.cpp's token ids for ``text`` (``special``: parse control-token text)."""
    p = _key(path)
    return list(_vocab(p, os.stat(p).st_mtime_ns).tokenize(text.encode("utf-8"),
                                                          add_bos=add_bos, special=special))


def llama_detokenize(path: str | os.PathLike, tokens: list[int]) -> bytes:
    """llama.cpp's bytes for ``tokens``."""
    p = _key(path)
    return _vocab(p, os.stat(p).st_mtime_ns).detokenize([int(t) for t in tokens])
