"""The link meter's arithmetic in one place: the Python transfer engines (link.py,
LinkTiming) and the native workers' bookkeeping kernel (native_workers.reap_rows) move the
same EWMAs, kept in one float64 array per engine (the M_* slots).

* a read of one expert by a worker: mean and mean absolute deviation of its duration
  (rate 0.1; the first read sets the mean);
* a copy over the link: bytes and busy seconds (rate 0.2, the first copy sets them), the
  service time (latency) and their ratio, the bandwidth while the link is busy.
"""

from __future__ import annotations

from numba import njit

# M_LAST_END: the latest completion (ns) the native engine's drive meter has seen
(M_READ, M_READ_DEV, M_BYTES, M_BUSY, M_LATENCY, M_BANDWIDTH, M_LAST_END) = range(7)
N_METER = 7


@njit(cache=True, fastmath=False)
def meter_read(m, seconds):
    """One worker's read of an expert took `seconds`."""
    if m[M_READ] == 0.0:
        m[M_READ] = seconds
        return
    m[M_READ_DEV] += 0.1 * (abs(seconds - m[M_READ]) - m[M_READ_DEV])
    m[M_READ] += 0.1 * (seconds - m[M_READ])


@njit(cache=True, fastmath=False)
def meter_copy(m, nbytes, busy):
    """nbytes carried in `busy` seconds of link time."""
    a = 0.2 if m[M_BUSY] != 0.0 else 1.0
    m[M_BYTES] += a * (nbytes - m[M_BYTES])
    m[M_BUSY] += a * (busy - m[M_BUSY])
    m[M_LATENCY] += a * (busy - m[M_LATENCY])
    if m[M_BUSY] > 0.0:
        m[M_BANDWIDTH] = m[M_BYTES] / m[M_BUSY]
