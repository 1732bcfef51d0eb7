"""Saving and restoring what the model has evaluated — the token ids and their keys and
values — so a long prompt (a system prompt, a document) is evaluated once and reused
across runs: llama.cpp's `--prompt-cache` / `llama_state_save_file`, mlx-lm's prompt cache
files.

A state file is a numpy .npz (read without pickle): `tokens` [n] int32, `k` and `v`
[n_layer, n, n_head_kv, head_dim] in the KV cache's type, and `meta`, a JSON string
(format version, the model's identity, the shapes). The identity is a SHA-256 of the GGUF
file's header — metadata and tensor table, every shard's — so a state is only ever
restored into the model (and quantization) that computed it.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from pathlib import Path

import numpy as np

from efedge.errors import ArgumentError, EfedgeError, ModelFormatError

FORMAT = "efedge-state"
VERSION = 1


def model_identity(gf) -> str:
    """SHA-256 over the header bytes (everything before the tensor data) of each file."""
    h = hashlib.sha256()
    for f in [gf, *getattr(gf, "_shards", [])]:
        h.update(bytes(f._mmap[:f.data_offset]))
    return h.hexdigest()


def _host(a) -> np.ndarray:
    """A cache slice as a numpy array (the GPU path keeps torch tensors)."""
    return a.detach().cpu().numpy() if hasattr(a, "detach") else np.asarray(a)


class StateMixin:
    """save_state / load_state for Model (its _session, _gf, _lock helpers)."""

    def _identity(self) -> str:
        if getattr(self, "_state_id", None) is None:
            self._state_id = model_identity(self._gf)
        return self._state_id

    def save_state(self, path: str | os.PathLike, n_tokens: int | None = None) -> int:
        """Write the evaluated sequence (its first `n_tokens`, default all) to `path`;
        returns how many tokens were saved. Written to a temporary file first, so a
        failed write never leaves half a state under `path`."""
        with self._lock:
            self._check_open()
            self._wait_idle("save_state")
            s = self._session
            # (an integer, not what int() makes of one: "3", 2.5, True or "all" saved
            # some other count, or raised int()'s bare ValueError)
            n = len(s.tokens) if n_tokens is None else n_tokens
            if isinstance(n, bool) or not isinstance(n, int | np.integer) or \
                    not 0 <= n <= len(s.tokens):
                raise ArgumentError(f"n_tokens must be an integer in 0..{len(s.tokens)} (the "
                                    f"tokens evaluated), got {n_tokens!r}")
            n = int(n)
            k, v = _host(s.kv.k[:, :n]), _host(s.kv.v[:, :n])
            meta = {"format": FORMAT, "version": VERSION, "model": self._identity(),
                    "arch": self.config.arch, "k_shape": list(k.shape),
                    "v_shape": list(v.shape), "dtype": str(k.dtype)}
            tokens = np.asarray(s.tokens[:n], dtype=np.int32)
        path = Path(path).expanduser()
        tmp = path.with_name(path.name + ".tmp")
        try:
            with open(tmp, "wb") as f:
                np.savez(f, tokens=tokens, k=k, v=v, meta=np.array(json.dumps(meta)))
            os.replace(tmp, path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise EfedgeError(f"cannot write the state file {str(path)!r}: "
                              f"{exc.strerror or exc}") from None
        return n

    def load_state(self, path: str | os.PathLike) -> list[int]:
        """Restore a state saved by save_state (the same model file only); returns its
        token ids. The next prompt that starts with them reuses their evaluation."""
        path = Path(path).expanduser()
        arrays = _read(path)
        meta, tokens, k, v = arrays
        if meta.get("model") != self._identity():
            raise ArgumentError(f"{str(path)!r} is the state of another model "
                                f"({meta.get('arch', '?')}, or another file or "
                                "quantization): it cannot be restored into this one")
        c = self.config
        with self._lock:
            self._check_open()
            self._wait_idle("load_state")
            kv = self._session.kv
            n = tokens.size
            want_k, want_v = (c.n_layer, n, *kv.k.shape[2:]), (c.n_layer, n, *kv.v.shape[2:])
            if tuple(k.shape) != want_k or tuple(v.shape) != want_v:
                raise ModelFormatError(f"{str(path)!r}: keys / values of shape {k.shape} / "
                                       f"{v.shape}, this model's cache needs {want_k} / "
                                       f"{want_v}")
            if n > kv.n_ctx:
                raise ArgumentError(f"{str(path)!r} holds {n} tokens; this model's context "
                                    f"is {kv.n_ctx} (raise n_ctx / -c)")
            if n and (tokens.min() < 0 or tokens.max() >= c.n_vocab):
                raise ModelFormatError(f"{str(path)!r}: token ids outside the vocabulary")
            self._session.reset()
            if hasattr(kv.k, "copy_"):  # torch (device="cuda")
                import torch

                kv.k[:, :n].copy_(torch.from_numpy(np.ascontiguousarray(k)))
                kv.v[:, :n].copy_(torch.from_numpy(np.ascontiguousarray(v)))
            else:
                kv.k[:, :n] = k
                kv.v[:, :n] = v
            kv.n_past = n
            self._session.tokens = tokens.tolist()
        return tokens.tolist()


def _read(path: Path):
    """(meta, tokens, k, v) from a state file, every failure an error naming it."""
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            if not isinstance(meta, dict) or meta.get("format") != FORMAT:
                raise ValueError("not an efedge state file")
            if meta.get("version") != VERSION:
                raise ValueError(f"state format version {meta.get('version')!r}; this efedge "
                                 f"reads version {VERSION}")
            tokens, k, v = z["tokens"], z["k"], z["v"]
    except FileNotFoundError:
        raise EfedgeError(f"state file {str(path)!r} does not exist") from None
    except OSError as exc:
        raise EfedgeError(f"cannot read the state file {str(path)!r}: "
                          f"{exc.strerror or exc}") from None
    except (ValueError, KeyError, zipfile.BadZipFile, EOFError, json.JSONDecodeError) as exc:
        # (numpy takes a file that is no .npz for a pickle, which it will not read)
        why = "not an .npz archive" if "pickle" in str(exc) else str(exc)
        raise ModelFormatError(f"{str(path)!r} is not a readable efedge state file "
                               f"({why})") from None
    if tokens.ndim != 1 or tokens.dtype.kind not in "iu" or k.ndim != 4 or v.ndim != 4 \
            or k.shape[1] != tokens.size or v.shape[1] != tokens.size \
            or k.dtype != v.dtype or k.dtype.kind != "f":
        raise ModelFormatError(f"{str(path)!r}: the arrays do not form a state (tokens "
                               f"{tokens.shape}, k {k.shape}, v {v.shape})")
    return meta, tokens.astype(np.int64), k, v
