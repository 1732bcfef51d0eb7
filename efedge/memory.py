"""How much memory the expert cache may take: `cache="auto"` (the default on the CPU).

A model whose file fits in the memory still available keeps every expert resident in the
mapped file, as before. One that does not gets an expert cache of what is left once the
weights every token reads (everything but the routed experts: they stay mapped), the KV
cache and a reserve for the rest of the system are set aside — so a model larger than
the machine's memory streams its experts through a cache instead of thrashing the page
cache. llama.cpp fits its offload to free memory the same way by default (`--fit`).

"Available" is what the operating system says it can still give without swapping: Linux's
MemAvailable (page cache it can drop included), capped by the cgroup's limit inside a
container; macOS's free, inactive, speculative and purgeable pages; Windows' available
physical memory. Unknown elsewhere: then `auto` keeps every expert resident.
"""

from __future__ import annotations

import ctypes
import logging
import re
import subprocess
import sys
from pathlib import Path

log = logging.getLogger("efedge")

# what stays free for the operating system, the application and everything else: this
# share of the available memory, and at least RESERVE_MIN bytes
RESERVE_SHARE = 0.15
RESERVE_MIN = 512 << 20


def available_memory(proc: Path = Path("/proc"), cgroup: Path = Path("/sys/fs/cgroup")
                     ) -> int | None:
    """Bytes this process can still allocate without swapping (None: not known here).
    `proc` / `cgroup`: where Linux keeps meminfo and the cgroup v2 files (tests point
    them elsewhere)."""
    try:
        if sys.platform.startswith("linux"):
            return _linux(proc, cgroup)
        if sys.platform == "darwin":
            return _darwin()
        if sys.platform == "win32":
            return _windows()
    except (OSError, ValueError, AttributeError, subprocess.SubprocessError) as exc:
        # (AttributeError: no ctypes.windll where a test poses as Windows)
        log.info("cannot tell the available memory (%s): experts stay resident", exc)
    return None


def _linux(proc: Path, cgroup: Path) -> int | None:
    m = re.search(r"^MemAvailable:\s+(\d+)\s*kB", (proc / "meminfo").read_text(), re.M)
    if m is None:
        return None
    avail = int(m.group(1)) * 1024
    try:  # inside a container: what its memory limit leaves (cgroup v2)
        limit = (cgroup / "memory.max").read_text().strip()
        if limit != "max":
            used = int((cgroup / "memory.current").read_text().strip())
            avail = min(avail, max(0, int(limit) - used))
    except (OSError, ValueError):
        pass  # no cgroup v2 here, or not readable: the machine's figure
    return avail


def _darwin() -> int | None:
    out = subprocess.run(["vm_stat"], capture_output=True, text=True, timeout=5,
                         check=True).stdout
    page = re.search(r"page size of (\d+) bytes", out)
    pages = 0
    for name in ("free", "inactive", "speculative", "purgeable"):
        m = re.search(rf"^Pages {name}:\s+(\d+)\.", out, re.M)
        pages += int(m.group(1)) if m else 0
    return pages * int(page.group(1)) if page and pages else None


def _windows() -> int | None:
    class MemoryStatus(ctypes.Structure):
        _fields_ = [("dwLength", ctypes.c_ulong), ("dwMemoryLoad", ctypes.c_ulong),
                    ("ullTotalPhys", ctypes.c_ulonglong), ("ullAvailPhys", ctypes.c_ulonglong),
                    ("ullTotalPageFile", ctypes.c_ulonglong),
                    ("ullAvailPageFile", ctypes.c_ulonglong),
                    ("ullTotalVirtual", ctypes.c_ulonglong),
                    ("ullAvailVirtual", ctypes.c_ulonglong),
                    ("ullAvailExtendedVirtual", ctypes.c_ulonglong)]

    st = MemoryStatus()
    st.dwLength = ctypes.sizeof(MemoryStatus)
    if not ctypes.windll.kernel32.GlobalMemoryStatusEx(ctypes.byref(st)):  # type: ignore[attr-defined]
        return None
    return int(st.ullAvailPhys)


def auto_budget(available: int | None, file_bytes: int, expert_bytes: int, kv_bytes: int,
                minimum: int) -> int | None:
    """The expert cache's budget for cache="auto": None (every expert resident in the
    mapped file) when the file and the KV cache fit in `available` less the reserve, or
    when `available` is unknown; else what is left for experts once the other weights
    (`file_bytes - expert_bytes`), the KV cache and the reserve are set aside — at least
    `minimum` (one layer's active experts per size class: less cannot run; a warning
    then says memory is short)."""
    if available is None:
        return None
    usable = available - max(RESERVE_MIN, int(RESERVE_SHARE * available)) - kv_bytes
    if file_bytes <= usable:
        return None
    budget = usable - (file_bytes - expert_bytes)
    if budget < minimum:
        log.warning("memory is short: %.0f MiB available, the weights outside the experts "
                    "take %.0f MiB and the KV cache %.0f MiB; the expert cache gets its "
                    "minimum, %.0f MiB (expect swapping; lower n_ctx / -c or free memory)",
                    available / 2**20, (file_bytes - expert_bytes) / 2**20, kv_bytes / 2**20,
                    minimum / 2**20)
        return minimum
    return min(budget, expert_bytes)
