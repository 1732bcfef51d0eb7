"""`efedge bench`: the llama-bench style table and JSON on a tiny model (no timing
assertions: the numbers depend on the machine)."""

from __future__ import annotations

import json

import pytest
from conftest import requires_llama_cpp

from efedge.cli import main

LLAMA_BENCH_FIELDS = ("model_filename", "model_type", "model_size", "model_n_params",
                      "backends", "n_threads", "n_prompt", "n_gen", "test_time", "avg_ns",
                      "stddev_ns", "avg_ts", "stddev_ts", "samples_ns", "samples_ts")


def _run(capsys, *argv) -> str:
    assert main(["bench", *map(str, argv)]) == 0
    return capsys.readouterr().out


def test_table(tiny_gguf, capsys):
    out = _run(capsys, tiny_gguf("qwen3moe", "F32"), "-p", 8, "-n", 4, "-r", 1)
    lines = out.strip().splitlines()
    heads = [c.strip() for c in lines[0].strip("|").split("|")]
    assert heads == ["model", "size", "params", "backend", "threads", "test", "t/s", "cache",
                     "policy", "link", "stall ms/token", "hit rate"]
    assert set(lines[1].replace("|", "").replace(" ", "")) <= {"-", ":"}
    body = lines[2:]
    assert len(body) == 2
    assert "pp8" in body[0] and "tg4" in body[1]
    assert all(" ± " in row and "| CPU " in row for row in body)


def test_json_fields_and_several_values(tiny_gguf, capsys):
    out = _run(capsys, tiny_gguf("qwen3moe", "F32"), "-p", "4,8", "-n", 4, "-r", 2,
               "-t", "1,2", "--json")
    rows = json.loads(out)
    assert len(rows) == 2 * 3  # threads × (pp4, pp8, tg4)
    for r in rows:
        for f in LLAMA_BENCH_FIELDS:
            assert f in r, f
        assert len(r["samples_ns"]) == len(r["samples_ts"]) == 2
        assert r["avg_ts"] > 0 and r["model_size"] > 0 and r["model_n_params"] > 0
        assert (r["n_prompt"] > 0) != (r["n_gen"] > 0)
        assert r["hit_rate"] == 1.0 and r["stall_ms_per_token"] == 0.0
        assert r["load_s"] >= r["warmup_s"] >= 0
    assert sorted({r["n_threads"] for r in rows}) == [1, 2]
    assert sorted({r["test"] for r in rows}) == ["pp4", "pp8", "tg4"]


def test_cache_and_policies(tiny_gguf, capsys):
    path = tiny_gguf("qwen3moe", "F32")
    out = _run(capsys, path, "-p", 0, "-n", 4, "-r", 1, "--cache", "50%",
               "--policy", "ondemand,lru", "--json")
    rows = json.loads(out)
    assert [r["policy"] for r in rows] == ["ondemand", "lru"]
    for r in rows:
        assert r["cache"] == "50%" and r["test"] == "tg4"
        assert 0.0 <= r["hit_rate"] <= 1.0 and r["stall_ms_per_token"] >= 0.0


def test_resident_row_beside_cached_rows_on_an_emulated_link(tiny_gguf, capsys):
    """--cache none,50% --link RATE: the resident baseline takes no link (link= needs a
    cache) and comes out as one row, as it does for several --policy values; it used to
    end the whole run with "link= ... needs an expert cache"."""
    path = tiny_gguf("qwen3moe", "F32")
    out = _run(capsys, path, "-p", 0, "-n", 4, "-r", 1, "--cache", "none,50%",
               "--policy", "ondemand,lfu", "--link", "8GB/s,4GB/s", "--json")
    rows = json.loads(out)
    assert [(r["cache"], r["policy"], r["link"]) for r in rows] == [
        (None, None, None), ("50%", "ondemand", "8GB/s"), ("50%", "ondemand", "4GB/s"),
        ("50%", "lfu", "8GB/s"), ("50%", "lfu", "4GB/s")]


