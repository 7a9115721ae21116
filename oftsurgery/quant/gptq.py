"""GPTQ layers: unpack checkpoint tensors into a `QuantizedWeight`, and pack one back, byte for byte.

`unpack_gptq` / `pack_gptq` handle `qweight`, `qzeros`, `scales` and `g_idx` of every bit width and
both zero-point conventions (v1 stores z − 1 with gptqmodel's word arithmetic, v2 stores z), so
unpack → pack is byte-exact for every checkpoint gptqmodel writes; every packed result is re-checked
by unpacking it. `gptq_module` builds a real gptqmodel layer (the reference packer, for tests and
benches). Layout and zero points: docs/formats.md ("Packed layouts"); speed: docs/performance.md.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from oftsurgery.errors import InvalidCheckpointError, MergeError, UnsupportedFormatError
from oftsurgery.quant.bitpack import MASK32, pack_codes, pack_stream, packed_words, to_int32_words, unpack_codes, unpack_stream
from oftsurgery.quant.grid import (QuantizedWeight, all_hold, default_g_idx, exact_float_weight, float_linear,
                                  num_groups_for, range_checks, same)

GPTQ_BITS = (2, 3, 4, 8)
GPTQ_FORMATS = ("gptq", "gptq_v2")
V1_ZERO_POLICIES = ("gptqmodel", "error")


def _check_bits_format(bits: int, format: str) -> None:
    if bits not in GPTQ_BITS:
        raise UnsupportedFormatError(f"GPTQ with {bits} bits is not supported (supported: 2, 3, 4, 8).")
    if format not in GPTQ_FORMATS:
        raise UnsupportedFormatError(f"GPTQ format {format!r} is not supported (supported: 'gptq', 'gptq_v2').")


def _v1_word_offset(bits: int) -> int:
    """The constant gptqmodel adds to every qzeros word when reading v1 (one 1 in each field)."""
    return sum(1 << shift for shift in range(0, 32, bits))


def v1_qzeros_to_v2(qzeros: torch.Tensor, bits: int, out_features: int) -> torch.Tensor:
    """Turn v1 qzeros words (z - 1) into v2 words (z), the way gptqmodel's loader does."""
    if bits == 3:
        fields = unpack_stream(qzeros, bits, out_features)
        return pack_stream((fields + 1) & 0x7, bits)
    return to_int32_words((qzeros.to(torch.int64) & MASK32) + _v1_word_offset(bits))


def v2_qzeros_to_v1(qzeros: torch.Tensor, bits: int, out_features: int) -> torch.Tensor:
    """Turn v2 qzeros words (z) into v1 words (z - 1), the way gptqmodel's exporter does."""
    if bits == 3:
        fields = unpack_stream(qzeros, bits, out_features)
        return pack_stream((fields - 1) & 0x7, bits)
    return to_int32_words((qzeros.to(torch.int64) & MASK32) - _v1_word_offset(bits))


def _infer_group_size(g_idx: torch.Tensor, num_groups: int) -> int:
    if num_groups == 1:
        return -1
    g_idx = g_idx.cpu()
    group_size = int((g_idx == 0).sum())
    if group_size > 0 and torch.equal(g_idx, default_g_idx(g_idx.numel(), group_size)):
        return group_size
    raise ValueError("group_size cannot be inferred from a non-contiguous g_idx; pass group_size")


def unpack_gptq(
    tensors: Mapping[str, torch.Tensor],
    bits: int,
    format: str = "gptq",
    group_size: int | None = None,
) -> QuantizedWeight:
    """Unpack one GPTQ layer (`qweight`, `qzeros`, `scales`, optional `g_idx`) into true codes/zeros."""
    _check_bits_format(bits, format)
    try:
        qweight, qzeros, scales = tensors["qweight"], tensors["qzeros"], tensors["scales"]
    except KeyError as exc:
        raise InvalidCheckpointError(f"A GPTQ layer is missing its {exc.args[0]!r} tensor.") from None
    g_idx = tensors.get("g_idx")
    if scales.dtype != torch.float16:
        raise UnsupportedFormatError(f"GPTQ scales are {scales.dtype}; only float16 scales can be repacked exactly.")
    if qweight.dtype != torch.int32 or qzeros.dtype != torch.int32:
        raise UnsupportedFormatError("GPTQ qweight/qzeros must be packed into int32 words.")
    n_groups, out_f = scales.shape
    in_f = g_idx.numel() if g_idx is not None else qweight.shape[0] * 32 // bits
    if g_idx is None:
        if group_size is None:
            if n_groups != 1 and in_f % n_groups:
                raise ValueError("group_size cannot be inferred (partial last group, no g_idx); pass group_size")
            group_size = -1 if n_groups == 1 else in_f // n_groups
        g_idx = default_g_idx(in_f, group_size)
    g_idx = g_idx.to(torch.int32).contiguous()
    if group_size is None:
        group_size = _infer_group_size(g_idx, n_groups)
    expected = {
        "qweight": (packed_words(in_f, bits), out_f),
        "qzeros": (n_groups, packed_words(out_f, bits)),
    }
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise InvalidCheckpointError(
                f"GPTQ {name} has shape {tuple(tensors[name].shape)}, expected {shape} for a "
                f"{bits}-bit layer with in={in_f}, out={out_f}, {n_groups} groups."
            )
    if n_groups != num_groups_for(in_f, group_size):
        raise InvalidCheckpointError(
            f"GPTQ scales have {n_groups} groups, but in={in_f} with group_size={group_size} needs "
            f"{num_groups_for(in_f, group_size)}."
        )
    if format == "gptq":
        qzeros = v1_qzeros_to_v2(qzeros, bits, out_f)
    codes_t = unpack_codes(qweight, bits, in_f, dim=0)  # uint8 [in, out], the order qweight stores
    zeros = unpack_codes(qzeros, bits, out_f, dim=-1).to(torch.int32)
    try:
        return QuantizedWeight(codes_t.T, scales.contiguous(), zeros, g_idx.to(codes_t.device), bits, group_size)
    except ValueError as exc:
        raise InvalidCheckpointError(f"A GPTQ layer is inconsistent: {exc}.") from None


