"""One entry point per operation, dispatching on the checkpoint's `QuantConfig`.

The merge engine and the CLI work with module prefixes (`model.layers.0.self_attn.q_proj`) and
the tensors stored under them; everything format-specific stays in `gptq.py` and `awq.py`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping

import torch

from oftsurgery.errors import UnsupportedFormatError
from oftsurgery.quant.awq import pack_awq, unpack_awq
from oftsurgery.quant.config import QuantConfig
from oftsurgery.quant.gptq import pack_gptq, unpack_gptq
from oftsurgery.quant.grid import QuantizedWeight

from oftsurgery.quant.layout import LAYER_SUFFIXES, find_quantized_layers  # noqa: F401  (re-exported)


def layer_tensors(tensors: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The tensors of one layer keyed by suffix ("qweight", …) out of a full-name mapping."""
    return {suffix: tensors[f"{prefix}.{suffix}"] for suffix in LAYER_SUFFIXES if f"{prefix}.{suffix}" in tensors}


def layer_quant_config(qcfg: QuantConfig, module_name: str) -> QuantConfig | None:
    """The config that applies to one module after gptqmodel's per-module `dynamic` overrides.

    Returns None for modules that `dynamic` excludes from quantization ("-:" patterns).
    """
    if not qcfg.dynamic:
        return qcfg
    from oftsurgery._deps import gptqmodel

    gptqmodel()
    from gptqmodel.quantization.config import dynamic_get

    overrides = dynamic_get(qcfg.dynamic, module_name)
    if overrides is False:
        return None
    if not overrides:
        return qcfg
    known = {"bits", "group_size", "sym", "desc_act"}
    unknown = set(overrides) - known
    if unknown:
        raise UnsupportedFormatError(
            f"{qcfg.source or 'The quantization config'} overrides {sorted(unknown)} for {module_name}; "
            "only bits, group_size, sym and desc_act overrides are supported."
        )
    return dataclasses.replace(qcfg, **{key: type(getattr(qcfg, key))(value) for key, value in overrides.items()})


def unpack_layer(tensors: Mapping[str, torch.Tensor], qcfg: QuantConfig) -> QuantizedWeight:
    """Unpack one layer's tensors (keyed by suffix: qweight, qzeros, scales[, g_idx])."""
    if qcfg.is_gptq:
        return unpack_gptq(tensors, qcfg.bits, qcfg.format, qcfg.group_size)
    if qcfg.is_awq:
        return unpack_awq(tensors, qcfg.group_size)
    raise UnsupportedFormatError(f"Quantization method {qcfg.method!r} is not supported.")


def pack_layer(qw: QuantizedWeight, qcfg: QuantConfig, bias: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Pack one layer into the tensors (keyed by suffix) that the checkpoint format stores."""
    if qcfg.is_gptq:
        return pack_gptq(qw, qcfg.format, bias)
    if qcfg.is_awq:
        return pack_awq(qw, bias)
    raise UnsupportedFormatError(f"Quantization method {qcfg.method!r} is not supported.")


def dequantize_layer(tensors: Mapping[str, torch.Tensor], qcfg: QuantConfig) -> torch.Tensor:
    """The dense float32 [out, in] weight of one stored layer."""
    return unpack_layer(tensors, qcfg).dequantize(torch.float32)
