"""GGUF file → metadata dict + validated tensor references over one read-only mapping.

Parsing goes through gguf-py's GGUFReader (memory-mapped, zero copy). Everything it
returns is validated here before any kernel sees a byte: numba does not bounds-check, so
a tensor whose offset, length, shape or type does not add up is refused with the tensor
named, never handed on.
"""

from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFValueType

from efedge.errors import ModelFormatError, UnsupportedModelError

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
# Smallest possible KV record (8-byte key length + 4-byte type + 1-byte value) and tensor
# info record (8 + 4 + 8 + 4 + 8): bounds on the declared counts before parsing.
_MIN_KV_BYTES = 13
_MIN_TENSOR_INFO_BYTES = 32
EXPERT_TENSORS = ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")


@dataclass(frozen=True)
class TensorRef:
    """Where one tensor lives: ggml shape order (ne0 = row length first)."""

    name: str
    qtype: int
    shape: tuple[int, ...]  # ggml order: shape[0] is the contiguous row length
    offset: int  # absolute byte offset in the file
    nbytes: int

    @property
    def qtype_name(self) -> str:
        return GGMLQuantizationType(self.qtype).name

    @property
    def n_rows(self) -> int:
        return int(np.prod(self.shape[1:], dtype=np.int64)) if len(self.shape) > 1 else 1

    @property
    def row_bytes(self) -> int:
        block, size = GGML_QUANT_SIZES[GGMLQuantizationType(self.qtype)]
        return self.shape[0] // block * size


@dataclass(frozen=True)
class ExpertSlice:
    """One expert's part of a stacked `blk.N.ffn_*_exps.weight` tensor: the cache's unit."""

    tensor: str
    layer: int
    expert: int
    qtype: int
    rows: int
    row_len: int  # elements per row
    offset: int  # absolute byte offset in the file
    nbytes: int


class _HeaderReader(GGUFReader):
    """gguf-py's parser for the header, metadata and tensor infos; tensor data views are
    built by GGUFFile after validation, so a bad tensor is reported by name instead of
    failing inside numpy."""

    def _build_tensors(self, start_offs: int, fields: list[Any]) -> None:
        self.tensor_infos: list[tuple[str, int, tuple[int, ...], int]] = []
        for field in fields:
            _len, name_data, _n_dims, dims, raw_dtype, offset_tensor = field.parts
            name = bytes(name_data).decode("utf-8")
            self.tensor_infos.append((name, int(raw_dtype[0]), tuple(int(d) for d in dims),
                                      int(start_offs + int(offset_tensor[0]))))


def _value(field: Any) -> Any:
    """Python value of a ReaderField (scalars unwrapped, arrays as lists)."""
    types = field.types
    if not types:
        return None
    if types[0] == GGUFValueType.ARRAY:
        sub = types[-1]
        if sub == GGUFValueType.STRING:
            return [bytes(field.parts[i]).decode("utf-8", errors="replace") for i in field.data]
        if sub == GGUFValueType.ARRAY:
            raise ModelFormatError(f"metadata key {field.name!r}: nested arrays are not supported")
        if not field.data:
            return []
        start, stop = field.data[0], field.data[-1] + 1
        arr = np.concatenate([field.parts[i] for i in range(start, stop)]) if stop > start else []
        return np.asarray(arr).tolist()
    if types[0] == GGUFValueType.STRING:
        return bytes(field.parts[field.data[0]]).decode("utf-8", errors="replace")
    return field.parts[field.data[0]].tolist()[0]


def _precheck(path: Path) -> int:
    """Check magic, version and declared counts from the raw header; return file size."""
    try:
        size = os.path.getsize(path)
    except OSError as exc:
        raise ModelFormatError(f"{path}: cannot open model file ({exc.strerror})") from exc
    if size < 24:
        raise ModelFormatError(f"{path}: file too short for a GGUF header ({size} bytes)")
    with open(path, "rb") as fh:
        head = fh.read(24)
    if head[:4] != GGUF_MAGIC:
        raise ModelFormatError(f"{path}: not a GGUF file (magic {head[:4]!r}, expected b'GGUF')")
    (version,) = struct.unpack_from("<I", head, 4)
    if version not in SUPPORTED_VERSIONS:
        raise ModelFormatError(f"{path}: GGUF version {version} is not supported (2 or 3)")
    n_tensors, n_kv = struct.unpack_from("<QQ", head, 8)
    if n_kv * _MIN_KV_BYTES > size:
        raise ModelFormatError(f"{path}: header declares {n_kv} metadata keys, file too short")
    if n_tensors * _MIN_TENSOR_INFO_BYTES > size:
        raise ModelFormatError(f"{path}: header declares {n_tensors} tensors, file too short")
    return size


