"""Random valid blocks of the low-bit lattice and ternary quant types, written directly.

llama.cpp's quantizer refuses IQ1_S, IQ1_M, IQ2_XXS and IQ2_XS without an importance
matrix, and what matters for testing a runtime is not how good the quantization is but
that every field of every block is exercised. So the tiny checkpoints of these types are
random bytes for the index, sign and sub-scale fields (every bit pattern is valid data)
with a finite fp16 super-block scale chosen so that the tensor has the standard deviation
``make_tiny`` gives its float weights (activations stay in the range of the float model).

    quant spec  "IQ2_XXS"        every matrix (attention, experts, shared experts, dense
                                 FFN, output) as IQ2_XXS; embeddings, norms, router F32
                "IQ1_S/IQ3_S"    routed experts IQ1_S, the other matrices IQ3_S
                                 (either side may also be F32 or F16)

A matrix whose rows are not a multiple of 256 elements stays F32.
"""

from __future__ import annotations

import gguf
import numpy as np

Q = gguf.GGMLQuantizationType
RANDOM_TYPES = ("IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ1_S", "IQ1_M",
                "TQ1_0", "TQ2_0")
# byte offset of the fp16 super-block scale (IQ1_M: split over the scale words, below)
_D_OFFSET = {"IQ2_XXS": 0, "IQ2_XS": 0, "IQ2_S": 0, "IQ3_XXS": 0, "IQ3_S": 0, "IQ1_S": 0,
             "TQ1_0": 52, "TQ2_0": 64}


def parse_spec(quant: str) -> tuple[str, str] | None:
    """(experts' type, other matrices' type) of a random-block spec, or None when
    ``quant`` is not one (then it is F32 / F16 or a llama.cpp quantizer type)."""
    parts = quant.upper().split("/")
    if len(parts) > 2 or not any(p in RANDOM_TYPES for p in parts):
        return None
    for p in parts:
        if p not in RANDOM_TYPES and p not in ("F32", "F16"):
            raise ValueError(f"random-block spec {quant!r}: {p!r} is not one of "
                             f"{', '.join(RANDOM_TYPES)}, F32, F16")
    return parts[0], parts[-1]


def tensor_type(spec: tuple[str, str], name: str, init: str, keep_f32: bool,
                row_len: int, ndim: int) -> str:
    """The type ("F32", "F16" or a random-block type) tensor ``name`` gets under spec."""
    if keep_f32 or ndim < 2 or init not in ("proj", "output"):
        return "F32"
    t = spec[0] if "_exps." in name else spec[1]
    if t in RANDOM_TYPES and row_len % 256:
        return "F32"
    return t


def _set_d(blocks: np.ndarray, qtype: str, d: np.ndarray) -> None:
    """Write fp16 scales d [n_blocks] into blocks [n_blocks, block_bytes]."""
    bits = d.astype(np.float16).view(np.uint16)
    if qtype == "IQ1_M":  # the top nibble of each of the four u16 at byte 48
        sc = blocks[:, 48:56].copy().view(np.uint16)
        for k in range(4):
            sc[:, k] = (sc[:, k] & 0x0FFF) | (((bits >> (4 * k)) & 0xF) << 12)
        blocks[:, 48:56] = sc.view(np.uint8)
    else:
        o = _D_OFFSET[qtype]
        blocks[:, o:o + 2] = bits.view(np.uint8).reshape(-1, 2)


def random_blocks(qtype: str, np_shape: tuple[int, ...], std: float,
                  rng: np.random.Generator) -> np.ndarray:
    """uint8 [..., row_bytes] of random valid ``qtype`` blocks for a tensor of np_shape
    (elements, last = row length) whose values have about the standard deviation std."""
    qt = Q[qtype]
    el, nb = gguf.GGML_QUANT_SIZES[qt]
    *lead, n = np_shape
    rows = int(np.prod(lead, dtype=np.int64))
    raw = rng.integers(0, 256, (rows * (n // el), nb), dtype=np.uint8)
    if qtype == "TQ2_0":  # codes 0..2 only (values -1, 0, 1), as the quantizer writes
        codes = rng.integers(0, 3, (raw.shape[0], 64, 4), dtype=np.uint8)
        raw[:, :64] = (codes << np.array([0, 2, 4, 6], np.uint8)).sum(-1, dtype=np.uint8)
    # per-block scales: 1 ± 40%, then one factor for the whole tensor from a sample
    rel = rng.uniform(0.6, 1.4, raw.shape[0]).astype(np.float32)
    _set_d(raw, qtype, rel)
    sample = gguf.quants.dequantize(raw[: min(raw.shape[0], 512)], qt)
    rms = float(np.sqrt(np.mean(np.square(sample, dtype=np.float64))))
    _set_d(raw, qtype, rel * np.float32(std / max(rms, 1e-30)))
    return raw.reshape(*lead, n // el * nb)


def add_tensor_info(w: gguf.GGUFWriter, name: str, np_shape: tuple[int, ...],
                    qtype: str) -> None:
    """Declare tensor ``name`` of np_shape (elements) as ``qtype`` blocks in writer w."""
    qt = Q[qtype]
    el, nb = gguf.GGML_QUANT_SIZES[qt]
    shape = (*np_shape[:-1], np_shape[-1] // el * nb)
    w.add_tensor_info(name, shape, np.dtype(np.uint8), int(np.prod(shape)), raw_dtype=qt)


def file_type(spec: tuple[str, str]) -> gguf.LlamaFileType:
    """general.file_type of a file made from spec: the experts' type names it (llama.cpp's
    IQ2_S file type is mostly IQ2_XS tensors; mostly IQ2_S tensors is its IQ2_M)."""
    name = spec[0] if spec[0] in RANDOM_TYPES else spec[1]
    return gguf.LlamaFileType["MOSTLY_" + {"IQ2_S": "IQ2_M"}.get(name, name)]
