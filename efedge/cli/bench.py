"""`efedge bench [MODEL]`: prompt-processing and generation speed, after llama-bench.

    efedge bench model.gguf -p 512 -n 128 -r 5 -t 2 --vs-llama-cpp

Every flag takes several values (``-p 128,512 -t 1,2 --cache 25%,100% --policy
ondemand,expertflow``); each combination is one row per test. ``ppN`` processes an
N-token prompt from an empty context (one batch, only the last logits); ``tgN``
generates N tokens one at a time from an empty context, as llama-bench does. Each test
runs once to warm up, then ``-r`` times; t/s is the mean ± sample standard deviation of
the repetitions.

``--vs-llama-cpp`` runs llama-cpp-python on the same file with the same thread count in
the same run, alternating with efedge repetition by repetition (so both see the same
machine load), and prints the ratio efedge / llama.cpp per test. llama.cpp runs in a
child process with the environment as the user left it (efedge's OpenMP setting would
otherwise apply to it too).

The table has llama-bench's columns plus ours: the expert cache budget, its policy, the
emulated link, stall time per token and the expert-cache hit rate. ``--json`` prints a
JSON array with llama-bench's field names (model_type, model_size, model_n_params,
n_threads, n_prompt, n_gen, avg_ns, stddev_ns, avg_ts, stddev_ts, samples_ns, samples_ts
…) and ours. Start-up is reported too: mapping the file, then bringing the numba kernels
up (compiled on a first run, loaded from numba's cache later).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np

from efedge import __version__
from efedge.cli.bench_llama import _Llama
from efedge.cli.common import add_host_tier_args, model_arg, non_negative_int, user_path
from efedge.errors import EfedgeError

# llama.cpp's names for general.file_type (llama_model_ftype_name)
FTYPES = {0: "all F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1",
          10: "Q2_K - Medium", 11: "Q3_K - Small", 12: "Q3_K - Medium", 13: "Q3_K - Large",
          14: "Q4_K - Small", 15: "Q4_K - Medium", 16: "Q5_K - Small", 17: "Q5_K - Medium",
          18: "Q6_K", 21: "Q2_K - Small", 25: "IQ4_NL - 4.5 bpw", 30: "IQ4_XS - 4.25 bpw",
          32: "BF16", 19: "IQ2_XXS - 2.0625 bpw", 20: "IQ2_XS - 2.3125 bpw",
          22: "IQ3_XS - 3.3 bpw", 23: "IQ3_XXS - 3.0625 bpw", 24: "IQ1_S - 1.5625 bpw",
          26: "IQ3_S - 3.4375 bpw", 27: "IQ3_S mix - 3.66 bpw", 28: "IQ2_S - 2.5 bpw",
          29: "IQ2_M - 2.7 bpw", 31: "IQ1_M - 1.75 bpw", 36: "TQ1_0 - 1.69 bpw ternary",
          37: "TQ2_0 - 2.06 bpw ternary"}


def _ints(text: str, low: int = 0) -> list[int]:
    try:
        vals = [int(v) for v in str(text).split(",") if v.strip() != ""]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") \
            from None
    if not vals or any(v < low for v in vals):
        what = "non-negative" if low == 0 else f"≥ {low}"
        raise argparse.ArgumentTypeError(f"expected integers {what}, got {text!r}")
    return vals


def _positive_ints(text: str) -> list[int]:
    """-t: 0 threads is not "none", and efedge.load refuses it."""
    return _ints(text, 1)


def _strs(text: str) -> list[str | None]:
    return [None if v.strip().lower() in ("", "none", "-") else v.strip()
            for v in str(text).split(",")]


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="measure prompt and generation speed (llama-bench style)",
                       description=__doc__.split("\n\n")[1],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", default=None,
                   help="GGUF model file (default: the embedded demo model)")
    p.add_argument("-m", "--model", dest="model_flag", default=None, help=argparse.SUPPRESS)
    p.add_argument("-p", "--n-prompt", type=_ints, default=None,
                   help="prompt lengths (default 512, with --policies 32; 0 skips the pp "
                        "test)")
    p.add_argument("-n", "--n-gen", type=_ints, default=None,
                   help="tokens to generate (default 128; 0 skips the tg test)")
    p.add_argument("-r", "--repetitions", type=int, default=None,
                   help="repetitions (default 5; with --policies 3)")
    p.add_argument("-t", "--threads", type=_positive_ints, default=None,
                   help="compute threads (default: every core; one fewer where expertflow "
                   "streams experts, leaving its predictor's helper a core)")
    p.add_argument("--cache", type=_strs, default=[None],
                   help="expert cache budgets (default: all experts resident)")
    p.add_argument("--policy", type=_strs, default=["expertflow"], help="cache policies")
    p.add_argument("--link", type=_strs, default=[None], help="emulated links, e.g. 8GB/s")
    p.add_argument("--policies", type=_strs, default=None, metavar="P1,P2,…",
                   help="compare cache policies instead (e.g. ondemand,next-layer,fixed:2,"
                        "expertflow): live runs of each on the same held-out text, budget "
                        "(--cache, default 50%%) and emulated link (--link; 'auto' = one "
                        "expert loads in one layer's compute); -p prompt tokens (default 32), "
                        "-n decoded tokens (default 128), -r runs (default 3, median)")
    p.add_argument("--device", default="cpu",
                   help="cpu (default), or cuda / cuda:N: non-expert weights and the expert "
                        "cache in VRAM (the table adds the device memory used)")
    p.add_argument("--vram", default=None,
                   help="device memory budget with --device cuda, e.g. 8GB (an emulated "
                        "laptop GPU on a larger one)")
    add_host_tier_args(p)  # (the table then adds the host hit rate)
    p.add_argument("--vs-llama-cpp", action="store_true",
                   help="run llama-cpp-python side by side and print the ratio per test "
                        "(with --device cuda: every layer offloaded, if its build can)")
    p.add_argument("--llama-cpu-moe", action="store_true",
                   help="with --vs-llama-cpp: llama.cpp keeps every expert tensor in host "
                        "memory and computes it on the CPU, the rest offloaded (its "
                        "--cpu-moe; the configuration llama.cpp users run when the experts "
                        "do not fit in VRAM)")
    # numpy's generator takes no negative seed (that was a ValueError traceback)
    p.add_argument("--seed", type=non_negative_int, default=0,
                   help="seed of the random token ids (default 0)")
    p.add_argument("--json", action="store_true", help="print a JSON array instead of a table")
    p.set_defaults(func=main)


# -- measurement ----------------------------------------------------------------------------

def _time(fn: Callable[[], None]) -> int:
    t0 = time.perf_counter_ns()
    fn()
    return time.perf_counter_ns() - t0


class _Efedge:
    """efedge through its Session (the API's prefill / decode path)."""

    def __init__(self, path, threads, cache, policy, link, n_ctx, device="cpu", vram=None,
                 host_cache=None, disk_link=None):
        import efedge
        from efedge.kernels import compile_stats

        before = compile_stats()
        t0 = time.perf_counter()
        self.model = efedge.load(path, threads=threads, cache=cache, policy=policy, link=link,
                                 n_ctx=n_ctx, device=device, vram=vram, host_cache=host_cache,
                                 disk_link=disk_link)
        self.load_s = time.perf_counter() - t0  # includes the kernel warm-up
        self.warmup_s = getattr(self.model._tf, "warmup_s", 0.0)  # the CPU model's
        after = compile_stats()
        self.kernels_compiled = after[0] - before[0]
        self.kernels_cached = after[1] - before[1]
        self.session = self.model._session

    def pp(self, toks):
        self.session.reset()
        self.session.prefill(toks)

    def tg(self, toks):
        s = self.session
        s.reset()
        for t in toks:
            s.decode(t)

    def close(self):
        self.model.close()


def _stats(samples_ns: list[int], n_tok: int) -> dict:
    ts = [n_tok * 1e9 / ns for ns in samples_ns]
    return {"avg_ns": int(statistics.fmean(samples_ns)),
            "stddev_ns": int(statistics.stdev(samples_ns)) if len(samples_ns) > 1 else 0,
            "avg_ts": statistics.fmean(ts),
            "stddev_ts": statistics.stdev(ts) if len(ts) > 1 else 0.0,
            "samples_ns": samples_ns, "samples_ts": ts}


def _model_info(path) -> dict:
    from efedge.gguf_file import GGUFFile

    gf = GGUFFile(path)
    try:
        n_params = sum(int(np.prod(t.shape, dtype=np.int64)) for t in gf.tensors.values())
        size = sum(t.nbytes for t in gf.tensors.values())
        ft = gf.get("general.file_type")
        ftype = FTYPES.get(ft, f"ftype {ft}" if ft is not None else "?")
        arch = gf.get("general.architecture", "?")
        label = f"{n_params / 1e9:.1f}B" if n_params >= 1e9 else f"{n_params / 1e6:.0f}M"
        return {"model_filename": str(path), "model_type": f"{arch} {label} {ftype}",
                "model_size": size, "model_n_params": n_params}
    finally:
        gf.close()


def _run_config(path, info, threads, cache, policy, link, args, tests, rows, llamas) -> None:
    n_ctx = max(max(n for _, n in tests), 1) + 8
    device = getattr(args, "device", "cpu") or "cpu"
    eng = _Efedge(path, threads, cache, policy, link, n_ctx, device, getattr(args, "vram", None),
                  getattr(args, "host_cache", None), getattr(args, "disk_link", None))
    nt = eng.model.threads  # its compute threads (numba's count is per thread)
    rng = np.random.default_rng(args.seed)
    ref = None
    if args.vs_llama_cpp:
        key = nt
        if key not in llamas:
            n_batch = max([n for kind, n in tests if kind == "pp"] + [32])
            llamas[key] = _Llama(path, nt, n_ctx, n_batch, -1 if device != "cpu" else 0,
                                 cpu_moe=getattr(args, "llama_cpu_moe", False))
        ref = llamas[key]
    vocab = eng.model.n_vocab
    try:
        for kind, n in tests:
            toks = rng.integers(0, vocab, n).tolist()
            ours_run = partial(getattr(eng, kind), toks)
            ref_run = partial(getattr(ref, kind), toks) if ref is not None else None
            ours_run()  # warm-up, not timed
            if ref_run is not None:
                ref_run()
            eng.model.reset_stats()
            ours, theirs = [], []
            for _ in range(args.repetitions):
                ours.append(_time(ours_run))
                if ref_run is not None:
                    theirs.append(ref_run())  # timed in the llama.cpp process
            s = eng.model.stats()
            n_total = n * args.repetitions
            dev = s.get("device") or {}  # device="cuda": memory, link, hybrid misses
            row = {**info, "backends": "CUDA" if device != "cpu" else "CPU", "engine": "efedge",
                   "device": dev.get("device_name") or device,
                   "vram_used_bytes": _vram_used(dev), "efedge_version": __version__,
                   "cpu_info": platform.processor() or platform.machine(), "n_threads": nt,
                   "n_prompt": n if kind == "pp" else 0, "n_gen": n if kind == "tg" else 0,
                   "n_depth": 0, "type_k": "f16", "type_v": "f16",
                   "test": f"{kind}{n}", "test_time": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                    time.gmtime()),
                   "cache": cache, "policy": policy if cache else None, "link": link,
                   "stall_ms_per_token": 1e3 * s["stall_s"] / max(n_total, 1),
                   "hit_rate": s["hits"] / s["expert_requests"] if s["expert_requests"] else None,
                   **_host_fields(s, dev),
                   "load_s": eng.load_s, "warmup_s": eng.warmup_s,
                   "kernels_compiled": eng.kernels_compiled,
                   "kernels_cached": eng.kernels_cached, **_stats(ours, n)}
            if ref is not None:
                ll = {**row, "engine": "llama.cpp", "backends": ref.backend,
                      "experts_on_cpu": ref.experts_on_cpu,
                      "vram_used_bytes": None, "cache": None, "policy": None, "link": None,
                      "stall_ms_per_token": None,
                      "hit_rate": None, "load_s": ref.load_s, "warmup_s": None,
                      "kernels_compiled": None,
                      "kernels_cached": None, **_stats(theirs, n)}
                for k in HOST_FIELDS:  # efedge's host tier, not llama.cpp's
                    ll.pop(k, None)
                row["vs_llama_cpp"] = row["avg_ts"] / ll["avg_ts"]
                # per repetition, side by side: robust to load that drifts between pairs
                row["vs_llama_cpp_paired"] = statistics.median(
                    b / a for a, b in zip(ours, theirs, strict=True))
                rows.append(row)
                rows.append(ll)
            else:
                rows.append(row)
    finally:
        eng.close()


