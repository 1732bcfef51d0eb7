"""efedge: run GGUF Mixture-of-Experts models when the experts do not fit in memory.

    import efedge
    with efedge.load() as m:          # the embedded demo model
        print(m.generate("def fib(n):", max_tokens=64))
"""

import importlib

from efedge.errors import (
    ArgumentError,
    CacheBudgetError,
    ContextLengthError,
    EfedgeError,
    ModelClosedError,
    ModelFormatError,
    SamplingError,
    TemplateError,
    TransferError,
    UnsupportedModelError,
)

__version__ = "0.1.0"

# Imported when first used: the model code brings numba and the kernels (~0.8 s), which
# `efedge --help`, a mistyped flag or an early Ctrl-C (a traceback from inside the import,
# before the command line could catch it) should not wait for
_LAZY = {"Model": "efedge.api", "load": "efedge.api", "GenerationResult": "efedge.generate"}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is not None:
        value = getattr(importlib.import_module(module), name)
    else:  # a submodule not imported yet (efedge.api, efedge.sampling …)
        try:
            value = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "ArgumentError",
    "CacheBudgetError",
    "ContextLengthError",
    "EfedgeError",
    "GenerationResult",
    "Model",
    "ModelClosedError",
    "ModelFormatError",
    "SamplingError",
    "TemplateError",
    "TransferError",
    "UnsupportedModelError",
    "__version__",
    "load",
]
