"""gpt-oss's causal attention for a batch of tokens: a sink logit per head and, on the
sliding-window layers, only the last ``window`` keys (efedge/oss.py has the numpy
reference, ``attention_sinks``).

The layer's cached keys are converted to float32 once, transposed to [Hkv, d, S] so that
one query's scores are a vector over keys (the loops vectorise without reordering a
sum), values to [Hkv, S, dv]; then one work item per (token, head). No BLAS: numpy's
batched products went through OpenBLAS, whose threads and numba's took turns on shared
cores (one layer's attention measured from 1 ms to 1 s).
"""

import numpy as np
from numba import njit, prange

from ._fp import half_to_f32, round_f16
from .nn import exp_f32

_ZERO = np.float32(0.0)


@njit(cache=True, nogil=True, parallel=True, error_model="numpy", fastmath=False)
def _keys_values(kc, vc, n_keys, kt, vf):
    for g in prange(kt.shape[0]):
        for s in range(n_keys):
            for j in range(kt.shape[1]):
                kt[g, j, s] = half_to_f32(np.int64(kc[s, g, j]))
            for j in range(vf.shape[2]):
                vf[g, s, j] = half_to_f32(np.int64(vc[s, g, j]))


@njit(cache=True, nogil=True, parallel=True, error_model="numpy", fastmath=False)
def _attend(q, kt, vf, pos, scale, sinks, window, out):
    t, h, d = q.shape
    dv = vf.shape[2]
    group = h // kt.shape[0]
    for item in prange(t * h):
        i = item // h
        hq = item % h
        g = hq // group
        n = pos + i + 1  # keys 0 .. pos + i (causal)
        k0 = max(0, n - window) if window > 0 else 0
        sc = np.zeros(n - k0, np.float32)
        for j in range(d):
            qj = q[i, hq, j]
            for s in range(k0, n):
                sc[s - k0] += qj * kt[g, j, s]
        sink = sinks[hq]
        mx = sink
        for s in range(n - k0):
            sc[s] = sc[s] * scale
            mx = max(mx, sc[s])
        tot = _ZERO
        for s in range(n - k0):
            sc[s] = exp_f32(sc[s] - mx)
            tot += sc[s]
        tot += exp_f32(sink - mx)
        o = out[i, hq * dv:(hq + 1) * dv]
        for j in range(dv):
            o[j] = _ZERO
        for s in range(n - k0):
            p = round_f16(sc[s] / tot)  # ggml's F16 V product takes the weights as f16
            for j in range(dv):
                o[j] += p * vf[g, k0 + s, j]


def prefill_attend_sinks(q: np.ndarray, kc: np.ndarray, vc: np.ndarray, pos: int,
                         sinks: np.ndarray, scale: np.float32, window: int) -> np.ndarray:
    """q [T, H, d] (rounded to f16) at positions pos..pos+T; kc / vc: the layer's KV cache
    as uint16 [n_ctx, Hkv, d] with rows 0..pos+T-1 written; sinks [H] float32; window:
    keys each query sees, its own included (0: all). Returns [T, H·dv] float32."""
    t, h, d = q.shape
    n_keys = pos + t
    hkv, dv = vc.shape[1], vc.shape[2]
    kt = np.empty((hkv, d, n_keys), np.float32)
    vf = np.empty((hkv, n_keys, dv), np.float32)
    _keys_values(kc, vc, n_keys, kt, vf)
    out = np.empty((t, h * dv), np.float32)
    _attend(np.ascontiguousarray(q, np.float32), kt, vf, pos, np.float32(scale),
            np.ascontiguousarray(sinks, np.float32), int(window), out)
    return out
