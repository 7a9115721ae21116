"""Calibration text: where it comes from and how it becomes token batches.

`--calib` takes a local text file, a JSONL file (one JSON object per line with a "text" field, or
one JSON string per line), or a Hugging Face dataset name (only when online). With nothing given,
the built-in default is English documentation prose that ships with Python (`pydoc_data.topics`),
its "calib" split, which never overlaps the text `verify` evaluates on.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from oftsurgery.errors import CalibrationError

if TYPE_CHECKING:
    import torch

BUILTIN_CALIB = "builtin:english"


def load_calibration_text(source: str | None) -> tuple[str, str]:
    """Return (text, description) for a calibration source."""
    from oftsurgery.models import builtin_text

    if source is None or source.startswith("builtin:"):
        kind = (source or BUILTIN_CALIB).split(":", 1)[1]
        if kind not in ("english", "code"):
            raise CalibrationError(f"Unknown built-in calibration text {source!r}; use builtin:english or builtin:code.")
        return builtin_text(kind, "calib", max_chars=None), f"built-in {kind} text (calib split)"
    path = Path(source)
    if path.is_file():
        try:
            raw = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise CalibrationError(f"Calibration file {path} cannot be read as UTF-8 text ({exc}).") from None
        if path.suffix in (".jsonl", ".ndjson"):
            texts = []
            for n, line in enumerate(raw.splitlines(), start=1):
                if not line.strip():
                    continue
                try:
                    item = json.loads(line)
                except json.JSONDecodeError:
                    raise CalibrationError(f"{path} line {n} is not valid JSON.") from None
                texts.append(item if isinstance(item, str) else str(item.get("text", "")))
            raw = "\n\n".join(t for t in texts if t)
        if not raw.strip():
            raise CalibrationError(f"Calibration file {path} holds no text.")
        return raw, f"file {path}"
    if "/" in source and not path.exists():
        return _hf_dataset_text(source), f"dataset {source}"
    raise CalibrationError(f"Calibration source {source!r} is neither a file nor a dataset name (namespace/name).")


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
        raise CalibrationError(f"Could not load calibration dataset {name!r} ({type(exc).__name__}); offline? "
                               "Pass a local text or JSONL file instead.") from None


def calibration_batches(text: str, tokenizer, num_tokens: int, seq_len: int) -> "torch.Tensor":
    """Cut the tokenized text into `num_tokens // seq_len` non-overlapping rows of `seq_len` ids."""
    import torch

    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    rows = max(1, num_tokens // seq_len)
    if ids.numel() < seq_len:
        raise CalibrationError(f"The calibration text has only {ids.numel()} tokens; at least {seq_len} are needed.")
    rows = min(rows, ids.numel() // seq_len)
    return ids[: rows * seq_len].view(rows, seq_len).to(torch.long)
