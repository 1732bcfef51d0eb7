"""Atomic operations on numpy arrays inside numba kernels (numba has them for CUDA only).

Why: threads that share memory without the GIL — the native transfer workers
(efedge/experts/native_workers.py), and every read kernel that tells the compute thread
an expert has landed (file_read.py) — must publish a value only after what it stands
for is in memory, and read it fresh each time. A plain store may be moved by the
compiler before the stores it follows (LLVM may move independent stores); these are
sequentially consistent: nothing before them in program order is moved after them.
"""

from __future__ import annotations

from numba import types
from numba.core import cgutils
from numba.extending import intrinsic


def _item_ptr(context, builder, aryty, ary, idx):
    return cgutils.get_item_pointer(context, builder, aryty,
                                    context.make_array(aryty)(context, builder, ary), [idx])


@intrinsic
def cas(typingctx, arr, idx, old, new):
    """arr[idx] = new if it is old (sequentially consistent); returns what it was."""
    sig = types.int64(arr, idx, types.int64, types.int64)

    def codegen(context, builder, signature, args):
        ptr = _item_ptr(context, builder, signature.args[0], args[0], args[1])
        return builder.extract_value(
            builder.cmpxchg(ptr, args[2], args[3], "seq_cst", "seq_cst"), 0)
    return sig, codegen


@intrinsic
def add32(typingctx, arr, idx, val):
    sig = types.int32(arr, idx, types.int32)

    def codegen(context, builder, signature, args):
        ptr = _item_ptr(context, builder, signature.args[0], args[0], args[1])
        return builder.atomic_rmw("add", ptr, args[2], "seq_cst")
    return sig, codegen


@intrinsic
def load(typingctx, arr, idx):
    """arr[idx] read from memory every time (another thread writes it)."""
    sig = arr.dtype(arr, idx)

    def codegen(context, builder, signature, args):
        ptr = _item_ptr(context, builder, signature.args[0], args[0], args[1])
        return builder.load_atomic(ptr, "seq_cst", signature.args[0].dtype.bitwidth // 8)
    return sig, codegen


@intrinsic
def store(typingctx, arr, idx, val):
    sig = types.void(arr, idx, arr.dtype)

    def codegen(context, builder, signature, args):
        ptr = _item_ptr(context, builder, signature.args[0], args[0], args[1])
        builder.store_atomic(args[2], ptr, "seq_cst", signature.args[0].dtype.bitwidth // 8)
        return context.get_dummy_value()
    return sig, codegen


@intrinsic
def as_ptr(typingctx, addr):
    """An address (int64) as a pointer, for numba.carray."""
    sig = types.voidptr(types.int64)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], cgutils.voidptr_t)
    return sig, codegen