def _torch_linear_class():
    from oftsurgery._deps import gptqmodel

    gptqmodel()
    from gptqmodel.nn_modules.qlinear import torch as torch_qlinear

    for name in ("TorchLinear", "TorchQuantLinear"):  # renamed between gptqmodel releases
        if hasattr(torch_qlinear, name):
            return getattr(torch_qlinear, name)
    raise UnsupportedFormatError("This gptqmodel release has no Torch GPTQ linear layer to pack with.")


def gptq_module(qw: QuantizedWeight, bias: torch.Tensor | None = None, desc_act: bool = False, sym: bool = True):
    """A real gptqmodel `TorchLinear` (v2 zero points) packed by gptqmodel from `qw`.

    Uses `pack` (-> `pack_block`) when in and out are multiples of 32, the only shapes it takes,
    and gptqmodel's `pack_original` otherwise (2/4/8 bits only).
    """
    if int(qw.codes.min()) < 0 or int(qw.codes.max()) > qw.maxq:
        raise ValueError(f"codes outside [0, {qw.maxq}]")
    if int(qw.zeros.min()) < 0 or int(qw.zeros.max()) > qw.maxq:
        raise ValueError(f"zero points outside [0, {qw.maxq}]")
    layer_cls = _torch_linear_class()
    try:
        layer = layer_cls(
            bits=qw.bits,
            group_size=qw.group_size,
            sym=sym,
            desc_act=desc_act,
            in_features=qw.in_features,
            out_features=qw.out_features,
            bias=bias is not None,
            register_buffers=True,
        )
    except (NotImplementedError, ValueError) as exc:
        raise UnsupportedFormatError(f"gptqmodel cannot build this GPTQ layer: {exc}") from None
    linear = float_linear(exact_float_weight(qw), bias)
    scales = qw.scales.float().T.contiguous()  # [out, G], float32 so that z*s is exact
    zeros = qw.zeros.T.contiguous()
    if qw.in_features % 32 == 0 and qw.out_features % 32 == 0:
        layer.pack(linear, scales, zeros, qw.g_idx.clone())
    elif qw.bits in (2, 4, 8):
        layer.pack_original(linear, scales, zeros, qw.g_idx.clone())
    else:
        raise UnsupportedFormatError(
            f"gptqmodel packs 3-bit GPTQ only when in/out features are multiples of 32 "
            f"(got in={qw.in_features}, out={qw.out_features})."
        )
    return layer


def pack_gptq(
    qw: QuantizedWeight,
    format: str = "gptq",
    bias: torch.Tensor | None = None,
    *,
    v1_zero_points: str = "gptqmodel",
) -> dict[str, torch.Tensor]:
    """Pack `qw` into GPTQ checkpoint tensors {"qweight", "qzeros", "scales", "g_idx"(, "bias")}.

    The same bytes as gptqmodel's packer (see the module docstring), on the device `qw` lives on;
    `format` "gptq" then applies gptqmodel's v1 offset. `v1_zero_points`: "gptqmodel" stores z = 0
    the way gptqmodel does (see module docstring); "error" raises `MergeError` instead. The bias is
    written as float16, like gptqmodel does.
    """
    _check_bits_format(qw.bits, format)
    if v1_zero_points not in V1_ZERO_POLICIES:
        raise ValueError(f"v1_zero_points must be one of {V1_ZERO_POLICIES}")
    if qw.bits == 3 and (qw.in_features % 32 or qw.out_features % 32):
        raise UnsupportedFormatError(
            f"3-bit GPTQ layers pack only when in/out features are multiples of 32 "
            f"(got in={qw.in_features}, out={qw.out_features})."
        )
    if format == "gptq" and v1_zero_points == "error" and bool((qw.zeros == 0).any()):
        raise MergeError(
            "The layer has zero points equal to 0, which GPTQ v1 ('gptq' format) cannot store without "
            "underflow; write 'gptq_v2' or requantize with zero points >= 1."
        )
    codes_t = qw.codes.T  # [in, out]: contiguous when the codes came from an unpacker
    packed = {
        "qweight": pack_codes(codes_t, qw.bits, dim=0),
        "qzeros": pack_codes(qw.zeros, qw.bits, dim=-1),
        "scales": qw.scales.contiguous(),
        "g_idx": qw.g_idx.to(torch.int32).contiguous(),
    }
    # the re-check: what a reader unpacks is exactly the codes and zero points we were given
    mismatch = MergeError("The packed GPTQ layer does not reproduce its integer codes exactly.")
    all_hold(range_checks(qw) + [
        (same(unpack_codes(packed["qweight"], qw.bits, qw.in_features, dim=0), codes_t), mismatch),
        (same(unpack_codes(packed["qzeros"], qw.bits, qw.out_features, dim=-1), qw.zeros), mismatch),
    ])
    if format == "gptq":
        packed["qzeros"] = v2_qzeros_to_v1(packed["qzeros"], qw.bits, qw.out_features)
    if bias is not None:
        packed["bias"] = bias.detach().to(packed["qweight"].device, torch.float16).contiguous()
    return packed
