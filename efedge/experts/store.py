"""ExpertStore: (layer, expert) → the byte slices of its gate / up / down matrices inside
the memory-mapped GGUF file. Nothing is copied; this is the unit the expert cache moves."""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass

import numpy as np

from efedge.gguf_file import GGUFFile

PARTS = ("gate", "up", "down")


@dataclass(frozen=True)
class ExpertWeights:
    """Quantized matrices of one expert: uint8 views [rows, row_bytes] plus their types."""

    gate: np.ndarray
    up: np.ndarray
    down: np.ndarray
    gate_qtype: int
    up_qtype: int
    down_qtype: int


def drop_spans(fd: int, spans) -> None:
    """Drop the page-cache pages of each (start, end) byte range of the file open as fd
    (POSIX_FADV_DONTNEED; where os has posix_fadvise)."""
    for start, end in spans:
        os.posix_fadvise(fd, start, end - start, os.POSIX_FADV_DONTNEED)


class ExpertStore:
    """Addresses every expert of every MoE layer in the mapped file.

    Layers without routed experts (deepseek2's leading dense layers) keep their index
    with zero bytes: the cache never gives them a slot and nothing is ever loaded for
    them. Shared experts and expert biases are not here: they stay resident in the model
    (model.Block), so they are never cache traffic."""

    def __init__(self, gf: GGUFFile, n_layer: int, n_expert: int):
        self.gf = gf
        self.n_layer = n_layer
        self.n_expert = n_expert
        # [layer][part] → stacked raw view [E, rows, row_bytes] and its qtype
        self._raw: list[dict[str, np.ndarray]] = []
        self._qtype: list[dict[str, int]] = []
        # [layer, expert, part] → (file offset, nbytes): what a transfer reads
        self.offsets = np.zeros((n_layer, n_expert, 3), dtype=np.int64)
        self.nbytes = np.zeros((n_layer, n_expert, 3), dtype=np.int64)
        # [layer, part] → which file of gf.paths holds it (a split GGUF may put a layer's
        # gate, up and down in different shards; a stacked tensor never spans two)
        self.paths = list(gf.paths)
        self.shard = np.zeros((n_layer, 3), dtype=np.int64)
        self.moe_layers: list[int] = []  # the layers with routed experts
        for il in range(n_layer):
            raw, qt = {}, {}
            self._raw.append(raw)
            self._qtype.append(qt)
            if f"blk.{il}.ffn_gate_exps.weight" not in gf.tensors:
                continue  # a dense layer
            self.moe_layers.append(il)
            for ip, part in enumerate(PARTS):
                name = f"blk.{il}.ffn_{part}_exps.weight"
                raw[part] = gf.raw(name)
                qt[part] = gf.tensor(name).qtype
                self.shard[il, ip] = gf.tensor(name).shard
                for s in gf.expert_slices(name):
                    self.offsets[il, s.expert, ip] = s.offset
                    self.nbytes[il, s.expert, ip] = s.nbytes

    def is_moe_layer(self, layer: int) -> bool:
        return bool(self._raw[layer])

    def part_shape(self, layer: int, part: str) -> tuple[int, int]:
        """(rows, row_bytes) of one expert's gate / up / down matrix."""
        return self._raw[layer][part].shape[1:]

    def qtypes(self, layer: int) -> tuple[int, int, int]:
        q = self._qtype[layer]
        return q["gate"], q["up"], q["down"]

    def expert_bytes(self, layer: int, expert: int = 0) -> int:
        return int(self.nbytes[layer, expert].sum())

    def total_bytes(self) -> int:
        return int(self.nbytes.sum())

    def expert_spans(self) -> list[list[tuple[int, int]]]:
        """Per file of the model (one, or a split GGUF's shards), the byte ranges its
        routed layers' expert tensors occupy: (start rounded down to a page, end)."""
        page = mmap.PAGESIZE
        spans: list[list[tuple[int, int]]] = [[] for _ in self.paths]  # per file
        for il in self.moe_layers:
            for ip in range(3):
                start = int(self.offsets[il, 0, ip])
                end = int(self.offsets[il, -1, ip] + self.nbytes[il, -1, ip])
                spans[int(self.shard[il, ip])].append((start - start % page, end))
        return spans

    def drop_page_cache(self) -> None:
        """Drop the file's expert pages from this process's mapping and from the page
        cache: with an expert cache, the slots are the only place experts should occupy
        memory. (Pages a process still maps survive fadvise, so the mapping goes first —
        e.g. the pages the load-time kernel warm-up touched.)"""
        spans = self.expert_spans()
        for shard, file_spans in enumerate(spans):
            mm = getattr(getattr(self.gf.file(shard), "_mmap", None), "_mmap", None)
            if mm is not None and hasattr(mm, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
                for start, end in file_spans:
                    try:
                        mm.madvise(mmap.MADV_DONTNEED, start, end - start)
                    except (OSError, ValueError):
                        pass
        if not hasattr(os, "posix_fadvise"):
            return
        for path, file_spans in zip(self.paths, spans, strict=True):
            if not file_spans:
                continue
            fd = os.open(path, os.O_RDONLY)
            try:
                drop_spans(fd, file_spans)
            finally:
                os.close(fd)

    def mapped(self, layer: int, expert: int) -> ExpertWeights:
        """Zero-copy views straight into the mapped file."""
        r, (qg, qu, qd) = self._raw[layer], self.qtypes(layer)
        return ExpertWeights(r["gate"][expert], r["up"][expert], r["down"][expert], qg, qu, qd)


class ResidentExperts:
    """The expert source when everything is resident (cache=None): computed straight from
    the mapping with zero copies; every request is a hit and nothing ever stalls."""

    def __init__(self, store: ExpertStore, counters):
        self.store = store
        self.counters = counters
        counters.cache_bytes = store.total_bytes()
        counters.cache_slots = store.n_layer * store.n_expert

    def acquire(self, layer: int, experts: np.ndarray):
        """Yield (expert, ExpertWeights) for each requested expert, ready ones first."""
        self.counters.expert_requests += len(experts)
        self.counters.hits += len(experts)
        for e in experts:
            yield int(e), self.store.mapped(layer, int(e))

    def close(self) -> None:
        pass
