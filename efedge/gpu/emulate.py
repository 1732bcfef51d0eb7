"""Laptop emulation on any GPU: a VRAM budget and an emulated host→device link.

* **VRAM budget** (`vram="8GB"`): everything efedge allocates on the device — non-expert
  weights, the KV cache, scratch for dequantized experts and activations, the expert slot
  pool — is planned against the budget before it is allocated (VramBudget), so a run on a
  141 GB H200 holds exactly what an 8 GB laptop would. `reserve` stands for what the
  laptop's driver, display and CUDA context take outside our tensors.
* **Link** (`link="pcie4x8"`, `"12.5GB/s"`, …, parsed by efedge.experts.link.parse_link):
  a copy's completion event is *delayed* — it reports complete no earlier than a shared
  token bucket at the link's rate allows (DelayedEvent). The real copy still runs at the
  real speed; only the moment the runtime may use the expert moves, so compute, stalls,
  prefetch timing and the measured bandwidth all see the emulated link.
* `laptop_setup(...)`: the cache share and link of a hardware profile (efedge/profiles.py)
  for a model profile, scaled to the model actually loaded (see its docstring).

Figures from an emulated run say "emulated" wherever they are printed.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from efedge.errors import CacheBudgetError
from efedge.experts.link import Link
from efedge.gil_yield import yield_gil


class DelayedEvent:
    """An event (anything with query() / synchronize()) that also waits for `ready_at`
    (time.perf_counter() seconds): the emulated link's completion time."""

    def __init__(self, inner, ready_at: float):
        self.inner, self.ready_at = inner, ready_at

    @property
    def torch_event(self):
        return getattr(self.inner, "torch_event", None)

    def query(self) -> bool:
        return time.perf_counter() >= self.ready_at and self.inner.query()

    def synchronize(self) -> None:
        wait_until(self.ready_at)
        self.inner.synchronize()


SPIN_S = 200e-6  # time.sleep overshoots by ~50–100 µs; the last stretch yields instead


def wait_until(t: float) -> None:
    """Sleep until perf_counter() ≥ t, to within a few µs (an expert on a laptop link
    takes ~240 µs, so sleep's overshoot alone would slow the emulated link by a third).
    The final stretch yields (efedge/gil_yield.py), releasing the GIL on every turn: a
    sleep(0) there could itself overshoot by its timer slack."""
    delay = t - time.perf_counter()
    if delay > SPIN_S:
        time.sleep(delay - SPIN_S)
    while time.perf_counter() < t:
        yield_gil()


class LinkEmulator:
    """A token bucket shared by every copy: transfers take latency + bytes / rate each and
    never overlap on the emulated link (one PCIe direction carries one stream of bytes)."""

    def __init__(self, link: Link):
        self.link = link
        self._lock = threading.Lock()
        self._free_at = 0.0
        self.busy_s = 0.0  # emulated link time handed out

    def reserve(self, nbytes: int, started: float) -> float:
        """Book the link for `nbytes` from `started` on; returns the completion time."""
        cost = self.link.latency_s + nbytes / self.link.bytes_per_s
        with self._lock:
            begin = max(started, self._free_at)
            self._free_at = begin + cost
            self.busy_s += cost
            return self._free_at

    def delay(self, event, nbytes: int, started: float) -> DelayedEvent:
        return DelayedEvent(event, self.reserve(nbytes, started))


# what makes each part smaller (the weights and the scratch are fixed by the model and the
# batch sizes: only a larger budget helps them)
_REMEDY = {"kv_cache": "raise vram= or lower n_ctx",
           "expert_cache": "raise vram= or lower cache=",
           "scratch": "raise vram= (the scratch does not depend on cache= or n_ctx; a "
                      "smaller ubatch= shrinks its activation part)",
           "weights": "raise vram= (the non-expert weights must all be on the device)"}


