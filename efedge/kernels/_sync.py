"""Atomics for the one-region layer kernels (``efedge.kernels.decode``).

A decode step is a chain of small products (q/k/v, attention, output, router, experts);
launching one numba parallel region per product costs more than the product itself on a
laptop-sized model. The layer kernels instead open one region and run the chain as
*stages*: each stage is a list of work items that threads claim with an atomic counter,
and a thread moves on once every item of the stage is done. Nothing waits for a thread
that has not claimed work, so this cannot deadlock however the runtime maps the region's
iterations onto threads (one thread running them all one after another is fine too).

    counters = np.zeros(2 * n_stages, np.int64)     # [claimed, done] per stage
    i = claim(counters, s)                          # next item of stage s (>= n: none left)
    finish(counters, s)                             # after the item's results are written
    wait_stage(counters, s, n)                      # until every item of stage s is done

A waiting thread spins (``pause``) for a while, then yields its core: on a loaded
machine the thread it waits for may be the one that is not running.

``finish`` is a sequentially consistent read-modify-write (a release of everything the
item wrote) and ``wait_stage`` reads with acquire ordering, so results written before
``finish`` are visible to any thread that got past ``wait_stage``.
"""

import platform
import sys

import numpy as np
from llvmlite import binding as llvm
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

_X86 = platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")


def _yield_symbol() -> str:
    """The C function ``sched_yield`` calls: libc's ``sched_yield`` on Linux and macOS.
    Windows has none, and numba links a call to a symbol it cannot find to address 0 (the
    first thread that waited ~50 µs for a stage would crash the process); kernel32's
    ``SwitchToThread`` does the same job there (the core goes to a ready thread, if any),
    registered with LLVM by address since the JIT does not search kernel32 by name."""
    if sys.platform != "win32":
        return "sched_yield"
    import ctypes

    fn = ctypes.windll.kernel32.SwitchToThread
    llvm.add_symbol("SwitchToThread", ctypes.cast(fn, ctypes.c_void_p).value)
    return "SwitchToThread"


_YIELD = _yield_symbol()


def _item_pointer(context, builder, aryty, ary, idx):
    arr = context.make_array(aryty)(context, builder, ary)
    return cgutils.get_item_pointer(context, builder, aryty, arr, [idx])


@intrinsic
def atomic_add(typingctx, ary, idx, val):
    """ary[idx] += val atomically (int64 array); returns the old value."""
    if not (isinstance(ary, types.Array) and ary.dtype == types.int64 and ary.ndim == 1):
        return None

    def codegen(context, builder, sig, args):
        aryty, idxty, valty = sig.args
        ary_v, idx_v, val_v = args
        ptr = _item_pointer(context, builder, aryty, ary_v, idx_v)
        v = context.cast(builder, val_v, valty, types.int64)
        return builder.atomic_rmw("add", ptr, v, "seq_cst")

    return types.int64(ary, idx, val), codegen


@intrinsic
def atomic_load(typingctx, ary, idx):
    """ary[idx] read with acquire ordering (int64 array)."""
    if not (isinstance(ary, types.Array) and ary.dtype == types.int64 and ary.ndim == 1):
        return None

    def codegen(context, builder, sig, args):
        aryty, _ = sig.args
        ptr = _item_pointer(context, builder, aryty, args[0], args[1])
        return builder.load_atomic(ptr, "acquire", 8)

    return types.int64(ary, idx), codegen


@intrinsic
def cpu_relax(typingctx):
    """The spin-wait hint (x86 ``pause``); a compiler barrier elsewhere."""

    def codegen(context, builder, sig, args):
        if _X86:
            fty = ir.FunctionType(ir.VoidType(), [])
            builder.call(cgutils.get_or_insert_function(builder.module, fty,
                                                        "llvm.x86.sse2.pause"), [])
        else:
            builder.fence("acquire")
        return context.get_dummy_value()

    return types.none(), codegen


@intrinsic
def sched_yield(typingctx):
    """libc sched_yield() (Windows: SwitchToThread): give the core away (a peer thread
    may be waiting for it)."""

    def codegen(context, builder, sig, args):
        fty = ir.FunctionType(ir.IntType(32), [])  # both return an int (BOOL on Windows)
        builder.call(cgutils.get_or_insert_function(builder.module, fty, _YIELD), [])
        return context.get_dummy_value()

    return types.none(), codegen


SPINS = 2000  # ~50 µs of pause before a waiting thread starts yielding its core


@njit(cache=True, nogil=True, fastmath=False)
def claim(counters, stage):
    return atomic_add(counters, 2 * stage, 1)


@njit(cache=True, nogil=True, fastmath=False)
def finish(counters, stage):
    atomic_add(counters, 2 * stage + 1, 1)


@njit(cache=True, nogil=True, fastmath=False)
def wait_stage(counters, stage, n_items):
    spins = 0
    while atomic_load(counters, 2 * stage + 1) < n_items:
        if spins < SPINS:
            cpu_relax()
            spins += 1
        else:  # the thread holding the last item is probably descheduled: let it run
            sched_yield()


def new_counters(n_stages: int) -> np.ndarray:
    return np.zeros(2 * n_stages, np.int64)
