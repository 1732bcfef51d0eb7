"""Weights as the forward pass holds them: quantized matrices as read-only views of the
mapped file (QMatrix), small vectors dequantized once, and an FFN's three stacked
matrices with their quant types and activation-rounding schemes (_FFN)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from efedge import kernels
from efedge.gguf_file import GGUFFile
from efedge.kernels.activations import act_scheme


def _readonly(a: np.ndarray) -> np.ndarray:
    # one kernel specialisation for every weight: plain read-only ndarray views
    v = a.view(np.ndarray)
    v.flags.writeable = False
    return v


def _scheme(raw: np.ndarray, qtype: int) -> int:
    elems, nbytes = kernels.block_size(qtype)
    return act_scheme(qtype, raw.shape[-1] // nbytes * elems)


@dataclass
class QMatrix:
    """A quantized matrix: uint8 view [rows, row_bytes] of the file and its ggml type."""

    raw: np.ndarray
    qtype: int
    name: str

    def __post_init__(self):
        self.raw = _readonly(self.raw)
        self.scheme = _scheme(self.raw, self.qtype)

    def __call__(self, x: np.ndarray, acts: dict | None = None) -> np.ndarray:
        """x [T, K] → [T, rows], activations rounded as llama.cpp rounds them (acts: see
        kernels.qmatmul)."""
        return kernels.qmatmul(self.raw, self.qtype, x, acts)


def _qmatrix(gf: GGUFFile, name: str) -> QMatrix:
    ref = gf.tensor(name)
    kernels.check_qtype(ref.qtype, f"tensor {name!r}")
    return QMatrix(gf.raw(name), ref.qtype, name)


def _vector(gf: GGUFFile, name: str) -> np.ndarray:
    ref = gf.tensor(name)
    kernels.check_qtype(ref.qtype, f"tensor {name!r}")
    return kernels.dequantize(np.ascontiguousarray(gf.raw(name)), ref.qtype).reshape(-1)


class _FFN:
    """gate / up / down of one FFN (dense, shared expert, or a layer's stacked experts)
    as decode_ffn takes them: read-only [E, rows, row_bytes], quant types, schemes."""

    def __init__(self, gate: np.ndarray, up: np.ndarray, down: np.ndarray,
                 qtypes: tuple[int, int, int], act: int = 0):
        mats = [_readonly(m if m.ndim == 3 else m[None]) for m in (gate, up, down)]
        self.gate, self.up, self.down = mats
        self.qt = np.array(qtypes, np.int64)
        self.sc = np.array([_scheme(m, q) for m, q in zip(mats, qtypes, strict=True)], np.int64)
        # the activation of gate (kernels.nn.ACT_SILU, ACT_RELU: smallthinker) as the
        # trailing argument of decode_ffn / moe_ffn: none for SiLU, so those archs keep
        # the kernels' default specialisation
        self.act = act
        self.act_args = (act,) if act else ()
