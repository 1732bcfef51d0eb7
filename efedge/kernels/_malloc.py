"""Keep glibc's malloc from handing the kernels' scratch memory back to the OS after
every call.

Prompt processing allocates a few MB of scratch per MoE layer call (the activations in
expert order, the gate and up outputs) and frees it when the call returns. glibc trims the
top of its heap once more than M_TRIM_THRESHOLD is free there, and serves blocks above
M_MMAP_THRESHOLD with fresh mappings; both thresholds adapt to the allocation history, so
whether the next call found its pages still mapped depended on where earlier blocks had
happened to land. When it did not, every prompt faulted its scratch back in: on the
generated bench model (qwen3moe Q4_K_M) 13 000 page faults per 128-token prefill and
5-8% of prefill time, after a change that only moved kernel code (2026-11-29). Fixed
thresholds keep the scratch mapped: 32 MiB for mmap (glibc's own ceiling for its
adaptive one) and 128 MiB for trimming. Larger blocks (KV cache, expert cache slots)
still get mappings of their own and go back to the OS when freed.

Only on glibc, and not when the user set MALLOC_TRIM_THRESHOLD_ or
MALLOC_MMAP_THRESHOLD_ (their choice wins, as for GOMP_SPINCOUNT).
"""

from __future__ import annotations

import ctypes
import os
import platform

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 128 << 20
USER_SETTINGS = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_")


def keep_scratch_mapped() -> bool:
    """Set the fixed thresholds; returns whether it did."""
    if any(k in os.environ for k in USER_SETTINGS) or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError, TypeError):  # TypeError: Windows takes no None
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    # mallopt returns 1 on success
    return (mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
            and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1)
