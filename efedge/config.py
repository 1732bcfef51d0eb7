"""ModelConfig: the hyper-parameters of a GGUF model, read from its "{arch}.*" keys and
checked against the tensor shapes before anything is computed."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from efedge import archs, rope
from efedge.archs import ArchSpec
from efedge.errors import ModelFormatError, UnsupportedModelError
from efedge.gguf_file import GGUFFile
from efedge.rope import RopeScaling


@dataclass(frozen=True)
class ModelConfig:
    arch: str
    spec: ArchSpec
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim: int  # key / query head size
    v_head_dim: int
    n_vocab: int
    n_ctx_train: int
    rope_base: float
    rope_dim: int
    norm_eps: float
    n_ff: int  # dense FFN width (0 when every layer is MoE)
    n_expert: int  # 0 for dense models
    n_expert_used: int
    n_ff_exp: int
    n_ff_shexp: int  # 0: no shared expert
    # multi-token-prediction blocks stored after the n_layer the forward pass runs
    # ("{arch}.nextn_predict_layers": block_count counts them, llama.cpp's pass skips them)
    n_nextn: int = 0
    # granite multipliers (1.0 = none); kq_scale multiplies attention scores
    embd_scale: float = 1.0
    residual_scale: float = 1.0
    kq_scale: float = 0.0  # 0: 1/sqrt(head_dim)
    logit_scale: float = 1.0  # logits are divided by it
    # deepseek2: dense leading layers, latent attention ranks, per-head sizes after
    # decompression (0: not MLA), routing from the metadata
    n_dense_lead: int = 0
    # ernie4_5-moe: past the dense lead, experts every moe_layer_step-th layer
    moe_layer_step: int = 1
    q_lora_rank: int = 0
    kv_lora_rank: int = 0
    k_head_dim_mla: int = 0
    v_head_dim_mla: int = 0
    gating: str = "softmax"  # "softmax" | "sigmoid" | "softmax_weight" (top-k, then softmax)
    expert_weights_norm: bool = False
    expert_weights_scale: float = 0.0  # 0: none
    n_expert_groups: int = 0
    n_group_used: int = 0
    # gpt-oss: layers il with il % swa_pattern < swa_pattern - 1 see the last sliding_window
    sliding_window: int = 0
    swa_pattern: int = 0
    # linear / YaRN rope scaling (efedge/rope.py); gpt-oss's sliding-window layers may
    # have their own base (rope.freq_base_swa) and scale: (base, scaling), None = the same
    rope_scaling: RopeScaling = RopeScaling()
    rope_swa: tuple[float, RopeScaling] | None = None
    # layers without rope (NoPE): llama4 (iRoPE) those with (il + 1) % nope_step == 0,
    # smallthinker (nope_first) those with il % nope_step == 0 (0: every layer ropes).
    # llama4's NoPE layers multiply their queries by attn_temperature(pos); swa_chunked:
    # the swa layers attend only to their query's sliding_window-sized chunk; kq_norm: the
    # rope layers take an unweighted per-head RMS norm of q and k
    nope_step: int = 0
    nope_first: bool = False
    attn_temp: tuple[int, float, float] = (0, 0.0, 0.0)  # floor scale, scale, offset
    swa_chunked: bool = False
    kq_norm: bool = False
    # smallthinker (ArchSpec.iswa_nope): the window's layers are il % swa_pattern != 0
    # (the first of each period attends everything)
    swa_dense_first: bool = False
    # qwen3vl* (ArchSpec.mrope): "{arch}.rope.dimension_sections", the pairs of each head
    # llama.cpp rotates by the t / h / w / 4th position (rope.imrope_fourth_pairs)
    rope_sections: tuple[int, ...] = ()
    # ArchSpec.per_layer (mimo2): (n_head, n_head_kv) of each layer where the file's
    # head_count / head_count_kv arrays differ (n_head / n_head_kv then hold the largest,
    # which size the KV cache), the layers of the window (its sliding_window_pattern array)
    # and those with routed experts (their ffn_gate_inp); () = uniform / the rules here
    head_counts: tuple[tuple[int, int], ...] = ()
    swa_layers: tuple[bool, ...] = ()
    moe_layers: tuple[bool, ...] = ()
    # mimo2's attention.value_scale: the attention's output times it (0: none)
    value_scale: float = 0.0

    @property
    def is_moe(self) -> bool:
        return self.n_expert > 0

    @property
    def has_shared(self) -> bool:
        return self.n_ff_shexp > 0

    def token_ids(self, tokens) -> np.ndarray:
        """tokens as a flat int64 array for a forward pass, checked: at least one, every
        id inside the vocabulary (the embedding lookup does not bounds-check)."""
        ids = np.asarray(tokens, dtype=np.int64).reshape(-1)
        if ids.shape[0] == 0:
            raise ValueError("forward needs at least one token")
        if ids.min() < 0 or ids.max() >= self.n_vocab:  # (the mask only when one is off)
            bad = int(ids[(ids < 0) | (ids >= self.n_vocab)][0])
            raise ValueError(f"token id {bad} is outside the vocabulary "
                             f"(0..{self.n_vocab - 1})")
        return ids

    def is_moe_layer(self, il: int) -> bool:
        if self.moe_layers:
            return self.is_moe and self.moe_layers[il]
        return (self.is_moe and il >= self.n_dense_lead
                and (il + 1) % self.moe_layer_step == 0)

    def is_swa_layer(self, il: int) -> bool:
        if self.swa_layers:
            return self.swa_layers[il]
        if self.swa_dense_first:
            return self.swa_pattern > 0 and il % self.swa_pattern != 0
        return self.swa_pattern > 0 and il % self.swa_pattern < self.swa_pattern - 1

    def heads_of(self, il: int) -> tuple[int, int]:
        """(n_head, n_head_kv) of layer il."""
        return self.head_counts[il] if self.head_counts else (self.n_head, self.n_head_kv)

    def is_nope_layer(self, il: int) -> bool:
        return self.nope_step > 0 and (il + (0 if self.nope_first else 1)) % self.nope_step == 0

    def window_of(self, il: int) -> int:
        """The positions layer il's queries see, their own included (0: all; llama4's
        chunks are not a window: efedge.model's attention runs)."""
        return self.sliding_window if self.is_swa_layer(il) and not self.swa_chunked else 0

    @property
    def attn_scale(self) -> float:
        return self.kq_scale or 1.0 / math.sqrt(self.head_dim)

    def rope_of(self, il: int) -> tuple[float, RopeScaling]:
        """(base, scaling) of layer il's rope."""
        if self.rope_swa is not None and self.is_swa_layer(il):
            return self.rope_swa
        return self.rope_base, self.rope_scaling