def test_emulated_links_are_labelled_in_the_output(tiny_gguf, capsys):
    """Speeds through --link are an emulated link's: bench's table says so in its link
    column, and run (as chat, serve, perplexity and trace: the CLI's one loader) says so on
    stderr before anything it measures. Neither said "emulated" anywhere."""
    path = tiny_gguf("qwen3moe", "F32")
    table = _run(capsys, path, "-p", 0, "-n", 2, "-r", 1, "--cache", "none,50%",
                 "--link", "8GB/s")
    rows = [ln for ln in table.splitlines() if ln.startswith("| qwen3moe")]
    assert len(rows) == 2 and "| 8GB/s (emulated) |" in rows[1], table
    assert "emulated" not in rows[0]  # the resident row has no link
    assert main(["run", str(path), "--cache", "50%", "--link", "8GB/s", "-p", "x",
                 "-n", "2"]) == 0
    err = capsys.readouterr().err
    assert "emulated link: 8GB/s (emulated, 8.00 GB/s)" in err, err
    assert main(["run", str(path), "--cache", "50%", "-p", "x", "-n", "2"]) == 0
    assert "emulated" not in capsys.readouterr().err


def test_nothing_to_run(tiny_gguf, capsys):
    assert main(["bench", str(tiny_gguf("qwen3moe", "F32")), "-p", "0", "-n", "0"]) == 1
    assert "nothing to run" in capsys.readouterr().err


@requires_llama_cpp
def test_vs_llama_cpp(tiny_gguf, capsys):
    out = _run(capsys, tiny_gguf("qwen3moe", "Q4_K_M"), "-p", 8, "-n", 4, "-r", 1,
               "--vs-llama-cpp", "--json")
    rows = json.loads(out)
    assert [r["engine"] for r in rows] == ["efedge", "llama.cpp"] * 2
    for ours, ref in zip(rows[::2], rows[1::2], strict=True):
        assert ours["test"] == ref["test"] and ours["n_threads"] == ref["n_threads"]
        assert ours["vs_llama_cpp"] == pytest.approx(ours["avg_ts"] / ref["avg_ts"])
    out = _run(capsys, tiny_gguf("qwen3moe", "Q4_K_M"), "-p", 8, "-n", 0, "-r", 1,
               "--vs-llama-cpp")
    assert "| llama.cpp" in out and "efedge / llama.cpp" in out


@requires_llama_cpp
def test_llama_cpu_moe_moves_every_expert_tensor_to_the_cpu(tiny_gguf, capsys):
    """--llama-cpu-moe: llama.cpp's loader reports each expert tensor (gate, up, down of
    every MoE layer) placed on the CPU; a CPU-only build labels the row plainly."""
    from efedge.gguf_file import GGUFFile

    path = tiny_gguf("qwen3moe", "F32")
    gf = GGUFFile(path)
    n_exps = sum(1 for t in gf.tensors if "_exps" in t)
    gf.close()
    out = _run(capsys, path, "-p", 8, "-n", 0, "-r", 1, "--vs-llama-cpp", "--llama-cpu-moe",
               "--json")
    ours, ref = json.loads(out)
    assert ref["engine"] == "llama.cpp" and ref["experts_on_cpu"] == n_exps > 0
    assert ref["backends"] in ("llama.cpp CPU", "llama.cpp GPU, experts on CPU (--cpu-moe)")
    assert main(["bench", str(path), "-p", "8", "-n", "0", "--llama-cpu-moe"]) == 1
    assert "add --vs-llama-cpp" in capsys.readouterr().err


