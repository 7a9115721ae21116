"""What `--overwrite` may replace: only what oftsurgery wrote, or an empty folder.

oftsurgery's outputs are recognised by their contents: a merged checkpoint holds `MERGE_REPORT`, an
adapter folder and a rotations file carry oftsurgery's format key in their safetensors metadata.
The one subfolder oftsurgery writes is a merge's `residual-lora/` (its weights carry the format key
too); a folder holding any other is never ours. The working directory, the home directory and any
folder above them are refused whatever they hold (docs/errors.md).
"""

from __future__ import annotations

import json
from pathlib import Path

from oftsurgery.errors import OutputPathError

MERGE_REPORT = "merge_report.json"  # the merge report's file name, for every module that writes or reads it
ADAPTER_WEIGHTS = "adapter_model.safetensors"
FORMAT_KEY = "oftsurgery_format"
ADAPTER_FORMAT = "peft-adapter"
ROTATIONS_FORMAT = "oftsurgery-rotations"
RESIDUAL_LORA_DIR = "residual-lora"  # a merge's residual LoRA adapter (merge --residual-rank)
RESIDUAL_LORA_FORMAT = "residual-lora"
_RESIDUAL_LORA_FILES = {"adapter_config.json", ADAPTER_WEIGHTS}
_REPORT_KEYS = {"checkpoint", "adapter", "method"}


def is_within(child: Path, parent: Path) -> bool:
    """Whether `child` is `parent` or lies below it (both taken as given: resolve them first)."""
    try:
        child.relative_to(parent)
        return True
    except ValueError:
        return False


def _header_format(path: Path) -> str | None:
    from oftsurgery.errors import OftSurgeryError
    from oftsurgery.io.reader import read_safetensors_header

    try:
        metadata, _ = read_safetensors_header(path)
    except OftSurgeryError:
        return None
    value = metadata.get(FORMAT_KEY) if isinstance(metadata, dict) else None
    return value if isinstance(value, str) else None


def is_merge_output(folder: Path) -> bool:
    try:
        report = json.loads((folder / MERGE_REPORT).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(report, dict) and _REPORT_KEYS <= set(report)


def is_adapter_output(folder: Path) -> bool:
    weights = folder / ADAPTER_WEIGHTS
    return weights.is_file() and _header_format(weights) == ADAPTER_FORMAT


def _is_residual_lora(folder: Path) -> bool:
    """A merge's residual-lora/ folder, holding only what the merge wrote there."""
    try:
        names = {e.name for e in folder.iterdir() if e.is_file() and not e.is_symlink()}
        count = sum(1 for _ in folder.iterdir())
    except OSError:
        return False
    return (folder.name == RESIDUAL_LORA_DIR and names == _RESIDUAL_LORA_FILES and count == len(names)
            and _header_format(folder / ADAPTER_WEIGHTS) == RESIDUAL_LORA_FORMAT)


def is_rotations_file(path: Path) -> bool:
    return path.is_file() and _header_format(path) == ROTATIONS_FORMAT


def _protected(out: Path) -> str | None:
    """Why `out` may never be replaced (it is or holds the working or home directory), or None."""
    places = []
    try:
        places.append(("the working directory", Path.cwd().resolve()))
    except OSError:  # the working directory was deleted
        pass
    try:
        places.append(("your home directory", Path.home().resolve()))
    except (OSError, RuntimeError):
        pass
    for what, place in places:
        if out == place:
            return f"it is {what}"
        if is_within(place, out):
            return f"it contains {what}"
    return None


def check_replaceable(out: Path, is_file: bool) -> None:
    """Raise OutputPathError (one sentence) unless `--overwrite` may replace the existing `out`."""
    refuse = "; --overwrite replaces only an output oftsurgery wrote or an empty folder, so choose another path " \
             "or remove it yourself."
    reason = _protected(out)
    if reason:
        raise OutputPathError(f"Not replacing {out}: {reason}; choose another output path.")
    if is_file:
        if out.is_dir():
            raise OutputPathError(f"Not replacing {out}: it is a folder and the output is a file{refuse}")
        if not is_rotations_file(out):
            raise OutputPathError(f"Not replacing {out}: it is not a rotations file written by oftsurgery{refuse}")
        return
    if not out.is_dir():
        raise OutputPathError(f"Not replacing {out}: it is a file and the output is a folder{refuse}")
    try:
        entries = sorted(out.iterdir())
    except OSError as exc:
        raise OutputPathError(f"Not replacing {out}: its contents cannot be listed ({exc.strerror or exc}).") from None
    if not entries:
        return
    if not (is_merge_output(out) or is_adapter_output(out)):
        raise OutputPathError(
            f"Not replacing {out}: it is not empty and holds neither a {MERGE_REPORT} nor an adapter written by "
            f"oftsurgery{refuse}"
        )
    subfolders = [e.name for e in entries if e.is_dir() and not e.is_symlink()
                  and not (is_merge_output(out) and _is_residual_lora(e))]
    if subfolders:
        raise OutputPathError(
            f"Not replacing {out}: it holds a folder oftsurgery did not write ({subfolders[0]}){refuse}"
        )
