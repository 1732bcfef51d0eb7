"""GET /metrics (opt-in): llama-server's Prometheus names with its meanings, and the
expert cache's figures under efedge:, all read from the model's own counters."""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request

import pytest
from _http import running_server, serve_kwargs

import efedge
from efedge.server_metrics import ServerMetrics

SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*) (\S+)$")


def get(srv, path: str, method: str = "GET") -> tuple[int, str, str]:
    req = urllib.request.Request(srv.url + path, method=method)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.headers["Content-Type"], r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers["Content-Type"], e.read().decode()


def parse(text: str) -> dict[str, float]:
    """Samples by name; every sample has its HELP and TYPE lines before it."""
    out, helped, typed = {}, set(), {}
    for line in text.splitlines():
        if line.startswith("# HELP "):
            helped.add(line.split(" ")[2])
        elif line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert kind in ("counter", "gauge"), line
            typed[name] = kind
        else:
            m = SAMPLE.match(line)
            assert m, f"not a Prometheus sample: {line!r}"
            name = m.group(1)
            assert name in helped and name in typed, name
            assert name not in out, f"{name} twice"
            out[name] = float(m.group(2))
    return out


@pytest.fixture(scope="module")
def streamed(tiny_gguf):
    """A model whose experts stream through a 50% cache (so the expert figures move)."""
    with efedge.load(tiny_gguf("qwen3moe", "Q4_K_M"), cache="50%") as m:
        yield m


def test_metrics_are_off_unless_asked_for(streamed):
    with running_server(streamed) as srv:
        status, ctype, body = get(srv, "/metrics")
    assert status == 501 and ctype.startswith("application/json")
    err = json.loads(body)["error"]
    assert "--metrics" in err["message"] and err["type"] == "not_supported_error"


def test_metrics_report_the_models_counters(streamed):
    with running_server(streamed, metrics=True) as srv:
        status, ctype, text = get(srv, "/metrics")
        assert status == 200 and ctype.startswith("text/plain; version=0.0.4")
        before = parse(text)
        req = urllib.request.Request(
            srv.url + "/v1/completions", headers={"Content-Type": "application/json"},
            data=json.dumps({"prompt": "def fib(n):", "max_tokens": 12,
                             "temperature": 0}).encode())
        with urllib.request.urlopen(req, timeout=120) as r:
            usage = json.loads(r.read())["usage"]
        after = parse(get(srv, "/metrics")[2])
        again = parse(get(srv, "/metrics")[2])
        status, _, head = get(srv, "/metrics", method="HEAD")
    assert status == 200 and head == ""
    s = streamed.stats()
    # the totals are the model's counters, and moved by this request's tokens
    assert after["llamacpp:tokens_predicted_total"] == s["tokens_generated"]
    assert after["llamacpp:prompt_tokens_total"] == s["tokens_prompt"]
    assert after["llamacpp:tokens_predicted_seconds_total"] == pytest.approx(s["decode_s"])
    grew = after["llamacpp:tokens_predicted_total"] - before["llamacpp:tokens_predicted_total"]
    # (the first token comes from the prompt's logits: one decode fewer than tokens)
    assert usage["completion_tokens"] - 1 <= grew <= usage["completion_tokens"]
    assert 0 < after["llamacpp:prompt_tokens_total"] - before["llamacpp:prompt_tokens_total"] \
        <= usage["prompt_tokens"]
    # throughput over the time since the previous scrape: this request's, then nothing
    assert after["llamacpp:predicted_tokens_seconds"] == pytest.approx(
        grew / (after["llamacpp:tokens_predicted_seconds_total"]
                - before["llamacpp:tokens_predicted_seconds_total"]))
    assert again["llamacpp:predicted_tokens_seconds"] == 0.0
    assert again["llamacpp:prompt_tokens_seconds"] == 0.0
    assert after["llamacpp:requests_processing"] == 0
    assert after["llamacpp:requests_deferred"] == 0
    assert after["llamacpp:kv_cache_tokens"] == streamed.n_tokens > 0
    # the prompt and the reply (its last token evaluated only if the reply went on)
    held = usage["prompt_tokens"] + usage["completion_tokens"]
    assert streamed.n_tokens in (held - 1, held)
    assert after["llamacpp:kv_cache_usage_ratio"] == pytest.approx(
        streamed.n_tokens / streamed.n_ctx)
    # the expert cache: every request a hit, a miss or a late prefetch; loads moved bytes
    req_ = after["efedge:expert_requests_total"]
    assert req_ == s["expert_requests"] > before["efedge:expert_requests_total"]
    assert req_ == (after["efedge:expert_hits_total"] + after["efedge:expert_misses_total"]
                    + after["efedge:expert_late_total"])
    assert after["efedge:expert_bytes_loaded_total"] > 0
    assert after["efedge:expert_stall_seconds_total"] == pytest.approx(s["stall_s"])
    assert after["efedge:expert_cache_bytes"] == s["cache_bytes"] > 0


def test_throughput_gauges_cover_the_time_since_the_last_scrape():
    m = ServerMetrics()
    kw = dict(processing=1, deferred=2, cancelled=3, kv_tokens=5, n_ctx=20)
    first = parse(m.render({"tokens_prompt": 100, "prompt_s": 0.5, "tokens_generated": 30,
                            "decode_s": 1.5}, **kw))
    assert first["llamacpp:prompt_tokens_seconds"] == 200.0
    assert first["llamacpp:predicted_tokens_seconds"] == 20.0
    assert (first["llamacpp:requests_processing"], first["llamacpp:requests_deferred"],
            first["efedge:requests_cancelled_total"]) == (1, 2, 3)
    assert first["llamacpp:kv_cache_usage_ratio"] == 0.25
    later = parse(m.render({"tokens_prompt": 100, "prompt_s": 0.5, "tokens_generated": 50,
                            "decode_s": 2.0}, **kw))
    assert later["llamacpp:prompt_tokens_seconds"] == 0.0  # no prompt since
    assert later["llamacpp:predicted_tokens_seconds"] == 40.0  # 20 tokens in 0.5 s
    assert later["llamacpp:tokens_predicted_total"] == 50


def test_serve_passes_metrics_to_the_server(tiny_gguf, monkeypatch):
    path = str(tiny_gguf("qwen3moe", "F32"))
    assert serve_kwargs(monkeypatch, [path, "--port", "0", "--metrics"])["metrics"] is True
    assert serve_kwargs(monkeypatch, [path, "--port", "0"])["metrics"] is False
