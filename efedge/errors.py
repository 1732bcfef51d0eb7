"""The errors efedge raises. Everything user-facing derives from EfedgeError."""


class EfedgeError(Exception):
    """Base class of every error efedge raises on purpose."""


class ModelFormatError(EfedgeError):
    """The GGUF file is malformed, truncated or inconsistent (names the key or tensor)."""


class UnsupportedModelError(EfedgeError):
    """The file is valid GGUF but uses an architecture or quant type efedge does not run."""


class CacheBudgetError(EfedgeError):
    """The expert cache budget is too small (the message says the minimum)."""


class ContextLengthError(EfedgeError):
    """A prompt or conversation does not fit in the context window."""


class SamplingError(EfedgeError, ValueError):
    """A sampling parameter is out of range."""


class ArgumentError(EfedgeError, ValueError):
    """An argument of the Python API is out of range or empty (also a ValueError, so
    code that caught ValueError keeps working)."""


class TransferError(EfedgeError):
    """An expert could not be loaded from the model file."""


class ModelClosedError(EfedgeError):
    """The Model was closed (close() or the end of its with-block) before or during the
    call."""


class TemplateError(EfedgeError):
    """The chat template failed to render."""
