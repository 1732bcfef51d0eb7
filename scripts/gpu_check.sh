#!/usr/bin/env bash
# GPU check for the GPU expert cache (issue 9). Run from the repository root on a machine
# with an NVIDIA GPU, after installing efedge without dependencies and the gguf wheel:
#
#     pip install gguf-*.whl && pip install -e . --no-deps
#     OUT=/path/to/results bash scripts/gpu_check.sh
#
# Needs torch with CUDA, numpy, numba, jinja2, regex, tqdm, gguf. Installs nothing and
# reaches no network. The llama.cpp stages need llama-cpp-python (+ diskcache); without
# it they end at once with a named error. A CPU build of it (24 MB: with the 42 MB tree it
# only just fits the device's 64 MiB carry) gives "llama.cpp CPU" rows; llama.cpp's own
# GPU offload, and so --llama-cpu-moe's meaning, needs a CUDA build of it. Finishes in under 8 minutes (a global deadline caps every stage).
# Writes $OUT/gpu_check.txt (summary), $OUT/gpu_check.json (all figures) and one log per
# stage. Stages:
#   1. env      torch / CUDA / GPU / package versions
#   2. pytest   tests/test_gpu.py, test_gpu_mla.py, test_host_tier.py -m cuda: the CUDA tests (bit-exact dequant on the GPU,
#               forward parity with the CPU path on generated models, streaming under
#               pressure, budget and pinned staging). The CPU-device tests of that file run
#               in CI; here they only cost numba compile time (the stage once hit its cap).
#   3. parity   the demo model (or a generated 64-expert qwen3moe): cosine ≥ 0.999 and the
#               same greedy tokens as the CPU path, resident / ondemand / expertflow+hybrid
#   4. bench    the emulated 8 GB laptop (RTX 4060 Laptop, PCIe 4.0 x8) on the same model:
#               ondemand and expertflow, hybrid misses off and auto, plus all resident
#   5. policies `efedge bench --device cuda --policies …`: the scheduler table on the GPU
#               path (25% / 50% cache, 720 MB/s and 180 MB/s links, as on the CPU)
#      hosttier  the pinned host level under the VRAM cache (emulated pcie4x8 and nvme)
#      llamacpp `efedge bench --device cuda --vs-llama-cpp` on the demo model (35% cache),
#      llamacpu  and the same with llama.cpp's experts on the CPU (--llama-cpu-moe)
#   6. bench16  if time is left: a generated 1.6 GB qwen3moe ("bench" preset, F16, 3.1 MB
#               experts ≈ Qwen3-30B-A3B's) with the real pcie4x8 rate, 35% cache, 8 GB
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_check_out}"
mkdir -p "$OUT"
LOG="$OUT/gpu_check.txt"
: > "$LOG"
T0=$(date +%s)
DEADLINE=$((T0 + ${DEADLINE_S:-450}))  # DEADLINE_S: the whole run's cap
PY="${PYTHON:-python}"
DEVICE="${DEVICE:-cuda}"  # DEVICE=cpu: a dry run of this script on torch's CPU device
NGEN="${NGEN:-64}"
MODELS="${MODELS:-/tmp/efedge-gpu-models}"  # generated models: kept out of $OUT (1.6 GB)
export PYTHONUNBUFFERED=1

say() { echo "$*" | tee -a "$LOG"; }

# stage NAME TIMEOUT CMD... : run with min(TIMEOUT, time left), log to $OUT/NAME.log
stage() {
    local name=$1 want=$2
    shift 2
    local left=$((DEADLINE - $(date +%s)))
    local t=$((want < left ? want : left))
    if [ "$t" -lt 20 ]; then
        say "== $name: skipped (only ${left}s left before the deadline)"
        return 0
    fi
    say "== $name (timeout ${t}s): $*"
    local s
    s=$(date +%s)
    timeout -k 5 "$t" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    tail -n 45 "$OUT/$name.log" | tee -a "$LOG"
    say "-- $name: exit $rc after $(($(date +%s) - s))s$([ $rc -ge 124 ] && echo ' (TIMED OUT)')"
    echo "$name $rc" >> "$OUT/stages.txt"
}

: > "$OUT/stages.txt"
say "efedge GPU check, $(date -u +%FT%TZ), OUT=$OUT"
nvidia-smi -L 2>&1 | tee -a "$LOG" || true

stage env 60 "$PY" - <<'EOF'
import importlib, sys
print("python", sys.version.split()[0])
for mod in ("torch", "numpy", "numba", "gguf", "efedge"):
    try:
        m = importlib.import_module(mod)
        print(mod, getattr(m, "__version__", "?"), getattr(m, "__file__", ""))
    except Exception as e:
        print(mod, "MISSING:", type(e).__name__, e)
import torch
print("cuda available", torch.cuda.is_available(), "torch cuda", torch.version.cuda)
if torch.cuda.is_available():
    free, total = torch.cuda.mem_get_info()
    print("gpu", torch.cuda.get_device_name(0), f"free {free/2**30:.1f} / {total/2**30:.1f} GiB")
    print("tf32 matmul default", torch.backends.cuda.matmul.allow_tf32)
import efedge.gpu, efedge.experts.scheduler as s
print("policies", sorted(s.POLICIES))
EOF

