"""Handing the GIL to a thread that waits for it, now.

A transfer worker woken for a just-queued copy needs the GIL for a few lines of Python
before it enters its file read or link wait (which release it again). The compute
thread would otherwise keep the GIL until its next kernel call. `time.sleep(0)` hands
it over, but it is a timer syscall: on Linux a zero sleep still waits out the thread's
timer slack (50 µs by default), and on this project's Firecracker VMs it cost 83 µs of
wall time per call (25 µs with a 1 µs slack, and then the handover often failed: the
sleep returned before the woken thread took the GIL). `os.sched_yield()` releases the
GIL around the syscall as well: measured there (a worker woken, then the main thread
yielding; benchmarks-style loop of 2000 handovers) the worker started 2 µs after the
yield instead of 13 µs, and the yield cost the main thread 13 µs instead of 83 µs.
Where there is no sched_yield (Windows), sleep(0) it is.
"""

from __future__ import annotations

import os
import time

yield_gil = getattr(os, "sched_yield", None) or (lambda: time.sleep(0))
