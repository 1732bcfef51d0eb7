"""llama.cpp (llama-cpp-python) with ggml's plain CPU kernels: no "extra buffer types",
the weights repacked for AMX and other CPU-specific layouts.

On a CPU with AMX, llama-cpp-python 0.3.36 built there crashes the process with them on
small MoE files: SIGSEGV in ggml_backend_amx_mul_mat for quantized weights, a failed
GGML_ASSERT(*cur_backend_id != -1) in the graph split for deepseek2 F16. The plain
kernels run those files, and compute the products efedge reproduces.

Used by the tests' llama.cpp references and by `efedge bench --vs-llama-cpp`'s child
process. The child must not import the efedge package (its import sets thread
environment variables llama.cpp's libgomp would read), so it loads this file by path:
keep it free of efedge imports.
"""

from __future__ import annotations

from contextlib import contextmanager


@contextmanager
def plain_cpu_kernels():
    """Within: every llama_cpp.Llama built uses the plain kernels. Llama() has no
    keyword for it, so the model parameters it starts from are patched, and restored
    on the way out (a model built inside keeps its parameters)."""
    import llama_cpp.llama_cpp as lc

    default = lc.llama_model_default_params

    def params():
        p = default()
        if hasattr(p, "use_extra_bufts"):  # llama-cpp-python ≥ 0.3.10
            p.use_extra_bufts = False
        return p

    lc.llama_model_default_params = params
    try:
        yield
    finally:
        lc.llama_model_default_params = default


def plain_llama(path, **kw):
    """``llama_cpp.Llama(path, **kw)`` built within plain_cpu_kernels(): the tests'
    references and the training tool's evaluations."""
    import os

    from llama_cpp import Llama

    with plain_cpu_kernels():
        return Llama(os.fspath(path), **kw)
