"""Rope frequencies as llama.cpp computes them: plain, linear scaling and YaRN.

llama.cpp reads ``{arch}.rope.scaling.type`` ("linear" when absent), ``.factor`` (or the
old ``rope.scale_linear``; freq_scale = 1 / factor), ``.original_context_length``
(n_ctx_orig, default context_length) and ``.attn_factor``; deepseek2 (and mistral4, its
loader) also reads ``.yarn_log_multiplier`` (stored ×0.1 by the converter). The YaRN
constants beta_fast = 32, beta_slow = 1 are fixed for every architecture efedge runs
(llama.cpp reads the ``yarn_beta_*`` keys only for grok and mistral3), and ext_factor is 1
for YaRN, else 0.

Per rotary pair i (ggml's ``rope_yarn``), with theta = pos · base^(-2i/n_dims):

    mix_i  = ext_factor · (1 − clamp((i − lo) / max(0.001, hi − lo), 0, 1))
    angle  = theta · (freq_scale · (1 − mix_i) + mix_i)
    cos, sin = cos(angle) · m, sin(angle) · m

where [lo, hi] are ``ggml_rope_yarn_corr_dims`` and m = attn_factor, times
(1 + 0.1 ln(1 / freq_scale)) when ext_factor ≠ 0. Both the angle's factor and m are
folded into the cos / sin tables, so every rope kernel (prefill, fused decode, MLA,
gpt-oss) applies YaRN unchanged. attn_factor is the context's ``yarn_attn_factor``
after llama.cpp's adjustments (llama_context: mscale / mscale_all_dims, then the
division that cancels rope_yarn's own factor, then ``rope.scaling.attn_factor``);
deepseek2 also scales its attention scores (``mla_kq_scale``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from efedge.errors import ModelFormatError, UnsupportedModelError

KINDS = ("none", "linear", "yarn")
CTX_PAD = 256  # llama.cpp rounds a context's size up to a multiple of this
YARN_BETA_FAST = 32.0
YARN_BETA_SLOW = 1.0


@dataclass(frozen=True)
class RopeScaling:
    """The rope parameters of a llama.cpp context besides the base (defaults: none)."""

    kind: str = "none"  # "none" | "linear" | "yarn"
    freq_scale: float = 1.0  # 1 / rope.scaling.factor
    ext_factor: float = 0.0  # 1 for YaRN
    attn_factor: float = 1.0  # cparams.yarn_attn_factor (see the module docstring)
    beta_fast: float = YARN_BETA_FAST
    beta_slow: float = YARN_BETA_SLOW
    n_ctx_orig: int = 0  # the context YaRN's correction dims are measured against
    yarn_log_mul: float = 0.0  # deepseek2's mscale_all_dim (the key's value / 0.1)

    @property
    def identity(self) -> bool:
        return self.freq_scale == 1.0 and self.ext_factor == 0.0 and self.attn_factor == 1.0

    @property
    def mscale(self) -> float:
        """The magnitude rope_yarn gives cos and sin."""
        m = self.attn_factor
        if self.ext_factor != 0.0:
            m *= 1.0 + 0.1 * math.log(1.0 / self.freq_scale)
        return m


def _get_mscale(scale: float, mscale: float) -> float:
    return 1.0 if scale <= 1.0 else 0.1 * mscale * math.log(scale) + 1.0


def scaling_from_gguf(gf, arch: str, n_ctx_train: int) -> RopeScaling:
    """llama.cpp's rope parameters from ``gf``'s metadata (llama_model::load_hparams and
    the llama_context constructor, with llama-cpp-python's defaults)."""
    k = f"{arch}.rope."
    kind = gf.get(k + "scaling.type", "linear")  # llama.cpp's default when the key is absent
    if kind not in KINDS:
        raise UnsupportedModelError(f"metadata key {k + 'scaling.type'!r}: rope scaling "
                                    f"{kind!r} is not supported (supported: "
                                    f"{', '.join(KINDS)})")
    freq_scale = 1.0 if kind == "none" else train_freq_scale(gf, arch)
    n_ctx_orig = gf.get(k + "scaling.original_context_length", 0) or n_ctx_train
    if not isinstance(n_ctx_orig, int) or isinstance(n_ctx_orig, bool) or n_ctx_orig < 1:
        raise ModelFormatError(f"{gf.path}: metadata key "
                               f"{k + 'scaling.original_context_length'!r} has invalid value "
                               f"{n_ctx_orig!r}")
    log_mul = 0.0
    if arch in ("deepseek2", "mistral4"):  # llama.cpp's deepseek2 loader reads it
        log_mul = _num(gf, k + "scaling.yarn_log_multiplier", 0.0) / 0.1
    ext_factor = 1.0 if kind == "yarn" else 0.0
    attn = 1.0
    if ext_factor != 0.0:
        f = 1.0 / freq_scale
        if log_mul != 0.0:
            # [TAG_DEEPSEEK2_YARN_LOG_MUL_FIX]: mscale = mscale_all_dims for deepseek2
            # (llama_context tests LLM_ARCH_DEEPSEEK2 alone: not mistral4, whose loader
            # and graph are deepseek2's)
            mscale = log_mul if arch == "deepseek2" and log_mul != 1.0 else 1.0
            attn = _get_mscale(f, mscale) / _get_mscale(f, log_mul)
        else:
            attn = _get_mscale(f, 1.0)
        attn /= 1.0 + 0.1 * math.log(f)  # cancels the factor rope_yarn multiplies in
    attn *= _num(gf, k + "scaling.attn_factor", 1.0)
    return RopeScaling(kind=kind, freq_scale=freq_scale, ext_factor=ext_factor,
                       attn_factor=attn, n_ctx_orig=int(n_ctx_orig), yarn_log_mul=log_mul)


def train_freq_scale(gf, arch: str) -> float:
    """hparams.rope_freq_scale_train: 1 / factor (1 without one), whatever the type
    (gpt-oss's sliding-window layers use it even when the type is "none")."""
    k = f"{arch}.rope."
    factor = _num(gf, k + "scaling.factor", None)
    if factor is None:
        factor = _num(gf, k + "scale_linear", 0.0)
    return 1.0 if factor == 0.0 else 1.0 / factor


def _num(gf, key: str, default):
    val = gf.get(key, default)
    if val is default:
        return val
    if (not isinstance(val, int | float) or isinstance(val, bool) or not math.isfinite(val)
            or val < 0):
        raise ModelFormatError(f"{gf.path}: metadata key {key!r} has invalid value {val!r}")
    return float(val)


def corr_dims(n_dims: int, n_ctx_orig: int, base: float, beta_fast: float,
              beta_slow: float) -> tuple[float, float]:
    """ggml_rope_yarn_corr_dims, in float32 as ggml computes it (floor / ceil can flip)."""
    f32 = np.float32

    def dim(n_rot: float) -> np.float32:
        num = f32(n_ctx_orig) / (f32(n_rot) * f32(2) * f32(math.pi))
        return f32(n_dims) * np.log(num) / (f32(2) * np.log(f32(base)))

    start = float(np.floor(dim(beta_fast)))
    end = float(np.ceil(dim(beta_slow)))
    return max(0.0, start), min(float(n_dims - 1), end)


def imrope_fourth_pairs(sections: tuple[int, ...], n_pairs: int) -> np.ndarray:
    """bool [n_pairs]: the pairs ggml's interleaved multi-section rope (IMROPE, qwen3vl*)
    turns by the 4th position. Pair i's sector is i mod sum(sections); sectors 3j, 3j + 1,
    3j + 2 take the t, h, w position while below 3 × that section's size, any other the
    4th. llama.cpp gives a text token the positions (p, p, p, 0): its other pairs turn as
    plain rope's, these not at all."""
    t, h, w = sections[:3]
    sector = np.arange(n_pairs) % sum(sections)
    rest = sector % 3
    return ~(((rest == 0) & (sector < 3 * t)) | ((rest == 1) & (sector < 3 * h))
             | ((rest == 2) & (sector < 3 * w)))


def tables(positions: np.ndarray, rope_dim: int, base: float,
           scaling: RopeScaling | None = None,
           freq_factors: np.ndarray | None = None,
           still: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """cos / sin float32 [T, rope_dim/2] of ``positions`` with linear / YaRN scaling and
    the magnitude folded in (freq_factors: llama-3's ``rope_freqs``, dividing theta;
    still: bool [rope_dim/2], pairs at angle 0 whatever the position — a text token's
    4th-position pairs under IMROPE: cos is the magnitude, sin 0)."""
    inv = base ** (-np.arange(0, rope_dim, 2, dtype=np.float64) / rope_dim)
    if freq_factors is not None:
        inv = inv / np.asarray(freq_factors, dtype=np.float64)[:rope_dim // 2]
    if still is not None:
        inv = np.where(still, 0.0, inv)
    m = 1.0
    if scaling is not None and not scaling.identity:
        fs, ext = scaling.freq_scale, scaling.ext_factor
        mix = np.zeros(rope_dim // 2)
        if ext != 0.0:
            lo, hi = corr_dims(rope_dim, scaling.n_ctx_orig, base, scaling.beta_fast,
                               scaling.beta_slow)
            y = (np.arange(rope_dim // 2, dtype=np.float64) - lo) / max(0.001, hi - lo)
            mix = (1.0 - np.clip(y, 0.0, 1.0)) * ext
        inv = inv * (fs * (1.0 - mix) + mix)
        m = scaling.mscale
    ang = positions.astype(np.float64)[:, None] * inv[None, :]
    if m == 1.0:
        return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)
    return (np.cos(ang) * m).astype(np.float32), (np.sin(ang) * m).astype(np.float32)


def mla_kq_scale(scaling: RopeScaling, head_k: int) -> float:
    """deepseek2's attention-score scale: mscale² / √head_k, where mscale undoes the
    context's adjustment of attn_factor and applies mscale_all_dims
    (llm_build_deepseek2)."""
    fs = scaling.freq_scale
    attn_org = scaling.attn_factor * (1.0 + 0.1 * math.log(1.0 / fs))
    mscale = attn_org * (1.0 + 0.1 * scaling.yarn_log_mul * math.log(1.0 / fs))
    return mscale * mscale / math.sqrt(head_k)


def freq_factors(gf, cfg, read_vector, n_ctx: int = 0) -> np.ndarray | None:
    """The divisors of theta [rope_dim/2] llama.cpp's get_rope_factors gives: the
    ``rope_freqs.weight`` of llama-3 files for the architectures it reads them for
    (ArchSpec.rope_freqs), LongRoPE's ``rope_factors_long.weight`` when the context n_ctx
    exceeds the original one (``rope.scaling.original_context_length``, else the training
    context) and ``rope_factors_short.weight`` otherwise (ArchSpec.rope_factors); None
    without them. llama.cpp compares its context rounded up to a multiple of 256
    (llama_context pads n_ctx so before cparams.n_ctx_seq is set): so does this."""
    name = "rope_freqs.weight"
    if cfg.spec.rope_factors == "longrope":
        long = -(-n_ctx // CTX_PAD) * CTX_PAD > cfg.rope_scaling.n_ctx_orig
        name = "rope_factors_long.weight" if long else "rope_factors_short.weight"
        if name not in gf.tensors:  # optional in llama.cpp: none, no division
            return None
    elif not cfg.spec.rope_freqs or name not in gf.tensors:
        return None
    ff = read_vector(gf, name)
    if ff.shape != (cfg.rope_dim // 2,):
        raise ModelFormatError(f"tensor {name!r}: shape {ff.shape} does not match the "
                               f"metadata (expected ({cfg.rope_dim // 2},))")
    return ff
