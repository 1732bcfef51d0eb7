"""Weights read into process memory instead of computed from the file mapping.

Decode reads every weight it uses once per token, so its speed is the speed at which one
core streams weight rows. On the 2-core test VM (2026-11-30) the row kernels streamed
7.4 GB/s from the mapped GGUF file (page-cache pages, 4 KiB each) and 11.2 GB/s from
the same bytes copied into anonymous memory on transparent huge pages: whole decode
steps of the bench models ran 1.13-1.27x faster (1 thread, paired). The huge pages are
what matter: the same copy on 4 KiB pages decoded 0.71-0.79x as fast as on huge pages,
no faster than the mapping (every 4 KiB of a weight stream is a TLB miss, and a page
walk under a hypervisor is two). llama.cpp reads most of its weights from copies too:
its CPU backend repacks the tensors it has interleaved kernels for (the bench model's
Q4_K experts, 360 MiB of its 491) into buffers of its own, and only the rest from the
mapping.

``hold(gf, which)`` copies the tensors ``which`` accepts into one such buffer;
``GGUFFile.raw`` then hands out views of the copy (the same bytes, so the same logits).
Only when they fit with room to spare (``fits``): a model larger than that stays on the
mapping, where the kernel pages it in and out as before. The file's pages the copy
touched leave this process's mapping (they stay in the page cache, reclaimable). The
copy costs load time: on the test VM 0.2 s for 490 MiB when another process had just
freed as much memory, 1.1-1.4 s otherwise (faulting fresh huge pages in took 1.15 s of it,
the copy 0.09 s; two copying threads did not help).
"""

from __future__ import annotations

import logging
import mmap
import os
import sys
from collections.abc import Callable

import numpy as np

log = logging.getLogger(__name__)

_HUGE = 2 << 20  # the x86-64 / arm64 transparent huge page
_ALIGN = 64  # each tensor starts on a cache line
# hold weights only while they take at most this share of the memory still available
_SHARE = 0.5


def available_bytes() -> int | None:
    """What memory.available_memory says (MemAvailable, capped by a container's limit)."""
    from efedge.memory import available_memory

    return available_memory()


def huge_pages() -> bool:
    """Whether the kernel gives huge pages to memory advised for them (transparent huge
    pages not "never"): without them a copy streams no faster than the mapping."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled", encoding="ascii") as f:
            return "[never]" not in f.read()
    except OSError:
        return False


def fits(nbytes: int, available: int | None = None) -> bool:
    """Whether nbytes of weights may be held: Linux with transparent huge pages only
    (elsewhere the mapping stays, as before: macOS's unified memory and Windows' file
    cache were not measured)."""
    avail = available_bytes() if available is None else available
    return avail is not None and nbytes <= _SHARE * avail and huge_pages()


def _buffer(nbytes: int) -> np.ndarray:
    """nbytes of zeroed anonymous memory starting on a huge-page boundary, advised for
    transparent huge pages (fewer TLB misses on a stream through hundreds of MB)."""
    # private: shared anonymous memory is shmem, whose huge pages are off by default
    flags = {"flags": mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS} if hasattr(mmap, "MAP_PRIVATE") \
        else {}
    mm = mmap.mmap(-1, nbytes + _HUGE, **flags)
    base = np.frombuffer(mm, np.uint8)  # keeps the mapping alive as long as any view
    skip = (-base.ctypes.data) % _HUGE
    buf = base[skip:skip + nbytes]
    advise = getattr(mm, "madvise", None)
    if advise is not None and hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            advise(mmap.MADV_HUGEPAGE, skip, nbytes - nbytes % _HUGE)
        except (OSError, ValueError):
            pass
    return buf


def hold(gf, which: Callable[[str], bool] | None = None) -> int:
    """Copy the tensors of ``gf`` that ``which`` accepts (all when None) into process
    memory, if they fit (``fits``); returns the bytes held (0: nothing, the mapping
    serves every tensor)."""
    names = sorted((n for n in gf.tensors if which is None or which(n)),
                   key=lambda n: (gf.tensors[n].shard, gf.tensors[n].offset))
    at, total = {}, 0
    for n in names:
        at[n] = total
        total += -(-gf.tensors[n].nbytes // _ALIGN) * _ALIGN
    if total == 0:
        return 0
    if not fits(total):
        log.info("weights stay on the file mapping: %d MiB would not leave room in the "
                 "memory available", total >> 20)
        return 0
    buf = _buffer(total)
    held = {}
    for n in names:
        ref = gf.tensors[n]
        src = gf.file(ref.shard)._mmap[ref.offset: ref.offset + ref.nbytes]
        dst = buf[at[n]: at[n] + ref.nbytes]
        dst[:] = src
        dst.flags.writeable = False
        held[n] = dst
    gf._held = held
    _unmap_copied(gf, names)
    return total


def _unmap_copied(gf, names) -> None:
    """Drop the copied tensors' pages from this process's mapping (MADV_DONTNEED on a
    shared file mapping: the page cache keeps them, the process's RSS no longer counts
    them twice). Whole pages inside each tensor only: a page shared with a tensor still
    read from the mapping stays."""
    if sys.platform != "linux" or not hasattr(mmap, "MADV_DONTNEED"):
        return
    page = mmap.PAGESIZE
    for n in names:
        ref = gf.tensors[n]
        raw = getattr(getattr(gf.file(ref.shard), "_mmap", None), "_mmap", None)
        start = -(-ref.offset // page) * page
        end = (ref.offset + ref.nbytes) // page * page
        if raw is None or end <= start or not hasattr(raw, "madvise"):
            continue
        try:
            raw.madvise(mmap.MADV_DONTNEED, start, end - start)
        except (OSError, ValueError):
            return


def wanted(use_mmap: bool) -> bool:
    """Whether to hold weights at all: not with use_mmap=True or EFEDGE_MMAP=1 (the
    mapping then serves every tensor, as before 2026-11-30)."""
    return not use_mmap and os.environ.get("EFEDGE_MMAP", "") not in ("1", "true", "yes")
