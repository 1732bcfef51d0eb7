"""macOS and Windows, emulated on Linux: what efedge calls that those systems lack.

The code only ever ran on Linux. Here the calls macOS or Windows do not have are taken
away (os.preadv / os.pread / os.posix_fadvise / os.sysconf, mmap.MADV_*, signal.SIGPIPE,
ctypes.CDLL(None)), sys.platform is set to "darwin" or "win32" where efedge branches on
it, and the model must still stream, generate, chat and serve with logits bit-identical
to the resident run. Attributes of `os` are removed in a child process, before efedge is
imported: the choices are made at import, as they would be on those systems.
"""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import efedge
from efedge.errors import EfedgeError

ROOT = Path(__file__).resolve().parent.parent
IDS_TEXT = "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n"


def _child(code: str, env: dict | None = None, timeout: int = 600) -> dict:
    """Run `code` in a fresh interpreter with the checkout first on the path; its last
    stdout line is JSON, returned."""
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), e.get("PYTHONPATH")) if p)
    e.update(env or {})
    p = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                       text=True, env=e, timeout=timeout, cwd=str(ROOT))
    assert p.returncode == 0, f"child failed ({p.returncode}):\n{p.stdout[-3000:]}\n" \
                              f"{p.stderr[-6000:]}"
    return json.loads(p.stdout.strip().splitlines()[-1])


# Windows' os module: no positional reads, no fadvise, no sysconf; no madvise constants;
# no SIGPIPE; ctypes.CDLL(None) is a TypeError (LoadLibrary needs a name); descriptors
# open in text mode unless O_BINARY is given — a .gguf opened without it fails here.
_WINDOWS_OS = """
import ctypes, mmap, os, signal
for name in ("preadv", "pread", "posix_fadvise", "sysconf", "POSIX_FADV_DONTNEED",
             "POSIX_FADV_RANDOM", "POSIX_FADV_SEQUENTIAL", "POSIX_FADV_WILLNEED"):
    if hasattr(os, name):
        delattr(os, name)
for name in [n for n in dir(mmap) if n.startswith("MADV_")]:
    delattr(mmap, name)
del signal.SIGPIPE
_CDLL = ctypes.CDLL
class _CDLLNoNone(_CDLL):
    def __init__(self, name, *a, **k):
        if name is None:
            raise TypeError("LoadLibrary() argument 1 must be str, not None")
        super().__init__(name, *a, **k)
ctypes.CDLL = _CDLLNoNone
os.O_BINARY = 0x8000
_open = os.open
def _open_binary_only(path, flags, *a, **k):
    if str(path).endswith(".gguf") and not flags & os.O_BINARY:
        raise OSError(22, "text-mode descriptor: CR LF and Ctrl-Z would be translated", path)
    return _open(path, flags & ~os.O_BINARY, *a, **k)
os.open = _open_binary_only
"""


