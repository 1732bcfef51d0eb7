"""The shared type dispatchers compiled once, as C callbacks, and registered under the
names ``_calls`` calls them by (see there for why).

Imported by the package before any kernel can run: numba resolves a kernel's call by
name when it compiles or loads the kernel, and a name nobody registered would become a
call to address 0.
"""

import llvmlite.binding as llvm
from numba import carray, cfunc, types

from . import _calls
from .generic import deq_row
from .prefill import gemm_rows
from .rowdot import dot_rows

_OPTS = {"cache": True, "fastmath": False, "error_model": "numpy"}


def _c_args(args, pointees):
    """The C signature: each void pointer of ``args`` becomes a pointer to its element
    type, in order."""
    it = iter(pointees)
    return tuple(types.CPointer(next(it)) if a == types.voidptr else a for a in args)


_F32, _I8, _I32, _U8 = types.float32, types.int8, types.int32, types.uint8


@cfunc(types.void(*_c_args(_calls.DOT_ROWS_ARGS, (_U8, _F32, _I8, _F32, _I32, _F32, _F32))),
       **_OPTS)
def _dot_rows(qt, w, rows, row_bytes, r0, r1, n, xf, nf, xq, nq, xd, nd, xs, ns, buf, nbuf,
              out, nout):
    pack = (carray(xf, nf), carray(xq, nq), carray(xd, nd), carray(xs, ns))
    dot_rows(qt, carray(w, (rows, row_bytes)), r0, r1, n, pack, carray(buf, nbuf),
             carray(out, nout))


@cfunc(types.void(*_c_args(_calls.GEMM_ROWS_ARGS, (_U8, _I8, _F32, _I32, _F32))), **_OPTS)
def _gemm_rows(qt, w, rows, row_bytes, r0, r1, xq, tq, nq, xdb, tdb, ndb, xsum, tsum, nsum,
               out, tout, nout):
    gemm_rows(qt, carray(w, (rows, row_bytes)), r0, r1, carray(xq, (tq, nq)),
              carray(xdb, (tdb, ndb)), carray(xsum, (tsum, nsum)), carray(out, (tout, nout)))


@cfunc(types.void(*_c_args(_calls.DEQ_ROW_ARGS, (_U8, _F32))), **_OPTS)
def _deq_row(qt, src, n_src, dst, n_dst):
    deq_row(qt, carray(src, n_src), carray(dst, n_dst))


for _name, _fn in ((_calls.DOT_ROWS, _dot_rows), (_calls.GEMM_ROWS, _gemm_rows),
                   (_calls.DEQ_ROW, _deq_row)):
    llvm.add_symbol(_name, _fn.address)