def _int(gf: GGUFFile, key: str, default: int | None = None) -> int:
    val = gf.get(key, default)
    if val is None:
        raise ModelFormatError(f"{gf.path}: required metadata key {key!r} is missing")
    if isinstance(val, list):
        # Some files store per-layer arrays (e.g. head_count_kv); we need one value.
        if not val or len(set(val)) != 1:
            raise UnsupportedModelError(f"metadata key {key!r}: per-layer values {val[:8]} "
                                        "are not supported")
        val = val[0]
    if not isinstance(val, int | float) or isinstance(val, bool) or int(val) != val or val < 0:
        raise ModelFormatError(f"{gf.path}: metadata key {key!r} has invalid value {val!r}")
    return int(val)


def _positive(gf: GGUFFile, key: str, default: int | None = None) -> int:
    val = _int(gf, key, default)
    if val == 0:
        raise ModelFormatError(f"{gf.path}: metadata key {key!r} must be at least 1, got 0")
    return val


def _float(gf: GGUFFile, key: str, default: float, minimum: float = 0.0) -> float:
    """A finite number >= minimum (NaN, infinities and negatives would only surface as
    NaN logits much later)."""
    val = gf.get(key, default)
    if (not isinstance(val, int | float) or isinstance(val, bool) or not math.isfinite(val)
            or val < minimum):
        raise ModelFormatError(f"{gf.path}: metadata key {key!r} has invalid value {val!r}")
    return float(val)


def _check_shape(gf: GGUFFile, name: str, want: tuple[int, ...]) -> None:
    ref = gf.tensor(name)
    if ref.shape != want:
        raise ModelFormatError(f"tensor {name!r}: shape {ref.shape} does not match the "
                               f"metadata (expected {want})")


