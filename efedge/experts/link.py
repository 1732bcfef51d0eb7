"""The link experts cross on their way into the cache: its emulation and its meter.

* Link emulation: `link="8GB/s"`, `"pcie4x4"`, `"nvme"` … a shared token bucket makes
  transfers as slow as that link, so laptop-GPU and SSD conditions can be reproduced on
  any machine. A copy books its link time when a worker takes it — from when it was
  queued, if the link was free then, as a copy engine starts it —, so the link carries
  copies in the order they start. Output that depends on it says "emulated".
* An online meter of the link, not of one request: bytes over the time at least one copy
  was under way (ratio of two EWMAs), and each request's service time (from when the link
  started on it: its own start, or the previous completion if it queued behind one). A
  per-request bytes/duration would count the wait behind the other worker's copy and halve
  the rate whenever both are busy (the simulator reads the link's real rate). Beside it,
  how long one read of the file takes (`read_tail_s`): reads overlapping in a drive's
  queue complete closer together than any one of them takes.

`LinkTiming` holds both for TransferEngine (efedge/experts/transfer.py), which calls
them with its condition held where a method says so.
"""

from __future__ import annotations

import re
import sys
import threading
import time
from dataclasses import dataclass

import numpy as np

from efedge.errors import EfedgeError
from efedge.experts.meter import (
    M_BANDWIDTH,
    M_BUSY,
    M_LATENCY,
    M_READ,
    M_READ_DEV,
    N_METER,
    meter_copy,
    meter_read,
)

# Sustained host→device or disk→RAM rates users see, bytes/s (DESIGN/peers.md sources):
# PCIe payload rates after protocol overhead; NVMe / SATA sequential reads.
NAMED_LINKS = {
    "pcie3x4": (3.2e9, 10e-6), "pcie3x8": (6.5e9, 10e-6), "pcie3x16": (12.5e9, 10e-6),
    "pcie4x4": (6.5e9, 10e-6), "pcie4x8": (13e9, 10e-6), "pcie4x16": (25e9, 10e-6),
    "pcie5x16": (50e9, 10e-6), "thunderbolt": (2.8e9, 20e-6), "usb4": (3.0e9, 20e-6),
    "nvme": (3.5e9, 80e-6), "nvme4": (7.0e9, 60e-6), "sata": (0.5e9, 100e-6),
}
_PR_SET_TIMERSLACK = 29  # linux/prctl.h
MIN_LINK_RATE = 100e3  # bytes/s: the slowest link emulated


@dataclass(frozen=True)
class Link:
    name: str
    bytes_per_s: float
    latency_s: float = 0.0

    def __str__(self) -> str:
        return f"{self.name} (emulated, {self.bytes_per_s / 1e9:.2f} GB/s)"


def parse_link(spec: str | Link | None) -> Link | None:
    """None, a Link, a name from NAMED_LINKS, or a rate like "8GB/s", "500MB/s"."""
    if spec is None or isinstance(spec, Link):
        return spec
    text = str(spec).strip().lower()
    if text in NAMED_LINKS:
        rate, lat = NAMED_LINKS[text]
        return Link(text, rate, lat)
    # B is bytes, b bits (8Gb/s, 8Gbps: a network's or a bus's gigabits, a byte an eighth)
    m = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*([kmg]i?)?(b)(?:/s|ps)", str(spec).strip(),
                     flags=re.IGNORECASE)
    if not m:
        raise EfedgeError(f"unknown link {spec!r}: use a rate like 8GB/s or 500MB/s, or one "
                          f"of {', '.join(NAMED_LINKS)}")
    mult = {None: 1, "k": 1e3, "m": 1e6, "g": 1e9, "ki": 2**10, "mi": 2**20, "gi": 2**30}
    rate = float(m.group(1)) * mult[m.group(2) and m.group(2).lower()]
    if m.group(3) == "b":
        rate /= 8
    if rate <= 0:
        raise EfedgeError(f"link rate must be positive, got {spec!r}")
    if rate < MIN_LINK_RATE:  # (1B/s took hours for a few tokens, seemingly hung)
        raise EfedgeError(f"link rate {spec!r} is below {MIN_LINK_RATE / 1e3:.0f} KB/s: a "
                          f"token would wait minutes for its experts")
    return Link(str(spec), rate, 0.0)