def test_windows_os_streams_generates_chats_and_serves_exactly(tmp_path):
    """Everything a Windows user does, with Windows' os module and numba's workqueue
    threading layer (what a pip numba falls back to without OpenMP or TBB, as on macOS):
    streamed logits equal to resident ones, bit for bit, under both policies; greedy text
    equal; `efedge chat` driven by a pipe and `efedge serve` answer."""
    out = _child(_WINDOWS_OS + f"""
import io, json, sys, threading, urllib.request
import numpy as np
import efedge
from efedge.experts import file_read
assert not file_read.available() and file_read._read_parts is None
ids_text = {IDS_TEXT!r}
res = {{}}
with efedge.load(threads=2) as m:
    ids = m.tokenize(ids_text)
    ref = m.logits(ids)
    ref_text = m.generate(ids_text, max_tokens=12, temperature=0)
np.save({str(tmp_path / "ref.npy")!r}, ref)
for policy in ("ondemand", "expertflow"):
    with efedge.load(threads=2, cache="25%", policy=policy) as m:
        assert m._experts.engine._read_whole is False
        got = m.logits(ids)
        text = m.generate(ids_text, max_tokens=12, temperature=0)
        s = m.stats()
    res[policy] = dict(equal=bool(np.array_equal(got, ref)), text_equal=text == ref_text,
                       bytes_loaded=s["bytes_loaded"])
# the chat REPL, its input piped
from efedge import cli
sys.stdin = io.StringIO("Say hi\\n/bye\\n")
out = io.StringIO()
sys.stdout = out
code = cli.main(["chat", "--cache", "25%", "--temp", "0", "-n", "6"])
sys.stdout = sys.__stdout__
res["chat"] = dict(code=code, out=out.getvalue())
# the server, on its own model thread
from efedge.server import make_server
with efedge.load(threads=2, cache="25%") as m:
    srv = make_server(m, "127.0.0.1", 0)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    body = json.dumps(dict(prompt=ids_text, max_tokens=12, temperature=0)).encode()
    req = urllib.request.Request(srv.url + "/v1/completions", body,
                                 {{"Content-Type": "application/json"}})
    with urllib.request.urlopen(req, timeout=120) as r:
        res["server_text_equal"] = json.loads(r.read())["choices"][0]["text"] == ref_text
    srv.shutdown()
    srv.server_close()
import numba
res["layer"] = numba.threading_layer()
print(json.dumps(res))
""", env={"NUMBA_THREADING_LAYER": "workqueue"})
    assert out["layer"] == "workqueue"
    for policy in ("ondemand", "expertflow"):
        assert out[policy]["equal"], policy
        assert out[policy]["text_equal"], policy
        assert out[policy]["bytes_loaded"] > 0, policy
    assert out["chat"]["code"] == 0 and out["chat"]["out"].startswith(">>> ")
    assert out["server_text_equal"]
    with efedge.load(threads=2) as m:  # this process: the default layer, Linux's os
        assert np.array_equal(m.logits(m.tokenize(IDS_TEXT)), np.load(tmp_path / "ref.npy"))


def test_a_python_without_preadv_reads_through_pread():
    """A Python built without os.preadv (macOS before 11) still has os.pread: the engine
    reads through it (a copy), with the same logits."""
    out = _child(f"""
import json, os
del os.preadv
import numpy as np
import efedge
from efedge.experts import engine_reads, file_read
file_read._AVAILABLE = False  # the Python reads, as on macOS
with efedge.load(threads=2) as m:
    ids = m.tokenize({IDS_TEXT!r})
    ref = m.logits(ids)
with efedge.load(threads=2, cache="25%") as m:
    same = bool(np.array_equal(m.logits(ids), ref))
    loaded = m.stats()["bytes_loaded"]
print(json.dumps(dict(via=engine_reads._preadv.__name__, same=same, loaded=loaded)))
""")
    assert out["via"] == "_preadv_copy" and out["same"] and out["loaded"] > 0


def test_two_models_in_two_threads_take_turns_on_numba_workqueue():
    """numba's workqueue layer (pip's numba on a Mac without OpenMP) aborts the process
    when two threads run parallel kernels at once: two Models there take turns."""
    out = _child(f"""
import json, threading
import numpy as np
import efedge
ms = [efedge.load(threads=2) for _ in range(2)]
ids = ms[0].tokenize({IDS_TEXT!r})
ref = ms[0].logits(ids)
errors, same = [], []
def work(m):
    try:
        for _ in range(4):
            same.append(bool(np.array_equal(m.logits(ids), ref)))
            m.generate("def f(", max_tokens=8, temperature=0)
    except BaseException as exc:
        errors.append(repr(exc))
ts = [threading.Thread(target=work, args=(m,)) for m in ms]
for t in ts:
    t.start()
for t in ts:
    t.join()
import numba
print(json.dumps(dict(layer=numba.threading_layer(), errors=errors, same=same)))
""", env={"NUMBA_THREADING_LAYER": "workqueue"})
    assert out["layer"] == "workqueue" and out["errors"] == []
    assert out["same"] == [True] * 8