def config_from_gguf(gf: GGUFFile) -> ModelConfig:
    arch = gf.get("general.architecture")
    if not isinstance(arch, str):
        raise ModelFormatError(f"{gf.path}: metadata key 'general.architecture' is missing")
    spec = archs.get(arch)
    k = f"{arch}."
    for key in spec.required_keys:
        if gf.get(k + key) is None:
            raise ModelFormatError(f"{gf.path}: required metadata key {k + key!r} is missing")
    n_blocks = _positive(gf, k + "block_count")
    n_nextn = _int(gf, k + "nextn_predict_layers", 0)
    if n_nextn >= n_blocks:
        raise ModelFormatError(f"{gf.path}: metadata key {k + 'nextn_predict_layers'!r} "
                               f"({n_nextn}) leaves none of the {n_blocks} blocks of "
                               f"{k + 'block_count'!r} to run (an MTP-only file?)")
    n_layer = n_blocks - n_nextn
    n_embd = _positive(gf, k + "embedding_length")
    heads = _head_counts(gf, k, n_layer, n_blocks) if spec.per_layer else ()
    if heads:  # the largest counts size the KV cache; head sizes default by layer 0's
        n_head, n_head_kv = max(h for h, _ in heads), max(h for _, h in heads)
    else:
        n_head = _positive(gf, k + "attention.head_count")
        n_head_kv = _positive(gf, k + "attention.head_count_kv", n_head)
    if n_head % n_head_kv and not heads:  # (per-layer counts: checked per layer)
        raise ModelFormatError(f"{gf.path}: metadata keys {k + 'attention.head_count'!r} "
                               f"({n_head}) and {k + 'attention.head_count_kv'!r} "
                               f"({n_head_kv}): heads must be a multiple of kv heads")
    if spec.mha_only and n_head_kv != n_head:
        raise ModelFormatError(f"{gf.path}: metadata keys {k + 'attention.head_count_kv'!r} "
                               f"({n_head_kv}) and {k + 'attention.head_count'!r} ({n_head}) "
                               f"differ: llama.cpp's {arch} loader sizes attn_k / attn_v by "
                               "head_count and cannot load such a file")
    head_dim = _int(gf, k + "attention.key_length",
                    n_embd // (heads[0][0] if heads else n_head))
    v_head_dim = _int(gf, k + "attention.value_length", head_dim)
    rope_dim = _int(gf, k + "rope.dimension_count", head_dim)
    if head_dim == 0 or rope_dim > head_dim or rope_dim % 2:
        raise ModelFormatError(f"{gf.path}: metadata keys {k + 'attention.key_length'!r} "
                               f"({head_dim}) and {k + 'rope.dimension_count'!r} ({rope_dim}): "
                               "the head size must be positive and the rope dims even and "
                               "no larger")
    if spec.mrope and rope_dim != head_dim:  # llama.cpp's qwen3vl* graphs assert it
        raise ModelFormatError(f"{gf.path}: metadata key {k + 'rope.dimension_count'!r} "
                               f"({rope_dim}) must equal the head size ({head_dim}) for "
                               f"{arch!r}")
    n_expert = _int(gf, k + "expert_count", 0)
    if spec.moe and n_expert == 0:
        raise ModelFormatError(f"{gf.path}: metadata key {k + 'expert_count'!r} is missing")
    if n_expert and not (spec.moe or spec.moe_optional):
        raise UnsupportedModelError(f"architecture {arch!r} does not take experts")
    n_expert_used = _int(gf, k + "expert_used_count", 0) if n_expert else 0
    if n_expert and not 0 < n_expert_used <= n_expert:
        raise ModelFormatError(f"{gf.path}: metadata key {k + 'expert_used_count'!r} "
                               f"({n_expert_used}) is not in 1..{k + 'expert_count'!r} "
                               f"({n_expert})")
    n_ff = _int(gf, k + "feed_forward_length", 0)
    n_ff_exp = _int(gf, k + spec.expert_width, n_ff) if n_expert else 0
    n_ff_shexp = 0
    if spec.shared_expert:
        n_ff_shexp = _int(gf, k + "expert_shared_feed_forward_length", n_ff_exp)
        if spec.shared_per_count:  # bailingmoe2: the key is one shared expert's width
            n_ff_shexp = (n_ff_shexp or n_ff_exp) * _int(gf, k + "expert_shared_count")
    elif spec.shared_optional and n_expert:
        n_ff_shexp = _int(gf, k + "expert_shared_feed_forward_length", 0)
        # deepseek2 and bailingmoe count shared experts of the routed experts' width instead
        if spec.shared_by_count:
            n_ff_shexp = n_ff_shexp or _int(gf, k + "expert_shared_count", 0) * n_ff_exp
    emb = gf.tensor("token_embd.weight")
    if len(emb.shape) != 2 or emb.shape[0] != n_embd:
        raise ModelFormatError(f"tensor 'token_embd.weight': shape {emb.shape} does not match "
                               f"embedding_length {n_embd}")
    n_vocab = emb.shape[1]
    tokens = gf.get("tokenizer.ggml.tokens")
    if isinstance(tokens, list) and len(tokens) != n_vocab:
        # as llama.cpp: the embedding has one row per vocabulary entry, else generated ids
        # would have no text (or text would have no row)
        raise ModelFormatError(f"tensor 'token_embd.weight': {n_vocab} rows do not match "
                               f"the {len(tokens)} entries of 'tokenizer.ggml.tokens'")
    n_ctx_train = _positive(gf, k + "context_length", 2048)
    rope_base = _float(gf, k + "rope.freq_base", 10000.0, minimum=1e-30)
    cfg = ModelConfig(
        arch=arch, spec=spec, n_layer=n_layer, n_embd=n_embd, n_head=n_head,
        n_head_kv=n_head_kv, head_dim=head_dim, v_head_dim=v_head_dim, n_vocab=n_vocab,
        n_ctx_train=n_ctx_train, rope_base=rope_base, rope_dim=rope_dim,
        norm_eps=_float(gf, k + "attention.layer_norm_rms_epsilon", 1e-5),
        n_ff=n_ff, n_expert=n_expert, n_expert_used=n_expert_used, n_ff_exp=n_ff_exp,
        n_ff_shexp=n_ff_shexp, n_nextn=n_nextn, head_counts=heads, **_scales(gf, spec, k),
        **_extras(gf, spec, k, n_layer),
        **_rope(gf, spec, k, n_ctx_train, rope_base),
    )
    if spec.mrope and not 0 < sum(cfg.rope_sections) <= head_dim:
        # ggml takes each pair's sector modulo the sum, and asserts it fits the head
        raise ModelFormatError(f"{gf.path}: metadata key {k + 'rope.dimension_sections'!r} "
                               f"({list(cfg.rope_sections)}): the sections must sum to 1 .. "
                               f"the head size ({head_dim})")
    _validate_shapes(gf, cfg)
    return cfg


def _scales(gf: GGUFFile, spec: ArchSpec, k: str) -> dict:
    """Granite's multipliers; llama.cpp requires logit_scale, the others default to none."""
    if not spec.scales:
        return {}
    if gf.get(k + "logit_scale") is None:
        raise ModelFormatError(f"{gf.path}: required metadata key {k + 'logit_scale'!r} "
                               "is missing")
    tiny = 1e-30
    return dict(embd_scale=_float(gf, k + "embedding_scale", 1.0) or 1.0,
                residual_scale=_float(gf, k + "residual_scale", 1.0, 0.0) or 1.0,
                kq_scale=_float(gf, k + "attention.scale", 0.0),
                logit_scale=_float(gf, k + "logit_scale", 1.0, tiny))


_GATING = {1: "softmax", 2: "sigmoid", 3: "softmax_weight"}  # llama_expert_gating_func_type


def _rope(gf: GGUFFile, spec: ArchSpec, k: str, n_ctx_train: int, base: float) -> dict:
    """Rope scaling as llama.cpp applies it to every architecture here (efedge/rope.py)."""
    arch = k[:-1]
    scaling = rope.scaling_from_gguf(gf, arch, n_ctx_train)
    out: dict = {"rope_scaling": scaling}
    # the sliding-window (chunked) layers' own base / scale (gpt-oss, llama4, smallthinker,
    # afmoe)
    if (spec.attention == "sinks" or spec.irope or spec.iswa_nope or spec.iswa_std
            or spec.per_layer):
        base_swa = _float(gf, k + "rope.freq_base_swa", base, minimum=1e-30)
        swa = dataclasses.replace(scaling, freq_scale=rope.train_freq_scale(gf, arch))
        if (base_swa, swa) != (base, scaling):
            out["rope_swa"] = (base_swa, swa)
    return out


def _extras(gf: GGUFFile, spec: ArchSpec, k: str, n_layer: int) -> dict:
    """deepseek2's, gpt-oss's and ernie4_5-moe's keys (see the ModelConfig fields)."""
    out: dict = {}
    if spec.attention == "mla" and _float(gf, k + "attention.temperature_scale", 0.0):
        # Mistral-Large-3 style query temperature: not computed here
        raise UnsupportedModelError(f"metadata key {k + 'attention.temperature_scale'!r}: "
                                    "attention temperature scaling is not supported")
    if spec.dense_lead:
        out["n_dense_lead"] = _int(gf, k + "leading_dense_block_count", 0)
        if out["n_dense_lead"] > n_layer:
            raise ModelFormatError(f"{gf.path}: metadata key "
                                   f"{k + 'leading_dense_block_count'!r} exceeds the layers")
    if spec.moe_step:
        out["moe_layer_step"] = _positive(gf, k + "interleave_moe_layer_step")
    if spec.attention == "mla":
        out["q_lora_rank"] = _int(gf, k + "attention.q_lora_rank", 0)
        out["kv_lora_rank"] = _positive(gf, k + "attention.kv_lora_rank")
        out["k_head_dim_mla"] = _int(gf, k + "attention.key_length_mla", 0)
        out["v_head_dim_mla"] = _int(gf, k + "attention.value_length_mla", 0)
    if spec.routing in ("deepseek", "gating"):
        code = _int(gf, k + "expert_gating_func", 0)
        if code and code not in _GATING:
            raise UnsupportedModelError(f"metadata key {k + 'expert_gating_func'!r}: gating "
                                        f"function {code} is not supported")
        if not code and (not spec.default_gating or spec.routing == "gating"):
            # llama.cpp aborts in build_moe_ffn without a gating function
            raise ModelFormatError(f"{gf.path}: metadata key {k + 'expert_gating_func'!r} is "
                                   f"0 (none): {spec.name} has no default gating function")
        out["gating"] = _GATING[code] if code else spec.default_gating
    if spec.routing == "gating":  # smallthinker: renormalised, unscaled, groups as for all
        out["expert_weights_norm"] = True
        out["n_expert_groups"] = _int(gf, k + "expert_group_count", 0)
        out["n_group_used"] = _int(gf, k + "expert_group_used_count", 0)
    if spec.routing == "deepseek":
        out["expert_weights_norm"] = bool(gf.get(k + "expert_weights_norm", False))
        out["expert_weights_scale"] = _float(gf, k + "expert_weights_scale", 0.0)
        out["n_expert_groups"] = _int(gf, k + "expert_group_count", 0)
        out["n_group_used"] = _int(gf, k + "expert_group_used_count", 0)
    elif spec.routing == "topk_softmax":
        out["gating"] = "softmax_weight"
    elif spec.routing == "sigmoid":  # llama4: fixed by llama.cpp, no routing keys read
        out["gating"] = "sigmoid"
        out["n_expert_groups"] = _int(gf, k + "expert_group_count", 0)
        out["n_group_used"] = _int(gf, k + "expert_group_used_count", 0)
    elif spec.routing == "sigmoid_norm":  # mimo2: llama.cpp reads no weights scale
        out.update(gating="sigmoid", expert_weights_norm=True,
                   n_expert_groups=_int(gf, k + "expert_group_count", 0),
                   n_group_used=_int(gf, k + "expert_group_used_count", 0))
    elif spec.routing == "softmax_scale":  # deepseek: the scale is the one key read
        out.update(gating="softmax", expert_weights_norm=spec.norm_topk,
                   expert_weights_scale=_float(gf, k + "expert_weights_scale", 0.0),
                   n_expert_groups=_int(gf, k + "expert_group_count", 0),
                   n_group_used=_int(gf, k + "expert_group_used_count", 0))
    elif spec.routing == "softmax_bias":  # llama.cpp reads no arch routing keys for these
        out["expert_weights_norm"] = spec.norm_topk
        # … but expert groups, as for every arch (llama_model_base::load_hparams)
        out["n_expert_groups"] = _int(gf, k + "expert_group_count", 0)
        out["n_group_used"] = _int(gf, k + "expert_group_used_count", 0)
    sections = gf.get(k + "rope.dimension_sections", 0)
    if spec.mrope:
        out["rope_sections"] = _sections(gf, k)
    elif any(sections if isinstance(sections, list) else [sections]):
        # M-RoPE (vision variants, e.g. GLM-4.5V): llama.cpp rotates by sections
        raise UnsupportedModelError(f"metadata key {k + 'rope.dimension_sections'!r}: "
                                    "multi-section rope (M-RoPE) is not supported")
    if spec.attention == "sinks":
        out["sliding_window"] = _int(gf, k + "attention.sliding_window", 0)
        out["swa_pattern"] = 2 if out["sliding_window"] else 0  # llama.cpp: every other layer
    if spec.irope:
        out.update(_irope(gf, k))
    if spec.iswa_std:
        out.update(_iswa_std(gf, k))
    if spec.per_layer:
        out.update(_per_layer(gf, k, n_layer))
    if spec.mup_embd:  # ggml_scale by sqrtf(n_embd): the float32 root
        out["embd_scale"] = float(np.float32(math.sqrt(_positive(gf, k + "embedding_length"))))
    if spec.iswa_nope and _int(gf, k + "attention.sliding_window", 0):
        # llama.cpp keeps only "on": the window is 4096 whatever the file says, and the
        # NoPE step its default 4 (no key sets it)
        out.update(sliding_window=4096, swa_dense_first=True, nope_step=4, nope_first=True,
                   swa_pattern=_positive(gf, k + "attention.sliding_window_pattern", 4))
    return out


def _head_counts(gf: GGUFFile, k: str, n_layer: int,
                 n_blocks: int) -> tuple[tuple[int, int], ...]:
    """Per-layer (n_head, n_head_kv) from head_count / head_count_kv, each one number or
    an array of one per block (llama.cpp's get_key_or_arr; the kv heads default to the
    heads); () when every layer has the same counts."""
    out = []
    for key, default in (("attention.head_count", None), ("attention.head_count_kv", 0)):
        val = gf.get(k + key, default)
        if val is None:
            raise ModelFormatError(f"{gf.path}: required metadata key {k + key!r} is missing")
        vals = val if isinstance(val, list) else [val] * n_blocks
        if len(vals) != n_blocks or not all(isinstance(v, int) and not isinstance(v, bool)
                                            and v >= 0 for v in vals):
            raise ModelFormatError(f"{gf.path}: metadata key {k + key!r} has invalid value "
                                   f"{val!r} (one count, or one per block: {n_blocks})")
        out.append(vals[:n_layer])
    heads = [(h, kv or h) for h, kv in zip(*out, strict=True)]
    for il, (h, kv) in enumerate(heads):
        if h == 0 or h % kv:
            raise ModelFormatError(f"{gf.path}: metadata keys {k + 'attention.head_count'!r} "
                                   f"and {k + 'attention.head_count_kv'!r}: layer {il} has "
                                   f"{h} heads and {kv} kv heads (heads must be a positive "
                                   "multiple of kv heads)")
    return tuple(heads) if len(set(heads)) > 1 else ()


def _per_layer(gf: GGUFFile, k: str, n_layer: int) -> dict:
    """mimo2's window layers (sliding_window_pattern: one flag per block), dense or MoE
    layers by their router tensor, and attention.value_scale (llama.cpp keeps it only
    where it is not 1)."""
    key = k + "attention.sliding_window_pattern"
    flags = gf.get(key)
    if not isinstance(flags, list) or len(flags) < n_layer:
        raise ModelFormatError(f"{gf.path}: metadata key {key!r} must be an array of one "
                               f"flag per block, got {flags!r}")
    scale = _float(gf, k + "attention.value_scale", 0.0)
    return dict(sliding_window=_positive(gf, k + "attention.sliding_window"),
                swa_layers=tuple(bool(f) for f in flags[:n_layer]),
                moe_layers=tuple(f"blk.{il}.ffn_gate_inp.weight" in gf.tensors
                                 for il in range(n_layer)),
                value_scale=0.0 if scale == 1.0 else scale)


def _iswa_std(gf: GGUFFile, k: str) -> dict:
    """afmoe's window and NoPE layers (ArchSpec.iswa_std)."""
    window = _positive(gf, k + "attention.sliding_window")  # llama.cpp crashes on 0
    return dict(sliding_window=window, nope_step=4,
                swa_pattern=_positive(gf, k + "attention.sliding_window_pattern", 4))


def _sections(gf: GGUFFile, k: str) -> tuple[int, ...]:
    """llama.cpp's get_key_or_arr(rope.dimension_sections, 4): an array of exactly 4, or
    one number for all 4."""
    key = k + "rope.dimension_sections"
    val = gf.get(key)
    vals = val if isinstance(val, list) else [val] * 4
    if len(vals) != 4 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                                 for v in vals):
        raise ModelFormatError(f"{gf.path}: metadata key {key!r} has invalid value {val!r} "
                               "(llama.cpp reads 4 section sizes)")
    return tuple(vals)


