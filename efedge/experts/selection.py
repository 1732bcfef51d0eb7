"""How a model's routers turn logits into their choice of experts, for the predictors.

Pre-gating applies a later layer's router to the current hidden state; to name the
experts that router will *select*, its logits must be ranked as the model ranks them. A
plain softmax router ranks by its logits. Others do not (llama.cpp's build_moe_ffn):

* gpt-oss adds a router bias and takes the top-k logits;
* DeepSeek-V3 / Kimi / GLM-4.5 select by sigmoid(logit) + a per-expert selection bias
  (exp_probs_b) that can outweigh the logits, and DeepSeek-V3 only within its best
  expert groups (the two best scores of each group summed);
* DeepSeek-V2's softmax router also selects within groups.

`RouterSelection.apply` turns router logits into *selection logits*: ordered as the
router selects, equal to the logits for a plain softmax router, and for a gated one the
log / logit of the biased score; without a selection bias they are the logits (+ the
router bias), whose softmax the predictor reads as for a plain softmax router. The
predictor's kernel applies the same function (predictor_kernels._selection_logits) to
the int8 routers it carries; traces record selection logits, so the simulator predicts
as the live run does.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from efedge.experts.predictor_kernels import (
    SEL_BIAS,
    SEL_NONE,
    SEL_SIGMOID,
    SEL_SOFTMAX,
    _selection_rows,
)


@dataclass(frozen=True)
class RouterSelection:
    mode: int  # SEL_NONE / SEL_BIAS / SEL_SOFTMAX / SEL_SIGMOID (predictor_kernels)
    router_bias: np.ndarray  # float32 [L, E]: added to the logits (gpt-oss); zeros if none
    select_bias: np.ndarray  # float32 [L, E]: added to the gate's scores (exp_probs_b)
    n_groups: int = 0  # expert groups (0 / 1: none)
    n_group_used: int = 0

    @classmethod
    def of_model(cls, tf) -> RouterSelection:
        """The selection rule of an efedge Transformer (model.py): its config's routing
        and gating, the blocks' router and selection biases (zero rows for dense layers)."""
        c = tf.cfg
        L, E = len(tf.blocks), max(1, int(c.n_expert))
        rb = np.zeros((L, E), dtype=np.float32)
        sb = np.zeros((L, E), dtype=np.float32)
        for il, b in enumerate(tf.blocks):
            if getattr(b, "router_bias", None) is not None:
                rb[il] = np.asarray(b.router_bias, dtype=np.float32).reshape(-1)[:E]
            if getattr(b, "exp_probs_b", None) is not None:
                sb[il] = np.asarray(b.exp_probs_b, dtype=np.float32).reshape(-1)[:E]
        if c.spec.routing == "softmax":  # softmax over the logits, top-k: they rank
            return cls(SEL_NONE, rb, sb)
        groups = (int(c.n_expert_groups), int(c.n_group_used))
        if c.gating == "sigmoid":
            return cls(SEL_SIGMOID, rb, sb, *groups)
        if c.gating == "softmax":
            return cls(SEL_SOFTMAX, rb, sb, *groups)
        # softmax_weight (gpt-oss's top-k of the logits, then their softmax)
        mode = SEL_BIAS if rb.any() or sb.any() else SEL_NONE
        return cls(mode, rb, sb, *groups)

    def apply(self, layer: int, logits: np.ndarray) -> np.ndarray:
        """Router logits [T, E] of `layer` → selection logits [T, E] float32 (a copy)."""
        z = np.array(logits, dtype=np.float64, ndmin=2)
        if self.mode != SEL_NONE or self.n_groups > 1:
            _selection_rows(z, self.mode, self.router_bias[layer], self.select_bias[layer],
                            self.n_groups, self.n_group_used)
        return z.astype(np.float32)