def test_file_read_kernel_is_not_built_where_libc_lacks_its_calls():
    """numba links a symbol it cannot find to address 0: the pread / posix_fadvise kernel
    compiled on macOS (no posix_fadvise) or Windows would crash the first call. Where
    they are missing it is not built, and calling it is a clear error; a ctypes.CDLL(None)
    that raises (Windows) only means 'not available'."""
    out = _child("""
import ctypes, json, os
del os.posix_fadvise
import numpy as np
from efedge.errors import EfedgeError
from efedge.experts import file_read
res = dict(available=file_read.available(), built=file_read._read_parts is not None)
try:
    file_read.read_expert(0, [np.zeros(8, np.uint8)] * 3, np.zeros(3, np.int64),
                          np.zeros(3, np.int64), 4096)
except EfedgeError as exc:
    res["error"] = str(exc)
print(json.dumps(res))
""")
    assert out == {"available": False, "built": False, "error": out.get("error")}
    assert "linux" in out["error"] and "pread and posix_fadvise" in out["error"]
    out = _child("""
import ctypes, json
class _CDLL(ctypes.CDLL):
    def __init__(self, name, *a, **k):
        if name is None:
            raise TypeError("LoadLibrary() argument 1 must be str, not None")
        super().__init__(name, *a, **k)
ctypes.CDLL = _CDLL
from efedge.experts import file_read
print(json.dumps(dict(available=file_read.available())))
""")
    assert out == {"available": False}


def test_spin_waits_yield_through_switchtothread_on_windows():
    """The layer kernels' waiting threads yield their core through libc's sched_yield,
    which Windows does not have (numba would call address 0). There they call kernel32's
    SwitchToThread, registered by address (here kernel32 is libc, emulated)."""
    out = _child("""
import ctypes, importlib, json, sys, types
import efedge.kernels._sync as s
from numba import njit
libc = ctypes.CDLL(None)
ctypes.windll = types.SimpleNamespace(kernel32=types.SimpleNamespace(
    SwitchToThread=libc.sched_yield))
sys.platform = "win32"
s = importlib.reload(s)
sys.platform = "linux"

@njit(fastmath=False)
def spin_once():
    s.sched_yield()
    return 1

ok = spin_once()  # resolved through the registered address: returns, no crash
ir = "\\n".join(spin_once.inspect_llvm().values())
declared = [ln for ln in ir.splitlines() if ln.startswith("declare")]
print(json.dumps(dict(ok=ok, switch=any("@SwitchToThread" in d for d in declared),
                      sched_yield=any("@sched_yield" in d for d in declared))))
""")
    assert out == {"ok": 1, "switch": True, "sched_yield": False}


@pytest.fixture(scope="module")
def demo():
    """The demo model, loaded before a test sets sys.platform: numba starts its threads
    at the first load, and importing multiprocessing as "win32" would fail on Linux."""
    with efedge.load(threads=2) as m:
        yield m


def test_macos_streams_exactly_with_reads_kept_out_of_the_page_cache(monkeypatch, demo):
    """macOS has no posix_fadvise (so no page drop and no file_read kernel): the engine
    reads in Python and sets F_NOCACHE on its descriptors instead; logits unchanged."""
    import fcntl

    from efedge.experts import file_read

    ref = demo.logits(demo.tokenize(IDS_TEXT))
    calls = []
    real_fcntl = fcntl.fcntl

    def spy(fd, cmd, arg=0):
        if cmd == 48:  # F_NOCACHE: not a Linux command
            calls.append((fd, cmd, arg))
            return 0
        return real_fcntl(fd, cmd, arg)

    monkeypatch.setattr(sys, "platform", "darwin")
    monkeypatch.delattr(os, "posix_fadvise")
    monkeypatch.setattr(file_read, "available", lambda: False)
    monkeypatch.setattr(fcntl, "fcntl", spy)
    with efedge.load(threads=2, cache="25%") as m:
        eng = m._experts.engine
        assert not eng._read_whole
        assert sorted(c[0] for c in calls) == sorted(eng._fds) and \
            all(c[2] == 1 for c in calls)
        assert np.array_equal(m.logits(m.tokenize(IDS_TEXT)), ref)
        assert m.stats()["bytes_loaded"] > 0


