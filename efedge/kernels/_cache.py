"""Keep numba's on-disk cache of the kernels in step with their sources.

numba's ``cache=True`` checks only the file a function is defined in: a kernel in
decode.py that inlines a helper from nn.py, or an IR kernel from simd.py, is loaded
stale from the cache after that helper changed. Here the cache of the whole package is
stamped with a digest of every kernel source file, and dropped when the digest differs
(the next calls recompile, once).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

STAMP = "efedge-kernels.sources"


def sources_digest() -> str:
    h = hashlib.sha256()
    for f in sorted(Path(__file__).parent.glob("*.py")):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def refresh_stale_cache(dispatcher) -> bool:
    """Drop the cached kernels if the sources changed since they were cached; returns
    whether it did. ``dispatcher``: any cached kernel of this package (it knows where
    numba keeps the package's cache)."""
    cache_dir = Path(getattr(dispatcher.stats, "cache_path", "") or "")
    if not cache_dir.is_dir():
        return False
    digest = sources_digest()
    stamp = cache_dir / STAMP
    try:
        if stamp.read_text(encoding="utf-8") == digest:
            return False
    except OSError:
        pass
    for f in list(cache_dir.glob("*.nbi")) + list(cache_dir.glob("*.nbc")):
        try:
            f.unlink()
        except OSError:  # another process got there first, or a read-only cache
            pass
    try:
        stamp.write_text(digest, encoding="utf-8")
    except OSError:
        return False
    return True
