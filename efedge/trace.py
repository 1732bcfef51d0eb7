"""Routing traces: run text through a model and record, per token and MoE layer, the
selected experts, their router probabilities, and what a predictor needs — the pre-gating
scores (the routers of the next layers applied to this layer's normalised hidden state)
and, optionally, a float16 sketch of the hidden state itself.

Trace file (.npz):
  experts   int16   [T, L, K]   selected experts, strongest first
  probs     float16 [T, L, K]   their routing weights (after renormalisation if any)
  pregate   float16 [T, L, H, E] router logits of layer l+d (d = 1..H) applied to h_l, as
                                 selection logits (efedge/experts/selection.py: ranked
                                 as that router selects; its plain logits for a softmax
                                 router) (NaN where l+d is past the last layer)
  pregate_in float16 [T, L, E]  router logits of layer l applied to layer l's input,
                                 normalised as the router's input is (known before
                                 the layer's attention), as selection logits; absent
                                 from older traces and for routers on the layer's input
  hidden    float16 [T, L, S]   optional: random projection of h_l to S dims
  tokens    int32   [T]
  meta      json string: model name, arch, layers, experts, top-k, bytes per expert per
            layer, n_embd, file, text source, horizon H, router_input ("ffn", or "layer"
            for routers on the layer's input: experts asked for before the attention;
            absent from older traces: "ffn")
"""

from __future__ import annotations

import json
import math
import numbers
import zipfile
from pathlib import Path

import numpy as np

from efedge import layers
from efedge.errors import ArgumentError, EfedgeError, UnsupportedModelError
from efedge.experts.options import expert_ids_problem, number
from efedge.experts.selection import RouterSelection

PREGATE_HORIZON = 4


class TraceError(EfedgeError, ValueError):
    """Nothing to trace (an empty text, a bad argument), or a file that is not a usable
    trace. A ValueError too, as these were before they had a class of their own."""


class TraceRecorder:
    """Installed as the model's on_route hook; collects one row per token per layer."""

    def __init__(self, tf, horizon: int = PREGATE_HORIZON, sketch_dim: int = 0, seed: int = 0):
        self.tf = tf
        c = tf.cfg
        # traced layers are the MoE layers (deepseek2's leading dense layers route nothing)
        self.moe_layers = [il for il, b in enumerate(tf.blocks) if b.moe]
        self._index = {il: i for i, il in enumerate(self.moe_layers)}
        self.n_layer, self.n_expert, self.k = len(self.moe_layers), c.n_expert, c.n_expert_used
        self.horizon = horizon
        self.selection = RouterSelection.of_model(tf)
        self.rows: list[dict] = []  # per forward call: layer → arrays
        self._cur: dict[int, tuple] = {}
        self._cur_in: dict[int, np.ndarray] = {}  # layer → its router on its input
        self.proj = None
        if sketch_dim > c.n_embd:  # (a projection wider than the state adds nothing; a
            # huge one asked for an array of hundreds of GiB)
            raise ArgumentError(f"sketch_dim {sketch_dim} is more than the hidden state's "
                                f"{c.n_embd} dimensions")
        if sketch_dim:
            rng = np.random.default_rng(seed)
            self.proj = (rng.standard_normal((c.n_embd, sketch_dim)) /
                         np.sqrt(sketch_dim)).astype(np.float32)

    def __call__(self, layer: int, h: np.ndarray, ids: np.ndarray) -> None:
        blk, c = self.tf.blocks[layer], self.tf.cfg
        if c.spec.routing == "softmax":
            probs = layers.softmax(blk.ffn_gate_inp(h))
        else:  # the arch's own gating scores (sigmoid, or softmax of the raw logits)
            probs = self.tf._route(blk, h)[2]
            if c.gating == "softmax_weight":
                probs = layers.softmax(probs)
        w = np.take_along_axis(probs, ids, axis=-1)
        if c.spec.norm_topk or c.expert_weights_norm:
            w = w / w.sum(axis=-1, keepdims=True)
        li = self._index[layer]
        pre = np.full((h.shape[0], self.horizon, self.n_expert), np.nan, dtype=np.float32)
        for d in range(1, self.horizon + 1):
            if li + d < self.n_layer:
                m = self.moe_layers[li + d]
                pre[:, d - 1] = self.selection.apply(m, self.tf.blocks[m].ffn_gate_inp(h))
        sketch = h @ self.proj if self.proj is not None else None
        self._cur[li] = (ids.copy(), w, pre, sketch, self._cur_in.pop(li, None))
        if li == self.n_layer - 1:
            self.rows.append(self._cur)
            self._cur = {}

    def layer_input(self, layer: int, h: np.ndarray) -> None:
        """The model's on_layer_input hook: layer's router on its normalised input."""
        self._cur_in[self._index[layer]] = self.selection.apply(
            layer, self.tf.blocks[layer].ffn_gate_inp(h))

    def arrays(self) -> dict[str, np.ndarray]:
        L = self.n_layer
        ex = np.concatenate([np.stack([r[il][0] for il in range(L)], axis=1)
                             for r in self.rows]).astype(np.int16)
        pr = np.concatenate([np.stack([r[il][1] for il in range(L)], axis=1)
                             for r in self.rows]).astype(np.float16)
        pg = np.concatenate([np.stack([r[il][2] for il in range(L)], axis=1)
                             for r in self.rows]).astype(np.float16)
        out = {"experts": ex, "probs": pr, "pregate": pg}
        if all(r[il][4] is not None for r in self.rows for il in range(L)):
            out["pregate_in"] = np.concatenate([np.stack([r[il][4] for il in range(L)],
                                                         axis=1)
                                                for r in self.rows]).astype(np.float16)
        if self.proj is not None:
            out["hidden"] = np.concatenate([np.stack([r[il][3] for il in range(L)], axis=1)
                                            for r in self.rows]).astype(np.float16)
        return out


