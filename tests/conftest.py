"""Shared fixtures: tiny random GGUF models per (arch, quant), and the llama.cpp guard.

* ``tiny_gguf(arch, quant="F32", **kw)`` → Path: written once per session (``kw`` go to
  ``gguf_tools.make_tiny.write_tiny``: preset, seed, n_layer, …). Non-float types need
  llama.cpp's quantizer; without llama-cpp-python such a test is skipped.
* ``@pytest.mark.requires_llama_cpp``: skip the test when ``llama_cpp`` cannot be imported
  (``requires_llama_cpp`` below is the same thing as a ``skipif`` mark).
"""

from __future__ import annotations

import os
import signal
import sys
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # efedge / gguf_tools from the checkout, installed or not
    sys.path.insert(0, str(ROOT))

# A shell without job control starts a background command (`.ci/run &`) with SIGINT
# ignored, and children inherit that: the tests that send a real Ctrl-C — to this
# process or to an `efedge chat` / `serve` child — would see nothing happen. Python's own
# handler here gives the children the default disposition back (a handler does not
# survive exec; an ignored signal does).
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def load_benchmark(name: str):
    """benchmarks/<name>.py as a module (a script, not a package module), for the tests
    that run a benchmark's parts."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@cache
def llama_cpp_error() -> str | None:
    """Why ``llama_cpp`` cannot be used here, or None when it can."""
    try:
        import llama_cpp  # noqa: F401
    except Exception as e:  # ImportError, or OSError when the shared library is broken
        return f"llama-cpp-python is not available ({type(e).__name__}: {e})"
    return None


class _LazySkip:
    """Truthiness evaluated when pytest asks, so collection does not import llama_cpp."""

    def __bool__(self) -> bool:
        return llama_cpp_error() is not None


requires_llama_cpp = pytest.mark.skipif(_LazySkip(), reason="llama-cpp-python is not available")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "requires_llama_cpp: skip when llama-cpp-python cannot be imported")
    # `-n N` (pytest-xdist) without --dist: whole files per worker rather than single
    # tests, so a file's module-scoped fixtures (models written and loaded once) and
    # the kernels its tests compile stay in one process instead of being built in each
    if getattr(config.option, "numprocesses", None) and not any(
            a == "--dist" or a.startswith("--dist=") for a in config.invocation_params.args):
        config.option.dist = "loadfile"


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """`-n auto`: one worker per core, at most 4 — each compiles its own kernels on a fresh
    checkout and holds its own models (about 1 GB), so more workers than that add memory
    faster than they take time off."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(4, cores))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    marked = [it for it in items if it.get_closest_marker("requires_llama_cpp")]
    if marked and (why := llama_cpp_error()) is not None:
        skip = pytest.mark.skip(reason=why)
        for it in marked:
            it.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory):
    """Factory: ``tiny_gguf(arch, quant="F32", **kw) -> Path``, each file written once."""
    from gguf_tools.make_tiny import write_tiny

    root = tmp_path_factory.mktemp("tiny_gguf")
    made: dict[tuple, Path] = {}

    def make(arch: str, quant: str = "F32", **kw) -> Path:
        quant = quant.upper()
        key = (arch, quant, tuple(sorted(kw.items())))
        if key not in made:
            from gguf_tools.random_quant import parse_spec

            # random-block files (IQ1 / IQ2 / IQ3 / TQ) are written without llama.cpp
            if (quant not in ("F32", "F16") and parse_spec(quant) is None
                    and (why := llama_cpp_error()) is not None):
                pytest.skip(f"quantizing to {quant}: {why}")
            extra = "".join(f"-{k}{v}" for k, v in sorted(kw.items()))
            made[key] = write_tiny(root / f"{arch}-{quant}{extra}.gguf", arch, quant, **kw)
        return made[key]

    return make
