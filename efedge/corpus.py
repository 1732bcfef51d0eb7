"""The demo model's corpus: the running interpreter's standard library, deterministically.

Documents, in this order:

* every ``*.py`` file under ``sysconfig.get_paths()["stdlib"]``, sorted by relative POSIX
  path, except test suites, third-party and generated code (``SKIP_DIRS``, ``SKIP_FILES``)
  and files that are not valid UTF-8;
* every topic of ``pydoc_data/topics.py`` (the text behind ``help("if")``), sorted by key,
  written as a ChatML exchange so that the chat template has something to lean on::

      <|im_start|>user\\nExplain the Python topic "if".<|im_end|>\\n
      <|im_start|>assistant\\n{text}<|im_end|>

Held-out split (fixed, independent of the interpreter version): a document goes to ``eval``
when ``int(sha1(name).hexdigest(), 16) % 20 == 0``, where ``name`` is the relative path
(``"json/decoder.py"``) or ``"pydoc_data/topics.py:{key}"`` for a topic. About 5% of the
documents are held out; everything else is ``train``. The size is capped by taking documents
in order until ``max_bytes`` of UTF-8 text.

``python -m gguf_tools.corpus`` prints the document and byte counts per split. The
definition lives in efedge (not gguf_tools) because the runtime uses the held-out split
too: `efedge bench --policies` replays held-out text.
"""

from __future__ import annotations

import ast
import hashlib
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

EOT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (EOT, IM_START, IM_END)

# Directory names anywhere in the relative path that exclude a file: test suites,
# third-party packages, the IDE, demos, vendored wheels, codec tables.
SKIP_DIRS = frozenset({
    "test", "tests", "idle_test", "site-packages", "dist-packages", "idlelib", "turtledemo",
    "ensurepip", "encodings", "__pycache__", "lib-dynload", "__phello__",
})
SKIP_FILES = frozenset({"pydoc_data/topics.py", "this.py", "antigravity.py"})
SKIP_PREFIXES = ("_sysconfigdata", "config-")
HELDOUT_MOD = 20
DEFAULT_MAX_BYTES = 32_000_000


@dataclass(frozen=True)
class Document:
    name: str   # relative path, or "pydoc_data/topics.py:{key}"
    text: str
    split: str  # "train" or "eval"


def split_of(name: str) -> str:
    """``"eval"`` for the fixed held-out share of documents, else ``"train"``."""
    h = int(hashlib.sha1(name.encode("utf-8")).hexdigest(), 16)
    return "eval" if h % HELDOUT_MOD == 0 else "train"


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _skipped(rel: Path) -> bool:
    if rel.as_posix() in SKIP_FILES:
        return True
    if any(part in SKIP_DIRS or part.startswith(SKIP_PREFIXES) for part in rel.parts):
        return True
    return False


def _source_documents(root: Path) -> Iterator[Document]:
    for path in sorted(root.rglob("*.py"), key=lambda p: p.relative_to(root).as_posix()):
        rel = path.relative_to(root)
        if _skipped(rel) or not path.is_file():
            continue
        try:
            text = path.read_bytes().decode("utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if any(s in text for s in SPECIAL_TOKENS) or not text.strip():
            continue
        name = rel.as_posix()
        yield Document(name, text, split_of(name))


def _topic_documents(root: Path) -> Iterator[Document]:
    path = root / "pydoc_data" / "topics.py"
    if not path.is_file():
        return
    # The file is one literal assignment; read it without importing it.
    tree = ast.parse(path.read_text(encoding="utf-8"))
    topics: dict[str, str] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == "topics" for t in node.targets):
            topics = ast.literal_eval(node.value)
    for key in sorted(topics):
        text = topics[key].strip()
        if not text:
            continue
        name = f"pydoc_data/topics.py:{key}"
        chat = (f"{IM_START}user\nExplain the Python topic \"{key}\".{IM_END}\n"
                f"{IM_START}assistant\n{text}{IM_END}")
        yield Document(name, chat, split_of(name))


def build_corpus(max_bytes: int = DEFAULT_MAX_BYTES, root: Path | None = None) -> list[Document]:
    """All documents in their fixed order, capped at ``max_bytes`` of UTF-8 text."""
    root = stdlib_root() if root is None else Path(root)
    docs: list[Document] = []
    total = 0
    for doc in (*_source_documents(root), *_topic_documents(root)):
        n = len(doc.text.encode("utf-8"))
        if total + n > max_bytes:
            continue
        docs.append(doc)
        total += n
    return docs


def heldout_sample(max_chars: int = 1700, root: Path | None = None) -> str:
    """A fixed piece of held-out source text: the start of the first held-out source files
    (in path order) that are at least ``max_chars`` long, cut at a line end."""
    for doc in _source_documents(stdlib_root() if root is None else Path(root)):
        if doc.split == "eval" and len(doc.text) >= max_chars:
            cut = doc.text.rfind("\n", 0, max_chars)
            return doc.text[:cut + 1 if cut > 0 else max_chars]
    raise RuntimeError("no held-out source file is long enough")


def heldout_text(max_chars: int = 20000, root: Path | None = None) -> str:
    """Held-out source files (in path order) joined by blank lines, up to ``max_chars``:
    the text traces and policy benchmarks run on (the model never trained on it)."""
    parts: list[str] = []
    total = 0
    for doc in _source_documents(stdlib_root() if root is None else Path(root)):
        if doc.split != "eval":
            continue
        parts.append(doc.text)
        total += len(doc.text) + 2
        if total >= max_chars:
            break
    return "\n\n".join(parts)[:max_chars]
