"""Reference quantized layers made by gptqmodel (and autoawq) themselves, for the codec tests.

Each builder takes a random float weight, lets gptqmodel's own `Quantizer` choose per-group scales
and zero points, and packs with gptqmodel's own packer (`pack_original`, a different code path
from the `pack` -> `pack_block` that oftsurgery packs with). Nothing here uses oftsurgery code, so
the tensors are an independent reference for unpacking and repacking.
"""

from __future__ import annotations

import os
import types

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
os.environ.setdefault("PYTHON_GIL", "1")

import torch  # noqa: E402


def gptqmodel_modules():
    import gptqmodel  # noqa: F401  (sets up the package the way users import it)
    from gptqmodel.nn_modules.qlinear.torch import TorchLinear
    from gptqmodel.nn_modules.qlinear.torch_awq import AwqTorchLinear
    from gptqmodel.quantization.config import QuantizeConfig
    from gptqmodel.quantization.quantizer import Quantizer
    from gptqmodel.utils import model as model_utils

    return types.SimpleNamespace(
        TorchLinear=TorchLinear,
        AwqTorchLinear=AwqTorchLinear,
        QuantizeConfig=QuantizeConfig,
        Quantizer=Quantizer,
        v2_to_v1=model_utils.convert_gptq_v2_to_v1_format_module,
        v1_to_v2=model_utils.convert_gptq_v1_to_v2_format_module,
    )


def reference_g_idx(in_features: int, group_size: int, desc_act: bool, generator: torch.Generator) -> torch.Tensor:
    """g_idx as gptqmodel writes it: contiguous groups, or with act-order the groups of a permutation."""
    size = in_features if group_size == -1 else group_size
    g_idx = torch.arange(in_features, dtype=torch.int32) // size
    if desc_act:
        perm = torch.randperm(in_features, generator=generator)
        g_idx = g_idx[torch.argsort(perm)].to(torch.int32)  # column perm[j] gets group j // size
    return g_idx.contiguous()


def gptqmodel_grid(weight: torch.Tensor, bits: int, sym: bool, g_idx: torch.Tensor, n_groups: int):
    """Per-group (scale, zero) [out, G] float32 from gptqmodel's own min/max `Quantizer`."""
    gm = gptqmodel_modules()
    quantizer = gm.Quantizer(gm.QuantizeConfig(bits=bits, sym=sym, offload_to_disk=False))
    quantizer.configure(perchannel=True)
    scales, zeros = [], []
    for g in range(n_groups):
        quantizer.find_params(weight[:, g_idx == g], weight=True)
        scales.append(quantizer.scale.reshape(-1).clone())
        zeros.append(quantizer.zero.reshape(-1).clone())
    return torch.stack(scales, 1), torch.stack(zeros, 1)


def gptq_reference(
    in_features: int,
    out_features: int,
    bits: int,
    group_size: int,
    sym: bool,
    desc_act: bool = False,
    bias: bool = False,
    seed: int = 0,
    weight: torch.Tensor | None = None,
):
    """A gptqmodel `TorchLinear` (v2 zero points, eval mode) packed by gptqmodel from random weights.

    Returns (layer, float weight).
    """
    gm = gptqmodel_modules()
    gen = torch.Generator().manual_seed(seed)
    if weight is None:
        weight = torch.randn(out_features, in_features, generator=gen) * 0.05
    g_idx = reference_g_idx(in_features, group_size, desc_act, gen)
    n_groups = 1 if group_size == -1 else -(-in_features // group_size)
    scales, zeros = gptqmodel_grid(weight, bits, sym, g_idx, n_groups)
    linear = torch.nn.Linear(in_features, out_features, bias=bias).requires_grad_(False)
    linear.weight.data = weight.clone()
    if bias:
        linear.bias.data = torch.randn(out_features, generator=gen) * 0.1
    layer = gm.TorchLinear(
        bits=bits,
        group_size=group_size,
        sym=sym,
        desc_act=desc_act,
        in_features=in_features,
        out_features=out_features,
        bias=bias,
        register_buffers=True,
    )
    layer.pack_original(linear, scales, zeros.to(torch.int32), g_idx)
    layer.eval()
    return layer, weight


def gptq_tensors(layer, format: str) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of a v2-state gptqmodel layer, exported in `format` by gptqmodel."""
    gm = gptqmodel_modules()
    v2_qzeros = layer.qzeros.clone()
    if format == "gptq":
        gm.v2_to_v1(layer, types.SimpleNamespace(bits=layer.bits, pack_dtype=layer.pack_dtype))
    tensors = {name: getattr(layer, name).clone() for name in ("qweight", "qzeros", "scales", "g_idx")}
    if format == "gptq":  # put the layer back into the v2 state its kernels expect
        layer.qzeros.data = v2_qzeros
        layer.qzero_format(format=2)
    if layer.bias is not None:
        tensors["bias"] = layer.bias.clone()
    return tensors


def gptq_layer_from_tensors(tensors: dict[str, torch.Tensor], bits: int, group_size: int, format: str):
    """Load checkpoint tensors into a fresh gptqmodel `TorchLinear` the way gptqmodel's loader does
    (v1 zero points converted to v2 by gptqmodel)."""
    gm = gptqmodel_modules()
    in_features, out_features = tensors["g_idx"].numel(), tensors["scales"].shape[1]
    layer = gm.TorchLinear(
        bits=bits,
        group_size=group_size,
        sym=True,
        desc_act=False,
        in_features=in_features,
        out_features=out_features,
        bias="bias" in tensors,
        register_buffers=True,
    )
    for name, tensor in tensors.items():
        getattr(layer, name).data.copy_(tensor)
    if format == "gptq":
        gm.v1_to_v2(layer, bits=bits, pack_dtype=layer.pack_dtype)
    layer.eval()
    return layer


def awq_reference(in_features: int, out_features: int, group_size: int, bias: bool = False, seed: int = 0):
    """A gptqmodel `AwqTorchLinear` packed by gptqmodel from random weights (4-bit, asymmetric grid
    chosen by gptqmodel's `Quantizer`). Returns (layer, float weight)."""
    gm = gptqmodel_modules()
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=gen) * 0.05
    g_idx = reference_g_idx(in_features, group_size, False, gen)
    scales, zeros = gptqmodel_grid(weight, 4, False, g_idx, in_features // group_size)
    linear = torch.nn.Linear(in_features, out_features, bias=bias).requires_grad_(False)
    linear.weight.data = weight.clone()
    if bias:
        linear.bias.data = torch.randn(out_features, generator=gen) * 0.1
    layer = gm.AwqTorchLinear(
        bits=4,
        group_size=group_size,
        sym=False,
        desc_act=False,
        in_features=in_features,
        out_features=out_features,
        bias=bias,
    )
    layer.pack(linear, scales.to(torch.float16), zeros.to(torch.int32))
    layer.eval()
    return layer, weight


def awq_tensors(layer) -> dict[str, torch.Tensor]:
    tensors = {name: getattr(layer, name).clone() for name in ("qweight", "qzeros", "scales")}
    if layer.bias is not None:
        tensors["bias"] = layer.bias.clone()
    return tensors
