"""Where the embedded demo model lives."""

from __future__ import annotations

from pathlib import Path

DATA_DIR = Path(__file__).parent / "data"
DEMO_MODEL = DATA_DIR / "demo.gguf"


def demo_model_path() -> Path:
    """The demo model shipped in the package; until a trained one is shipped, a tiny
    random-weight checkpoint that gguf_tools writes once into the user cache."""
    if DEMO_MODEL.exists():
        return DEMO_MODEL
    from gguf_tools.make_tiny import ensure_default_model  # placeholder path only

    return Path(ensure_default_model())
