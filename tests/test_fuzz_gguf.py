"""Fuzz: mutated GGUF checkpoints load and score, or fail with a named EfedgeError.

Valid tiny qwen3moe checkpoints (F16 and Q4_K_M) are mutated region by region — truncation
of the header, metadata, tensor infos, padding and data; forged counts, string lengths,
array lengths, value types, key values, tensor offsets, shapes and types; duplicate names;
misaligned data — and every mutant goes through ``efedge.load(path)`` then
``m.logits([1, 2, 3])`` in a child process. The parent counts per category:

* ``ok``: loaded and scored (garbage weights are allowed to give garbage logits);
* ``named``: an ``efedge.EfedgeError`` whose message names the key, tensor or region;
* ``unnamed``: an EfedgeError whose message names nothing (must be 0);
* ``leak``: any other exception, MemoryError included (must be 0);
* ``crash``: the child died (a segfault in a kernel, an abort) (must be 0);
* ``hang``: no answer within HANG_S seconds (must be 0).

Cases are derived from a fixed seed, so a failure names a reproducible case. Set
``EFEDGE_FUZZ_REPORT=path.json`` to write the per-category table.
"""

from __future__ import annotations

import json
import os
import random
import re
import select
import struct
import subprocess
import sys
import tempfile
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

SEED = 8_2024
HANG_S = 10.0
DEFAULT_CASES = 160  # per base file: ~320 in the default run
SLOW_CASES = 1200  # per base file: 2,400 in the slow suite
TINY = dict(n_layer=2, n_expert=4, n_expert_used=2)  # small files: ~4 MB F16, ~1.4 MB Q4_K_M

# GGUFValueType → byte size of a scalar; 8 = STRING, 9 = ARRAY
_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q",
           12: "d"}
STRING, ARRAY = 8, 9


# -- layout of a valid file ---------------------------------------------------------------
@dataclass
class Spot:
    """A field of the file a mutation can target."""

    kind: str
    off: int
    fmt: str  # struct format of the field ("<Q", "<I", ...)
    what: str  # the key or tensor it belongs to
    value: object = None


@dataclass
class Layout:
    size: int
    kv_end: int
    ti_end: int
    data_offset: int
    alignment: int
    spots: dict[str, list[Spot]] = field(default_factory=lambda: defaultdict(list))
    keys: dict[str, tuple[int, int, int]] = field(default_factory=dict)  # key → start, end, type
    tensors: dict[str, tuple[int, int, int]] = field(default_factory=dict)  # name → off, len, start


