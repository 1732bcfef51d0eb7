"""The hybrid predictor's step outside any model: warm, and with the CPU caches flushed
between steps the way a decode's layer kernels flush them. Not a test — run it:

    python benchmarks/predictor_step.py                      # the bench model's shape
    python benchmarks/predictor_step.py --layers 5 --experts 64 --top-k 8 --width 256  # demo

It separates the predictor's own cost from what runs around it in a live decode (in place,
`benchmarks/policies.py --cost`): the same steps on the same inputs in two source trees
(`PYTHONPATH=TREE python benchmarks/predictor_step.py`) compare the predictor alone
(docs/scheduler.md §7). Random routers, routes and hidden states; a decode's shape: one
token per pass, a pass-start prediction, two distances predicted per layer.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from efedge.experts.predictor import HybridPredictor


def step_us(pred: HybridPredictor, ids, hidden, n_tokens: int, flush: np.ndarray | None,
            n_pred: int) -> float:
    """Median µs of one step() over n_tokens passes; `flush` is streamed through before
    each step when given."""
    times = []
    i = 0
    for t in range(n_tokens):
        pred.begin_pass(np.array([t % 97]))
        pred.predict_pass_start(n_pred)
        for layer in range(pred.n_layer):
            if flush is not None:
                np.add(flush, 1.0, out=flush)
            t0 = time.perf_counter()
            pred.step(layer, ids[i % len(ids)], hidden=hidden[i % len(hidden)], n_pred=n_pred)
            times.append(time.perf_counter() - t0)
            i += 1
    return 1e6 * float(np.median(times))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--predict", type=int, default=2, help="distances predicted per step")
    ap.add_argument("--flush-mb", type=float, default=32.0,
                    help="bytes streamed between steps (the layer kernels' traffic)")
    ap.add_argument("-n", "--tokens", type=int, default=100)
    a = ap.parse_args()
    if min(a.layers, a.experts, a.top_k, a.width, a.tokens, a.predict) < 1 \
            or a.top_k > a.experts:
        ap.error("sizes must be ≥ 1 and --top-k ≤ --experts")
    rng = np.random.default_rng(0)
    pred = HybridPredictor(a.layers, a.experts, a.top_k)
    pred.set_router_weights(rng.standard_normal((a.layers, a.experts, a.width))
                            .astype(np.float32))
    ids = [np.sort(rng.choice(a.experts, a.top_k, replace=False)).astype(np.int32)[None]
           for _ in range(4096)]
    hidden = rng.standard_normal((64, 1, a.width)).astype(np.float32)
    flush = np.zeros(max(1, int(a.flush_mb * (1 << 20)) // 4), dtype=np.float32)
    step_us(pred, ids, hidden, 20, None, a.predict)  # compile, fill the tables
    warm = step_us(pred, ids, hidden, a.tokens, None, a.predict)
    cold = step_us(pred, ids, hidden, max(1, a.tokens // 2), flush, a.predict)
    print(f"{a.layers} layers x {a.experts} experts, top-{a.top_k}, width {a.width}: "
          f"step {warm:.1f} us warm, {cold:.1f} us with {a.flush_mb:g} MB streamed between "
          f"steps (median)")


if __name__ == "__main__":
    main()
