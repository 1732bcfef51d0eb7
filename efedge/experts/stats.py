"""Counters of one run, as DESIGN.md lists them (m.stats(), --stats, bench --json)."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class Counters:
    tokens_prompt: int = 0
    tokens_generated: int = 0
    wall_s: float = 0.0
    compute_s: float = 0.0
    stall_s: float = 0.0  # wall time the compute thread waited for expert weights
    expert_requests: int = 0  # (token-layer, expert) pairs the router asked for, per layer call
    hits: int = 0  # resident and complete when asked
    misses: int = 0  # not even requested before the layer asked
    late: int = 0  # prefetched but still in flight
    prefetch_issued: int = 0
    prefetch_used: int = 0
    prefetch_wasted: int = 0
    bytes_loaded: int = 0
    bandwidth_gbps: float = 0.0
    horizon_mean: float = 0.0
    cache_bytes: int = 0
    cache_slots: int = 0
    substitutions: int = 0
    # beyond DESIGN.md's list: time split by phase, for prompt / generation t/s
    prompt_s: float = 0.0
    decode_s: float = 0.0
    # the pinned host tier of device="cuda" (efedge/gpu/host_tier.py); 0 without one.
    # Each copy into VRAM is a host hit (from a host slot) or a host miss (read from the
    # file into a host slot first): host_hits + host_misses = copies into VRAM.
    host_hits: int = 0
    host_misses: int = 0
    host_staged: int = 0  # disk → host loads made ahead of need by the predictions
    disk_bytes: int = 0  # bytes read from the model file into host slots

    def as_dict(self) -> dict:
        return asdict(self)

    def reset(self) -> None:
        keep = (self.cache_bytes, self.cache_slots)
        for k, v in asdict(Counters()).items():
            setattr(self, k, v)
        self.cache_bytes, self.cache_slots = keep