# llama4's attention as llama.cpp fixes it (the file's window size is not read): chunks of
# 8192 on 3 of every 4 layers, no rope on every 4th layer, whose queries are scaled by
# log(floor((pos + 1) / 8192) + 1) · 0.1 + 1
LLAMA4_CHUNK, LLAMA4_SWA_PATTERN, LLAMA4_NOPE_STEP = 8192, 4, 4
LLAMA4_TEMP = (8192, 0.1, 1.0)  # floor scale, scale, position offset


def _irope(gf: GGUFFile, k: str) -> dict:
    """llama4's chunked / NoPE layout and its kq-norm rule (llama_model_llama4)."""
    # llama.cpp 0.3.36 reads a swa pattern of the file's own for llama4 (real files have
    # none; not run here), and ignores attention.temperature_scale / _length (checked
    # past 8192 positions): so does efedge
    for key in ("attention.sliding_window_pattern", "attention.rope_pattern"):
        if gf.get(k + key) is not None:
            raise UnsupportedModelError(f"metadata key {k + key!r}: not supported for "
                                        f"{k[:-1]!r} (efedge runs llama.cpp's fixed layout)")
    window = gf.get(k + "attention.sliding_window")
    if window is not None and _int(gf, k + "attention.sliding_window") == 0:
        # llama.cpp 0.3.36 turns chunking off, makes the last layer a NoPE layer without
        # a temperature, then aborts in its first batch (GGML_ASSERT(f_attn_temp_scale !=
        # 0)): there is no reference to match
        raise UnsupportedModelError(f"metadata key {k + 'attention.sliding_window'!r} = 0 "
                                    f"(no chunked attention) is not supported for "
                                    f"{k[:-1]!r}: llama.cpp cannot run such files either")
    head, rot = gf.get(k + "attention.key_length"), gf.get(k + "rope.dimension_count")
    if rot is not None and head is not None and rot != head:  # llama.cpp asserts it
        raise ModelFormatError(f"{gf.path}: metadata key {k + 'rope.dimension_count'!r} "
                               f"({rot}) must equal the head size ({head}) for {k[:-1]!r}")
    # llama.cpp names the 128-expert model (Maverick) by its expert count and gives it no
    # kq norm; every other count has it
    return {"kq_norm": _int(gf, k + "expert_count", 0) != 128,
            "sliding_window": LLAMA4_CHUNK, "swa_pattern": LLAMA4_SWA_PATTERN,
            "swa_chunked": True, "nope_step": LLAMA4_NOPE_STEP, "attn_temp": LLAMA4_TEMP}


