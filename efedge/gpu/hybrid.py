"""Hybrid misses: compute a missing expert on the CPU, from the mapped file, when copying
it to the GPU would take longer (after Fiddler and llama.cpp's --moe-cache-cpu-share).

For decode a token needs each expert once: copying a 3 MB expert over a laptop's PCIe
4.0 x8 link takes ~240 µs, while the CPU reads the same bytes from RAM for one mat-vec in
a comparable time — and needs no free slot. The decision is made per miss, per layer,
from measurements only:

    t_copy(e) = demand bytes already queued / bandwidth + max(latency, bytes(e) / bandwidth)
    t_cpu(e)  = CPU work already given out in this layer + s_per_byte · bytes(e) · tokens(e)

The bandwidth and latency are TransferEngine's EWMAs of real (or emulated) copies (its
latency is the whole time of one copy, bytes included); the CPU
speed `s_per_byte` is measured once at load on one expert (calibrate) and then as an EWMA
of every CPU expert. A miss goes to the CPU when t_cpu < t_copy (greedy list scheduling
over the two resources, in the order the misses are listed), and only for experts with at
most `max_tokens` tokens (prefill batches belong on the GPU). Each decision is counted.

The CPU computes exactly what the CPU path computes (efedge.ffn.expert_ffn with the
numba kernels), so the output stays within the GPU/CPU parity tolerance.
"""

from __future__ import annotations

import threading
import time

import numpy as np

from efedge.experts.store import ExpertStore

MODES = ("off", "auto", "always")


class HybridMisses:
    def __init__(self, store: ExpertStore, mode: str = "auto", max_tokens: int = 2):
        if mode not in MODES:
            raise ValueError(f"hybrid mode must be one of {', '.join(MODES)}, got {mode!r}")
        self.store, self.mode, self.max_tokens = store, mode, int(max_tokens)
        self.s_per_byte = 0.0  # CPU seconds per weight byte per token (EWMA)
        self._lock = threading.Lock()
        self.cpu_experts = 0  # decided for the CPU
        self.copies_kept = 0  # misses considered and left to the copy engine
        self.cpu_tokens = 0
        self.cpu_s = 0.0  # CPU time spent on experts
        self.unmeasured = 0  # misses decided before any bandwidth was measured (→ copy)

    # -- measurement -----------------------------------------------------------------------
    def calibrate(self, layer: int = 0, repeats: int = 3) -> float:
        """Time one expert of `layer` on one token (the first call compiles the kernels)."""
        from efedge.ffn import expert_ffn

        w = self.store.mapped(layer, 0)
        x = np.random.default_rng(0).standard_normal((1, self._width(layer))).astype(np.float32)
        expert_ffn(x, w)
        best = float("inf")
        for _ in range(max(1, repeats)):
            t0 = time.perf_counter()
            expert_ffn(x, w)
            best = min(best, time.perf_counter() - t0)
        self.s_per_byte = best / self.store.expert_bytes(layer)
        return self.s_per_byte

    def _width(self, layer: int) -> int:
        from efedge.gpu.kernels import row_len

        _, row_bytes = self.store.part_shape(layer, "gate")
        return row_len(self.store.qtypes(layer)[0], row_bytes)

    def run(self, layer: int, expert: int, x: np.ndarray) -> np.ndarray:
        """expert_ffn on the CPU (numba, nogil) for x [t, D]; measured."""
        from efedge.ffn import expert_ffn

        t0 = time.perf_counter()
        y = expert_ffn(np.ascontiguousarray(x, dtype=np.float32), self.store.mapped(layer, expert))
        dt = time.perf_counter() - t0
        per = dt / (self.store.expert_bytes(layer, expert) * max(1, x.shape[0]))
        with self._lock:
            self.cpu_s += dt
            self.cpu_tokens += x.shape[0]
            self.s_per_byte += 0.2 * (per - self.s_per_byte) if self.s_per_byte else per
        return y

    # -- the decision (called with the cache's cond held) ------------------------------------
    def plan(self, layer: int, pending: list[int], tokens: dict[int, int], engine) -> list[int]:
        """The misses of `layer` to compute on the CPU instead of copying."""
        if self.mode == "off" or not pending:
            return []
        if self.mode == "always":
            self.cpu_experts += len(pending)
            return list(pending)
        bw, lat = float(engine.bandwidth_ewma), float(engine.latency_ewma)
        if bw <= 0 or self.s_per_byte <= 0:
            self.unmeasured += len(pending)
            self.copies_kept += len(pending)
            return []
        link_bytes = float(engine.demand_backlog_bytes())
        cpu_busy = 0.0
        out = []
        for e in pending:
            nb = self.store.expert_bytes(layer, e)
            t = int(tokens.get(e, 1))
            t_cpu = cpu_busy + self.s_per_byte * nb * max(1, t)
            t_copy = link_bytes / bw + max(lat, nb / bw)
            if t <= self.max_tokens and t_cpu < t_copy:
                out.append(e)
                cpu_busy = t_cpu
            else:
                link_bytes += nb
        self.cpu_experts += len(out)
        self.copies_kept += len(pending) - len(out)
        return out

    def reset_counts(self) -> None:
        """Zero the decisions counted so far (the measured CPU speed stays)."""
        self.cpu_experts = self.copies_kept = self.cpu_tokens = self.unmeasured = 0
        self.cpu_s = 0.0

    def stats(self) -> dict:
        return {"hybrid_mode": self.mode, "hybrid_cpu_experts": self.cpu_experts,
                "hybrid_copies_kept": self.copies_kept, "hybrid_cpu_tokens": self.cpu_tokens,
                "hybrid_cpu_s": self.cpu_s, "hybrid_unmeasured": self.unmeasured,
                "hybrid_cpu_us_per_mb": self.s_per_byte * 1e12}