def parse_layout(data: bytes) -> Layout:
    """Where every count, length, type, shape and offset of a (valid) GGUF file sits."""

    def u(fmt: str, off: int):
        return struct.unpack_from(fmt, data, off)[0]

    n_tensors, n_kv = u("<Q", 8), u("<Q", 16)
    lay = Layout(len(data), 0, 0, 0, 32)
    lay.spots["count"] += [Spot("count", 8, "<Q", "tensor count", n_tensors),
                           Spot("count", 16, "<Q", "kv count", n_kv)]
    pos = 24

    def string(what: str) -> tuple[str, int]:
        nonlocal pos
        n = u("<Q", pos)
        lay.spots["strlen"].append(Spot("strlen", pos, "<Q", what, n))
        s = data[pos + 8:pos + 8 + n].decode("utf-8")
        pos += 8 + n
        return s, pos - n

    def value(vtype: int, key: str, top: bool) -> None:
        nonlocal pos
        if vtype == STRING:
            string(key)
        elif vtype == ARRAY:
            sub, n = u("<I", pos), u("<Q", pos + 4)
            lay.spots["vtype"].append(Spot("vtype", pos, "<I", key, sub))
            lay.spots["arrlen"].append(Spot("arrlen", pos + 4, "<Q", key, n))
            pos += 12
            for _ in range(n):
                value(sub, key, False)
        else:
            fmt = "<" + _SCALAR[vtype]
            if top:
                lay.spots["value"].append(Spot("value", pos, fmt, key, u(fmt, pos)))
            pos += struct.calcsize(fmt)

    for _ in range(n_kv):
        start = pos
        key, _ = string("metadata key")
        lay.spots["strlen"][-1].what = key
        lay.spots["keyname"].append(Spot("keyname", pos - len(key.encode()), "", key))
        vtype = u("<I", pos)
        lay.spots["vtype"].append(Spot("vtype", pos, "<I", key, vtype))
        pos += 4
        value(vtype, key, True)
        lay.keys[key] = (start, pos, vtype)
        if key == "general.alignment":
            lay.alignment = u("<I", pos - 4)
    lay.kv_end = pos
    for _ in range(n_tensors):
        start = pos
        name, name_off = string("tensor name")
        lay.spots["strlen"][-1].what = name
        nd = u("<I", pos)
        lay.spots["ndims"].append(Spot("ndims", pos, "<I", name, nd))
        pos += 4
        for i in range(nd):
            lay.spots["dim"].append(Spot("dim", pos + 8 * i, "<Q", name, u("<Q", pos + 8 * i)))
        pos += 8 * nd
        lay.spots["ttype"].append(Spot("ttype", pos, "<I", name, u("<I", pos)))
        lay.spots["toffset"].append(Spot("toffset", pos + 4, "<Q", name, u("<Q", pos + 4)))
        pos += 12
        lay.tensors[name] = (name_off, len(name.encode()), start)
    lay.ti_end = pos
    lay.data_offset = -(-pos // lay.alignment) * lay.alignment
    return lay


# -- mutations ----------------------------------------------------------------------------
def _interesting(rng: random.Random, v: int, bits: int) -> int:
    top = (1 << bits) - 1
    picks = [0, 1, v - 1, v + 1, 2 * v, v ^ (1 << rng.randrange(bits)), (1 << (bits - 1)) - 1,
             1 << (bits - 1), top, rng.getrandbits(bits), 1 << rng.randrange(bits)]
    if bits == 64:
        picks += [2**31 - 1, 2**32 - 1, 2**32, 2**40]
    return rng.choice(picks) & top


def _patch(spot: Spot, value: int) -> tuple:
    return ("patch", spot.off, struct.pack(spot.fmt, value))


def _int_spot(rng: random.Random, spots: list[Spot]) -> tuple[Spot, tuple]:
    s = rng.choice(spots)
    bits = 8 * struct.calcsize(s.fmt)
    return s, _patch(s, _interesting(rng, int(s.value), bits))


def _truncate(region: str):
    def make(rng, lay, data):
        lo, hi = {"header": (0, 24), "kv": (24, lay.kv_end),
                  "tensor_info": (lay.kv_end, lay.ti_end),
                  "padding": (lay.ti_end, lay.data_offset),
                  "data": (lay.data_offset, lay.size)}[region]
        cut = rng.randrange(lo, hi) if hi > lo else lo
        return f"cut at {cut}", [("truncate", cut)]
    return make


def _header_bytes(rng, lay, data):
    off = rng.randrange(24)
    return f"byte {off}", [("patch", off, bytes([data[off] ^ (1 << rng.randrange(8))]))]


def _spot_kind(kind: str):
    def make(rng, lay, data):
        s, op = _int_spot(rng, lay.spots[kind])
        return f"{kind} of {s.what!r} at {s.off}", [op]
    return make


def _kv_value(rng, lay, data):
    s = rng.choice(lay.spots["value"])
    code = s.fmt[-1]
    if code in "fd":
        new = rng.choice([0.0, -1.0, 1e-30, 1e30, float("nan"), float("inf"), -float("inf"),
                          float(s.value) * rng.choice([0.5, 2.0, -1.0])])
        op = ("patch", s.off, struct.pack(s.fmt, new))
    elif code == "?":
        op = ("patch", s.off, bytes([rng.choice([0, 1, 2, 255])]))
    else:
        signed = code.islower()
        bits = 8 * struct.calcsize(s.fmt)
        v = _interesting(rng, int(s.value), bits)
        if signed and v >= 1 << (bits - 1):
            v -= 1 << bits
        op = ("patch", s.off, struct.pack(s.fmt, v))
    return f"value of {s.what!r}", [op]


def _rename(kind: str):
    """Give one key / tensor another's name (same length, so the layout stays)."""
    def make(rng, lay, data):
        names = ({k: (lay.keys[k][0] + 8, len(k.encode())) for k in lay.keys} if kind == "key"
                 else {n: (off, ln) for n, (off, ln, _) in lay.tensors.items()})
        by_len = defaultdict(list)
        for n, (_, ln) in names.items():
            by_len[ln].append(n)
        groups = [g for g in by_len.values() if len(g) > 1]
        a, b = rng.sample(rng.choice(groups), 2)
        return f"{kind} {a!r} renamed {b!r}", [("patch", names[a][0], b.encode())]
    return make


def _name_bytes(kind: str):
    def make(rng, lay, data):
        if kind == "key":
            s = rng.choice(lay.spots["keyname"])
            off, n, what = s.off, len(s.what.encode()), s.what
        else:
            what = rng.choice(sorted(lay.tensors))
            off, n, _ = lay.tensors[what]
        i = off + rng.randrange(n)
        new = rng.choice([0x00, 0x80, 0xC3, 0xFF, data[i] ^ 0x20, ord(".")])
        return f"{kind} name {what!r} byte {i - off}", [("patch", i, bytes([new]))]
    return make


def _misalign_offset(rng, lay, data):
    s = rng.choice(lay.spots["toffset"])
    d = rng.choice([1, 2, 4, 8, 16, lay.alignment - 1])
    v = int(s.value) + rng.choice([d, -d]) if int(s.value) >= d else int(s.value) + d
    return f"offset of {s.what!r} {int(s.value)} -> {v}", [_patch(s, v)]


def _alignment_key(rng, lay, data):
    """Replace general.name with general.alignment = X plus a filler key of the same total
    size, so tensor infos and data stay where they were and only the alignment changes."""
    start, end, _ = lay.keys["general.name"]
    align = rng.choice([0, 1, 3, 8, 16, 24, 64, 128, 4096, 2**31, 2**32 - 1])
    rec = struct.pack("<Q", 17) + b"general.alignment" + struct.pack("<II", 4, align)
    filler_key = b"x" * (end - start - len(rec) - 8 - 4 - 1)
    rec += struct.pack("<Q", len(filler_key)) + filler_key + struct.pack("<IB", 0, 7)
    assert len(rec) == end - start
    n_kv = struct.unpack_from("<Q", data, 16)[0]
    return (f"general.alignment = {align}",
            [("patch", start, rec), ("patch", 16, struct.pack("<Q", n_kv + 1))])


def _shift_data(rng, lay, data):
    """Insert bytes between the tensor infos and the data: every tensor moves off its
    declared offset (and the alignment)."""
    n = rng.choice([1, 3, 8, 31, 33, lay.alignment])
    return f"insert {n} bytes at {lay.ti_end}", [("insert", lay.ti_end, b"\0" * n)]


def _random_bytes(lo_name: str, hi_name: str):
    def make(rng, lay, data):
        lo = {"header": 0, "kv": 24, "ti": lay.kv_end, "data": lay.data_offset}[lo_name]
        hi = {"kv": lay.kv_end, "ti": lay.ti_end, "end": lay.size}[hi_name]
        ops = []
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(lo, hi)
            ops.append(("patch", i, bytes([rng.randrange(256)])))
        return f"{len(ops)} random bytes in {lo}..{hi}", ops
    return make


def _data_specials(rng, lay, data):
    """NaN / Inf / huge scales inside tensor data: must still not crash."""
    i = rng.randrange(lay.data_offset, lay.size - 64)
    pat = rng.choice([b"\xff" * 64, b"\x00\x7c" * 32, b"\x00\x00\xc0\x7f" * 16, b"\x7f" * 64])
    return f"special floats at {i}", [("patch", i, pat)]


CATEGORIES = {
    "truncate/header": _truncate("header"),
    "truncate/kv": _truncate("kv"),
    "truncate/tensor_info": _truncate("tensor_info"),
    "truncate/padding": _truncate("padding"),
    "truncate/data": _truncate("data"),
    "header/bytes": _header_bytes,
    "header/counts": _spot_kind("count"),
    "kv/string_length": _spot_kind("strlen"),
    "kv/array_length": _spot_kind("arrlen"),
    "kv/value_type": _spot_kind("vtype"),
    "kv/value": _kv_value,
    "kv/key_bytes": _name_bytes("key"),
    "kv/duplicate_key": _rename("key"),
    "kv/random_bytes": _random_bytes("kv", "kv"),
    "tensor/name_bytes": _name_bytes("tensor"),
    "tensor/duplicate_name": _rename("tensor"),
    "tensor/n_dims": _spot_kind("ndims"),
    "tensor/shape": _spot_kind("dim"),
    "tensor/type": _spot_kind("ttype"),
    "tensor/offset": _spot_kind("toffset"),
    "tensor/random_bytes": _random_bytes("ti", "ti"),
    "align/offset": _misalign_offset,
    "align/key": _alignment_key,
    "align/shift_data": _shift_data,
    "data/special_floats": _data_specials,
    "data/random_bytes": _random_bytes("data", "end"),
}


def make_cases(data: bytes, n: int, seed: str) -> list[dict]:
    """n cases, round robin over the categories, each reproducible from (seed, index)."""
    lay = parse_layout(data)
    cats = sorted(CATEGORIES)
    cases = []
    for i in range(n):
        cat = cats[i % len(cats)]
        rng = random.Random(f"{seed}/{i}")
        for _ in range(50):  # redraw the rare mutation that changes nothing
            detail, ops = CATEGORIES[cat](rng, lay, data)
            if apply_ops(data, _encode(ops)) != data:
                break
        cases.append({"id": i, "cat": cat, "detail": detail, "ops": _encode(ops)})
    return cases


def _encode(ops: list[tuple]) -> list[list]:
    return [[o[0], o[1], o[2].hex() if len(o) > 2 else None] for o in ops]


def apply_ops(base: bytes, ops: list) -> bytes:
    out = bytearray(base)
    for kind, off, payload in ops:
        if kind == "patch":
            b = bytes.fromhex(payload)
            out[off:off + len(b)] = b
        elif kind == "insert":
            out[off:off] = bytes.fromhex(payload)
        elif kind == "truncate":
            del out[off:]
    return bytes(out)


# -- judging messages ---------------------------------------------------------------------
_REGION_WORDS = ("header", "magic", "version", "metadata", "tensor", "truncated", "too short",
                 "past the end", "align", "offset", "key", "file")
_LEAKED = re.compile(r"index \d+ is out of bounds|axis \d|buffer is too small|codec can't|"
                     r"unpack requires|cannot reshape|object has no attribute")


# Bugs in code this suite does not own, each pinned by a strict xfail test: cases that hit
# them are counted as "known" rather than failing the fuzz run; the entry goes when the
# owner's fix lands (its xfail test then passes, and strict makes that visible). Empty now:
# the decode kernels' SystemError on non-finite activations is fixed.
KNOWN_BUGS: dict[str, re.Pattern] = {}


def known_bug(status: str, text: str) -> str | None:
    if status != "leak":
        return None
    return next((name for name, pat in KNOWN_BUGS.items() if pat.search(text)), None)


def names_problem(msg: str) -> bool:
    """True when an error message names what is wrong: a quoted key / tensor, or the
    region of the file, and carries no raw numpy / struct / codec wording."""
    if _LEAKED.search(msg):
        return False
    return bool(re.search(r"'[^']+'", msg)) or any(w in msg.lower() for w in _REGION_WORDS)


# -- the child process --------------------------------------------------------------------
def _child_main(paths: list[str]) -> None:  # pragma: no cover - runs in the subprocess
    import resource
    import time

    import efedge

    bases = [Path(p).read_bytes() for p in paths]
    for p in paths:  # warm the kernels before any case is timed
        with efedge.load(p) as m:
            m.logits([1, 2, 3])
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # nothing but answers on the answer pipe
    # A declared length that makes us allocate gigabytes must fail as a MemoryError (and
    # be counted as a leak) rather than quietly succeed on an overcommitting kernel.
    vm = int(re.search(r"VmSize:\s+(\d+)", Path("/proc/self/status").read_text())[1]) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (vm + (3 << 30), resource.RLIM_INFINITY))
    work = Path(tempfile.mkdtemp(prefix="efedge-fuzz-"))
    out.write("ready\n")
    out.flush()
    for line in sys.stdin:
        case = json.loads(line)
        path = work / f"case{case['id']}.gguf"
        path.write_bytes(apply_ops(bases[case["base"]], case["ops"]))
        t0 = time.perf_counter()
        ans = {"status": "ok", "type": "", "msg": ""}
        try:
            with efedge.load(path) as m:
                m.logits([1, 2, 3])
        except efedge.EfedgeError as exc:
            msg = str(exc).replace(str(path), "<file>")  # judge the words, not the path
            ans = {"status": "named" if names_problem(msg) else "unnamed",
                   "type": type(exc).__name__, "msg": msg}
        except BaseException as exc:  # noqa: BLE001 - everything else is a finding
            ans = {"status": "leak", "type": type(exc).__name__, "msg": str(exc)[:500]}
        ans["s"] = time.perf_counter() - t0
        path.unlink()
        out.write(json.dumps(ans) + "\n")
        out.flush()