@dataclass
class VramBudget:
    """Device bytes planned against a total: `take` what each part needs before
    allocating it; `CacheBudgetError` names the part that does not fit."""

    total: float  # bytes; float("inf") = no limit (the CPU test device)
    reserve: int = 0  # driver / display / context, outside our tensors
    emulated: bool = False
    parts: dict[str, int] = field(default_factory=dict)

    @property
    def used(self) -> int:
        return self.reserve + sum(self.parts.values())

    @property
    def remaining(self) -> float:
        return self.total - self.used

    def take(self, name: str, nbytes: int) -> None:
        nbytes = int(nbytes)
        if nbytes > self.remaining:
            have = ", ".join(f"{k} {v / 2**20:.0f} MiB" for k, v in self.parts.items())
            raise CacheBudgetError(
                f"{name} needs {nbytes / 2**20:.1f} MiB of device memory but only "
                f"{max(self.remaining, 0) / 2**20:.1f} MiB of the {self.total / 2**30:.2f} "
                f"GiB budget is left (reserve {self.reserve / 2**20:.0f} MiB; {have or 'nothing'}"
                f" taken so far); {_REMEDY.get(name, 'raise vram=')}")
        self.parts[name] = self.parts.get(name, 0) + nbytes

    def report(self) -> dict:
        return {"budget_bytes": None if self.total == float("inf") else int(self.total),
                "emulated": self.emulated, "reserve_bytes": self.reserve,
                **{f"{k}_bytes": v for k, v in self.parts.items()}}


# What a laptop loses outside efedge's tensors: CUDA context (~300 MB on recent drivers)
# plus the desktop's framebuffers on a laptop whose GPU also drives the display.
LAPTOP_RESERVE = 512 << 20


def laptop_setup(hardware: str, model_profile: str, expert_bytes_here: float,
                 kv_bytes_profile: float = 0.4e9,
                 extra_non_expert_profile: float = 0.4e9) -> dict:
    """The emulated laptop for a model that is much smaller than the one users run.

    The laptop (hardware profile, e.g. rtx4060-laptop) running the model profile (e.g.
    qwen3-30b-a3b at Q4_K_M) can keep a share of that model's experts in VRAM:
    (VRAM − reserve − non-expert weights − KV cache) / all expert bytes. We give the loaded
    model the same *share* of its experts, and a link on which one of *its* experts takes
    as long as one of the profile's experts takes on the laptop's link — so the cache
    holds as many experts and a miss costs as much time as on the laptop. What is not
    scaled: the compute between transfers (this GPU's), which the report states.

    `kv_bytes_profile`: the profile model's KV cache at a 4096 context (Qwen3-30B-A3B:
    48 layers × 4096 × 4 KV heads × 128 × 2 (K, V) × 2 bytes ≈ 0.4 GB);
    `extra_non_expert_profile`: token embedding + output head (151k × 2048 at ~5 bpw,
    ≈ 0.2 GB each). Returns {"cache": "NN%", "link": Link, "share": float, "why": str}.
    """
    from efedge.profiles import get_hardware, get_model

    hw, mp = get_hardware(hardware), get_model(model_profile)
    experts_total = mp.n_layer * mp.n_expert * mp.bytes_per_expert
    non_expert = mp.n_layer * mp.non_expert_bytes_per_layer + extra_non_expert_profile
    free = hw.fast_mem_bytes - LAPTOP_RESERVE - non_expert - kv_bytes_profile
    share = min(1.0, max(free, 0.0) / experts_total)
    per_expert_s = hw.link_latency_s + mp.bytes_per_expert / hw.link_bytes_per_s
    rate = expert_bytes_here / max(per_expert_s - hw.link_latency_s, 1e-9)
    link = Link(f"{hw.name}~{mp.name}", rate, hw.link_latency_s)
    why = (f"{hw.description}: {hw.fast_mem_bytes / 1e9:.0f} GB VRAM − reserve "
           f"{LAPTOP_RESERVE / 2**20:.0f} MiB − non-expert {non_expert / 1e9:.2f} GB − KV "
           f"{kv_bytes_profile / 1e9:.2f} GB leaves {share:.0%} of {mp.name}'s "
           f"{experts_total / 1e9:.1f} GB of experts; one expert ({mp.bytes_per_expert / 1e6:.2f}"
           f" MB) takes {per_expert_s * 1e6:.0f} µs on {hw.link_bytes_per_s / 1e9:.1f} GB/s, "
           f"so this model's {expert_bytes_here / 1e3:.0f} kB experts get "
           f"{rate / 1e9:.3f} GB/s + {hw.link_latency_s * 1e6:.0f} µs")
    return {"cache": f"{share * 100:.1f}%", "link": link, "share": share, "why": why}
