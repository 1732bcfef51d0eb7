"""KV cache: preallocated keys and values for every layer, owned beside the model.

Stored as float16 by default, like llama.cpp's default KV type: half the memory, and the
same rounding llama.cpp applies, which keeps near-tied expert routing on the same side.
"""

from __future__ import annotations

import numpy as np

from efedge.errors import ContextLengthError


class KVCache:
    """Keys / values as [n_layer, n_ctx, n_head_kv, head_dim]; `n_past` tokens are valid."""

    def __init__(self, n_layer: int, n_ctx: int, n_head_kv: int, head_dim: int,
                 v_head_dim: int | None = None, dtype=np.float16):
        if not isinstance(n_ctx, int) or isinstance(n_ctx, bool) or n_ctx <= 0:
            raise ContextLengthError(f"context size must be a positive integer, got {n_ctx!r}")
        self.n_ctx = n_ctx
        k_shape = (n_layer, n_ctx, n_head_kv, head_dim)
        v_shape = (n_layer, n_ctx, n_head_kv, v_head_dim or head_dim)
        try:
            self.k = np.zeros(k_shape, dtype=dtype)
            self.v = np.zeros(v_shape, dtype=dtype)
        except MemoryError:  # an n_ctx far beyond this machine: say so, in its terms
            need = (np.prod(k_shape, dtype=float) + np.prod(v_shape, dtype=float)) \
                * np.dtype(dtype).itemsize
            raise ContextLengthError(
                f"a KV cache for a context of {n_ctx} tokens needs {need / 2**30:.1f} GiB, "
                "more than this machine can allocate (lower n_ctx / -c)") from None
        self.n_past = 0

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def check_room(self, pos: int, n_new: int) -> None:
        if pos < 0 or pos > self.n_past:
            raise ContextLengthError(f"position {pos} is outside the cached sequence "
                                     f"(0..{self.n_past})")
        if pos + n_new > self.n_ctx:
            raise ContextLengthError(
                f"{pos + n_new} tokens do not fit in the context of {self.n_ctx} tokens "
                f"(raise n_ctx / -c, or shorten the prompt)")

    def store(self, layer: int, pos: int, k: np.ndarray, v: np.ndarray) -> None:
        """Write T new keys / values ([T, n_head_kv, d]) at positions pos..pos+T."""
        t = k.shape[0]
        self.k[layer, pos:pos + t] = k
        self.v[layer, pos:pos + t] = v

    def view(self, layer: int, end: int) -> tuple[np.ndarray, np.ndarray]:
        return self.k[layer, :end], self.v[layer, :end]

    def truncate(self, n: int) -> None:
        """Forget everything from position n on (the next forward starts there)."""
        self.n_past = max(0, min(n, self.n_past))

    def clear(self) -> None:
        self.n_past = 0