def _validate_shapes(gf: GGUFFile, c: ModelConfig) -> None:
    """Every tensor the forward pass touches must have the shape the metadata implies."""
    d, q_out, kv_out = c.n_embd, c.n_head * c.head_dim, c.n_head_kv * c.head_dim
    _check_shape(gf, "output_norm.weight", (d,))
    if "output.weight" in gf.tensors or c.spec.out_bias:  # phimoe: no tied head
        _check_shape(gf, "output.weight", (d, c.n_vocab))
    if c.spec.norm_bias:
        _check_shape(gf, "output_norm.bias", (d,))
    if c.spec.out_bias:
        _check_shape(gf, "output.bias", (c.n_vocab,))
    for i in range(c.n_layer):
        b = f"blk.{i}."
        _check_shape(gf, b + "attn_norm.weight", (d,))
        _check_shape(gf, b + c.spec.ffn_norm + ".weight", (d,))
        if c.spec.norm_bias:
            _check_shape(gf, b + "attn_norm.bias", (d,))
            _check_shape(gf, b + c.spec.ffn_norm + ".bias", (d,))
        if c.spec.out_bias:
            _check_shape(gf, b + "attn_output.bias", (d,))
        _validate_ffn(gf, c, i)
        if c.spec.post_norms:  # afmoe
            _check_shape(gf, b + "post_attention_norm.weight", (d,))
            _check_shape(gf, b + "post_ffw_norm.weight", (d,))
        if c.spec.attn_gate:
            _check_shape(gf, b + "attn_gate.weight", (d, q_out))
        if c.spec.attention != "standard":
            continue  # mla.py / sinks.py check their own tensors
        if fused_qkv(gf, c, i):
            _check_fused_qkv(gf, c, i)
        else:
            _check_shape(gf, b + "attn_q.weight", (d, q_out))
            _check_shape(gf, b + "attn_k.weight", (d, kv_out))
            _check_shape(gf, b + "attn_v.weight", (d, c.n_head_kv * c.v_head_dim))
        _check_shape(gf, b + "attn_output.weight", (c.n_head * c.v_head_dim, d))
        for p, n in (("q", q_out), ("k", kv_out), ("v", c.n_head_kv * c.v_head_dim)):
            if c.spec.attn_bias or b + f"attn_{p}.bias" in gf.tensors:  # optional elsewhere
                _check_shape(gf, b + f"attn_{p}.bias", (n,))
        qk_norm = qk_norm_of(gf, c, i)
        if qk_norm in ("head", "head_post"):
            _check_shape(gf, b + "attn_q_norm.weight", (c.head_dim,))
            _check_shape(gf, b + "attn_k_norm.weight", (c.head_dim,))
        elif qk_norm == "full":
            _check_shape(gf, b + "attn_q_norm.weight", (q_out,))
            _check_shape(gf, b + "attn_k_norm.weight", (kv_out,))


