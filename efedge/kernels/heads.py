"""Per-head products in one parallel region: ggml's batched mul_mat over heads, where each
head has its own small matrix (deepseek2's latent attention: ``attn_k_b`` absorbs each
head's query into latent space, ``attn_v_b`` decompresses each head's result).

Called head by head through ``qmatmul``, a decode step of a 16-head model made 32 calls
per layer whose validation and dispatch cost more than their products (on the bench-preset
deepseek2 file: half of the decode time). Here one call covers every (token, head): the
activation pack of each is made once (``rowdot.prep``: rounded as llama.cpp rounds them
for the weight type), then the rows go out in chunks of ``CH`` through ``rowdot.dot_rows``,
the decode kernels' row product — so a row's result depends only on the row and its pack.
"""

import numpy as np
from numba import njit, prange

from . import _check_raw, _readonly
from ._calls import dot_rows
from .activations import act_scheme
from .rowdot import prep

CH = 32  # matrix rows per work item


@njit(cache=True, nogil=True, parallel=True, error_model="numpy", fastmath=False)
def _heads_matmul(raw, qt, scheme, x, out):
    t_n, h_n, k = x.shape
    r_n = raw.shape[1]
    n = t_n * h_n
    xf = np.empty((n, k), np.float32)
    xq = np.empty((n, k), np.int8)
    xd = np.empty((n, k // 4 + 8), np.float32)
    xs = np.empty((n, k // 16 + 1), np.int32)
    for i in prange(n):
        prep(scheme, qt, x[i // h_n, i % h_n], (xf[i], xq[i], xd[i], xs[i]))
    chunks = (r_n + CH - 1) // CH
    for j in prange(n * chunks):
        i, c = j // chunks, j % chunks
        hh = i % h_n
        r0 = c * CH
        r1 = min(r_n, r0 + CH)
        buf = np.empty(k, np.float32)
        tmp = np.empty(CH, np.float32)
        dot_rows(qt, raw[hh], r0, r1, k, (xf[i], xq[i], xd[i], xs[i]), buf, tmp)
        o = out[i // h_n, hh]
        for r in range(r0, r1):
            o[r] = tmp[r - r0]


def heads_matmul(raw: np.ndarray, qtype: int, x: np.ndarray) -> np.ndarray:
    """out[t, h] = round(x[t, h]) @ dequantize(raw[h]).T for every token t and head h.

    raw: uint8 [H, R, row_bytes] (one [R, K] matrix per head, quant type qtype); x:
    float32 [T, H, K]. Returns float32 [T, H, R]. Shapes are checked here: the kernel
    indexes by them unchecked."""
    qtype = int(qtype)
    k, _ = _check_raw(raw, qtype, "heads_matmul")
    if raw.ndim != 3:
        raise ValueError(f"heads_matmul: raw must be [H, R, row_bytes], got {raw.shape}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 3 or x.shape[1:] != (raw.shape[0], k):
        raise ValueError(f"heads_matmul: x must be [T, {raw.shape[0]}, {k}], got {x.shape}")
    out = np.empty((x.shape[0], raw.shape[0], raw.shape[1]), np.float32)
    if out.size:
        _heads_matmul(_readonly(raw), qtype, act_scheme(qtype, k), x, out)
    return out
