"""Calibration text: where it comes from and how it becomes token batches.

`--calib` takes a local text file, a JSONL file (one JSON object per line with a "text" field, or
one JSON string per line), or a Hugging Face dataset name (only when online). With nothing given,
the built-in default is English documentation prose that ships with Python (`pydoc_data.topics`),
its "calib" split, which never overlaps the text `verify` evaluates on.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

from oftsurgery.errors import CalibrationError

if TYPE_CHECKING:
    import torch

BUILTIN_CALIB = "builtin:english"


TEXT_SUFFIXES = (".txt", ".text", ".md", ".jsonl", ".ndjson", ".json")
_DATASET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
_LAST: tuple[tuple, tuple[str, str]] | None = None  # the last source read: checked up front, used later


def load_calibration_text(source: str | None) -> tuple[str, str]:
    """Return (text, description) for a calibration source.

    The last source read is remembered, so checking it before a merge starts (which reads it) and
    using it later costs one read (one download for a dataset).
    """
    global _LAST
    key = _cache_key(source)
    if _LAST is not None and _LAST[0] == key:
        return _LAST[1]
    loaded = _load(source)
    _LAST = (key, loaded)
    return loaded


def _cache_key(source: str | None) -> tuple:
    if source is None or source.startswith("builtin:"):
        return (source,)
    try:
        stat = Path(source).stat()
        return (source, stat.st_mtime_ns, stat.st_size)
    except OSError:
        return (source, None)


def _looks_like_path(source: str) -> bool:
    """A local path, not a Hub dataset name (namespace/name): absolute, ./ ../ ~, or a text suffix."""
    return (Path(source).is_absolute() or source.startswith((".", "~")) or "\\" in source
            or source.lower().endswith(TEXT_SUFFIXES) or source.count("/") > 1)


def _load(source: str | None) -> tuple[str, str]:
    from oftsurgery.texts import builtin_text

    if source is None or source.startswith("builtin:"):
        kind = (source or BUILTIN_CALIB).split(":", 1)[1]
        if kind not in ("english", "code"):
            raise CalibrationError(f"Unknown built-in calibration text {source!r}; use builtin:english or builtin:code.")
        return builtin_text(kind, "calib", max_chars=None), f"built-in {kind} text (calib split)"
    path = Path(source).expanduser()
    if path.is_file():
        return _file_text(path), f"file {path}"
    if path.is_dir():
        raise CalibrationError(f"Calibration source {path} is a folder; pass a .txt or .jsonl file.")
    if os.path.lexists(path):
        raise CalibrationError(f"Calibration file {path} cannot be read (a broken link or not a regular file).")
    if _looks_like_path(source):
        raise CalibrationError(f"Calibration file {path} does not exist.")
    if not _DATASET_NAME.match(source):
        raise CalibrationError(
            f"Calibration source {source!r} is neither an existing file nor a Hub dataset name (namespace/name)."
        )
    return _hf_dataset_text(source), f"dataset {source}"


def _file_text(path: Path) -> str:
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CalibrationError(f"Calibration file {path} cannot be read as UTF-8 text ({exc}).") from None
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        texts = []
        for n, line in enumerate(raw.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError:
                raise CalibrationError(f"{path} line {n} is not valid JSON.") from None
            if isinstance(item, dict) and isinstance(item.get("text"), str):
                texts.append(item["text"])
            elif isinstance(item, str):
                texts.append(item)
            else:
                from oftsurgery.schema import describe

                raise CalibrationError(
                    f"{path} line {n} holds {describe(item)}; each line must be a JSON string or an object "
                    'with a "text" string.'
                )
        raw = "\n\n".join(t for t in texts if t)
    if not raw.strip():
        raise CalibrationError(f"Calibration file {path} holds no text.")
    return raw


def _hf_dataset_text(name: str) -> str:
    try:
        import datasets  # noqa: F401
        from datasets import load_dataset

        ds = load_dataset(name, split="train", streaming=True)
        texts = []
        total = 0
        for row in ds:
            text = row.get("text") if isinstance(row, dict) else None
            if text:
                texts.append(text)
                total += len(text)
            if total > 2_000_000:
                break
        return "\n\n".join(texts)
    except Exception as exc:  # offline, unknown dataset, no text column...
        raise CalibrationError(f"Could not load calibration dataset {name!r} ({type(exc).__name__}): no such local "
                               "file, and the Hub dataset cannot be read (offline?); pass a local text or JSONL file "
                               "instead.") from None


def calibration_batches(text: str, tokenizer, num_tokens: int, seq_len: int) -> "torch.Tensor":
    """Cut the tokenized text into `num_tokens // seq_len` non-overlapping rows of `seq_len` ids."""
    import torch

    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    rows = max(1, num_tokens // seq_len)
    if ids.numel() < seq_len:
        raise CalibrationError(f"The calibration text has only {ids.numel()} tokens; at least {seq_len} are needed.")
    rows = min(rows, ids.numel() // seq_len)
    return ids[: rows * seq_len].view(rows, seq_len).to(torch.long)
