"""Where the embedded demo model lives."""

from __future__ import annotations

from pathlib import Path

from efedge.errors import EfedgeError

DATA_DIR = Path(__file__).parent / "data"
DEMO_MODEL = DATA_DIR / "demo.gguf"


def demo_model_path() -> Path:
    """The demo model shipped in the package (efedge/data/demo.gguf)."""
    if DEMO_MODEL.exists():
        return DEMO_MODEL
    raise EfedgeError(f"the embedded demo model is missing from this installation "
                      f"({DEMO_MODEL}); reinstall efedge or pass a GGUF file")