def test_the_server_does_not_share_its_port_on_windows(monkeypatch, demo):
    """On Windows SO_REUSEADDR lets a second server bind a port another one listens on:
    the server (and the address probe before loading) leave it off there. Linux keeps
    SO_REUSEADDR (restarts past TIME_WAIT)."""
    from efedge.cli.serve import check_address
    from efedge.server import make_server

    srv = make_server(demo, "127.0.0.1", 0)
    try:
        assert srv.socket.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR) == 1
    finally:
        srv.server_close()
    monkeypatch.setattr(sys, "platform", "win32")
    srv = make_server(demo, "127.0.0.1", 0)
    try:
        assert srv.socket.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR) == 0
        port = srv.server_address[1]
        with pytest.raises(EfedgeError, match="already in use"):
            check_address("127.0.0.1", port)  # the probe uses the same options
    finally:
        srv.server_close()


def test_windows_port_reservation_is_named():
    from efedge.cli.serve import bind_error

    class WinError(OSError):
        winerror = 10013

    msg = str(bind_error("127.0.0.1", 8080, WinError(13, "access forbidden")))
    assert "reserved by Windows" in msg and "--port" in msg


def _run_cli(monkeypatch, args, encoding="cp1252"):
    from efedge import cli

    raw = io.BytesIO()
    out = io.TextIOWrapper(raw, encoding=encoding, newline="\n")
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.delenv("PYTHONIOENCODING", raising=False)
    code = cli.main(args)
    out.flush()
    return code, raw.getvalue()


PROMPT = "π ≈ 3.14 — 中文\n"


def test_cli_writes_utf8_to_a_windows_pipe(monkeypatch, demo):
    """Windows gives a pipe the ANSI code page: echoing or generating a character cp1252
    lacks was a UnicodeEncodeError mid-run. There the CLI writes UTF-8."""
    monkeypatch.setattr(sys, "platform", "win32")
    code, data = _run_cli(monkeypatch, ["run", "-p", PROMPT, "-n", "2", "--echo",
                                        "--temp", "0", "-t", "2"])
    assert code == 0 and data.decode("utf-8").startswith(PROMPT)


def test_cli_replaces_what_a_non_utf8_locale_cannot_write(monkeypatch):
    code, data = _run_cli(monkeypatch, ["run", "-p", PROMPT, "-n", "2", "--echo",
                                        "--temp", "0", "-t", "2"])
    assert code == 0 and data.decode("cp1252").startswith("? ? 3.14 — ??\n")


def test_chat_names_windows_end_of_input_key(monkeypatch):
    from efedge.cli.chat import ChatREPL

    feed = iter(())

    def fake_input(prompt=""):
        v = next(feed)
        if isinstance(v, type):
            raise v
        return v

    for platform, key in (("win32", "Ctrl-Z Enter"), ("linux", "Ctrl-D")):
        feed = iter([KeyboardInterrupt, "/help", EOFError])
        monkeypatch.setattr("builtins.input", fake_input)
        monkeypatch.setattr(sys, "platform", platform)
        out, err = io.StringIO(), io.StringIO()
        assert ChatREPL(object(), out=out, err=err).run() == 0
        assert f"Ctrl-C again or {key} or /bye" in err.getvalue()
        assert f"leave ({key} too)" in out.getvalue()


def test_home_directory_in_paths(monkeypatch, tmp_path):
    """`~` reaches efedge unexpanded from Windows' shells (and from API callers)."""
    from efedge.cli.common import read_text_file
    from efedge.demo import demo_model_path

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("USERPROFILE", str(tmp_path))
    (tmp_path / "demo.gguf").symlink_to(demo_model_path())
    (tmp_path / "p.txt").write_text("hello", encoding="utf-8")
    assert read_text_file("~/p.txt", "prompt file") == "hello"
    with efedge.load("~/demo.gguf", threads=2) as m:
        assert m.path == tmp_path / "demo.gguf"


