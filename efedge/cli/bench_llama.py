"""The llama.cpp side of `efedge bench --vs-llama-cpp`: llama-cpp-python on the same file,
in a child process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

from efedge.cli import llama_plain
from efedge.errors import EfedgeError

# The llama.cpp side runs in a child process: it must see the process environment as the
# user left it. efedge sets OMP_WAIT_POLICY=PASSIVE for its own threads (kernels module);
# llama.cpp's ggml uses the same libgomp, and with that setting its decode measured 4×
# slower. Commands go over stdin ("pp"/"tg" + token ids as JSON), timings come back in ns,
# measured in the child around the call.
_LLAMA_WORKER = r"""
import contextlib, json, sys, time
try:
    from llama_cpp import Llama
except Exception as exc:
    print(json.dumps({"error": f"--vs-llama-cpp needs llama-cpp-python "
                               f"({type(exc).__name__}: {exc})"}), flush=True)
    sys.exit(0)
path, threads, n_ctx, n_batch, n_gpu_layers, cpu_moe, plain = json.loads(sys.argv[1])
kernels = contextlib.nullcontext()
if plain:  # the path of efedge/cli/llama_plain.py: loaded without importing efedge
    import importlib.util
    spec = importlib.util.spec_from_file_location("efedge_llama_plain", plain)
    llama_plain = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(llama_plain)
    kernels = llama_plain.plain_cpu_kernels()
try:
    from llama_cpp import llama_supports_gpu_offload
    offload = bool(llama_supports_gpu_offload())
except Exception:
    offload = False
overridden = []
if cpu_moe:
    try:
        # llama.cpp's --cpu-moe: expert tensors in host memory, computed on the CPU. The
        # high-level API has no tensor overrides: set the model parameters' NULL-terminated
        # pattern -> buffer type list, and count the loader's "buffer type overridden" lines.
        import ctypes
        import llama_cpp.llama_cpp as lc

        class _Override(ctypes.Structure):
            _fields_ = [("pattern", ctypes.c_char_p), ("buft", ctypes.c_void_p)]

        lc._lib.ggml_backend_cpu_buffer_type.restype = ctypes.c_void_p
        cpu = lc._lib.ggml_backend_cpu_buffer_type()
        overrides = (_Override * 2)(_Override(rb"\.ffn_(up|down|gate)_exps", cpu),
                                    _Override(None, None))
        default_params = lc.llama_model_default_params

        def _params():
            p = default_params()
            p.tensor_buft_overrides = ctypes.cast(overrides, ctypes.c_void_p).value
            return p

        lc.llama_model_default_params = _params

        @lc.llama_log_callback
        def _log(level, text, user):
            if b"buffer type overridden" in text:
                overridden.append(text)

        lc.llama_log_set(_log, ctypes.c_void_p(0))
    except Exception as exc:  # a llama-cpp-python whose low-level API differs
        print(json.dumps({"error": f"--llama-cpu-moe: this llama-cpp-python cannot set tensor "
                                   f"overrides ({type(exc).__name__}: {exc})"}), flush=True)
        sys.exit(0)
t0 = time.perf_counter()
with kernels:
    llm = Llama(path, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                n_batch=n_batch, n_ubatch=n_batch, n_gpu_layers=n_gpu_layers, verbose=False)
print(json.dumps({"load_s": time.perf_counter() - t0, "gpu": offload and n_gpu_layers != 0,
                  "experts_on_cpu": len(overridden)}), flush=True)
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


# exit codes of a child killed by SIGSEGV, SIGBUS, SIGILL, SIGFPE or SIGABRT
_CRASH_CODES = frozenset(-int(getattr(signal, n)) for n in
                         ("SIGSEGV", "SIGBUS", "SIGILL", "SIGFPE", "SIGABRT")
                         if hasattr(signal, n))


def _signal_name(code: int) -> str:
    """SIGSEGV for the exit code -11 of a child killed by that signal."""
    try:
        return signal.Signals(-code).name
    except ValueError:
        return f"signal {-code}"


class _Llama:
    """llama.cpp through llama-cpp-python, the same file and thread count, in a child
    process that efedge's thread settings do not reach."""

    def __init__(self, path, threads, n_ctx, n_batch, n_gpu_layers=0, cpu_moe=False):
        self.cpu_moe = bool(cpu_moe)
        self._args = [str(path), threads, n_ctx, n_batch, n_gpu_layers, self.cpu_moe]
        # plain: ggml's plain CPU kernels (efedge/cli/llama_plain.py). Only after
        # llama.cpp crashed with its repacked weights (AMX: seen on the generated bench
        # model), so that elsewhere it runs at its best
        self.plain = False
        self._start()

    def _start(self) -> None:
        from efedge.kernels import INJECTED_ENV

        env = {k: v for k, v in os.environ.items() if INJECTED_ENV.get(k) != v}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _LLAMA_WORKER,
             json.dumps(self._args + [llama_plain.__file__ if self.plain else None])],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        reply = self._read()
        if "error" in reply:
            self.close()
            raise EfedgeError(reply["error"])
        self.load_s = reply["load_s"]
        # expert tensors llama.cpp's loader placed on the CPU (--llama-cpu-moe)
        self.experts_on_cpu = int(reply.get("experts_on_cpu", 0))
        if self.cpu_moe and self.experts_on_cpu == 0:
            self.close()
            raise EfedgeError("--llama-cpu-moe: the installed llama-cpp-python did not apply "
                              "the tensor override (no expert tensor was moved to the CPU)")
        # what llama.cpp really ran on: a CPU-only build ignores n_gpu_layers
        if not reply.get("gpu"):
            self.backend = "llama.cpp CPU"
        elif self.cpu_moe:
            self.backend = "llama.cpp GPU, experts on CPU (--cpu-moe)"
        else:
            self.backend = "llama.cpp GPU (all layers)"
        if self.plain:
            self.backend += ", plain CPU kernels"

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            code = self.proc.wait()
            how = f"killed by {_signal_name(code)}" if code < 0 else f"exit code {code}"
            raise EfedgeError(f"the llama.cpp process ended ({how})")
        return json.loads(line)

    def _run(self, kind: str, toks) -> int:
        try:
            return self._send(kind, toks)
        except (EfedgeError, OSError):
            code = self.proc.wait()
            if self.plain or code not in _CRASH_CODES:
                raise
        # llama.cpp crashed (a signal): once more with its plain kernels, from a fresh load
        print(f"llama.cpp crashed ({_signal_name(code)}); running it again without "
              "repacked weights (its plain CPU kernels)", file=sys.stderr, flush=True)
        self.plain = True
        self._start()
        return self._send(kind, toks)

    def _send(self, kind: str, toks) -> int:
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
