"""Which tensors form a quantized linear, its shape and its decoder layer: from names and header shapes only.

Kept free of torch so `inspect`, `attach` and the merge planner can answer from safetensors headers.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from oftsurgery.quant.config import QuantConfig

LAYER_SUFFIXES = ("qweight", "qzeros", "scales", "g_idx", "bias")
REQUIRED_SUFFIXES = ("qweight", "qzeros", "scales")
_LAYER_INDEX = re.compile(r"\.layers\.(\d+)\.")


def decoder_layer_index(name: str) -> int | None:
    """Index of the decoder layer a tensor or module belongs to (None outside the layer stack)."""
    match = _LAYER_INDEX.search(f".{name}.")
    return int(match.group(1)) if match else None


def find_quantized_layers(tensor_names: Iterable[str]) -> list[str]:
    """Module prefixes (sorted) that have all of `.qweight`, `.qzeros` and `.scales`."""
    seen: dict[str, set[str]] = {}
    for name in tensor_names:
        prefix, _, suffix = name.rpartition(".")
        if prefix and suffix in REQUIRED_SUFFIXES:
            seen.setdefault(prefix, set()).add(suffix)
    return sorted(prefix for prefix, suffixes in seen.items() if len(suffixes) == len(REQUIRED_SUFFIXES))


def linear_shape(shapes: Mapping[str, tuple[int, ...]], prefix: str, qcfg: QuantConfig) -> tuple[int, int]:
    """(in_features, out_features) of a packed layer, from its tensor shapes alone."""
    qweight = shapes[f"{prefix}.qweight"]
    out_features = shapes[f"{prefix}.scales"][1]
    if qcfg.is_awq:
        in_features = qweight[0]
    elif f"{prefix}.g_idx" in shapes:
        in_features = shapes[f"{prefix}.g_idx"][0]
    else:
        in_features = qweight[0] * 32 // qcfg.bits
    return int(in_features), int(out_features)


def quantized_linear_shapes(shapes: Mapping[str, tuple[int, ...]], qcfg: QuantConfig) -> dict[str, tuple[int, int]]:
    """module path -> (in_features, out_features) for every quantized linear."""
    return {prefix: linear_shape(shapes, prefix, qcfg) for prefix in find_quantized_layers(shapes)}
