"""Merging OFT adapters into quantized checkpoints (see `merge_checkpoint`)."""

from oftsurgery.merge.engine import METHODS, MergeOptions, merge_checkpoint
from oftsurgery.merge.report import LayerReport, MergeReport

__all__ = ["METHODS", "LayerReport", "MergeOptions", "MergeReport", "merge_checkpoint", "parse_size"]


def parse_size(text: str) -> int:
    """'5GB' / '500MB' / '1024' -> bytes."""
    import math

    from oftsurgery.errors import OftSurgeryError

    units = {"KB": 1024, "MB": 1024**2, "GB": 1024**3, "TB": 1024**4, "B": 1}
    value = text.strip().upper()
    for unit, factor in units.items():
        if value.endswith(unit):
            number = value[: -len(unit)].strip()
            break
    else:
        number, factor = value, 1
    try:
        amount = float(number) * factor
    except ValueError:
        amount = math.nan
    if not math.isfinite(amount):  # "inf" and "nan" parse as floats
        raise OftSurgeryError(f"Cannot read the size {text!r}; write it like 5GB or 500MB.")
    size = int(amount)
    if size <= 0:
        raise OftSurgeryError(f"The size {text!r} must be positive.")
    return size
