"""AWQ (GEMM layout) layers: unpack into a `QuantizedWeight`, pack back through gptqmodel or autoawq.

`unpack_awq` / `pack_awq` handle 4-bit GEMM `qweight` / `qzeros` / `scales` (codes packed along the
output dimension, true zero points, contiguous groups). By default our bit packer writes the codes;
`backend="gptqmodel"` and `backend="autoawq"` use the real packers, the references the tests hold ours
to. Every result is re-checked by unpacking it. Layout: docs/formats.md ("Packed layouts").
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from oftsurgery.errors import InvalidCheckpointError, MergeError, UnsupportedFormatError
from oftsurgery.quant.bitpack import AWQ_PACK_ORDER, pack_codes, unpack_codes
from oftsurgery.quant.grid import (QuantizedWeight, all_hold, default_g_idx, exact_float_weight, float_linear,
                                  range_checks, same)

AWQ_BITS = 4
AWQ_BACKENDS = ("oftsurgery", "gptqmodel", "autoawq")


def _unpack_columns(words: torch.Tensor, out_features: int) -> torch.Tensor:
    """[rows, out/8] AWQ words -> uint8 [rows, out] codes in column order."""
    return unpack_codes(words, AWQ_BITS, out_features, dim=-1, order=AWQ_PACK_ORDER)


def unpack_awq(tensors: Mapping[str, torch.Tensor], group_size: int) -> QuantizedWeight:
    """Unpack one AWQ GEMM layer (`qweight`, `qzeros`, `scales`) into codes and true zero points."""
    try:
        qweight, qzeros, scales = tensors["qweight"], tensors["qzeros"], tensors["scales"]
    except KeyError as exc:
        raise InvalidCheckpointError(f"An AWQ layer is missing its {exc.args[0]!r} tensor.") from None
    if scales.dtype != torch.float16:
        raise UnsupportedFormatError(f"AWQ scales are {scales.dtype}; only float16 scales can be repacked exactly.")
    if qweight.dtype != torch.int32 or qzeros.dtype != torch.int32:
        raise UnsupportedFormatError("AWQ qweight/qzeros must be packed into int32 words.")
    if group_size <= 0:
        raise UnsupportedFormatError(f"AWQ GEMM needs a positive group size, got {group_size}.")
    n_groups, out_f = scales.shape
    in_f = qweight.shape[0]
    if (
        out_f % 8
        or in_f % group_size
        or n_groups != in_f // group_size
        or tuple(qweight.shape) != (in_f, out_f // 8)
        or tuple(qzeros.shape) != (n_groups, out_f // 8)
    ):
        raise InvalidCheckpointError(
            f"AWQ tensors do not fit together: qweight {tuple(qweight.shape)}, qzeros {tuple(qzeros.shape)}, "
            f"scales {tuple(scales.shape)} with group_size={group_size}."
        )
    codes_t = _unpack_columns(qweight, out_f)  # [in, out], the order qweight stores
    zeros = _unpack_columns(qzeros, out_f).to(torch.int32)
    g_idx = default_g_idx(in_f, group_size).to(codes_t.device)
    return QuantizedWeight(codes_t.T, scales.contiguous(), zeros, g_idx, AWQ_BITS, group_size)


def _check_awq_packable(qw: QuantizedWeight) -> None:
    if qw.bits != AWQ_BITS:
        raise UnsupportedFormatError(f"AWQ GEMM stores 4-bit codes only, got {qw.bits} bits.")
    if qw.group_size <= 0 or qw.in_features % qw.group_size or qw.out_features % 8:
        raise UnsupportedFormatError(
            f"AWQ GEMM needs in_features divisible by group_size and out_features by 8 "
            f"(in={qw.in_features}, out={qw.out_features}, group_size={qw.group_size})."
        )
    if not qw.contiguous:
        raise UnsupportedFormatError("AWQ GEMM has contiguous groups only; this layer has a reordered g_idx.")


def _pack_with_oftsurgery(qw: QuantizedWeight, bias: torch.Tensor | None) -> dict[str, torch.Tensor]:
    packed = {
        "qweight": pack_codes(qw.codes.T, AWQ_BITS, dim=-1, order=AWQ_PACK_ORDER),
        "qzeros": pack_codes(qw.zeros, AWQ_BITS, dim=-1, order=AWQ_PACK_ORDER),
        "scales": qw.scales,
    }
    if bias is not None:
        packed["bias"] = bias.to(packed["qweight"].device)
    return packed


def _pack_with_gptqmodel(qw: QuantizedWeight, linear: torch.nn.Linear) -> dict[str, torch.Tensor]:
    from oftsurgery._deps import gptqmodel

    gptqmodel()
    from gptqmodel.nn_modules.qlinear.torch_awq import AwqTorchLinear

    layer = AwqTorchLinear(
        bits=AWQ_BITS,
        group_size=qw.group_size,
        sym=False,
        desc_act=False,
        in_features=qw.in_features,
        out_features=qw.out_features,
        bias=linear.bias is not None,
    )
    # [out, G] float32 scales keep z*s exact inside the packer; it stores them as float16.
    layer.pack(linear, scales=qw.scales.float().T.contiguous(), zeros=qw.zeros.T.contiguous())
    packed = {"qweight": layer.qweight, "qzeros": layer.qzeros, "scales": layer.scales.to(torch.float16)}
    if linear.bias is not None:
        packed["bias"] = layer.bias
    return packed


def _pack_with_autoawq(qw: QuantizedWeight, linear: torch.nn.Linear) -> dict[str, torch.Tensor]:
    from oftsurgery._deps import import_optional

    gemm = import_optional("awq.modules.linear.gemm", "awq")
    layer = gemm.WQLinear_GEMM.from_linear(
        linear, AWQ_BITS, qw.group_size, init_only=False, scales=qw.scales.float(), zeros=qw.zeros
    )
    packed = {"qweight": layer.qweight, "qzeros": layer.qzeros, "scales": layer.scales}
    if linear.bias is not None:
        packed["bias"] = layer.bias
    return packed


def pack_awq(qw: QuantizedWeight, bias: torch.Tensor | None = None, backend: str = "oftsurgery") -> dict[str, torch.Tensor]:
    """Pack `qw` into AWQ GEMM tensors {"qweight", "qzeros", "scales"(, "bias" as float16)}.

    backend "oftsurgery" (default) packs the codes directly, on `qw`'s device; "gptqmodel" uses
    `AwqTorchLinear.pack` and "autoawq" `WQLinear_GEMM.from_linear` (CPU; the tests' references).
    """
    if backend not in AWQ_BACKENDS:
        raise ValueError(f"backend must be one of {AWQ_BACKENDS}")
    _check_awq_packable(qw)
    if backend != "oftsurgery":  # the reference packers need valid codes to start with
        all_hold(range_checks(qw))
    if bias is not None:
        bias = bias.detach().to(torch.float16)
    if backend == "oftsurgery":
        packed = _pack_with_oftsurgery(qw, bias)
    else:
        cpu = QuantizedWeight(qw.codes.cpu(), qw.scales.cpu(), qw.zeros.cpu(), qw.g_idx.cpu(), qw.bits, qw.group_size)
        linear = float_linear(exact_float_weight(cpu), None if bias is None else bias.cpu())
        packer = _pack_with_gptqmodel if backend == "gptqmodel" else _pack_with_autoawq
        packed = packer(cpu, linear)
    packed = {name: tensor.detach().contiguous() for name, tensor in packed.items()}
    if "bias" in packed:
        packed["bias"] = packed["bias"].to(torch.float16)
    # the re-check: what a reader unpacks is exactly the codes, zero points and scales we were given
    # (uint8 codes and zero points are range-checked here; see grid.range_checks)
    mismatch = MergeError(f"The {backend} AWQ packer did not reproduce the layer's integer codes exactly.")
    all_hold(range_checks(qw) + [
        (same(_unpack_columns(packed["qweight"], qw.out_features), qw.codes.T), mismatch),
        (same(_unpack_columns(packed["qzeros"], qw.out_features), qw.zeros), mismatch),
        (same(packed["scales"], qw.scales), mismatch),
    ])
    return packed