# -- output -------------------------------------------------------------------------------

HOST_FIELDS = ("host_cache_bytes", "disk_link", "host_hit_rate", "host_staged", "disk_bytes")


def _host_fields(s: dict, dev: dict) -> dict:
    """The host tier's figures for a row: none without one (the CPU path's rows and JSON
    stay as they were)."""
    if not dev.get("host_cache_bytes"):
        return {}
    from efedge.policy_compare import host_hit_rate

    return {"host_cache_bytes": dev["host_cache_bytes"], "disk_link": dev.get("disk_link"),
            "host_hit_rate": host_hit_rate(s),
            "host_staged": s["host_staged"], "disk_bytes": s["disk_bytes"]}


def _vram_used(dev: dict) -> int | None:
    """Device memory efedge holds: the peak it allocated on a GPU, else (torch's CPU
    device, tests) what its budget accounts for; None on the CPU path."""
    if not dev:
        return None
    peak = dev.get("vram_peak_allocated_bytes")
    if peak is not None:
        return int(peak)
    parts = dev.get("vram") or {}
    return int(sum(v for k, v in parts.items()
                   if k.endswith("_bytes") and k not in ("budget_bytes", "reserve_bytes")
                   and isinstance(v, int | float)))


def _fmt_size(b: int) -> str:
    return f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.2f} MiB"