def fused_qkv(gf: GGUFFile, c: ModelConfig, il: int) -> bool:
    """Whether layer il's q / k / v come from one attn_qkv tensor (ArchSpec.qkv)."""
    return c.spec.qkv == "fused" or (c.spec.qkv == "either"
                                     and f"blk.{il}.attn_qkv.weight" in gf.tensors)


def qkv_widths(c: ModelConfig) -> tuple[int, int, int]:
    """The q, k and v rows of an attention layer's projections."""
    return c.n_head * c.head_dim, c.n_head_kv * c.head_dim, c.n_head_kv * c.v_head_dim


def _check_fused_qkv(gf: GGUFFile, c: ModelConfig, il: int) -> None:
    b, d, (q, k, v) = f"blk.{il}.", c.n_embd, qkv_widths(c)
    if c.spec.qkv == "fused" and q != d:
        # llama.cpp sizes bailingmoe2's attn_qkv by the width, its output by the heads
        raise ModelFormatError(f"{gf.path}: tensor {b + 'attn_qkv.weight'!r}: the heads "
                               f"({c.n_head} × {c.head_dim}) must span the width {d}")
    _check_shape(gf, b + "attn_qkv.weight", (d, q + k + v))
    if b + "attn_qkv.bias" in gf.tensors:
        _check_shape(gf, b + "attn_qkv.bias", (q + k + v,))


