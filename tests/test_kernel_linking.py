"""How the kernels are built: the shared type dispatchers are called by name, never
linked into a kernel (efedge/kernels/_calls.py says why), and glibc keeps the kernels'
scratch mapped between calls (_malloc.py)."""

import dis
import importlib
import os
import pkgutil
import platform
import subprocess
import sys

import numpy as np
import pytest
from numba import njit
from numba.core.dispatcher import Dispatcher
from numba.core.errors import TypingError

import efedge.kernels as kernels
from efedge.kernels import _calls, generic, prefill, rowdot

# each dispatcher, and the only functions allowed to link it: the dispatchers themselves
# (dot_rows decodes the non-integer types with deq_row) and the C callbacks of _callees
LADDERS = {rowdot.dot_rows: set(), prefill.gemm_rows: set(),
           generic.deq_row: {"efedge.kernels.rowdot.dot_rows"}}


def _kernel_functions():
    for info in pkgutil.iter_modules(kernels.__path__):
        mod = importlib.import_module(f"efedge.kernels.{info.name}")
        for obj in vars(mod).values():
            if isinstance(obj, Dispatcher) and obj.py_func.__module__ == mod.__name__:
                yield obj


def _referenced(fn):
    """The globals fn's code loads, and the attributes it takes of global modules."""
    g = fn.py_func.__globals__
    module = None
    for ins in dis.get_instructions(fn.py_func):
        if ins.opname == "LOAD_GLOBAL":
            obj = g.get(ins.argval)
            yield obj
            module = obj if isinstance(obj, type(np)) else None
        elif ins.opname in ("LOAD_ATTR", "LOAD_METHOD") and module is not None:
            yield getattr(module, ins.argval, None)
            module = None
        else:
            module = None


def test_no_kernel_links_a_type_dispatcher():
    found = []
    for fn in _kernel_functions():
        qual = f"{fn.py_func.__module__}.{fn.py_func.__qualname__}"
        for obj in _referenced(fn):
            if isinstance(obj, Dispatcher) and obj in LADDERS and qual not in LADDERS[obj]:
                found.append(f"{qual} -> {obj.py_func.__qualname__}")
    assert not found, ("call these through efedge.kernels._calls, not directly: "
                       + ", ".join(sorted(set(found))))


def test_the_checker_sees_a_direct_call():
    # the test above must be able to fail: a kernel calling generic.deq_row directly
    @njit
    def bad(qt, src, dst):
        generic.deq_row(qt, src, dst)

    assert generic.deq_row in set(_referenced(bad))


def test_called_by_name_gives_the_linked_result():
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 255, (4, 34), dtype=np.uint8)  # Q8_0: 2 bytes of scale + 32
    raw[:, 1] = 0x3C  # scale 1.0 (f16 bits 0x3C00), finite
    raw[:, 0] = 0
    out = np.empty((4, 32), np.float32)
    generic.dequantize_rows(generic.Q8_0, raw, out)
    ref = np.empty(32, np.float32)
    for r in range(4):
        generic.deq_row(generic.Q8_0, raw[r], ref)
        assert np.array_equal(out[r], ref)


def test_a_strided_array_is_refused_when_the_caller_compiles():
    @njit
    def strided(qt, src, dst):
        _calls.deq_row(qt, src[::2], dst)

    with pytest.raises(TypingError, match="C-contiguous"):
        strided(generic.Q8_0, np.zeros(68, np.uint8), np.zeros(32, np.float32))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_malloc_thresholds_are_set_unless_the_user_set_them():
    code = "import efedge.kernels as k; print(k.MALLOC_TUNED)"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    plain = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                           text=True, check=True).stdout.strip()
    import platform

    assert plain == str(platform.libc_ver()[0] == "glibc")
    mine = subprocess.run([sys.executable, "-c", code],
                          env=dict(env, MALLOC_TRIM_THRESHOLD_="1000000"),
                          capture_output=True, text=True, check=True).stdout.strip()
    assert mine == "False"


