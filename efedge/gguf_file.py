"""GGUF file → metadata dict + validated tensor references over read-only mappings.

A split GGUF (llama.cpp's gguf-split: `PREFIX-00001-of-0000N.gguf` …, `split.count` = N)
is opened from its first shard, which holds the metadata; the other shards are found
beside it by name, validated the same way, and their tensors join the first's, each
remembering its shard (a tensor never spans two).

Parsing goes through gguf-py's GGUFReader (memory-mapped, zero copy). Everything it
returns is validated here before any kernel sees a byte: numba does not bounds-check, so
a tensor whose offset, length, shape or type does not add up is refused with the tensor
named, never handed on.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFValueType
from gguf.gguf_reader import ReaderField

from efedge.errors import ModelFormatError, UnsupportedModelError

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
# Smallest possible KV record (8-byte key length + 4-byte type + 1-byte value) and tensor
# info record (8 + 4 + 8 + 4 + 8): bounds on the declared counts before parsing.
_MIN_KV_BYTES = 13
_MIN_TENSOR_INFO_BYTES = 32
EXPERT_TENSORS = ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")
GGML_MAX_DIMS = 4


@dataclass(frozen=True)
class TensorRef:
    """Where one tensor lives: ggml shape order (ne0 = row length first)."""

    name: str
    qtype: int
    shape: tuple[int, ...]  # ggml order: shape[0] is the contiguous row length
    offset: int  # absolute byte offset in its file (shard)
    nbytes: int
    shard: int = 0  # which file of a split GGUF holds it (GGUFFile.paths)

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
    offset: int  # absolute byte offset in its file (shard)
    nbytes: int
    shard: int = 0


class _HeaderReader(GGUFReader):
    """gguf-py's parser, made strict for files from strangers.

    gguf-py clips a read that runs past the end of the file and carries on, and reads an
    array one numpy view per element: a forged length is then an IndexError far from its
    cause, or a loop of billions of elements (a hang, then MemoryError). Here every read
    must lie inside the file, a declared array length must fit in the bytes that remain,
    scalar arrays are one view, names must be UTF-8 and types known — each refused as a
    ModelFormatError naming the key or tensor and the byte offset. Tensor data views are
    built by GGUFFile after validation, so a bad tensor is reported by name too."""

    _where = "header"

    def _fail(self, msg: str, offset: int) -> NoReturn:
        raise ModelFormatError(f"{self._where} (at byte {offset}): {msg}")

    def _get(self, offset: int, dtype: Any, count: int = 1, override_order: Any = None):
        end = int(offset) + np.dtype(dtype).itemsize * int(count)
        if end > self.data.size:
            self._fail(f"needs bytes up to {end} but the file ends at {self.data.size} "
                       "(truncated, or a forged length or count)", offset)
        return super()._get(offset, dtype, count, override_order)

    def _utf8(self, raw: np.ndarray, offset: int, what: str) -> str:
        try:
            return bytes(raw).decode("utf-8")
        except UnicodeDecodeError:
            self._fail(f"{what} is not valid UTF-8: {bytes(raw)[:48]!r}", offset)

    def _vtype(self, raw: Any, offset: int) -> GGUFValueType:
        try:
            return GGUFValueType(int(raw))
        except ValueError:
            self._fail(f"unknown value type {int(raw)}", offset)

    def _build_fields(self, offs: int, count: int) -> int:
        for i in range(int(count)):
            start = offs
            self._where = f"metadata key #{i}"
            klen, kdata = self._get_str(offs)
            key = self._utf8(kdata, offs + 8, "the key name")
            self._where = f"metadata key {key!r}"
            if key in self.fields:
                self._fail("the key appears twice", start)
            offs += 8 + int(kdata.nbytes)
            raw_type = self._get(offs, np.uint32)
            offs += 4
            size, parts, idxs, types = self._get_field_parts(offs, raw_type[0])
            self.fields[key] = ReaderField(start, key, [klen, kdata, raw_type, *parts],
                                           [j + 3 for j in idxs], types)
            offs += size
        return offs

    def _get_field_parts(self, orig_offs: int, raw_type: Any):
        gtype = self._vtype(raw_type, orig_offs - 4)
        if gtype != GGUFValueType.ARRAY:
            return super()._get_field_parts(orig_offs, raw_type)  # scalar / string
        raw_itype = self._get(orig_offs, np.uint32)
        alen = self._get(orig_offs + 4, np.uint64)
        itype = self._vtype(raw_itype[0], orig_offs)
        if itype == GGUFValueType.ARRAY:
            self._fail("nested arrays are not supported", orig_offs)
        n, offs = int(alen[0]), orig_offs + 12
        nptype = self.gguf_scalar_to_np.get(itype)
        min_size = 8 if nptype is None else np.dtype(nptype).itemsize  # 8: a string length
        if n * min_size > self.data.size - offs:
            self._fail(f"array declares {n} {itype.name} elements but only "
                       f"{self.data.size - offs} bytes remain in the file", orig_offs + 4)
        types = [GGUFValueType.ARRAY, itype]
        if nptype is not None:  # one view for the whole array
            arr = self._get(offs, nptype, n)
            return 12 + int(arr.nbytes), [raw_itype, alen, arr], [2] if n else [], types
        # strings: plain bytes objects, not two numpy views each (a 150k-token vocabulary
        # and its merges parse in a fraction of a second instead of seconds)
        parts: list[Any] = [raw_itype, alen]
        buf, size = memoryview(self.data), self.data.size
        for _ in range(n):
            end = offs + 8
            if end > size:
                self._get(offs, np.uint64)  # fails, naming the key
            end += int.from_bytes(buf[offs:end], "little")
            if end > size:
                self._get(offs + 8, np.uint8, end - offs - 8)  # fails, naming the key
            parts.append(bytes(buf[offs + 8:end]))
            offs = end
        del buf
        return offs - orig_offs, parts, list(range(2, len(parts))), types

    def _build_tensor_info(self, offs: int, count: int) -> tuple[int, list[Any]]:
        fields = []
        for i in range(int(count)):
            start = offs
            self._where = f"tensor info #{i}"
            name_len, name_data = self._get_str(offs)
            name = self._utf8(name_data, offs + 8, "the tensor name")
            self._where = f"tensor {name!r}"
            offs += 8 + int(name_data.nbytes)
            n_dims = self._get(offs, np.uint32)
            if not 1 <= int(n_dims[0]) <= GGML_MAX_DIMS:
                self._fail(f"{int(n_dims[0])} dimensions (GGUF allows 1 to {GGML_MAX_DIMS})",
                           offs)
            dims = self._get(offs + 4, np.uint64, int(n_dims[0]))
            offs += 4 + int(dims.nbytes)
            raw_dtype = self._get(offs, np.uint32)
            offset_tensor = self._get(offs + 4, np.uint64)
            offs += 12
            fields.append(ReaderField(start, name, [name_len, name_data, n_dims, dims,
                                                    raw_dtype, offset_tensor], [1, 3, 4, 5]))
        align = self.fields.get("general.alignment")
        if align is not None:  # gguf-py checks it too, without naming the key
            self._where = "metadata key 'general.alignment'"
            value = int(align.parts[-1][0]) if align.types == [GGUFValueType.UINT32] else 0
            if value <= 0 or value & (value - 1):
                self._fail("must be a UINT32 power of two", align.offset)
        self._where = "the tensor data"
        return offs, fields

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
        with open(path, "rb") as fh:  # a directory, a missing or unreadable file all fail here
            size = os.fstat(fh.fileno()).st_size
            head = fh.read(24)
    except OSError as exc:
        raise ModelFormatError(f"{path}: cannot open model file ({exc.strerror})") from exc
    if size < 24:
        raise ModelFormatError(f"{path}: file too short for a GGUF header ({size} bytes)")
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


_SPLIT_NAME = re.compile(r"^(.*)-(\d{5})-of-(\d{5})\.gguf$")  # llama.cpp's shard names


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


class GGUFFile:
    """A validated, memory-mapped GGUF file (or split GGUF, opened from its first shard).

    `metadata` maps every key to a Python value; `tensors` maps names to TensorRef;
    `raw(name)` returns a zero-copy uint8 view [rows, row_bytes] of a tensor. `paths`
    lists the files (one, or the shards in order; TensorRef.shard indexes it) and
    `file_size` is their total size.
    """

    def __init__(self, path: str | os.PathLike[str], *, _shard: bool = False):
        self.path = Path(path)
        self.paths = [self.path]
        self._held: dict[str, np.ndarray] = {}  # tensors copied into memory (efedge.held)
        self._shards: list[GGUFFile] = []  # the split GGUF's other shards
        self.file_size = _precheck(self.path)
        try:
            reader = _HeaderReader(self.path, "r")
        except ModelFormatError as exc:
            raise ModelFormatError(f"{self.path}: {exc}") from None
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
        count = _count(self.metadata.get("split.count"))
        if not _shard and count is not None and count > 1:
            try:
                self._open_shards(count)
            except BaseException:
                self.close()
                raise

    def _open_shards(self, count: int) -> None:
        """Open shards 2..count beside this one (the first) and take their tensors."""
        no = _count(self.metadata.get("split.no"))
        m = _SPLIT_NAME.match(self.path.name)
        first = f"{m.group(1)}-00001-of-{count:05d}.gguf" if m else "its first shard"
        if no != 0:
            which = f"shard {no + 1}" if no is not None else "a shard"
            raise ModelFormatError(f"{self.path} is {which} of {count} of a split GGUF: load "
                                   f"the first one, {first} (the others are found beside it)")
        if m is None or int(m.group(3)) != count:
            raise ModelFormatError(
                f"{self.path}: the first of {count} split GGUF shards, but not named "
                f"PREFIX-00001-of-{count:05d}.gguf, so the others cannot be found (keep "
                f"llama.cpp's gguf-split names)")
        for i in range(1, count):
            p = self.path.with_name(f"{m.group(1)}-{i + 1:05d}-of-{count:05d}.gguf")
            if not p.exists():
                raise ModelFormatError(f"{self.path}: shard {i + 1} of {count} of this split "
                                       f"GGUF is missing ({p.name} is not beside it)")
            try:
                sh = GGUFFile(p, _shard=True)
            except ModelFormatError as exc:  # name the shard: the tensor alone does not
                if str(p) in str(exc):
                    raise
                raise ModelFormatError(f"{p}: {exc}") from None
            self._shards.append(sh)  # closed with this file, whatever happens next
            self.paths.append(p)
            if _count(sh.metadata.get("split.no")) != i or \
                    _count(sh.metadata.get("split.count")) != count:
                raise ModelFormatError(f"{p}: not shard {i + 1} of {count} (its split.no / "
                                       f"split.count say otherwise)")
            for name, ref in sh.tensors.items():
                if name in self.tensors:
                    raise ModelFormatError(f"tensor {name!r} appears in two shards ({p.name})")
                self.tensors[name] = dataclasses.replace(ref, shard=i)
        declared = _count(self.metadata.get("split.tensors.count"))
        if declared is not None and declared != len(self.tensors):
            raise ModelFormatError(f"{self.path}: split.tensors.count is {declared}, the "
                                   f"{count} shards hold {len(self.tensors)} tensors")
        self.file_size = sum(sh.file_size for sh in self._shards) + self.file_size

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
        """Zero-copy uint8 view of a tensor, shaped [rows, row_bytes] (or [.., rows, bytes]):
        of the mapping, or of the tensor's copy in memory when efedge.held made one."""
        ref = self.tensor(name)
        buf = self._held.get(name)
        if buf is None:
            buf = self.file(ref.shard)._mmap[ref.offset: ref.offset + ref.nbytes]
        dims = tuple(reversed(ref.shape[1:])) + (ref.row_bytes,)
        return buf.reshape(dims)

    def file(self, shard: int) -> GGUFFile:
        """The file of `paths[shard]` (this one for 0, a split GGUF's later shards)."""
        return self if shard == 0 else self._shards[shard - 1]

    def expert_slices(self, name: str) -> list[ExpertSlice]:
        """Per-expert byte slices of a stacked expert tensor `blk.N.ffn_*_exps.weight`."""
        ref = self.tensor(name)
        if len(ref.shape) != 3:
            raise ModelFormatError(f"tensor {name!r}: expert tensor must be 3-D, got {ref.shape}")
        row_len, rows, n_expert = ref.shape
        per = ref.nbytes // n_expert
        layer = int(name.split(".")[1])
        return [ExpertSlice(name, layer, e, ref.qtype, rows, row_len, ref.offset + e * per, per,
                            ref.shard) for e in range(n_expert)]

    def close(self) -> None:
        """Drop the mapping: unmapped now when no view of it is left, else by the last
        view to die (or the garbage collector, for views inside reference cycles). Never
        unmap under a live view: numpy keeps no buffer export on the mmap, so mmap.close()
        would succeed and the next read through that view would be a segfault. A split
        GGUF's shards go the same way."""
        for sh in getattr(self, "_shards", ()):
            sh.close()
        self._held = {}  # the copies go with their last view
        mm = getattr(self, "_mmap", None)
        self._mmap = None
        raw = getattr(mm, "_mmap", None)
        del mm
        if raw is None or raw.closed:
            return
        # refs: `raw` here and getrefcount's argument; anything more is a live view
        if sys.getrefcount(raw) <= 2:
            raw.close()
