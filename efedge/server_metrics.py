"""GET /metrics: the server's figures in Prometheus' text format (opt-in, `efedge serve
--metrics`, as llama-server's flag; without it the route answers 501 as llama-server's).

llama-server's names come first, with its meanings, so that dashboards and scrapers made
for it read efedge too: token and time totals (prompt evaluation, generation), the
throughput since the previous scrape (its "bucket" gauges), requests running and waiting,
and how full the context is. Then efedge's own, under `efedge:`: what the expert cache
did — requests, hits, misses, late prefetches, stall time, bytes read, prefetches issued,
used and wasted — which is what a user of a model larger than memory watches. Everything
is read from the model's counters (Model.stats()), which the generations keep anyway:
nothing is counted twice or estimated.
"""

from __future__ import annotations

import math
import threading

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
NOT_ENABLED = "This server does not support metrics endpoint. Start it with `--metrics`"

# (name, type, help, the Model.stats() key it reports)
_TOTALS = (
    ("llamacpp:prompt_tokens_total", "counter", "Number of prompt tokens processed.",
     "tokens_prompt"),
    ("llamacpp:prompt_seconds_total", "counter", "Prompt process time", "prompt_s"),
    ("llamacpp:tokens_predicted_total", "counter", "Number of generation tokens processed.",
     "tokens_generated"),
    ("llamacpp:tokens_predicted_seconds_total", "counter", "Predict process time",
     "decode_s"),
)
_EXPERTS = (
    ("efedge:expert_requests_total", "counter",
     "Expert weights the routers asked for (one per token-layer and expert).",
     "expert_requests"),
    ("efedge:expert_hits_total", "counter",
     "Expert requests found resident and complete.", "hits"),
    ("efedge:expert_misses_total", "counter",
     "Expert requests not resident nor on their way: loaded on demand.", "misses"),
    ("efedge:expert_late_total", "counter",
     "Expert requests whose prefetch was still in flight.", "late"),
    ("efedge:expert_stall_seconds_total", "counter",
     "Time the computation waited for expert weights.", "stall_s"),
    ("efedge:expert_bytes_loaded_total", "counter",
     "Bytes of expert weights loaded into the expert cache.", "bytes_loaded"),
    ("efedge:prefetch_issued_total", "counter", "Expert prefetches issued.",
     "prefetch_issued"),
    ("efedge:prefetch_used_total", "counter",
     "Prefetched experts that a router then asked for.", "prefetch_used"),
    ("efedge:prefetch_wasted_total", "counter",
     "Prefetched experts evicted before any router asked for them.", "prefetch_wasted"),
    ("efedge:routing_substitutions_total", "counter",
     "Experts replaced by resident ones (opt-in cache-aware routing).", "substitutions"),
    ("efedge:expert_cache_bytes", "gauge",
     "Bytes of the expert cache (0: every expert resident in the mapped file).",
     "cache_bytes"),
    ("efedge:expert_cache_slots", "gauge", "Expert slots of the expert cache.",
     "cache_slots"),
    ("efedge:prefetch_horizon_mean", "gauge",
     "Mean look-ahead of the prefetch policy, in layers.", "horizon_mean"),
)


def _value(x: float) -> str:
    """A sample value as Prometheus reads it (integers without a decimal point)."""
    if isinstance(x, bool):
        return str(int(x))
    if isinstance(x, int):
        return str(x)
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "+Inf" if x > 0 else "-Inf"
    return repr(float(x))


class ServerMetrics:
    """The exposition of one server's model. The gauges of throughput cover the time
    since the previous scrape (llama-server's bucket), so each render() moves it on."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last = {"tokens_prompt": 0, "prompt_s": 0.0, "tokens_generated": 0,
                      "decode_s": 0.0}

    def render(self, stats: dict, *, processing: int, deferred: int, cancelled: int,
               kv_tokens: int, n_ctx: int) -> str:
        lines: list[str] = []

        def metric(name: str, kind: str, help_: str, value: float) -> None:
            lines.extend((f"# HELP {name} {help_}", f"# TYPE {name} {kind}",
                          f"{name} {_value(value)}"))

        for name, kind, help_, key in _TOTALS:
            metric(name, kind, help_, stats.get(key, 0))
        with self._lock:  # two scrapes at once: each interval counted once
            last, self._last = self._last, {k: stats.get(k, 0) for k in self._last}
        metric("llamacpp:prompt_tokens_seconds", "gauge",
               "Average prompt throughput in tokens/s.",
               _rate(stats, last, "tokens_prompt", "prompt_s"))
        metric("llamacpp:predicted_tokens_seconds", "gauge",
               "Average generation throughput in tokens/s.",
               _rate(stats, last, "tokens_generated", "decode_s"))
        metric("llamacpp:kv_cache_usage_ratio", "gauge",
               "KV-cache usage. 1 means 100 percent usage.",
               kv_tokens / n_ctx if n_ctx else 0.0)
        metric("llamacpp:kv_cache_tokens", "gauge", "KV-cache tokens.", kv_tokens)
        metric("llamacpp:requests_processing", "gauge", "Number of requests processing.",
               processing)
        metric("llamacpp:requests_deferred", "gauge", "Number of requests deferred.",
               deferred)
        metric("efedge:requests_cancelled_total", "counter",
               "Generations cut short (client gone, server shutting down).", cancelled)
        for name, kind, help_, key in _EXPERTS:
            metric(name, kind, help_, stats.get(key, 0))
        return "\n".join(lines) + "\n"


def _rate(now: dict, last: dict, tokens: str, seconds: str) -> float:
    """Tokens per second over what happened between two scrapes (0 when nothing did)."""
    dt = now.get(seconds, 0.0) - last[seconds]
    dn = now.get(tokens, 0) - last[tokens]
    return dn / dt if dt > 0 and dn > 0 else 0.0