def qk_norm_of(gf: GGUFFile, c: ModelConfig, il: int) -> str:
    """Layer il's qk norm: the spec's, or "none" where the spec lets it be absent and the
    layer has neither tensor (one without the other is refused by name)."""
    if not c.spec.qk_norm_optional:
        return c.spec.qk_norm
    q, k = (f"blk.{il}.attn_{p}_norm.weight" for p in "qk")
    if (q in gf.tensors) != (k in gf.tensors):
        missing, present = (k, q) if q in gf.tensors else (q, k)
        raise ModelFormatError(f"{gf.path}: tensor {missing!r} is missing ({present!r} is "
                               "present)")
    return c.spec.qk_norm if q in gf.tensors else "none"


def _validate_ffn(gf: GGUFFile, c: ModelConfig, i: int) -> None:
    d, b = c.n_embd, f"blk.{i}."
    if c.is_moe_layer(i):
        e, f = c.n_expert, c.n_ff_exp
        _check_shape(gf, b + "ffn_gate_inp.weight", (d, e))
        _check_shape(gf, b + "ffn_gate_exps.weight", (d, f, e))
        _check_shape(gf, b + "ffn_up_exps.weight", (d, f, e))
        _check_shape(gf, b + "ffn_down_exps.weight", (f, d, e))
        if c.spec.sel_bias or b + "exp_probs_b.bias" in gf.tensors:
            _check_shape(gf, b + "exp_probs_b.bias", (e,))
        if c.spec.expert_bias:
            _check_shape(gf, b + "ffn_gate_inp.bias", (e,))
            for p, n in (("gate", f), ("up", f), ("down", d)):
                _check_shape(gf, b + f"ffn_{p}_exps.bias", (n, e))
        if not c.has_shared and b + "ffn_up_shexp.weight" in gf.tensors:
            # a shared expert the metadata gives no width would be left out silently
            keys = [f"{c.arch}.expert_shared_feed_forward_length"]
            keys += [f"{c.arch}.expert_shared_count"] if c.spec.shared_by_count else []
            raise ModelFormatError(
                f"tensor {b + 'ffn_up_shexp.weight'!r}: the file has a shared expert but "
                f"no width for it (metadata key {' or '.join(map(repr, keys))} is missing)")
        if c.has_shared:
            s = c.n_ff_shexp
            if c.spec.shared_gate:
                _check_shape(gf, b + "ffn_gate_inp_shexp.weight", (d,))
            _check_shape(gf, b + "ffn_gate_shexp.weight", (d, s))
            _check_shape(gf, b + "ffn_up_shexp.weight", (d, s))
            _check_shape(gf, b + "ffn_down_shexp.weight", (s, d))
    else:
        _check_shape(gf, b + "ffn_gate.weight", (d, c.n_ff))
        _check_shape(gf, b + "ffn_up.weight", (d, c.n_ff))
        _check_shape(gf, b + "ffn_down.weight", (c.n_ff, d))
