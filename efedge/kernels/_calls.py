"""The three type dispatchers every kernel shares, called by symbol name.

numba links the code of every njit function a kernel calls into that kernel and
optimises all of it again for that kernel. The type dispatchers hold the code of every
quant type — ``rowdot.dot_rows`` (a range of rows dotted with one activation vector, the
decode unit), ``prefill.gemm_rows`` (the tiled integer product of prompt processing) and
``generic.deq_row`` (one row decoded) — so each parallel kernel that reached one of them
took 5–30 s to compile on first use, and the demo model's first reply waited 3.5 minutes
for numba. ``_callees`` compiles each dispatcher once, as a C callback registered under
the names below; kernels call these wrappers instead, which pass every array as a
pointer and its shape, and compile in about a second.

Every array must be C-contiguous (the callee rebuilds it from pointer and shape): a
caller that passes another layout fails to compile, with the reason.
"""

from numba import njit, types
from numba.core.errors import TypingError
from numba.extending import overload

DOT_ROWS = "efedge_dot_rows"
GEMM_ROWS = "efedge_gemm_rows"
DEQ_ROW = "efedge_deq_row"

_I, _P = types.int64, types.voidptr
# dot_rows: qt, w (ptr, rows, row_bytes), r0, r1, n, xf, xq, xd, xs, buf, out (ptr, length)
DOT_ROWS_ARGS = (_I, _P, _I, _I, _I, _I, _I) + (_P, _I) * 6
# gemm_rows: qt, w (ptr, rows, row_bytes), r0, r1, xq, xdb, xsum, out (ptr, rows, columns)
GEMM_ROWS_ARGS = (_I, _P, _I, _I, _I, _I) + (_P, _I, _I) * 4
# deq_row: qt, src (ptr, bytes), dst (ptr, length)
DEQ_ROW_ARGS = (_I, _P, _I, _P, _I)

_dot_rows = types.ExternalFunction(DOT_ROWS, types.void(*DOT_ROWS_ARGS))
_gemm_rows = types.ExternalFunction(GEMM_ROWS, types.void(*GEMM_ROWS_ARGS))
_deq_row = types.ExternalFunction(DEQ_ROW, types.void(*DEQ_ROW_ARGS))


def c_data(a):
    """The address of a C-contiguous array's first element (numba only)."""
    raise NotImplementedError("c_data runs inside numba kernels only")


@overload(c_data, jit_options={"cache": True})
def _c_data(a):
    if not (isinstance(a, types.Array) and a.layout == "C"):
        raise TypingError(f"a shared type dispatcher takes C-contiguous arrays, not {a}")
    return lambda a: a.ctypes.data


@njit(cache=True, nogil=True, fastmath=False)
def dot_rows(qt, w, r0, r1, n, pack, buf, out):
    """``rowdot.dot_rows``, compiled once."""
    xf, xq, xd, xs = pack
    _dot_rows(qt, c_data(w), w.shape[0], w.shape[1], r0, r1, n,
              c_data(xf), xf.shape[0], c_data(xq), xq.shape[0], c_data(xd), xd.shape[0],
              c_data(xs), xs.shape[0], c_data(buf), buf.shape[0], c_data(out), out.shape[0])


@njit(cache=True, nogil=True, fastmath=False)
def gemm_rows(qt, w, r0, r1, xq, xdb, xsum, out):
    """``prefill.gemm_rows``, compiled once."""
    _gemm_rows(qt, c_data(w), w.shape[0], w.shape[1], r0, r1,
               c_data(xq), xq.shape[0], xq.shape[1], c_data(xdb), xdb.shape[0], xdb.shape[1],
               c_data(xsum), xsum.shape[0], xsum.shape[1],
               c_data(out), out.shape[0], out.shape[1])


@njit(cache=True, nogil=True, fastmath=False)
def deq_row(qt, src, dst):
    """``generic.deq_row``, compiled once."""
    _deq_row(qt, c_data(src), src.shape[0], c_data(dst), dst.shape[0])