def record_trace(model, text: str, *, max_tokens: int | None = None, chunk: int = 128,
                 horizon: int = PREGATE_HORIZON, sketch_dim: int = 0) -> dict:
    """Run `text` through `model` (an efedge.Model) in causal chunks; return trace arrays
    plus metadata. The context restarts when it is full."""
    tf = model._tf
    if not tf.cfg.is_moe:
        raise UnsupportedModelError(f"{model.path.name} is a dense {tf.cfg.arch} model with no "
                                    f"routed experts: tracing needs a mixture-of-experts model")
    for name, value, low in (("max_tokens", max_tokens, 1), ("horizon", horizon, 0),
                             ("sketch_dim", sketch_dim, 0), ("chunk", chunk, 1)):
        # ids[:-3] would silently drop the last tokens; a negative horizon or sketch
        # fails deep in numpy
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                  or value < low):
            raise TraceError(f"{name} must be an integer ≥ {low}, got {value!r}")
    ids = model.tokenize(text, add_special=True)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if not ids:  # no rows to stack (and the model adds no BOS token)
        raise TraceError("the text to trace is empty: no tokens to run through the model")
    rec = TraceRecorder(tf, horizon=horizon, sketch_dim=sketch_dim)
    old, old_in, old_all = tf.on_route, tf.on_layer_input, tf.layer_input_all
    tf.on_route = rec if old is None else _chain(old, rec)
    tf.layer_input_all = True  # (every layer's input is recorded)
    if tf.cfg.spec.router_input != "layer":  # (there the router reads the input already)
        tf.on_layer_input = (rec.layer_input if old_in is None
                             else _chain(old_in, rec.layer_input))
    try:
        kv = tf.new_kv_cache(model.n_ctx)
        pos = 0
        for start in range(0, len(ids), chunk):
            piece = ids[start:start + chunk]
            if pos + len(piece) > kv.n_ctx:
                kv.clear()
                pos = 0
            tf.forward(piece, pos, kv, model._experts, all_logits=False)
            pos += len(piece)
    finally:
        tf.on_route, tf.on_layer_input = old, old_in
        tf.layer_input_all = old_all
    arrays = rec.arrays()
    store = tf.store
    meta = {
        "model": str(model.path.name), "arch": tf.cfg.arch, "n_layer": rec.n_layer,
        "n_expert": tf.cfg.n_expert, "top_k": tf.cfg.n_expert_used, "n_embd": tf.cfg.n_embd,
        "bytes_per_expert": [store.expert_bytes(i) for i in rec.moe_layers],
        "horizon": horizon, "n_tokens": int(arrays["experts"].shape[0]),
        # "layer": the routers read the layer's input (smallthinker), so each layer's
        # experts are asked for before its attention (the simulator replays that)
        "router_input": tf.cfg.spec.router_input,
    }
    arrays["tokens"] = np.asarray(ids, dtype=np.int32)
    arrays["meta"] = np.array(json.dumps(meta))
    return arrays


def _chain(a, b):
    """One model hook calling a hook already installed, then b (any of the hooks'
    arguments: on_route's and on_layer_input's)."""
    def both(*args):
        a(*args)
        b(*args)
    return both


def save_trace(path: str | Path, arrays: dict, source: str = "") -> None:
    meta = json.loads(str(arrays["meta"]))
    meta["source"] = source
    arrays = dict(arrays, meta=np.array(json.dumps(meta)))
    # through a file object: given a name, numpy appends ".npz" when it lacks one, and
    # the file written was not the one named (`efedge trace … -o routing` → routing.npz)
    with open(path, "wb") as fh:
        np.savez_compressed(fh, **arrays)


