"""Architecture registry: the folder is the registry, one module per general.architecture.

Each module defines `SPEC`, an ArchSpec holding that architecture's quirks and nothing
else; the forward pass in model.py is shared.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass

from efedge.errors import UnsupportedModelError


@dataclass(frozen=True)
class ArchSpec:
    name: str
    rope_style: str  # "normal": adjacent pairs rotate (llama); "neox": the two halves rotate
    moe: bool  # has routed experts (dense archs: False)
    qk_norm: str = "none"  # "none" | "head" (RMS over each head) | "full" (RMS over all of q / k)
    attn_bias: bool = False  # q/k/v projections carry biases (qwen2 family)
    shared_expert: bool = False  # a dense expert beside the routed ones, gated by sigmoid
    norm_topk: bool = True  # renormalise the top-k routing weights to sum 1
    # Dense archs whose metadata can still declare experts (llama → Mixtral-style)
    moe_optional: bool = False


def available() -> list[str]:
    import efedge.archs as pkg

    return sorted(m.name.replace("_", "-") for m in pkgutil.iter_modules(pkg.__path__))


def get(arch: str) -> ArchSpec:
    """The spec of a general.architecture value; UnsupportedModelError names it if unknown."""
    module_name = arch.replace("-", "_")
    known = {a.replace("-", "_") for a in available()}
    if not module_name.isidentifier() or module_name not in known:
        raise UnsupportedModelError(
            f"architecture {arch!r} is not supported (supported: {', '.join(available())})")
    return importlib.import_module(f"efedge.archs.{module_name}").SPEC
