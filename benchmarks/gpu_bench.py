"""GPU benchmark and parity check (issue: the GPU expert cache). Not a test — run by hand
or from scripts/gpu_check.sh:

    python benchmarks/gpu_bench.py [MODEL] --parity --bench --json out.json --text out.txt

MODEL: a GGUF file; default the demo model (efedge/data/demo.gguf) when it exists, else a
generated qwen3moe (64 experts, 8 active, "small" preset, F16; llama.cpp's quantizer is
not needed).

--parity  the device path against efedge's CPU path on the same file: cosine of the logits
          per position (≥ 0.999 wanted), argmax agreement, and the greedy continuation,
          for every expert resident, streaming (ondemand) and expertflow + hybrid misses.
--bench   an emulated laptop (efedge.gpu.emulate.laptop_setup: the share of experts an
          RTX 4060 Laptop 8 GB keeps of Qwen3-30B-A3B, and a link on which one of this
          model's experts takes as long as one of Qwen3-30B-A3B's on PCIe 4.0 x8; VRAM
          budget 8 GB) for each policy × hybrid setting, plus every expert resident.
          Or give --cache / --link / --vram yourself. Reports prefill and decode tokens/s,
          stall (total and per decoded token), hits / late / misses, bytes moved, peak
          device memory, hybrid decisions, and stall(policy) / stall(ondemand).
--vs-cpu  adds efedge's CPU path (all experts resident) on the same prompt.
--vs-llama-cpp adds llama-cpp-python on the same file when it is installed: CPU-only and,
          if its build offloads, all layers on the GPU. Its high-level API (0.3.x) has no
          tensor overrides, so llama.cpp's experts-on-CPU configuration (-ot exps=CPU /
          --n-cpu-moe) cannot be run from here; the report says so.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PROMPT = ("import os\nimport sys\n\n\ndef read_config(path):\n    \"\"\"Read a config file "
          "and return a dict of its settings.\"\"\"\n    result = {}\n    with open(path) as f:\n"
          "        for line in f:\n            line = line.strip()\n")


def default_model(workdir: Path) -> Path:
    from efedge.demo import DEMO_MODEL

    if DEMO_MODEL.exists():
        return DEMO_MODEL
    from gguf_tools.make_tiny import write_tiny

    path = workdir / "qwen3moe-small-e64-F16.gguf"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_tiny(path, "qwen3moe", "F16", preset="small", n_expert=64, n_expert_used=8)
    return path


def prompt_ids(path: Path, n: int | None) -> list[int]:
    from efedge.gguf_file import GGUFFile
    from efedge.tokenizer import Tokenizer

    gf = GGUFFile(path)
    try:
        ids = Tokenizer.from_metadata(gf.metadata).encode(PROMPT, add_special=True)
    except Exception:  # a file without a usable tokenizer: fixed pseudo-random ids
        vocab = int(gf.get(f"{gf.get('general.architecture')}.vocab_size", 0) or 256)
        ids = np.random.default_rng(0).integers(0, min(vocab, 500), 48).tolist()
    finally:
        gf.close()
    return ids[:n] if n else ids


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


# -- parity --------------------------------------------------------------------------------

def cpu_reference(path: Path, ids: list[int], n_gen: int) -> tuple[np.ndarray, list[int]]:
    import efedge
    from efedge.generate import GenerationResult

    with efedge.load(path, n_ctx=len(ids) + n_gen + 8) as m:
        logits = m.logits(ids)
        res = GenerationResult([], "length")
        "".join(m.stream(ids, max_tokens=n_gen, temperature=0, result=res))
    return logits, res.tokens


def parity(path: Path, device: str, ids: list[int], n_gen: int, setup: dict) -> dict:
    from efedge.gpu import load_cuda_model

    ref, ref_toks = cpu_reference(path, ids, n_gen)
    out = {"model": str(path), "n_positions": len(ids), "greedy_tokens": n_gen, "runs": []}
    configs = [("resident", dict()),
               ("ondemand", dict(cache=setup["cache"], link=setup["link"], policy="ondemand",
                                 hybrid="off")),
               ("expertflow+hybrid", dict(cache=setup["cache"], link=setup["link"],
                                          policy=setup["policy_best"], hybrid="auto"))]
    for name, kw in configs:
        with load_cuda_model(path, device=device, n_ctx=len(ids) + n_gen + 8, **kw) as g:
            logits = g.forward(ids, 0, g.new_kv_cache(len(ids)))
            toks = g.generate_greedy(ids, len(ref_toks))
        cos = _cos(logits, ref)
        first = next((i for i, (a, b) in enumerate(zip(toks, ref_toks, strict=False))
                      if a != b), None)
        out["runs"].append({
            "config": name, "cos_min": float(cos.min()), "cos_median": float(np.median(cos)),
            "frac_cos_ge_0999": float((cos >= 0.999).mean()),
            "argmax_agree": float((logits.argmax(-1) == ref.argmax(-1)).mean()),
            "greedy_equal": toks == ref_toks, "first_divergence": first,
            "ok": bool(cos.min() >= 0.999 and toks == ref_toks)})
    out["ok"] = all(r["ok"] for r in out["runs"])
    return out


# -- benchmark -----------------------------------------------------------------------------

def run_gen(g, ids: list[int], n_gen: int) -> dict:
    """Prefill `ids`, then n_gen greedy decode steps; counters split by phase."""
    from efedge.generate import Session

    c = g.counters
    sess = Session(g.forward, g.new_kv_cache(len(ids) + n_gen + 1), c)
    c.reset()
    h0 = g.extra_stats()
    logits = sess.prefill(ids)
    pre = c.as_dict()
    toks = []
    for _ in range(n_gen):
        tok = int(np.argmax(logits))
        toks.append(tok)
        logits = sess.decode(tok)
    post = c.as_dict()
    h1 = g.extra_stats()
    dec = {k: post[k] - pre[k] for k in ("stall_s", "hits", "late", "misses", "bytes_loaded",
                                          "expert_requests", "prefetch_issued",
                                          "prefetch_used", "prefetch_wasted")}
    return {
        "prompt_tokens": len(ids), "gen_tokens": n_gen,
        "prefill_tok_s": len(ids) / max(post["prompt_s"], 1e-9),
        "decode_tok_s": n_gen / max(post["decode_s"], 1e-9),
        "stall_s": post["stall_s"], "decode_stall_s": dec["stall_s"],
        "decode_stall_ms_per_token": 1e3 * dec["stall_s"] / max(n_gen, 1),
        "decode_hit_rate": dec["hits"] / max(dec["expert_requests"], 1),
        "decode": dec, "counters": post, "tokens": toks,
        "hybrid_cpu_experts": h1.get("hybrid_cpu_experts", 0) - h0.get("hybrid_cpu_experts", 0),
        "vram_peak_allocated_bytes": h1.get("vram_peak_allocated_bytes"),
        "vram": h1["vram"], "horizon_mean": post["horizon_mean"],
        "policy_overhead_s": h1.get("policy_overhead_s", 0.0),
    }


def bench(path: Path, device: str, ids: list[int], n_gen: int, setup: dict,
          policies: list[str], hybrids: list[str], workers: int) -> dict:
    from efedge.gpu import load_cuda_model

    warm = ids[:8]
    rows = []
    plan = [("resident", None, None, "off")]
    plan += [(f"{p}/hybrid={h}", p, setup["cache"], h) for p in policies for h in hybrids]
    for name, policy, cache, hybrid in plan:
        kw = dict(device=device, n_ctx=len(ids) + n_gen + 8, hybrid=hybrid, workers=workers)
        if policy is not None:
            kw.update(cache=cache, link=setup["link"], vram=setup["vram"], policy=policy)
        t0 = time.perf_counter()
        with load_cuda_model(path, **kw) as g:
            load_s = time.perf_counter() - t0
            run_gen(g, warm[::-1], 2)  # compile / first-touch work, not this prompt's experts
            r = run_gen(g, ids, n_gen)
            r.update(config=name, policy=policy or "-", hybrid=hybrid, load_s=load_s,
                     cache_bytes=r["counters"]["cache_bytes"],
                     link=str(g.link) if g.link else "-",
                     bandwidth_gbps=r["counters"]["bandwidth_gbps"])
        rows.append(r)
    base = {r["hybrid"]: r for r in rows if r["policy"] == "ondemand"}
    for r in rows:
        b = base.get(r["hybrid"])
        if b is not None and r["policy"] != "-":
            r["stall_vs_ondemand"] = r["stall_s"] / max(b["stall_s"], 1e-12)
            r["decode_stall_vs_ondemand"] = r["decode_stall_s"] / max(b["decode_stall_s"], 1e-12)
    return {"model": str(path), "setup": {k: str(v) for k, v in setup.items()}, "rows": rows}


def vs_cpu(path: Path, ids: list[int], n_gen: int) -> dict:
    import efedge

    with efedge.load(path, n_ctx=len(ids) + n_gen + 8) as m:
        m.generate(ids[:8], max_tokens=2, temperature=0)
        m.reset_stats()
        m._session.reset()
        m.generate(ids, max_tokens=n_gen, temperature=0)
        s = m.stats()
    return {"config": "efedge CPU path, resident",
            "prefill_tok_s": s["tokens_prompt"] / max(s["prompt_s"], 1e-9),
            "decode_tok_s": s["tokens_generated"] / max(s["decode_s"], 1e-9)}


def vs_llama_cpp(path: Path, ids: list[int], n_gen: int) -> dict:
    try:
        import llama_cpp
    except Exception as e:  # not installed on the GPU machine
        return {"skipped": f"llama-cpp-python is not available ({type(e).__name__})"}
    out = {"note": "llama-cpp-python's Llama() has no tensor overrides: llama.cpp's "
                   "experts-on-CPU configuration (-ot exps=CPU, --n-cpu-moe) is not "
                   "reachable from it; shown are CPU-only and full offload", "runs": []}
    layers = [0] + ([-1] if llama_cpp.llama_supports_gpu_offload() else [])
    for ngl in layers:
        llm = llama_cpp.Llama(str(path), n_gpu_layers=ngl, n_ctx=len(ids) + n_gen + 8,
                              verbose=False)
        llm.eval(ids[:8])  # warm-up: graph allocation, first-touch
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids)
        t1 = time.perf_counter()
        for _ in range(n_gen):  # greedy on the last token's logits
            last = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))
            llm.eval([int(np.argmax(last))])
        t2 = time.perf_counter()
        out["runs"].append({"n_gpu_layers": ngl, "prefill_tok_s": len(ids) / (t1 - t0),
                            "decode_tok_s": n_gen / (t2 - t1)})
        llm.close()
    return out


# -- report --------------------------------------------------------------------------------

def text_report(res: dict) -> str:
    lines = []
    p = res.get("parity")
    if p:
        lines.append(f"PARITY {p['model']} ({p['n_positions']} positions, "
                     f"{p['greedy_tokens']} greedy tokens): {'OK' if p['ok'] else 'FAIL'}")
        for r in p["runs"]:
            lines.append(f"  {r['config']:<20} cos min {r['cos_min']:.6f} median "
                         f"{r['cos_median']:.6f} ≥0.999 {r['frac_cos_ge_0999']:.0%} argmax "
                         f"{r['argmax_agree']:.0%} greedy {'same' if r['greedy_equal'] else 'DIFF'}"
                         f" (first diff {r['first_divergence']})")
    b = res.get("bench")
    if b:
        lines.append(f"BENCH {b['model']} (emulated: {b['setup'].get('why', '')})")
        lines.append(f"  cache {b['setup']['cache']}  link {b['setup']['link']}  vram "
                     f"{b['setup']['vram']}")
        hdr = (f"  {'config':<26}{'pp t/s':>9}{'tg t/s':>9}{'stall s':>9}{'ms/tok':>8}"
               f"{'hit%':>6}{'late':>6}{'miss':>6}{'cpu-x':>6}{'MB moved':>9}{'GB/s':>7}"
               f"{'peak MiB':>9}{'vs od':>7}")
        lines.append(hdr)
        for r in b["rows"]:
            d = r["decode"]
            peak = r["vram_peak_allocated_bytes"]
            lines.append(
                f"  {r['config']:<26}{r['prefill_tok_s']:9.1f}{r['decode_tok_s']:9.1f}"
                f"{r['stall_s']:9.3f}{r['decode_stall_ms_per_token']:8.2f}"
                f"{100 * r['decode_hit_rate']:6.1f}{d['late']:6d}{d['misses']:6d}"
                f"{r['hybrid_cpu_experts']:6d}{r['counters']['bytes_loaded'] / 1e6:9.1f}"
                f"{r['bandwidth_gbps']:7.2f}"
                f"{(peak or 0) / 2**20:9.0f}"
                f"{r.get('stall_vs_ondemand', float('nan')):7.3f}")
    for key in ("vs_cpu", "vs_llama_cpp"):
        if key in res:
            lines.append(f"{key}: {json.dumps(res[key])}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", default=None)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--parity", action="store_true")
    ap.add_argument("--bench", action="store_true")
    ap.add_argument("--vs-cpu", action="store_true")
    ap.add_argument("--vs-llama-cpp", action="store_true")
    ap.add_argument("--laptop", default="rtx4060-laptop")
    ap.add_argument("--model-profile", default="qwen3-30b-a3b")
    ap.add_argument("--cache", default=None, help="override the emulated share")
    ap.add_argument("--link", default=None, help="override the scaled link")
    ap.add_argument("--vram", default="8GB")
    ap.add_argument("--policies", nargs="+", default=["ondemand", "expertflow"])
    ap.add_argument("--hybrid", nargs="+", default=["off", "auto"])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("-n", "--n-gen", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=None)
    ap.add_argument("--workdir", default="/tmp/efedge-gpu-bench")
    ap.add_argument("--json", default=None)
    ap.add_argument("--text", default=None)
    args = ap.parse_args(argv)

    from efedge.experts.scheduler import POLICIES
    from efedge.gguf_file import GGUFFile
    from efedge.gpu.emulate import laptop_setup

    path = Path(args.model) if args.model else default_model(Path(args.workdir))
    ids = prompt_ids(path, args.prompt_tokens)
    gf = GGUFFile(path)
    from efedge.config import config_from_gguf
    from efedge.experts.store import ExpertStore

    cfg = config_from_gguf(gf)
    store = ExpertStore(gf, cfg.n_layer, cfg.n_expert)
    mean_expert = store.total_bytes() / (cfg.n_layer * cfg.n_expert)
    gf.close()
    lap = laptop_setup(args.laptop, args.model_profile, mean_expert)
    policies = [p for p in args.policies if p in POLICIES or p.startswith("fixed")]
    missing = sorted(set(args.policies) - set(policies))
    setup = {"cache": args.cache or lap["cache"], "link": args.link or lap["link"],
             "vram": args.vram, "why": lap["why"] if not (args.cache or args.link) else
             "given on the command line",
             "policy_best": "expertflow" if "expertflow" in POLICIES else "ondemand"}
    res: dict = {"device": args.device, "model": str(path), "n_expert": cfg.n_expert,
                 "n_expert_used": cfg.n_expert_used, "n_layer": cfg.n_layer,
                 "expert_bytes_mean": mean_expert, "policies_missing": missing}
    try:
        import torch

        res["torch"] = torch.__version__
        if args.device.startswith("cuda") and torch.cuda.is_available():
            res["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    if args.parity:
        res["parity"] = parity(path, args.device, ids, min(args.n_gen, 32), setup)
    if args.bench:
        res["bench"] = bench(path, args.device, ids, args.n_gen, setup, policies, args.hybrid,
                             args.workers)
    if args.vs_cpu:
        res["vs_cpu"] = vs_cpu(path, ids, args.n_gen)
    if args.vs_llama_cpp:
        res["vs_llama_cpp"] = vs_llama_cpp(path, ids, args.n_gen)
    text = text_report(res)
    print(text)
    if args.text:
        Path(args.text).write_text(text + "\n", encoding="utf-8")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1, default=str), encoding="utf-8")
    return 0 if res.get("parity", {}).get("ok", True) else 1


if __name__ == "__main__":
    sys.exit(main())