def load_trace(path: str | Path) -> tuple[dict[str, np.ndarray], dict]:
    """Arrays and metadata of a trace file; TraceError (a ValueError) naming what is wrong
    with its contents; OSError when it cannot be read."""
    try:
        z = np.load(path, allow_pickle=False)
        if not isinstance(z, np.lib.npyio.NpzFile):  # a bare .npy: one array, not a trace
            raise TraceError(f"{path}: not an efedge trace (a single array, not an .npz)")
        with z:
            arrays = {k: z[k] for k in z.files}
    except TraceError:
        raise
    except ValueError:  # numpy's own message would suggest unpickling it
        raise TraceError(f"{path}: not an efedge trace (not a numpy .npz file)") from None
    except (zipfile.BadZipFile, EOFError) as exc:
        raise TraceError(f"{path}: not an efedge trace (a damaged .npz: {exc})") from None
    for key in ("experts", "probs", "meta"):
        if key not in arrays:
            raise TraceError(f"{path}: not an efedge trace (missing {key!r})")
    try:
        meta = json.loads(str(arrays.pop("meta")))
    except ValueError as exc:
        raise TraceError(f"{path}: the trace's metadata is not JSON ({exc})") from None
    missing = [k for k in ("model", "n_layer", "n_expert", "top_k", "n_embd", "bytes_per_expert",
                           "n_tokens")
               if not isinstance(meta, dict) or k not in meta]
    if missing:
        raise TraceError(f"{path}: the trace's metadata lacks {', '.join(missing)}")
    _check_trace(path, arrays, meta)
    return arrays, meta


def _check_trace(path, arrays: dict, meta: dict) -> None:
    """A TraceError naming the first thing in a trace that does not fit the layout
    record_trace writes (the module docstring). The simulator sizes its tables from the
    metadata and indexes the arrays with it: a mismatch failed deep inside it (an
    IndexError, a broadcast error), or read wrapped-round ids into a plausible table."""
    def bad(what: str) -> TraceError:
        return TraceError(f"{path}: {what}")

    try:  # (number's message names the field, the range and the value)
        L, E, K = (number(f"the metadata's {key}", meta[key], 1, integer=True)
                   for key in ("n_layer", "n_expert", "top_k"))
        number("the metadata's n_embd", meta["n_embd"], 1, integer=True)
        H = meta.get("horizon")
        if H is not None:
            H = number("the metadata's horizon", H, 0, integer=True)
    except ArgumentError as exc:
        raise bad(str(exc)) from None
    if K > E:
        raise bad(f"the metadata's top_k ({K}) is more than its n_expert ({E})")

    ex = arrays["experts"]
    if ex.ndim != 3 or ex.shape[0] == 0:
        raise bad(f"experts must be [tokens ≥ 1, layers, top-k], got shape {ex.shape}")
    T = ex.shape[0]

    def shape(name: str, want: tuple, layout: str, kinds: str = "f") -> np.ndarray | None:
        a = arrays.get(name)
        if a is not None and (a.shape != want or a.dtype.kind not in kinds):
            raise bad(f"{name} must be {layout} = {want} (from experts and the metadata), "
                      f"got shape {a.shape} {a.dtype}")
        return a

    problem = expert_ids_problem(ex, E)
    if problem:
        raise bad(f"experts: {problem}")
    shape("experts", (T, L, K), "[tokens, n_layer, top_k]", "iu")
    if meta["n_tokens"] != T:  # (what `efedge simulate` reports as the trace's length)
        raise bad(f"the metadata's n_tokens ({meta['n_tokens']!r}) is not the number of "
                  f"tokens in experts ({T})")
    per = meta["bytes_per_expert"]
    if not isinstance(per, list) or len(per) != L:
        raise bad(f"the metadata's bytes_per_expert must list an expert's size for each of "
                  f"its {L} layers, got {str(per)[:80]}")
    for i, b in enumerate(per):
        # a size ≤ 0 gave the cache budget negative sizes (≥ 1: the simulator's
        # TraceStore counts whole bytes, and a fraction of one was 0)
        if (isinstance(b, bool) or not isinstance(b, numbers.Real) or not math.isfinite(b)
                or b < 1):
            raise bad(f"the metadata's bytes_per_expert[{i}] must be a size ≥ 1 (bytes), got "
                      f"{b!r}")
    if meta.get("router_input", "ffn") not in ("ffn", "layer"):  # (anything else read as ffn)
        raise bad(f"the metadata's router_input must be 'ffn' or 'layer', got "
                  f"{meta['router_input']!r}")
    shape("probs", (T, L, K), "[tokens, n_layer, top_k]")
    pg = arrays.get("pregate")
    if pg is not None:
        horizon = pg.shape[2:3] if H is None else (H,)  # (older traces: no horizon)
        pg = shape("pregate", (T, L, *horizon, E), "[tokens, n_layer, horizon, n_expert]")
        # NaN only where layer l + d is past the last layer: elsewhere a NaN row reads as
        # "no information", and the simulator would silently predict nothing from it
        for d in range(1, min(pg.shape[2], L - 1) + 1):
            if not np.isfinite(pg[:, :L - d, d - 1]).all():
                raise bad(f"pregate holds NaN or infinite logits at distance {d} within the "
                          f"traced layers (only distances past the last layer are NaN)")
    pi = shape("pregate_in", (T, L, E), "[tokens, n_layer, n_expert]")
    if pi is not None and not np.isfinite(pi).all():
        raise bad("pregate_in holds NaN or infinite logits")
    if "hidden" in arrays:  # (any sketch width)
        shape("hidden", (T, L, *arrays["hidden"].shape[2:3]), "[tokens, n_layer, sketch]")
    tokens = shape("tokens", (T,), "[tokens]", "iu")
    if tokens is not None and tokens.min() < 0:
        raise bad(f"tokens must be token ids ≥ 0, got {tokens.min()}")