def _fmt_params(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"


def _link_cell(link: str | None) -> str:
    """A row's link as the table shows it: the copies' speed there is the emulated link's
    (the README's promise: emulated links are labelled so wherever they show)."""
    return "-" if link is None else f"{link} (emulated)"


def table(rows: list[dict]) -> str:
    heads = ["model", "size", "params", "backend", "threads", "test", "t/s", "cache", "policy",
             "link", "stall ms/token", "hit rate"]
    vram = any(r.get("vram_used_bytes") is not None for r in rows)
    if vram:
        heads.append("VRAM")
    host = any("host_hit_rate" in r for r in rows)
    if host:  # of the copies into VRAM, the share found in the pinned host tier
        heads.append("host hit rate")
    ratio = any("vs_llama_cpp" in r for r in rows)
    if ratio:
        heads.append("vs llama.cpp")
    right = {"size", "params", "threads", "test", "t/s", "stall ms/token", "hit rate",
             "VRAM", "host hit rate", "vs llama.cpp"}
    lines = []
    for r in rows:
        ours = r["engine"] == "efedge"
        cells = [r["model_type"], _fmt_size(r["model_size"]), _fmt_params(r["model_n_params"]),
                 r["backends"], str(r["n_threads"]), r["test"],
                 f"{r['avg_ts']:.2f} ± {r['stddev_ts']:.2f}",
                 (r["cache"] or "all") if ours else "-", r["policy"] or "-",
                 _link_cell(r["link"]),
                 f"{r['stall_ms_per_token']:.3f}" if ours else "-",
                 f"{r['hit_rate']:.3f}" if r.get("hit_rate") is not None else "-"]
        if vram:
            v = r.get("vram_used_bytes")
            cells.append(_fmt_size(v) if v is not None else "-")
        if host:
            h = r.get("host_hit_rate")
            cells.append(f"{h:.3f}" if h is not None else "-")
        if ratio:
            cells.append(f"{r['vs_llama_cpp']:.2f}x" if "vs_llama_cpp" in r else "")
        lines.append(cells)
    widths = [max(len(h), *(len(c[i]) for c in lines)) for i, h in enumerate(heads)]
    out = ["| " + " | ".join(h.ljust(w) if h not in right else h.rjust(w)
                             for h, w in zip(heads, widths, strict=True)) + " |",
           "| " + " | ".join(("-" * (w - 1) + ":") if h in right else "-" * w
                             for h, w in zip(heads, widths, strict=True)) + " |"]
    for cells in lines:
        out.append("| " + " | ".join(c.rjust(w) if h in right else c.ljust(w)
                                     for c, h, w in zip(cells, heads, widths, strict=True)) + " |")
    return "\n".join(out)


def main(args: argparse.Namespace) -> int:
    from efedge import demo

    model = model_arg(args)
    path = user_path(model) if model else demo.demo_model_path()
    if args.repetitions is not None and args.repetitions < 1:
        raise EfedgeError("-r must be at least 1")
    if args.policies is not None:
        return _compare_policies(path, args)
    args.repetitions = args.repetitions or 5
    args.n_prompt, args.n_gen = args.n_prompt or [512], args.n_gen or [128]
    tests = [("pp", n) for n in args.n_prompt if n > 0] + [("tg", n) for n in args.n_gen if n > 0]
    if not tests:
        raise EfedgeError("nothing to run: every -p and -n value is 0")
    if getattr(args, "llama_cpu_moe", False) and not args.vs_llama_cpp:
        raise EfedgeError("--llama-cpu-moe sets up the llama.cpp side: add --vs-llama-cpp")
    info = _model_info(path)
    rows: list[dict] = []
    llamas: dict = {}
    try:
        for threads in args.threads or [None]:
            for cache in args.cache:
                # all experts resident: no policy and no link (link= needs a cache), one
                # row however many --policy / --link values the cached rows take
                for policy in (args.policy if cache else [args.policy[0]]):
                    for link in (args.link if cache else [None]):
                        _run_config(path, info, threads, cache, policy, link, args, tests, rows,
                                    llamas)
    finally:
        for ll in llamas.values():
            ll.close()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(table(rows))
    seen = set()
    for r in rows:
        if r["engine"] != "efedge":
            continue
        key = (r["n_threads"], r["cache"], r["policy"], r["link"])
        if key not in seen:
            seen.add(key)
            how = (f"{r['kernels_compiled']} kernels compiled (first run)"
                   if r["kernels_compiled"] else f"{r['kernels_cached']} kernels from cache")
            print(f"\nstart-up ({r['n_threads']} threads, cache {r['cache'] or 'all'}): load "
                  f"{r['load_s']:.2f} s = map + metadata "
                  f"{r['load_s'] - r['warmup_s']:.2f} s + kernel warm-up {r['warmup_s']:.2f} s "
                  f"({how})", file=sys.stderr)
    for r in rows:
        if "vs_llama_cpp" in r:
            print(f"{r['test']} t={r['n_threads']} cache={r['cache'] or 'all'}: "
                  f"efedge / llama.cpp = "
                  f"{r['vs_llama_cpp']:.2f} (median of paired repetitions "
                  f"{r['vs_llama_cpp_paired']:.2f})")
    return 0


def _compare_policies(path: Path, args: argparse.Namespace) -> int:
    """`bench --policies`: the scheduler comparison table (efedge/policy_compare.py)."""
    import efedge
    from efedge.policy_compare import (
        auto_links,
        compare_policies,
        comparison_threads,
        format_bounds,
        format_table,
        heldout_ids,
        median_rows,
    )

    policies = [p for p in args.policies if p]
    if not policies:
        raise EfedgeError("--policies needs at least one policy name")
    # one held-out passage, one thread count: further values were dropped without a word
    for flag, values in (("-p", args.n_prompt), ("-n", args.n_gen), ("-t", args.threads)):
        if values is not None and len(values) > 1:
            raise EfedgeError(f"--policies takes one {flag} value, got "
                              f"{','.join(map(str, values))}")
    if args.vs_llama_cpp or getattr(args, "llama_cpu_moe", False):
        raise EfedgeError("--policies takes no --vs-llama-cpp (llama.cpp has no expert cache "
                          "policy to compare): run the two apart")
    from efedge.experts.scheduler import make_policy

    for name in policies:
        make_policy(name)  # an unknown name fails here, before any run
    # unless given, a shorter held-out passage than llama-bench's 512 / 128
    n_prompt = (args.n_prompt or [32])[0]
    n_gen = (args.n_gen or [128])[0]
    if n_prompt < 1 or n_gen < 1:
        raise EfedgeError("--policies needs -p ≥ 1 prompt token and -n ≥ 1 decoded token")
    caches = [c for c in args.cache if c] or ["50%"]
    device = getattr(args, "device", "cpu") or "cpu"
    # one count for every row and for the auto link's resident runs: -t, else what
    # expertflow takes by default while experts stream (one core fewer than the machine's)
    threads = comparison_threads(policies, (args.threads or [None])[0], device)
    # the median of three runs of 128 tokens (~8 s for two policies on the demo model): one
    # run of 64 read expertflow's stall at 30-110% of on-demand's on the same machine and
    # link, the predictor's first tokens and the machine's noise in every figure
    runs = args.repetitions or 3
    with efedge.load(path, threads=threads) as m:
        if not m.config.is_moe:
            raise EfedgeError(f"{path.name} has no routed experts: nothing to compare")
        if n_prompt + n_gen > m.n_ctx:  # (each run prefills -p, then decodes -n)
            raise EfedgeError(f"-p {n_prompt} + -n {n_gen} tokens do not fit the model's "
                              f"context of {m.n_ctx} tokens: use a smaller -p or -n")
        ids = heldout_ids(m, n_prompt + n_gen)
    links, info = [lk for lk in args.link if lk], {}
    if (not links or links == ["auto"]) and device != "cpu":
        raise EfedgeError("--policies with --device cuda needs an explicit --link (the auto "
                          "link is measured from the CPU's layer compute)")
    if not links or links == ["auto"]:
        links, info = auto_links(path, ids, n_gen, threads)
        links = links[:1]
    rows = []
    for link in links:
        for cache in caches:
            rows += median_rows([compare_policies(path, policies, cache, link, ids, n_gen,
                                                  threads=threads, device=device,
                                                  vram=getattr(args, "vram", None),
                                                  host_cache=getattr(args, "host_cache", None),
                                                  disk_link=getattr(args, "disk_link", None),
                                                  reverse=r % 2 == 1)
                                 for r in range(runs)])
    if args.json:
        for r in rows:
            r.pop("stats", None)
        print(json.dumps({"model": str(path), "n_prompt": n_prompt, "n_gen": n_gen,
                          "auto_link": info, "rows": rows}, indent=2, default=str))
        return 0
    print(f"model: {path.name}   held-out text: {n_prompt} prompt + {n_gen} decoded tokens "
          f"(teacher-forced)   links emulated; {runs} run(s) per setting, median; "
          f"{rows[0]['threads'] if rows else '-'} compute thread(s)")
    if info:
        print(f"auto link: one {info['expert_kib']:.1f} KiB expert loads in one layer's "
              f"resident decode compute ({info['layer_ms']:.3f} ms)")
    if any(r.get("predictor_thread") for r in rows):
        gave_up = sum(r.get("predictor_thread_fallbacks", 0) for r in rows)
        print("expertflow's predictor: on a helper thread (a core is spare beside the "
              "compute threads; EFEDGE_PREDICTOR_THREAD=0 keeps it on the compute thread)"
              + (f"; taken back {gave_up} time(s), waiting for it cost more than the step"
                 if gave_up else ""))
    print(format_table(rows))
    bounds = format_bounds(rows)
    if bounds:
        print(bounds)
    if any(r.get("copy_ms_per_token", 0.0) > 0 for r in rows):
        print("copies ms/token: the compute thread's own copies through the emulated link "
              "(compute time the link's time overlaps, not stall; a DMA copy engine would "
              "not spend it: docs/scheduler.md §6)")
    return 0
