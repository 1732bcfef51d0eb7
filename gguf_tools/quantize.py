"""Quantize a GGUF file with llama.cpp's own quantizer (through llama-cpp-python).

The K-quant and IQ test files must be byte-for-byte what users download, so we never
re-implement the quantizer: ``llama_model_quantize`` picks the same per-tensor mixes
(e.g. Q4_K_M = Q4_K + Q6_K + …) that ``llama-quantize`` does.

    python -m gguf_tools.quantize SRC DST TYPE        # TYPE: Q4_K_M, Q8_0, IQ4_NL, …
"""

from __future__ import annotations

import argparse
import ctypes
import os
from pathlib import Path

_backend_ready = False


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise RuntimeError(
            "quantizing needs llama-cpp-python (pip install llama-cpp-python==0.3.36)"
        ) from e
    return llama_cpp


def _ftype_attr(name: str) -> str:
    name = name.upper()
    return "LLAMA_FTYPE_ALL_F32" if name == "F32" else f"LLAMA_FTYPE_MOSTLY_{name}"


def known_types() -> list[str]:
    """The file-type names this llama.cpp build can produce ("Q4_K_M", "IQ4_NL", …)."""
    llama_cpp = _llama_cpp()
    names = [n.removeprefix("LLAMA_FTYPE_MOSTLY_") for n in dir(llama_cpp)
             if n.startswith("LLAMA_FTYPE_MOSTLY_")]
    return sorted(names + ["F32"])


def quantize(src: str | os.PathLike, dst: str | os.PathLike, ftype_name: str,
             nthread: int = 2) -> Path:
    """Quantize ``src`` (an F32/F16 GGUF) into ``dst`` as ``ftype_name`` (e.g. "Q4_K_M").

    Raises ``ValueError`` for a type name llama.cpp does not know, ``FileNotFoundError``
    for a missing source and ``RuntimeError`` when the quantizer reports failure.
    llama.cpp prints its progress to stderr.
    """
    global _backend_ready
    src, dst = Path(src), Path(dst)
    llama_cpp = _llama_cpp()
    attr = _ftype_attr(ftype_name)
    ftype = getattr(llama_cpp, attr, None)
    if ftype is None:
        raise ValueError(f"unknown quantization type {ftype_name!r}; "
                         f"known: {', '.join(known_types())}")
    if not src.is_file():
        raise FileNotFoundError(f"quantize: source file {src} does not exist")
    if not _backend_ready:
        llama_cpp.llama_backend_init()
        _backend_ready = True
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = nthread
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(),
                                        ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({src} -> {dst}, {ftype_name}) "
                           f"failed with code {rc}")
    return dst


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m gguf_tools.quantize",
                                 description="Quantize a GGUF file with llama.cpp's quantizer")
    ap.add_argument("src", type=Path)
    ap.add_argument("dst", type=Path)
    ap.add_argument("type", help="Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K_M, Q4_K_M, "
                                 "Q5_K_M, Q6_K, IQ4_NL, IQ4_XS, …")
    ap.add_argument("-t", "--threads", type=int, default=2)
    args = ap.parse_args(argv)
    quantize(args.src, args.dst, args.type, nthread=args.threads)
    print(args.dst)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