if ! "$PY" -c "import gguf, torch, efedge; assert '$DEVICE' == 'cpu' or torch.cuda.is_available()" \
        2>/dev/null; then
    say "ABORT: needs gguf, efedge and a CUDA build of torch that sees a GPU (see env.log)"
    exit 2
fi

# numba compiles each test process's kernels anew: with pytest-xdist (on the lent image)
# the compiles run side by side on the machine's cores (one process hit the cap once)
XDIST=()
"$PY" -c "import xdist" 2>/dev/null && XDIST=(-n 8)
stage pytest 150 "$PY" -m pytest -q -rs -p no:cacheprovider "${XDIST[@]}" -m cuda \
    tests/test_gpu.py tests/test_gpu_mla.py tests/test_host_tier.py

stage parity 100 "$PY" benchmarks/gpu_bench.py --device "$DEVICE" --parity -n 32 \
    --workdir "$MODELS" \
    --json "$OUT/parity.json" --text "$OUT/parity.txt"

stage bench 130 "$PY" benchmarks/gpu_bench.py --device "$DEVICE" --bench --vs-cpu -n "$NGEN" \
    --workdir "$MODELS" \
    --json "$OUT/bench.json" --text "$OUT/bench.txt"

# the scheduler's policies side by side on the GPU path, the CPU table's settings
stage policies 120 "$PY" -m efedge bench --device "$DEVICE" --policies \
    ondemand,next-layer,fixed:2,expertflow -p 32 -n 48 -r 1 --cache 25%,50% \
    --link 720MB/s,180MB/s

# the two cache levels: 25% in VRAM over an emulated laptop link, 50% in pinned host memory
# over an emulated NVMe disk (the host hit rate column; figures never measured on a GPU yet)
if [ "$DEVICE" != cpu ]; then  # (efedge's CPU path has no second level: refused there)
    stage hosttier 45 "$PY" -m efedge bench --device "$DEVICE" -p 64 -n 32 -r 2 \
        --cache 25% --link pcie4x8 --host-cache 50% --disk-link nvme --policy expertflow --json
fi

# efedge's own bench on the GPU path beside llama-cpp-python (all layers offloaded when
# its build can; the row's backend says what it ran on; exits at once without llama_cpp)
stage llamacpp 70 "$PY" -m efedge bench --device "$DEVICE" -p 64 -n 32 -r 2 --cache 35% \
    --vs-llama-cpp --json
# and against llama.cpp's experts-on-CPU configuration (--cpu-moe), the one the issue names
stage llamacpu 60 "$PY" -m efedge bench --device "$DEVICE" -p 64 -n 32 -r 2 --cache 35% \
    --vs-llama-cpp --llama-cpu-moe --json
if [ $(($(date +%s) + 90)) -lt "$DEADLINE" ]; then
    stage bench16 $((DEADLINE - $(date +%s) - 5)) "$PY" - "$OUT" "$DEVICE" "$MODELS" <<'EOF'
import sys
from pathlib import Path
sys.path.insert(0, ".")
from gguf_tools.make_tiny import write_tiny
out, device, models = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
p = models / "qwen3moe-bench-F16.gguf"
if not p.exists():
    p.parent.mkdir(parents=True, exist_ok=True)
    write_tiny(p, "qwen3moe", "F16", preset="bench")
sys.argv = ["gpu_bench", str(p), "--device", device, "--bench", "-n", "32", "--cache", "35%",
            "--link", "pcie4x8", "--prompt-tokens", "64", "--json", str(out / "bench16.json"),
            "--text", str(out / "bench16.txt")]
import runpy
runpy.run_path("benchmarks/gpu_bench.py", run_name="__main__")
EOF
else
    say "== bench16: skipped (not enough time left)"
fi

"$PY" - "$OUT" <<'EOF' | tee -a "$LOG"
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
res = {"stages": dict(l.split() for l in (out / "stages.txt").read_text().splitlines() if l)}
for name in ("parity", "bench", "bench16"):
    f = out / f"{name}.json"
    if f.exists():
        res[name] = json.loads(f.read_text())
keys = ("decode_tok_s", "prefill_tok_s", "stall_s", "decode_stall_ms_per_token",
        "stall_vs_ondemand", "decode_stall_vs_ondemand", "decode_hit_rate",
        "hybrid_cpu_experts", "vram_peak_allocated_bytes")
summary = {"parity": [{k: r[k] for k in ("config", "cos_min", "frac_cos_ge_0999",
                                         "greedy_equal", "ok")}
                      for r in res.get("parity", {}).get("parity", {}).get("runs", [])],
           "parity_ok": res.get("parity", {}).get("parity", {}).get("ok")}
for name in ("bench", "bench16"):
    rows = res.get(name, {}).get("bench", {}).get("rows", [])
    summary[name] = {r["config"]: {k: r.get(k) for k in keys} for r in rows}
    if "vs_cpu" in res.get(name, {}):
        summary[name]["efedge CPU path"] = res[name]["vs_cpu"]
res["summary"] = summary
(out / "gpu_check.json").write_text(json.dumps(res, indent=1, default=str))
print("SUMMARY", json.dumps(res["summary"], indent=1, default=str))
EOF
say "total $(($(date +%s) - T0))s"