def test_a_utf16_file_is_named(tmp_path):
    """Windows PowerShell 5 writes UTF-16 with `>`: the error says so."""
    from efedge.cli.common import read_text_file

    p = tmp_path / "prompt.txt"
    p.write_bytes("hello".encode("utf-16"))
    with pytest.raises(EfedgeError, match="UTF-16"):
        read_text_file(str(p), "prompt file")


def test_cuda_without_torch_is_one_clear_error(monkeypatch):
    """A Mac (mlx users) has neither torch nor CUDA: device='cuda' says what to use
    instead, as an efedge error, not an ImportError traceback."""
    from efedge.errors import UnsupportedModelError

    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
    monkeypatch.setattr(sys, "platform", "darwin")
    with pytest.raises(UnsupportedModelError, match=r"needs torch.*device='cpu'.*macOS"):
        efedge.load(device="cuda")


def test_a_closed_pipe_on_windows_ends_quietly(monkeypatch, capsys, demo):
    """Windows reports writing to a pipe whose reader left as EINVAL, not EPIPE: `efedge
    run … | more` quit early ends with status 0 and no error, as on POSIX."""
    from efedge import cli

    class ClosedPipe(io.TextIOWrapper):
        def write(self, s):
            raise OSError(22, "Invalid argument")

        def flush(self):
            raise OSError(22, "Invalid argument")

    monkeypatch.setattr(sys, "platform", "win32")
    monkeypatch.setattr(sys, "stdout", ClosedPipe(io.BytesIO(), encoding="utf-8"))
    assert cli.main(["run", "-p", "def f(", "-n", "4", "--temp", "0", "-t", "2"]) == 0
    assert "error" not in capsys.readouterr().err


def test_a_prompt_piped_with_windows_line_ends_reads_as_from_a_file(monkeypatch, tmp_path,
                                                                     demo):
    """`type prompt.txt | efedge run -p -` on Windows pipes CR LF: the prompt is the same
    as `-f prompt.txt` (universal newlines, as mlx-lm reads stdin), not one with CRs."""
    crlf = b"def fib(n):\r\n    return n\r\n"
    (tmp_path / "p.txt").write_bytes(crlf)
    args = ["run", "-n", "3", "--echo", "--temp", "0", "-t", "2"]
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(crlf)))
    piped = _run_cli(monkeypatch, [*args, "-p", "-"], encoding="utf-8")
    from_file = _run_cli(monkeypatch, [*args, "-f", str(tmp_path / "p.txt")],
                         encoding="utf-8")
    assert piped == from_file and piped[1].startswith(b"def fib(n):\n    return n\n")


def test_a_split_gguf_streams_exactly_with_windows_reads(tiny_gguf, tmp_path):
    """gguf-split shards under Windows' os module: each expert part read (seek + read,
    one lock for all descriptors) from its own shard; logits equal to the single file."""
    from test_gguf_file import _split

    src = tiny_gguf("qwen3moe", "F32")
    shards = _split(src, tmp_path)
    assert len(shards) > 2
    out = _child(_WINDOWS_OS + f"""
import json
import numpy as np
import efedge
from efedge.experts import engine_reads
ids = list(range(5, 40))
with efedge.load({str(src)!r}, threads=2) as m:
    ref = m.logits(ids)
res = dict(via=engine_reads._preadv.__name__)
for policy in ("ondemand", "expertflow"):
    with efedge.load({str(shards[0])!r}, threads=2, cache="30%", policy=policy) as m:
        store = m._experts.store
        res[policy] = dict(same=bool(np.array_equal(m.logits(ids), ref)),
                           files=len(m._experts.engine._fds),
                           mixed=any(len(set(r)) > 1 for r in store.shard.tolist()))
print(json.dumps(res))
""")
    assert out["via"] == "_preadv_seek"
    for policy in ("ondemand", "expertflow"):
        assert out[policy] == {"same": True, "files": len(shards), "mixed": True}, policy
