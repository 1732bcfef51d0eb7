"""Saved and restored evaluation state (efedge/api_state.py, `run --prompt-cache`): a
restored prompt continues bit for bit as a fresh one, only the new tokens are evaluated,
and every bad state file is refused with an error naming it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import efedge
from efedge.api_state import model_identity
from efedge.errors import ArgumentError, EfedgeError, ModelFormatError
from efedge.generate import GenerationResult

PROMPT = list(range(5, 60))


@pytest.fixture(scope="module")
def path(tiny_gguf):
    return tiny_gguf("qwen3moe", "F32")


def _greedy(m, ids, n=8):
    r = GenerationResult([], "")
    m.generate(ids, max_tokens=n, temperature=0, result=r)
    return r.tokens


@pytest.mark.parametrize("cache", [None, "50%"])
def test_a_restored_prompt_continues_as_a_fresh_one(path, tmp_path, cache):
    def steps(m):  # the logits of three more tokens over the evaluated prompt
        return np.stack([m._session.prefill(PROMPT + want[:i + 1]) for i in range(3)])

    with efedge.load(path, n_ctx=256, cache=cache) as m:
        want = _greedy(m, PROMPT)
        m.generate(PROMPT, max_tokens=0)
        logits = steps(m)
        m.generate(PROMPT, max_tokens=0)
        assert m.save_state(tmp_path / "s.npz") == len(PROMPT)
    with efedge.load(path, n_ctx=256, cache=cache) as m:
        assert m.load_state(tmp_path / "s.npz") == PROMPT
        m.reset_stats()
        assert _greedy(m, PROMPT) == want
        assert m.stats()["tokens_prompt"] == 2  # the last two again, as for any reuse
        m.load_state(tmp_path / "s.npz")
        # longer sequences over the restored one: the same bits as over an evaluated one
        np.testing.assert_array_equal(steps(m), logits)


def test_part_of_a_sequence_and_bad_counts(path, tmp_path):
    with efedge.load(path, n_ctx=256) as m:
        m.generate(PROMPT, max_tokens=4, temperature=0)
        assert m.save_state(tmp_path / "p.npz", n_tokens=10) == 10
        assert m.load_state(tmp_path / "p.npz") == PROMPT[:10]
        for bad in (-1, 10_000, "3", 2.5, True, "all"):
            with pytest.raises(ArgumentError, match="n_tokens"):
                m.save_state(tmp_path / "x.npz", n_tokens=bad)
        with pytest.raises(EfedgeError, match="cannot write"):
            m.save_state(tmp_path / "no" / "such" / "dir.npz")
        assert not list((tmp_path).glob("**/*.tmp"))


def _rewrite(src, dst, **change):
    with np.load(src, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(str(arrays["meta"]))
    meta.update(change.pop("meta", {}))
    arrays["meta"] = np.array(json.dumps(meta))
    arrays.update(change)
    np.savez(dst, **arrays)
    return dst


def test_bad_state_files_are_named(path, tmp_path, tiny_gguf):
    good = tmp_path / "good.npz"
    with efedge.load(path, n_ctx=256) as m:
        m.generate(PROMPT, max_tokens=0)
        m.save_state(good)
        (tmp_path / "text.npz").write_text("not a state")
        (tmp_path / "cut.npz").write_bytes(good.read_bytes()[:500])
        cases = [
            (tmp_path / "missing.npz", EfedgeError, "does not exist"),
            (tmp_path / "text.npz", ModelFormatError, "not an .npz archive"),
            (tmp_path / "cut.npz", ModelFormatError, "not a readable"),
            (_rewrite(good, tmp_path / "v.npz", meta={"version": 9}), ModelFormatError,
             "version 9"),
            (_rewrite(good, tmp_path / "f.npz", meta={"format": "x"}), ModelFormatError,
             "not an efedge state"),
            (_rewrite(good, tmp_path / "o.npz", meta={"model": "0" * 64}), ArgumentError,
             "another model"),
            (_rewrite(good, tmp_path / "s.npz", k=np.zeros((1, len(PROMPT), 1, 1),
                                                            np.float16)),
             ModelFormatError, "shape"),
            (_rewrite(good, tmp_path / "t.npz", tokens=np.full(len(PROMPT), 10**6, np.int32)),
             ModelFormatError, "vocabulary"),
            (_rewrite(good, tmp_path / "n.npz", tokens=np.zeros(3, np.int32)),
             ModelFormatError, "do not form a state"),
        ]
        for bad, exc, words in cases:
            with pytest.raises(exc, match=words):
                m.load_state(bad)
        assert m.load_state(good) == PROMPT  # a refused file left the model usable
    with efedge.load(path, n_ctx=32) as small, pytest.raises(ArgumentError, match="context"):
        small.load_state(good)
    with efedge.load(tiny_gguf("qwen3moe", "F16"), n_ctx=256) as other:
        with np.load(good, allow_pickle=False) as z:
            assert json.loads(str(z["meta"]))["model"] != model_identity(other._gf)
        with pytest.raises(ArgumentError, match="another model"):
            other.load_state(good)


def test_run_prompt_cache(path, tmp_path):
    cache = tmp_path / "prompt.npz"
    base = [sys.executable, "-m", "efedge", "run", str(path), "-p", "hello " * 30,
            "-n", "6", "--temp", "0", "--prompt-cache", str(cache)]
    first = subprocess.run(base, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    assert cache.exists() and "reused" not in first.stderr
    again = subprocess.run(base, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert again.stdout == first.stdout
    assert "reused" in again.stderr and "| prompt 2 tokens" in again.stderr
    before = os.stat(cache).st_mtime_ns
    ro = subprocess.run(base[:6] + ["hello " * 29 + "bye", *base[7:], "--prompt-cache-ro"],
                        capture_output=True, text=True, timeout=300)
    assert ro.returncode == 0 and os.stat(cache).st_mtime_ns == before, ro.stderr
    bad = subprocess.run(base[:-2] + ["--prompt-cache-all"], capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode == 1 and "--prompt-cache" in bad.stderr


def test_a_cache_of_torch_tensors_round_trips(path, tmp_path):
    """The GPU path's cache (GpuKVCache, torch tensors; here on torch's CPU device) saves
    and restores the same values as the numpy one."""
    torch = pytest.importorskip("torch")
    from efedge.gpu.model import GpuKVCache

    with efedge.load(path, n_ctx=128) as m:
        m.generate(PROMPT, max_tokens=0)
        m.save_state(tmp_path / "np.npz")
        kv = m._session.kv
        g = GpuKVCache(kv.k.shape[0], kv.n_ctx, kv.k.shape[2], kv.k.shape[3], kv.v.shape[3],
                       "cpu")
        g.k.copy_(torch.from_numpy(kv.k))
        g.v.copy_(torch.from_numpy(kv.v))
        g.n_past = kv.n_past
        m._session.kv = g
        m.save_state(tmp_path / "torch.npz")
        with np.load(tmp_path / "np.npz") as a, np.load(tmp_path / "torch.npz") as b:
            for key in ("tokens", "k", "v"):
                np.testing.assert_array_equal(a[key], b[key])
        g.k.zero_()
        g.v.zero_()
        assert m.load_state(tmp_path / "np.npz") == PROMPT
        np.testing.assert_array_equal(g.k[:, :len(PROMPT)].numpy(), kv.k[:, :len(PROMPT)])
        np.testing.assert_array_equal(g.v[:, :len(PROMPT)].numpy(), kv.v[:, :len(PROMPT)])
        m._session.kv = kv