def tight_timer_slack() -> None:
    """Let this thread's sleeps end within microseconds of their deadline (Linux lets a
    normal thread's timers run 50 µs late, which made every emulated copy ~75 µs slow).
    Elsewhere, or if it fails, sleeps just stay as they are."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_TIMERSLACK, 1000, 0, 0, 0)
    except Exception:  # noqa: BLE001 - best effort. It runs before the worker's own
        # guard: anything escaping here (a libc ctypes cannot open by None raises
        # TypeError, as Windows' LoadLibrary does) killed the worker unreplaced, and every
        # load then waited out the 60 s no-progress limit
        pass


# how long before the emulated link comes free a Python worker takes its next copy
TAKE_LEAD_S = 50e-6


class LinkTiming:
    """The emulated link's clock and the meter of the real or emulated one, for a
    transfer engine with `link` (a Link or None) and `counters` (bandwidth_gbps)."""

    link: Link | None

    def _init_link_timing(self) -> None:
        self._link_lock = threading.Lock()
        self._link_free_at = 0.0
        self._oversleep = 0.0  # EWMA of how late a sleep ends: the emulated link wakes early
        self._in_flight = 0  # copies under way (cond held to change)
        self._busy_mark = 0.0  # when the current busy period began or last completion
        # the meter's EWMAs (efedge/experts/meter.py), read through the properties below
        self.meter = np.zeros(N_METER)

    # bytes/s while the link is busy; s: one request's service time
    bandwidth_ewma = property(lambda self: float(self.meter[M_BANDWIDTH]))
    latency_ewma = property(lambda self: float(self.meter[M_LATENCY]))
    # how long a worker's read of one expert takes (mean and mean absolute deviation,
    # EWMA): with several reads overlapping in a drive's queue, the link meter above sees
    # completions closer together than any one read takes (measured on the test VM,
    # reading the drive: 250-350 µs between completions, reads of 640 µs median, p90
    # 1 ms), and the look-ahead planned from it left prefetches landing late
    read_s_ewma = property(lambda self: float(self.meter[M_READ]))
    read_dev_ewma = property(lambda self: float(self.meter[M_READ_DEV]))

    # -- the emulated link --------------------------------------------------------------
    def _book_link(self, nbytes: int, now: float) -> float:
        """When the emulated link delivers a copy of nbytes that starts now (0: no link).
        Booked as a worker takes the job (from when it was queued, if the link was free
        then: TransferEngine._book_queued), so the link carries copies in the order they
        start, as a copy engine does: booked after the read instead, a demand load whose
        worker came back from its read late (no core, or no GIL, on a busy machine) went
        behind prefetches that started after it (measured: 500-900 µs for one 137 µs
        copy while the other worker moved five)."""
        if self.link is None:
            return 0.0
        with self._link_lock:
            begin = max(now, self._link_free_at)
            self._link_free_at = begin + self.link.latency_s + nbytes / self.link.bytes_per_s
            return self._link_free_at

    def link_free_at(self) -> float:
        """When the emulated link's last booked copy ends (0: no link, or none booked)."""
        return self._link_free_at if self.link is not None else 0.0

    def take_delay(self, now: float) -> float:
        """How long a worker waits before it takes the next copy: a copy engine chooses
        its next copy as the link comes free. Taken (and booked) earlier, a prefetch holds
        its place behind the copies on the wire against a demand load queued or promoted
        meanwhile. A worker's wake-up and the GIL's hand-over make it late by tens of µs:
        it looks TAKE_LEAD_S early (the booking starts when the link comes free either
        way: _book_queued)."""
        if self.link is None:
            return 0.0
        return self.link_free_at() - self._oversleep - TAKE_LEAD_S - now

    def _emulate_link(self, nbytes: int, started: float, until: float = 0.0) -> None:
        """Hold the copy until the link would have delivered it: at `until` where it was
        booked at its start, else booked now for a copy that started at `started`."""
        if self.link is None:
            return
        if until <= 0.0:
            until = self._book_link(nbytes, started)
        t0 = time.perf_counter()
        delay = until - t0 - self._oversleep
        if delay > 0:  # the copy ends at `until` on average, not a timer's slack later
            time.sleep(delay)
            late = time.perf_counter() - t0 - delay
            self._oversleep += 0.1 * (min(late, 1e-3) - self._oversleep)

    # -- the meter (cond held) ----------------------------------------------------------
    def _meter_start(self, job) -> None:
        if self._in_flight == 0:
            self._busy_mark = time.perf_counter()
        self._in_flight += 1
        job.metered = True

    def _meter_end(self, job, nbytes: int) -> None:
        """One copy finished (nbytes 0: it failed): the busy time since the last mark
        carried these bytes."""
        if not job.metered:
            return
        job.metered = False
        self._in_flight -= 1
        now = time.perf_counter()
        busy, self._busy_mark = now - self._busy_mark, now
        if nbytes <= 0:
            return
        self._meter_copy(nbytes, busy)

    @property
    def read_tail_s(self) -> float:
        """A slow read of one expert by a worker: the mean read time plus two mean
        deviations (0 before any read). Through an emulated link the reads come from the
        page cache, far below the link's own time."""
        return self.read_s_ewma + 2.0 * self.read_dev_ewma

    def _meter_read(self, seconds: float) -> None:
        """(cond held) One worker read took `seconds`."""
        meter_read(self.meter, float(seconds))

    def _meter_copy(self, nbytes: int, busy: float) -> None:
        """(cond held) nbytes carried in `busy` seconds of link time."""
        meter_copy(self.meter, float(nbytes), float(busy))
        self._meter_report()

    def _meter_report(self) -> None:
        """(cond held) The meter's bandwidth into the counters, once it has one."""
        if self.meter[M_BUSY] > 0.0:
            self.counters.bandwidth_gbps = self.bandwidth_ewma / 1e9
