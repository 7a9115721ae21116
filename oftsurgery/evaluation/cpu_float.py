"""Running a gptqmodel-loaded quantized model in float32 on CPU.

`compute_in_float32` dequantizes each quantized linear once with gptqmodel's own dequantizer (the
exact s·(q − z) values its kernel multiplies with) and makes it a dense float32 matmul; every other
floating-point parameter becomes float32 too. The same quantized model in a wider dtype, which CPUs
without fp16/bf16 arithmetic run many times faster (docs/performance.md); OFT wrappers keep rotating
the input and call the dense layer.
"""

from __future__ import annotations

import functools


def compute_in_float32(model) -> int:
    """Switch every quantized linear of `model` (wrapped or not) to a dense float32 forward; return how many."""
    import torch

    from oftsurgery.oft.layer import OFTQuantLinear

    quantized = [m for m in model.modules() if hasattr(m, "qweight") and not isinstance(m, OFTQuantLinear)]
    dequantizers = [_dequantizer(m) for m in quantized]
    if any(d is None for d in dequantizers):
        return 0  # a kernel we cannot dequantize: leave the whole model as it is (mixed dtypes break)
    switched = 0
    quantized_ids: set[int] = set()
    for module, dequantize in zip(quantized, dequantizers):
        quantized_ids.update(id(t) for t in module.parameters())
        with torch.no_grad():
            weight = dequantize().to(torch.float32).T.contiguous()  # gptqmodel gives [in, out]
            bias = getattr(module, "bias", None)
            bias = bias.detach().to(torch.float32) if bias is not None else None
        # an instance attribute shadows the class's forward; wrappers call base_layer(x) and get it too
        module.forward = functools.partial(_dense_forward, weight, bias)
        switched += 1
    for param in model.parameters():
        if id(param) not in quantized_ids and param.is_floating_point() and param.dtype != torch.float32:
            param.data = param.data.to(torch.float32)
    return switched


def _dequantizer(module):
    """gptqmodel's own dequantizer for this layer (a callable giving the [in, out] weight), or None.

    GPTQ kernels expose `dequantize_weight()`; AWQ GEMM kernels (`AwqTorchLinear`) have none, so we
    call `dequantize_gemm`, the function their forward itself multiplies with.
    """
    if hasattr(module, "dequantize_weight"):
        return module.dequantize_weight
    if all(hasattr(module, a) for a in ("qzeros", "scales", "bits", "group_size")) and "awq" in type(module).__name__.lower():
        from gptqmodel.quantization.awq.utils.packing_utils import dequantize_gemm

        return functools.partial(dequantize_gemm, qweight=module.qweight, qzeros=module.qzeros,
                                 scales=module.scales, bits=module.bits, group_size=module.group_size)
    return None


def _dense_forward(weight, bias, x, *args, **kwargs):
    import torch

    return torch.nn.functional.linear(x.to(torch.float32), weight, bias)