def test_policies_table_side_by_side(tiny_gguf, capsys):
    """`bench --policies`: one row per policy and budget on the same held-out tokens; the
    prefetching policy issues prefetches, the on-demand baseline is its own 100%."""
    path = tiny_gguf("qwen3moe", "Q4_K_M")
    out = _run(capsys, path, "--policies", "ondemand,expertflow", "--cache", "30%,60%",
               "--link", "500MB/s", "-p", 8, "-n", 12, "--json")
    doc = json.loads(out)
    rows = doc["rows"]
    assert [(r["cache"], r["policy"]) for r in rows] == [
        ("30%", "ondemand"), ("30%", "expertflow"), ("60%", "ondemand"), ("60%", "expertflow")]
    for r in rows:
        assert r["link"] == "500MB/s" and 0 <= r["hit_rate"] <= 1 and r["tokens_per_s"] > 0
        if r["policy"] == "ondemand":
            assert r["prefetch_precision"] is None and r["horizon_mean"] == 0
            assert r["stall_vs_ondemand"] in (None, 1.0)
        else:
            assert r["horizon_mean"] > 0
    table = _run(capsys, path, "--policies", "ondemand,next-layer", "--cache", "30%",
                 "--link", "500MB/s", "-p", 8, "-n", 6, "-r", 1)
    assert "| 30% | 500MB/s | next-layer |" in table and "stall % of ondemand" in table
    assert "helper thread" not in table


def test_policies_table_says_where_the_predictor_ran(tiny_gguf, capsys, monkeypatch):
    """With EFEDGE_PREDICTOR_THREAD=1 (or a spare core) expertflow's rows say its predictor
    ran on a helper thread, and the table says so above it; =0 keeps it off."""
    from efedge.experts import predictor_thread

    if not predictor_thread.available():
        pytest.skip("no predictor thread on this platform")
    path = tiny_gguf("qwen3moe", "Q4_K_M")
    args = ("--policies", "ondemand,expertflow", "--cache", "30%", "--link", "500MB/s",
            "-p", 8, "-n", 6, "-r", 1)
    for env, want in (("1", True), ("0", False)):
        monkeypatch.setenv("EFEDGE_PREDICTOR_THREAD", env)
        rows = json.loads(_run(capsys, path, *args, "--json"))["rows"]
        assert [r["predictor_thread"] for r in rows] == [False, want]
        assert ("on a helper thread" in _run(capsys, path, *args)) is want


def test_policy_comparisons_alternate_the_order_the_policies_run_in(tiny_gguf, monkeypatch):
    """compare_policies(reverse=True) runs the policies last to first (repeats alternate
    it, so that no policy always gets the late minutes of a drifting machine) and still
    returns its rows in the order asked for."""
    import efedge
    from efedge import policy_compare

    path = tiny_gguf("qwen3moe")
    ran = []
    real = efedge.load

    def load(*a, **kw):
        ran.append(kw.get("policy"))
        return real(*a, **kw)

    monkeypatch.setattr(efedge, "load", load)
    ids = list(range(5, 20))
    names = ["ondemand", "next-layer", "expertflow"]
    for reverse in (False, True):
        ran.clear()
        rows = policy_compare.compare_policies(path, names, "40%", None, ids, 4,
                                               reverse=reverse)
        assert [r["policy"] for r in rows] == names
        assert ran == (names[::-1] if reverse else names)
        assert rows[0]["stall_vs_ondemand"] in (None, 1.0)


def test_policy_table_shows_the_compute_threads_own_copies(tiny_gguf):
    """copies ms/token: through an emulated link the CPU engine's compute thread copies
    the experts itself (compute the link's time overlaps, which a DMA copy would not
    take), so the table says how long, per decoded token: the engine's copy time during
    the decode alone, and 0 where the transfer workers read the file (no link)."""
    from efedge import policy_compare

    path = tiny_gguf("qwen3moe")
    ids = list(range(5, 25))
    linked = policy_compare.compare_policies(path, ["ondemand", "expertflow"], "40%",
                                             "1GB/s", ids, 8)
    assert all(r["copy_ms_per_token"] > 0 for r in linked)
    n = linked[0]["stats"]["tokens_generated"]
    for r in linked:  # at most the decode's own time (not the prefill's copies)
        assert r["copy_ms_per_token"] * n <= 1e3 * r["stats"]["wall_s"]
    read = policy_compare.compare_policies(path, ["ondemand"], "40%", None, ids, 8)
    assert read[0]["copy_ms_per_token"] == 0.0
    table = policy_compare.format_table(linked)
    assert "| copies ms/token |" in table.splitlines()[0]
    assert all(line.count("|") == table.splitlines()[1].count("|")
               for line in table.splitlines())


