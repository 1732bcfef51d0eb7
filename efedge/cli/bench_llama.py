"""The llama.cpp side of `efedge bench --vs-llama-cpp`: llama-cpp-python on the same file,
in a child process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from efedge.errors import EfedgeError

# The llama.cpp side runs in a child process: it must see the process environment as the
# user left it. efedge sets OMP_WAIT_POLICY=PASSIVE for its own threads (kernels module);
# llama.cpp's ggml uses the same libgomp, and with that setting its decode measured 4×
# slower. Commands go over stdin ("pp"/"tg" + token ids as JSON), timings come back in ns,
# measured in the child around the call.
_LLAMA_WORKER = r"""
import json, sys, time
try:
    from llama_cpp import Llama
except Exception as exc:
    print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}), flush=True)
    sys.exit(0)
path, threads, n_ctx, n_batch, n_gpu_layers = json.loads(sys.argv[1])
try:
    from llama_cpp import llama_supports_gpu_offload
    offload = bool(llama_supports_gpu_offload())
except Exception:
    offload = False
t0 = time.perf_counter()
llm = Llama(path, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
            n_batch=n_batch, n_ubatch=n_batch, n_gpu_layers=n_gpu_layers, verbose=False)
print(json.dumps({"load_s": time.perf_counter() - t0,
                  "gpu": offload and n_gpu_layers != 0}), flush=True)
for line in sys.stdin:
    kind, toks = json.loads(line)
    if kind == "quit":
        break
    t0 = time.perf_counter_ns()
    llm.reset()
    if kind == "pp":
        llm.eval(toks)
    else:
        for t in toks:
            llm.eval([t])
    print(json.dumps({"ns": time.perf_counter_ns() - t0}), flush=True)
llm.close()
"""


class _Llama:
    """llama.cpp through llama-cpp-python, the same file and thread count, in a child
    process that efedge's thread settings do not reach."""

    def __init__(self, path, threads, n_ctx, n_batch, n_gpu_layers=0):
        from efedge.kernels import INJECTED_ENV

        env = {k: v for k, v in os.environ.items() if INJECTED_ENV.get(k) != v}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _LLAMA_WORKER, json.dumps([str(path), threads, n_ctx,
                                                                n_batch, n_gpu_layers])],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        reply = self._read()
        if "error" in reply:
            self.close()
            raise EfedgeError(f"--vs-llama-cpp needs llama-cpp-python ({reply['error']})")
        self.load_s = reply["load_s"]
        # what llama.cpp really ran on: a CPU-only build ignores n_gpu_layers
        self.backend = "llama.cpp GPU (all layers)" if reply.get("gpu") else "llama.cpp CPU"

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise EfedgeError(f"the llama.cpp process ended (exit code {self.proc.wait()})")
        return json.loads(line)

    def _run(self, kind: str, toks) -> int:
        self.proc.stdin.write(json.dumps([kind, [int(t) for t in toks]]) + "\n")
        self.proc.stdin.flush()
        return int(self._read()["ns"])

    def pp(self, toks):
        return self._run("pp", toks)

    def tg(self, toks):
        return self._run("tg", toks)

    def close(self):
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps(["quit", []]) + "\n")
                self.proc.stdin.close()
                self.proc.wait(timeout=30)
            except (OSError, ValueError, subprocess.TimeoutExpired):
                self.proc.kill()
