"""OFT on GPTQ layers quantized by gptqmodel (any of its kernels that implement the GPTQ method)."""

from __future__ import annotations

from typing import Any

from torch import nn

from oftsurgery.oft.layer import OFTQuantLinear


class GPTQOFTLinear(OFTQuantLinear):
    """OFT wrapper for a gptqmodel GPTQ quantized linear (defaults as PEFT's: r=8, oft_block_size=0,
    which are the base class's; its constructor is `OFTQuantLinear`'s).

    Unlike the PEFT seed, the quantized layer runs once per forward (on the rotated input).
    """


def is_gptq_layer(module: nn.Module) -> bool:
    """A gptqmodel quantized linear whose kernel implements the GPTQ method."""
    from oftsurgery._deps import gptqmodel

    gptqmodel()
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear

    if not isinstance(module, BaseQuantLinear):
        return False
    methods = getattr(module, "SUPPORTS_METHODS", None) or []
    return any(getattr(method, "value", method) == "gptq" for method in methods)


def dispatch_gptq(target: nn.Module, adapter_name: str, **kwargs: Any) -> GPTQOFTLinear | None:
    """A `GPTQOFTLinear` around `target` when it (or its `base_layer`) is a GPTQ layer, else None."""
    base = target.get_base_layer() if hasattr(target, "get_base_layer") else target
    if not is_gptq_layer(base):
        return None
    kwargs.pop("gptq_quantization_config", None)
    new_module = GPTQOFTLinear(target, adapter_name, **kwargs)
    new_module.qweight = base.qweight
    return new_module