def test_policy_table_bounds_each_setting_by_belady_min(tiny_gguf, capsys):
    """Through an emulated link each setting gets what no policy could beat on the run's
    own routing: Belady's MIN's hit rate (at least LRU's — on-demand's, live — on the same
    requests) and the stall its loads force with on-demand's compute to hide behind (at
    most on-demand's); none without a link. The bench prints it under the table."""
    from efedge import policy_compare

    path = tiny_gguf("qwen3moe")
    ids = list(range(5, 45))
    # (a link slow enough that MIN's loads outlast the compute even when another process
    # slows it 2×: at 200 MB/s a loaded machine's compute hid every load, and the bound
    # read 0 — a CI flake, not a bug)
    rows = policy_compare.compare_policies(path, ["ondemand", "expertflow"], "40%",
                                           "50MB/s", ids, 24)
    od = rows[0]
    assert all(r["min_hit_rate"] == od["min_hit_rate"] for r in rows)
    assert od["hit_rate"] <= od["min_hit_rate"] <= 1.0
    assert 0.0 < od["min_stall_ms_per_token"] <= od["stall_ms_per_token"]
    assert od["min_vs_ondemand"] == pytest.approx(
        od["min_stall_ms_per_token"] / od["stall_ms_per_token"])
    experts, layout = policy_compare.run_routing(path, ids, 24, "40%")
    assert experts.shape[0] == len(ids) and layout["n_slots"] == od["stats"]["cache_slots"]
    assert "MIN at 40%, 50MB/s" in policy_compare.format_bounds(rows)
    read = policy_compare.compare_policies(path, ["ondemand"], "40%", None, ids, 8)
    assert "min_hit_rate" not in read[0] and policy_compare.format_bounds(read) == ""
    assert main(["bench", str(path), "--policies", "ondemand,expertflow", "--cache", "40%",
                 "--link", "200MB/s", "-n", "8", "-r", "1"]) == 0
    assert "Belady's MIN, knowing the future" in capsys.readouterr().out


def test_policies_rejects_unknown_names(tiny_gguf, capsys):
    assert main(["bench", str(tiny_gguf("qwen3moe")), "--policies", "ondemand,nope"]) != 0
    assert "unknown cache policy 'nope'" in capsys.readouterr().err


@pytest.mark.parametrize("n_prompt", ["600", "30000"])
def test_policies_refuses_a_passage_past_the_context(n_prompt, capsys):
    """-p and -n past the model's context: one line naming both and the context (it was
    a held-out text traceback, or advice to raise -c, which bench does not take)."""
    rc = main(["bench", "--policies", "ondemand", "--cache", "50%", "-p", n_prompt,
               "-n", "8"])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err, err
    assert f"-p {n_prompt} + -n 8 tokens do not fit the model's context of 512" in err, err


@pytest.mark.parametrize(("extra", "word"), [
    (["-p", "8,16"], "-p"), (["-n", "4,8"], "-n"), (["-t", "1,2"], "-t"),
    (["--vs-llama-cpp"], "--vs-llama-cpp")])
def test_policies_refuses_what_it_would_ignore(tiny_gguf, capsys, extra, word):
    """--policies runs one held-out passage with one thread count: a second -p, -n or -t
    value, or --vs-llama-cpp, was dropped without a word."""
    rc = main(["bench", str(tiny_gguf("qwen3moe", "F32")), "--policies", "ondemand",
               "--link", "1GB/s", "-r", "1", *extra])
    err = capsys.readouterr().err
    assert rc == 1 and (f"--policies takes no {word}" in err
                        or f"--policies takes one {word} value" in err), err


@pytest.mark.parametrize("extra", [["--policies", "ondemand", "expertflow"],
                                   ["--cache", "25%", "50%"]])
