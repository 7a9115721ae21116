"""Real text that ships with Python, in disjoint train / calib / heldout splits.

English (`pydoc_data.topics`) or code (the standard library's top-level modules), split by position
so every split covers the whole source: the merge calibrates on "calib", `verify` evaluates on
"heldout", the demo trains on "train". No download, no dependency.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path
from typing import Optional

SPLITS = ("train", "calib", "heldout")
# Split assignment by position modulo 10: disjoint, deterministic, and interleaved so every split
# sees every part of the source (documentation topics and stdlib modules are sorted by name).
_SPLIT_OF_SLOT = {0: "train", 1: "train", 2: "train", 3: "train", 4: "train", 5: "train",
                  6: "calib", 7: "calib", 8: "heldout", 9: "heldout"}


def _english_documents() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[key] for key in sorted(topics)]


def _code_documents() -> list[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for path in sorted(stdlib.glob("*.py")):
        try:
            docs.append(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, OSError):
            continue
    return docs


def builtin_documents(kind: str = "english", split: str = "train") -> list[str]:
    """The documents of one split: Python's documentation topics ("english") or stdlib modules ("code").

    Documents are assigned to splits by their position in name order (slots 0-5 of every 10 train,
    6-7 calib, 8-9 heldout), so the splits are disjoint and each covers the whole source.
    """
    if kind == "english":
        documents = _english_documents()
    elif kind == "code":
        documents = _code_documents()
    else:
        raise ValueError(f"kind must be 'english' or 'code', not {kind!r}.")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}.")
    return [doc for index, doc in enumerate(documents) if _SPLIT_OF_SLOT[index % 10] == split and doc.strip()]


def builtin_text(kind: str = "english", split: str = "train", max_chars: Optional[int] = 400_000) -> str:
    """Real text that ships with Python, from one split of builtin_documents joined by blank lines.

    kind: "english" (pydoc_data.topics) or "code" (the standard library's top-level .py files);
    split: "train", "calib" or "heldout" (disjoint: never evaluate on calibration or training text).
    The result is cut to at most max_chars characters (None: no cut).
    """
    parts: list[str] = []
    total = 0
    for doc in builtin_documents(kind, split):
        parts.append(doc)
        total += len(doc) + 2
        if max_chars is not None and total >= max_chars:
            break
    text = "\n\n".join(parts)
    return text if max_chars is None else text[:max_chars]
