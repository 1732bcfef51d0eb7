"""efedge: run GGUF Mixture-of-Experts models when the experts do not fit in memory.

    import efedge
    with efedge.load() as m:          # the embedded demo model
        print(m.generate("def fib(n):", max_tokens=64))
"""

from efedge.api import Model, load
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
from efedge.generate import GenerationResult

__version__ = "0.1.0"

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
