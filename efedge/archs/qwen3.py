"""qwen3 (dense): per-head q / k RMS norm, neox rope."""

from efedge.archs import ArchSpec

SPEC = ArchSpec(name="qwen3", rope_style="neox", moe=False, qk_norm="head")