class _Child:
    """One child process answering cases one at a time; restarted after a crash or hang."""

    def __init__(self, paths: list[Path]):
        self.paths = [str(p) for p in paths]
        self.proc: subprocess.Popen | None = None

    def _start(self) -> None:
        env = dict(os.environ, NUMBA_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
        self.proc = subprocess.Popen([sys.executable, __file__, "--child", *self.paths],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True, env=env)
        line = self._read(300.0)
        if line != "ready\n":
            raise RuntimeError(f"fuzz child failed to start ({line!r})")

    def _read(self, timeout: float) -> str | None:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        return self.proc.stdout.readline() if ready else None

    def _kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def ask(self, case: dict) -> dict:
        if self.proc is None:
            self._start()
        self.proc.stdin.write(json.dumps(case) + "\n")
        self.proc.stdin.flush()
        line = self._read(HANG_S)
        if line is None:
            self._kill()
            return {"status": "hang", "type": "", "msg": f"no answer in {HANG_S:.0f} s"}
        if not line:
            rc = self.proc.wait()
            self.proc = None
            return {"status": "crash", "type": "", "msg": f"child exited with {rc}"}
        return json.loads(line)

    def close(self) -> None:
        if self.proc is not None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._kill()
            self.proc = None


def run_fuzz(bases: list[Path], n_per_base: int, workers: int) -> dict:
    cases = []
    for b, path in enumerate(bases):
        for c in make_cases(path.read_bytes(), n_per_base, f"{SEED}/{path.name}"):
            c["base"] = b
            cases.append(c)
    chunks = [cases[i::workers] for i in range(workers)]

    def run(chunk: list[dict]) -> list[tuple[dict, dict]]:
        child = _Child(bases)
        try:
            return [(c, child.ask(c)) for c in chunk]
        finally:
            child.close()

    with ThreadPoolExecutor(workers) as pool:
        results = [r for part in pool.map(run, chunks) for r in part]
    table: dict[str, Counter] = defaultdict(Counter)
    bad = []
    for case, ans in results:
        if known_bug(ans["status"], f"{ans['type']}: {ans['msg']}"):
            ans["status"] = "known"
        table[case["cat"]][ans["status"]] += 1
        if ans["status"] not in ("ok", "named", "known"):
            bad.append(f"[{bases[case['base']].name} #{case['id']} {case['cat']}: "
                       f"{case['detail']}] {ans['status']} {ans['type']}: {ans['msg'][:300]}")
    report = {"cases": len(results), "per_category": {k: dict(v) for k, v in table.items()},
              "totals": dict(sum(table.values(), Counter())), "bad": bad,
              "slowest_s": max(a.get("s", 0.0) for _, a in results)}
    if os.environ.get("EFEDGE_FUZZ_REPORT"):
        Path(os.environ["EFEDGE_FUZZ_REPORT"]).write_text(json.dumps(report, indent=1))
    return report


def _print_table(report: dict) -> None:
    cols = ("ok", "named", "known", "unnamed", "leak", "crash", "hang")
    print(f"\n{'category':24s}" + "".join(f"{c:>8s}" for c in cols))
    for cat in sorted(report["per_category"]):
        row = report["per_category"][cat]
        print(f"{cat:24s}" + "".join(f"{row.get(c, 0):8d}" for c in cols))
    tot = report["totals"]
    print(f"{'total':24s}" + "".join(f"{tot.get(c, 0):8d}" for c in cols))


@pytest.fixture(scope="module")
def bases(tiny_gguf):
    return [tiny_gguf("qwen3moe", "F16", **TINY), tiny_gguf("qwen3moe", "Q4_K_M", **TINY)]


def test_layout_parser_matches_gguf_reader(bases):
    import gguf

    for path in bases:
        lay = parse_layout(path.read_bytes())
        r = gguf.GGUFReader(path)
        assert lay.data_offset == r.data_offset and lay.size == path.stat().st_size
        assert set(lay.tensors) == {t.name for t in r.tensors}
        assert set(lay.keys) == {k for k in r.fields if not k.startswith("GGUF.")}


def test_every_category_mutates(bases):
    data = bases[1].read_bytes()
    for c in make_cases(data, 3 * len(CATEGORIES), "check"):
        assert apply_ops(data, c["ops"]) != data, c


def _check(report: dict, n: int) -> None:
    _print_table(report)
    assert report["cases"] == n
    assert not report["bad"], "\n".join(report["bad"][:40])


def test_fuzz_default(bases):
    report = run_fuzz(bases, DEFAULT_CASES, workers=1)
    _check(report, 2 * DEFAULT_CASES)


@pytest.mark.slow
def test_fuzz_slow(bases):
    report = run_fuzz(bases, SLOW_CASES, workers=2)
    _check(report, 2 * SLOW_CASES)


def test_infinite_activations_are_rounded_not_raised():
    """Regression: _round_q8_k once divided 1 / -0.0 for a row holding an infinity
    (ZeroDivisionError inside a parallel region, seen as SystemError)."""
    import numpy as np
    from gguf import GGMLQuantizationType

    from efedge.kernels.activations import round_activations

    x = np.ones((2, 256), np.float32)
    x[0, 3], x[1, 7] = np.inf, -np.inf
    for qt in (GGMLQuantizationType.Q4_K, GGMLQuantizationType.Q8_0, GGMLQuantizationType.F16):
        assert round_activations(x, qt).shape == x.shape


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # inf − inf
def test_extreme_weights_raise_only_efedge_errors(bases, tmp_path):
    """A file can be perfectly well-formed and still hold weights that overflow float32
    (a norm of 1e30, an infinity): the runtime may return NaN logits or refuse with an
    EfedgeError, but nothing else may escape. (Regression: the fused decode kernels once
    raised ZeroDivisionError inside numba parallel regions, seen as SystemError.)"""
    import gguf

    import efedge

    src = bases[1]
    offsets = {t.name: t.data_offset for t in gguf.GGUFReader(src).tensors}
    leaks = []
    for name in ("blk.0.attn_norm.weight", "blk.0.ffn_norm.weight", "output_norm.weight"):
        for value in (float("inf"), float("nan"), 1e30):
            path = tmp_path / "extreme.gguf"
            path.write_bytes(apply_ops(src.read_bytes(), _encode(
                [("patch", offsets[name], struct.pack("<f", value))])))
            try:
                with efedge.load(path) as m:
                    m.logits([1, 2, 3])
                    m.generate([1, 2, 3], max_tokens=3, temperature=0)
            except efedge.EfedgeError:
                pass
            except Exception as exc:  # noqa: BLE001 - the finding
                leaks.append(f"{name} = {value}: {type(exc).__name__}: {exc}")
    assert not leaks, "\n".join(leaks)


@pytest.mark.parametrize("quant", ["IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ1_S",
                                   "IQ1_M", "TQ1_0", "TQ2_0"])
def test_truncated_low_bit_file_names_the_tensor(tiny_gguf, tmp_path, quant):
    """The byte range of a tensor comes from its type's block size: a file cut one byte
    short of its last low-bit tensor, or in the middle of an expert tensor, is refused
    with the tensor's name before any kernel reads the missing bytes."""
    import gguf

    import efedge

    src = tiny_gguf("qwen3moe", quant, **TINY)
    data = src.read_bytes()
    r = gguf.GGUFReader(src)
    low = [t for t in r.tensors if t.tensor_type.name == quant]
    el, nb = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[quant]]
    assert all(t.n_bytes == t.n_elements // el * nb for t in low)
    last = max(low, key=lambda t: t.data_offset)
    exps = next(t for t in low if t.name == "blk.1.ffn_up_exps.weight")
    for t, cut in ((last, last.data_offset + last.n_bytes - 1),
                   (exps, exps.data_offset + exps.n_bytes // 2)):
        bad = tmp_path / "cut.gguf"
        bad.write_bytes(data[:cut])
        with pytest.raises(efedge.ModelFormatError, match=re.escape(t.name)):
            efedge.load(bad)


if __name__ == "__main__" and sys.argv[1:2] == ["--child"]:
    _child_main(sys.argv[2:])
