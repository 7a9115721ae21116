"""OFT on AWQ layers: gptqmodel's AWQ kernels, and autoawq's `WQLinear_GEMM`.

autoawq is deprecated upstream; its `WQLinear_GEMM.forward` takes a triton path whenever triton is
importable, and that path has no CPU implementation. For that layer the wrapper therefore computes
the base output itself from the dequantized weight (the GEMM format is the same one gptqmodel's
`AwqTorchLinear` reads, so the numbers are those of gptqmodel's torch kernel: computed in the input
dtype when it is float16/bfloat16, else in float16). Autograd then flows through a plain matmul, so
the input gradient exists on every device.
"""

from __future__ import annotations

import importlib.metadata
from typing import Any

import torch
from torch import nn

from oftsurgery.oft.layer import OFTQuantLinear

AUTOAWQ_MINIMUM_VERSION = "0.2.0"


def _autoawq_gemm_class() -> type | None:
    """autoawq's WQLinear_GEMM when autoawq is importable, else None."""
    try:
        from awq.modules.linear import WQLinear_GEMM
    except Exception:  # noqa: BLE001 - autoawq breaks in many ways on new stacks; then it is simply absent
        return None
    return WQLinear_GEMM


def _is_autoawq_gemm(module: nn.Module) -> bool:
    cls = _autoawq_gemm_class()
    return cls is not None and isinstance(module, cls)


def autoawq_version() -> str:
    return importlib.metadata.version("autoawq")


def check_autoawq_version(found: str | None = None) -> None:
    """Raise ImportError naming the found and minimum versions when autoawq is older than 0.2.0."""
    from packaging.version import Version

    found = found if found is not None else autoawq_version()
    if Version(found) < Version(AUTOAWQ_MINIMUM_VERSION):
        raise ImportError(
            f"Found an incompatible version of autoawq: found {found}, but the minimum supported "
            f"version is {AUTOAWQ_MINIMUM_VERSION}."
        )


def dequantize_awq_gemm(layer: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """`[in, out]` weight of an AWQ GEMM layer (autoawq or gptqmodel buffers), in `dtype`."""
    from oftsurgery._deps import gptqmodel

    gptqmodel()
    from gptqmodel.quantization.awq.utils.packing_utils import dequantize_gemm

    bits = getattr(layer, "w_bit", None) or getattr(layer, "bits", 4)
    group_size = layer.group_size if layer.group_size not in (-1, None) else layer.in_features
    weight = dequantize_gemm(layer.qweight, layer.qzeros, layer.scales.to(dtype), bits, group_size)
    return weight.to(dtype)


class AwqOFTLinear(OFTQuantLinear):
    """OFT wrapper for an AWQ quantized linear (defaults as PEFT's: r=0, oft_block_size=32)."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, r: int = 0, oft_block_size: int = 32,
                 **kwargs: Any) -> None:
        """`OFTQuantLinear`'s arguments; only the defaults of `r` and `oft_block_size` differ (PEFT's for AWQ)."""
        super().__init__(base_layer, adapter_name, r=r, oft_block_size=oft_block_size, **kwargs)
        self._computes_base_itself = _is_autoawq_gemm(self.base_layer)

    def base_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if not self._computes_base_itself:
            return self.base_layer(x, *args, **kwargs)
        layer = self.base_layer
        compute_dtype = x.dtype if x.dtype in (torch.float16, torch.bfloat16) else torch.float16
        weight = dequantize_awq_gemm(layer, compute_dtype)
        out = torch.matmul(x.to(compute_dtype), weight)
        if layer.bias is not None:
            out = out + layer.bias.to(compute_dtype)
        return out.to(x.dtype)


def is_gptqmodel_awq_layer(module: nn.Module) -> bool:
    """A gptqmodel quantized linear whose kernel implements the AWQ method."""
    from oftsurgery._deps import gptqmodel

    gptqmodel()
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear

    if not isinstance(module, BaseQuantLinear):
        return False
    methods = getattr(module, "SUPPORTS_METHODS", None) or []
    return any(getattr(method, "value", method) == "awq" for method in methods)


def dispatch_awq(target: nn.Module, adapter_name: str, **kwargs: Any) -> AwqOFTLinear | None:
    """An `AwqOFTLinear` around `target` when it (or its `base_layer`) is an AWQ layer, else None.

    For autoawq's `WQLinear_GEMM` the installed autoawq version is checked here (ImportError below
    0.2.0), not at import time, so an old autoawq only matters when an AWQ layer is met.
    """
    base = target.get_base_layer() if hasattr(target, "get_base_layer") else target
    if _is_autoawq_gemm(base):
        check_autoawq_version()
    elif not is_gptqmodel_awq_layer(base):
        return None
    new_module = AwqOFTLinear(target, adapter_name, **kwargs)
    new_module.qweight = base.qweight
    return new_module