def test_space_separated_lists_are_named_as_such(tiny_gguf, capsys, extra):
    """benchmarks/policies.py takes `--cache 25% 50%`; bench takes llama-bench's commas.
    The second value was "unrecognized arguments: 50%" and no more; the error says how."""
    with pytest.raises(SystemExit) as info:
        main(["bench", str(tiny_gguf("qwen3moe", "F32")), *extra])
    err = capsys.readouterr().err
    assert info.value.code == 2
    assert f"unrecognized arguments: {extra[-1]} (efedge bench takes lists " \
           "comma-separated" in err, err


def test_other_commands_keep_argparses_error(capsys):
    """An unknown flag is named under the command's own usage, as a bad value of one of
    its flags is (the README's promise): it came under `usage: efedge [-h] … COMMAND`."""
    with pytest.raises(SystemExit) as info:
        main(["run", "--no-such-flag"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.rstrip().endswith(
        "efedge run: error: unrecognized arguments: --no-such-flag"), err
    assert err.startswith("usage: efedge run "), err
    with pytest.raises(SystemExit) as info:  # before any command: the top usage
        main(["--no-such-flag"])
    err = capsys.readouterr().err
    assert err.rstrip().endswith("efedge: error: unrecognized arguments: --no-such-flag")


def test_negative_seed_is_a_flag_error(tiny_gguf, capsys):
    """--seed seeds the random token ids: numpy refuses a negative one, which was a
    ValueError traceback after the model had loaded."""
    with pytest.raises(SystemExit) as info:
        main(["bench", str(tiny_gguf("qwen3moe", "F32")), "-p", "8", "-n", "4", "-r", "1",
              "--seed", "-1"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "Traceback" not in err
    assert "--seed: expected a non-negative integer, got -1" in err, err


def _torch_cpu_as_cuda(monkeypatch):
    """device="cuda" served by the GPU model on torch's CPU device: the same code but
    the kernels, so the bench's device path runs on a machine without a GPU."""
    pytest.importorskip("torch")
    import efedge.gpu as gpu

    real = gpu.load_cuda_model
    monkeypatch.setattr(gpu, "load_cuda_model",
                        lambda *a, **kw: real(*a, **{**kw, "device": "cpu"}))


def test_device_rows_report_the_backend_and_device_memory(tiny_gguf, capsys, monkeypatch):
    _torch_cpu_as_cuda(monkeypatch)
    path = tiny_gguf("qwen3moe", "F32")
    rows = json.loads(_run(capsys, path, "-p", 8, "-n", 4, "-r", 1, "--device", "cuda",
                           "--cache", "50%", "--json"))
    assert [r["test"] for r in rows] == ["pp8", "tg4"]
    for r in rows:
        assert r["backends"] == "CUDA" and r["vram_used_bytes"] > 0
        assert r["cache"] == "50%" and 0.0 <= r["hit_rate"] <= 1.0
    table = _run(capsys, path, "-p", 0, "-n", 4, "-r", 1, "--device", "cuda")
    heads = [c.strip() for c in table.splitlines()[0].strip("|").split("|")]
    assert heads[-1] == "VRAM" and "| CUDA " in table
    doc = json.loads(_run(capsys, path, "--policies", "ondemand,expertflow", "--cache", "50%",
                          "--link", "500MB/s", "-p", 8, "-n", 6, "-r", 1, "--device", "cuda",
                          "--json"))
    assert [r["policy"] for r in doc["rows"]] == ["ondemand", "expertflow"]


def test_device_errors_are_named(tiny_gguf, capsys):
    path = str(tiny_gguf("qwen3moe", "F32"))
    import torch

    if not torch.cuda.is_available():
        assert main(["bench", path, "-p", "4", "-n", "0", "-r", "1", "--device", "cuda"]) == 1
        assert "needs an NVIDIA GPU" in capsys.readouterr().err
    assert main(["bench", path, "-p", "4", "-n", "0", "-r", "1", "--vram", "1GB"]) == 1
    assert "device='cuda'" in capsys.readouterr().err
    assert main(["bench", path, "--policies", "ondemand", "--device", "cuda"]) == 1
    assert "explicit --link" in capsys.readouterr().err


# A stand-in for the llama.cpp child: it dies by SIGSEGV at its first command unless
# started with its plain CPU kernels (the last argument), as llama.cpp's AMX path does.
_CRASHING_WORKER = r"""
import json, os, signal, sys
args = json.loads(sys.argv[1])
plain = args[-1]
print(json.dumps({"load_s": 0.0, "gpu": False, "args": args}), flush=True)
for line in sys.stdin:
    kind, toks = json.loads(line)
    if kind == "quit":
        break
    if not plain:
        os.kill(os.getpid(), signal.SIG%s)
    print(json.dumps({"ns": 1000 + len(toks)}), flush=True)
"""


@pytest.mark.skipif(not hasattr(__import__("signal"), "SIGKILL"), reason="POSIX signals")
def test_llama_crash_is_retried_once_with_plain_kernels(monkeypatch, capsys):
    """A llama.cpp child killed by a crash signal (SIGSEGV in its AMX matmul) is started
    again with its plain CPU kernels, and the call it died in is made again; the row
    says which kernels ran."""
    from efedge.cli import bench_llama

    monkeypatch.setattr(bench_llama, "_LLAMA_WORKER", _CRASHING_WORKER % "SEGV")
    ref = bench_llama._Llama("model.gguf", 2, 64, 32)
    try:
        assert not ref.plain and ref.backend == "llama.cpp CPU"
        assert ref.pp([1, 2, 3]) == 1003
        assert ref.plain and ref.backend == "llama.cpp CPU, plain CPU kernels"
        assert ref.tg([1]) == 1001
    finally:
        ref.close()
    assert "llama.cpp crashed (SIGSEGV)" in capsys.readouterr().err


def test_llama_killed_otherwise_is_an_error_not_a_retry(monkeypatch):
    """Only crash signals are retried: a child killed from outside (SIGKILL, e.g. the
    OOM killer) is an error naming its exit code."""
    from efedge.cli import bench_llama
    from efedge.errors import EfedgeError

    monkeypatch.setattr(bench_llama, "_LLAMA_WORKER", _CRASHING_WORKER % "KILL")
    ref = bench_llama._Llama("model.gguf", 2, 64, 32)
    try:
        with pytest.raises(EfedgeError, match=r"llama.cpp process ended \(killed by SIGKILL\)"):
            ref.pp([1, 2, 3])
        assert not ref.plain
    finally:
        ref.close()


def test_policy_hooks_benchmark_times_every_layers_hooks(capsys):
    """benchmarks/policy_hooks.py (a script): each policy's hooks are timed in place, one
    on_route per layer and token, the predictor's steps and the engine's calls with it."""
    from conftest import load_benchmark

    mod = load_benchmark("policy_hooks")
    assert mod.main(["-n", "4", "--rounds", "2", "--link", "2GB/s", "--cache", "40%",
                     "--policy", "expertflow", "ondemand", "--json"]) == 0
    runs = {r["policy"]: r for r in json.loads(capsys.readouterr().out)}
    assert runs.keys() == {"expertflow", "ondemand"}
    n_layer = 5  # the demo model's
    for policy, cls in (("expertflow", "ExpertFlow"), ("ondemand", "OnDemandLRU")):
        r = runs[policy]
        hooks = {h["hook"]: h for h in r["hooks"]}
        assert r["decode_ms_per_token"] > 0
        assert hooks[f"{cls}.on_route"]["calls_per_token"] == n_layer
        assert hooks[f"{cls}.on_pass"]["calls_per_token"] == 1
        assert all(h["us_per_token"] >= 0 for h in r["hooks"])
    ef = {h["hook"]: h for h in runs["expertflow"]["hooks"]}
    # a step per routed layer, on this thread or posted to a helper
    steps = sum(ef.get(f"HybridPredictor.{k}", {"calls_per_token": 0})["calls_per_token"]
                for k in ("step", "post_step"))
    assert steps == n_layer
    assert ef["StreamingExperts._classify"]["calls_per_token"] > 0
    # through an emulated link the compute thread queues and copies the prefetches itself:
    # the queue and the engine's copies are timed apart from the policy's own work
    assert ef["InlinePrefetches.add"]["calls_per_token"] > 0
    assert any(k.endswith(".copy_inline") and h["calls_per_token"] > 0 for k, h in ef.items())
    mod.main(["-n", "2", "--rounds", "1", "--link", "2GB/s", "--cache", "40%"])
    assert "ExpertFlow.on_route" in capsys.readouterr().out


def test_the_auto_link_takes_the_fastest_resident_run(tiny_gguf, monkeypatch):
    """--link auto: one expert loads in one layer's resident compute, and 4× slower. The
    compute is the fastest of the resident runs (noise only slows a run: a slowed one
    chose a link a third too slow)."""
    import numpy as np

    import efedge
    from efedge import policy_compare

    path = tiny_gguf("qwen3moe")
    walls = iter([9.0, 0.30, 0.10, 0.20])  # the warm-up, then three measured runs

    def fake_run(m, ids, n, decoding=None):
        return {"wall_s": next(walls), "tokens_generated": n}, 0.0, 0.0

    monkeypatch.setattr(policy_compare, "decode_run", fake_run)
    links, info = policy_compare.auto_links(path, list(range(5, 40)), 10, runs=3)
    with efedge.load(path) as m:
        n_layer = m.config.n_layer
        per_expert = float(np.mean([m._tf.store.expert_bytes(i) for i in range(n_layer)]))
    layer_s = 0.10 / 10 / n_layer  # the fastest run
    assert info["layer_ms"] == pytest.approx(1e3 * layer_s)
    assert links == [f"{per_expert / layer_s / 1e6:.1f}MB/s",
                     f"{per_expert / layer_s / 4e6:.1f}MB/s"]
    assert next(walls, None) is None  # every run was made


def test_simulate_vs_live_measures_compute_with_every_expert_in(tiny_gguf):
    """benchmarks/simulate_vs_live.py's resident compute: every expert is loaded before
    the timed window, so no first touch (a load from the file) is timed as compute — with
    8 warm-up tokens only, the demo model's layers read 0.20-0.22 ms instead of 0.08 and
    the simulator was given compute the live run never had. All layers then take the
    fused all-resident call: the time per expert comes from the live run instead."""
    from conftest import load_benchmark

    import efedge

    mod = load_benchmark("simulate_vs_live")
    path = tiny_gguf("qwen3moe")
    with efedge.load(path) as m:
        ids = m.tokenize("def f(x):\n    return x * 2\n" * 8)[:64]
    assert len(ids) >= 60
    t_layer, t_expert = mod.measure_compute(path, ids)
    assert t_layer > 0
    assert t_expert == 0.0  # no layer streamed an expert: all were in before the window


def test_policies_table_runs_every_policy_at_one_thread_count(tiny_gguf, capsys):
    """bench --policies compares the policies at one compute-thread count: without -t,
    the one expertflow takes while experts stream (one core fewer), for on-demand too;
    with -t, that."""
    import numba

    from efedge.policy_compare import comparison_threads

    path = tiny_gguf("qwen3moe", "Q4_K_M")
    args = ("--policies", "ondemand,expertflow", "--cache", "30%", "--link", "500MB/s",
            "-p", 8, "-n", 6, "--json")
    rows = json.loads(_run(capsys, path, *args))["rows"]
    want = comparison_threads(["ondemand", "expertflow"]) or numba.config.NUMBA_NUM_THREADS
    assert [r["threads"] for r in rows] == [want, want]
    rows = json.loads(_run(capsys, path, *args, "-t", 1))["rows"]
    assert [r["threads"] for r in rows] == [1, 1]