def test_compile_notice_reports_the_first_compile_once():
    calls = []
    done = njit(lambda x: x + 1)
    done(1)
    with kernels.compile_notice(lambda: calls.append("compiling")):
        done(2)  # compiled before: no notice
        assert calls == []
        njit(lambda x: x * 2)(2)
        njit(lambda x: x * 3)(2)
    njit(lambda x: x - 1)(1)  # after the context: not reported
    assert calls == ["compiling"]


def test_load_tells_its_progress_display_when_it_compiles(monkeypatch):
    import efedge
    import efedge.api as api

    real = api.Transformer

    def compiling_transformer(*a, **kw):  # stands in for a first run's warm-up
        njit(lambda x: x + 7)(1)
        return real(*a, **kw)

    efedge.load().close()  # compiles the demo's kernels if the cache is cold
    seen = []
    with efedge.load(progress=lambda frac, msg: seen.append(msg)):  # kernels cached
        pass
    assert not any("compiling" in m for m in seen)
    monkeypatch.setattr(api, "Transformer", compiling_transformer)
    seen.clear()
    with efedge.load(progress=lambda frac, msg: seen.append(msg)):
        pass
    assert sum("compiling kernels" in m for m in seen) == 1


def test_import_time_compiles_are_logged_once(caplog):
    """The shared dispatchers compile at import when numba's cache is cold; the listener
    the package installs around that import logs one WARNING (shown even without any
    logging set up: the CLI imports efedge before it configures logging)."""
    import logging

    from efedge.kernels._compile_log import COMPILE_MESSAGE, announce_compiles

    log = logging.getLogger("efedge.kernels.test")
    with caplog.at_level(logging.WARNING, logger="efedge.kernels.test"):
        with announce_compiles(log):
            njit(lambda x: x + 11)(1)
            njit(lambda x: x + 12)(1)
    msgs = [r for r in caplog.records if r.name == "efedge.kernels.test"]
    assert [r.getMessage() for r in msgs] == [COMPILE_MESSAGE]
    assert msgs[0].levelno == logging.WARNING
    import efedge.kernels as k

    src = open(k.__file__, encoding="utf-8").read()
    at = src.index("from . import _callees")
    assert "_announce_compiles" in src[max(0, at - 300):at]  # the import is inside it


_LOWERING = """
import llvmlite.binding as llvm
from efedge.kernels import _ir, gemm, simd
llvm.initialize_native_target()
llvm.initialize_native_asmprinter()
feats = ",".join(("+" if on else "-") + name for name, on in _ir._FEATS.items())
tm = llvm.Target.from_default_triple().create_target_machine(
    cpu=llvm.get_host_cpu_name(), features=feats, opt=2)
for text in (simd._ir_all(), gemm._ir_all()):
    mod = llvm.parse_assembly(text)
    mod.verify()
    calls = [ln for ln in tm.emit_assembly(mod).splitlines() if "llvm." in ln]
    assert not calls, calls[:3]
print("ok", _ir._VNNI_FN)
"""


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"),
                    reason="x86 feature sets")
# (the default run keeps the AVX-VNNI-only set, the one that broke: each case compiles
# every integer kernel, ~30 s of a 2-core CI run; plain AVX2 is what the CPUs without
# AVX-512 that CI runs on build natively in every other test)
@pytest.mark.parametrize("features", [
    pytest.param("", marks=pytest.mark.slow), "-avx512vnni",
    pytest.param("-avx512vnni,-avxvnni", marks=pytest.mark.slow)])
def test_vector_kernels_lower_to_instructions_on_x86_feature_sets(features):
    """Every intrinsic the integer kernels declare lowers to instructions on a CPU with
    just those features (EFEDGE_CPU_FEATURES builds them as for one): an intrinsic name
    LLVM does not know compiles into a call of a symbol nobody defines. The AVX-VNNI-only
    path (Intel's laptop cores) called llvm.x86.avx2.vpdpbusd.256 so until 2026-11-30."""
    env = dict(os.environ, EFEDGE_CPU_FEATURES=features)
    r = subprocess.run([sys.executable, "-c", _LOWERING], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith("ok")
