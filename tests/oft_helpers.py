"""Real quantized layers for the OFT tests, packed by the libraries' own packers from random weights.

GPTQ: gptqmodel `TorchLinear.pack_block`; AWQ: gptqmodel `AwqTorchLinear.pack` and autoawq
`WQLinear_GEMM.from_linear` (byte-identical buffers for the same codes). Scales/zeros are fitted
here with the plain min/max rule; the packers round and we clamp first (they do not).
"""

from __future__ import annotations

import os

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")

import torch  # noqa: E402

from oftsurgery._deps import gptqmodel  # noqa: E402


def _fit_grid(weight: torch.Tensor, bits: int, group_size: int, sym: bool):
    """Per-group scale and integer zero, `[out, G]`, and the weight snapped to that grid."""
    out_features, in_features = weight.shape
    groups = in_features // group_size
    maxq = 2**bits - 1
    w = weight.view(out_features, groups, group_size)
    if sym:
        scale = 2 * w.abs().amax(-1) / maxq
        zero = torch.full_like(scale, (maxq + 1) / 2)
    else:
        lo, hi = w.amin(-1).clamp(max=0), w.amax(-1).clamp(min=0)
        scale = (hi - lo) / maxq
        zero = torch.round(-lo / scale)
    scale = scale.half().float()  # the packers store fp16 scales
    codes = torch.clamp(torch.round(w / scale[..., None] + zero[..., None]), 0, maxq)
    snapped = ((codes - zero[..., None]) * scale[..., None]).view(out_features, in_features)
    return scale, zero, snapped


def dense_linear(in_features: int, out_features: int, bias: bool = True, seed: int = 0) -> torch.nn.Linear:
    torch.manual_seed(seed)
    lin = torch.nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        lin.weight.normal_(0, 0.05)
        if bias:
            lin.bias.normal_(0, 0.05)
    return lin


def gptq_layer(in_features=64, out_features=32, bits=4, group_size=32, sym=True, bias=True, seed=0):
    """A gptqmodel TorchLinear (eval mode, eager dequantization) packed from a random weight."""
    gptqmodel()
    from gptqmodel.nn_modules.qlinear.torch import TorchLinear

    lin = dense_linear(in_features, out_features, bias, seed)
    scale, zero, snapped = _fit_grid(lin.weight.data, bits, group_size, sym)
    lin.weight.data = snapped
    layer = TorchLinear(
        bits=bits, group_size=group_size, sym=sym, desc_act=False, in_features=in_features,
        out_features=out_features, bias=bias, register_buffers=True,
    )
    layer.optimized = True  # skip torch.compile of the dequantizer: same math, no compile time in tests
    g_idx = torch.arange(in_features, dtype=torch.int32) // group_size
    layer.pack_block(lin, scale, zero, g_idx)
    layer.post_init()
    return layer.eval()


def awq_layer(in_features=64, out_features=32, group_size=32, bias=True, seed=0):
    """A gptqmodel AwqTorchLinear packed from a random weight."""
    gptqmodel()
    from gptqmodel.nn_modules.qlinear.torch_awq import AwqTorchLinear

    lin = dense_linear(in_features, out_features, bias, seed)
    scale, zero, snapped = _fit_grid(lin.weight.data, 4, group_size, sym=False)
    lin.weight.data = snapped
    layer = AwqTorchLinear(
        bits=4, group_size=group_size, sym=False, desc_act=False, in_features=in_features,
        out_features=out_features, bias=bias, register_buffers=False,
    )
    layer.pack(lin, scale, zero)
    layer.post_init()
    return layer.eval()


def autoawq_layer(in_features=64, out_features=32, group_size=32, bias=True, seed=0):
    """autoawq's WQLinear_GEMM packed by autoawq from the same random weight as `awq_layer`."""
    from awq.modules.linear import WQLinear_GEMM

    lin = dense_linear(in_features, out_features, bias, seed)
    scale, zero, snapped = _fit_grid(lin.weight.data, 4, group_size, sym=False)
    lin.weight.data = snapped
    layer = WQLinear_GEMM.from_linear(
        lin.half(), 4, group_size, init_only=False, scales=scale.t().contiguous().half(),
        zeros=zero.t().contiguous(),
    )
    return layer.eval()


def dequantized_weight(layer) -> torch.Tensor:
    """`[out, in]` float64 weight from the library's own dequantizer."""
    from gptqmodel.nn_modules.qlinear.torch_awq import AwqTorchLinear

    if isinstance(layer, AwqTorchLinear):
        from gptqmodel.quantization.awq.utils.packing_utils import dequantize_gemm

        w = dequantize_gemm(layer.qweight, layer.qzeros, layer.scales, layer.bits, layer.group_size)
        return w.t().double()
    with torch.no_grad():
        return layer.dequantize_weight().t().double()