class GGUFFile:
    """A validated, memory-mapped GGUF file.

    `metadata` maps every key to a Python value; `tensors` maps names to TensorRef;
    `raw(name)` returns a zero-copy uint8 view [rows, row_bytes] of a tensor.
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self.file_size = _precheck(self.path)
        try:
            reader = _HeaderReader(self.path, "r")
        except (ValueError, IndexError, KeyError, OverflowError, UnicodeDecodeError,
                TypeError, struct.error) as exc:
            raise ModelFormatError(f"{self.path}: malformed GGUF ({exc})") from exc
        except MemoryError as exc:
            raise ModelFormatError(f"{self.path}: malformed GGUF (absurd declared size)") from exc
        self._mmap = reader.data
        self.data_offset = int(reader.data_offset)
        self.alignment = int(reader.alignment)
        self.metadata: dict[str, Any] = {}
        for key, field in reader.fields.items():
            if key.startswith("GGUF."):
                continue
            try:
                self.metadata[key] = _value(field)
            except (IndexError, ValueError) as exc:
                raise ModelFormatError(f"{self.path}: metadata key {key!r} is malformed") from exc
        self.tensors: dict[str, TensorRef] = {}
        for name, qtype, shape, offset in reader.tensor_infos:
            if name in self.tensors:
                raise ModelFormatError(f"{self.path}: tensor {name!r} appears twice")
            self.tensors[name] = self._validate_tensor(name, qtype, shape, offset)
        self._check_overlaps()
        del reader

    # -- validation -------------------------------------------------------------------
    def _validate_tensor(self, name: str, qtype: int, shape: tuple[int, ...],
                         offset: int) -> TensorRef:
        try:
            qt = GGMLQuantizationType(qtype)
        except ValueError as exc:
            raise UnsupportedModelError(f"tensor {name!r}: unknown ggml type {qtype}") from exc
        if not shape or any(d <= 0 for d in shape):
            raise ModelFormatError(f"tensor {name!r}: invalid shape {shape}")
        block, type_size = GGML_QUANT_SIZES[qt]
        if shape[0] % block:
            raise ModelFormatError(
                f"tensor {name!r}: row length {shape[0]} is not a multiple of the "
                f"{qt.name} block size {block}")
        n_el = math.prod(shape)  # Python ints: a forged shape cannot overflow
        nbytes = n_el // block * type_size
        rel = offset - self.data_offset
        if rel < 0 or rel % self.alignment:
            raise ModelFormatError(f"tensor {name!r}: data offset {rel} is not aligned to "
                                   f"{self.alignment}")
        if offset + nbytes > self.file_size:
            raise ModelFormatError(
                f"tensor {name!r}: bytes {offset}..{offset + nbytes} lie past the end of the "
                f"file ({self.file_size} bytes); the file is truncated or corrupt")
        return TensorRef(name, qtype, shape, offset, nbytes)

    def _check_overlaps(self) -> None:
        spans = sorted((t.offset, t.offset + t.nbytes, t.name) for t in self.tensors.values())
        for (_, end_a, name_a), (start_b, _, name_b) in zip(spans, spans[1:], strict=False):
            if start_b < end_a:
                raise ModelFormatError(f"tensors {name_a!r} and {name_b!r} overlap in the file")

    # -- access -----------------------------------------------------------------------
    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    def require(self, key: str) -> Any:
        if key not in self.metadata:
            raise ModelFormatError(f"{self.path}: required metadata key {key!r} is missing")
        return self.metadata[key]

    def tensor(self, name: str) -> TensorRef:
        ref = self.tensors.get(name)
        if ref is None:
            raise ModelFormatError(f"{self.path}: required tensor {name!r} is missing")
        return ref

    def raw(self, name: str) -> np.ndarray:
        """Zero-copy uint8 view of a tensor, shaped [rows, row_bytes] (or [.., rows, bytes])."""
        ref = self.tensor(name)
        buf = self._mmap[ref.offset: ref.offset + ref.nbytes]
        dims = tuple(reversed(ref.shape[1:])) + (ref.row_bytes,)
        return buf.reshape(dims)

    def expert_slices(self, name: str) -> list[ExpertSlice]:
        """Per-expert byte slices of a stacked expert tensor `blk.N.ffn_*_exps.weight`."""
        ref = self.tensor(name)
        if len(ref.shape) != 3:
            raise ModelFormatError(f"tensor {name!r}: expert tensor must be 3-D, got {ref.shape}")
        row_len, rows, n_expert = ref.shape
        per = ref.nbytes // n_expert
        layer = int(name.split(".")[1])
        return [ExpertSlice(name, layer, e, ref.qtype, rows, row_len, ref.offset + e * per, per)
                for e in range(n_expert)]

    def close(self) -> None:
        mm = getattr(self, "_mmap", None)
        if mm is not None and getattr(mm, "_mmap", None) is not None:
            try:
                mm._mmap.close()
            except (BufferError, ValueError):
                # Views still alive elsewhere keep the mapping; it closes with them.
                pass
        self._mmap = None
