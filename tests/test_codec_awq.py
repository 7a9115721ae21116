"""The AWQ (GEMM) codec against gptqmodel's AwqTorchLinear (packer, dequantizer, kernel) and autoawq's packer."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quant_layers import awq_reference, awq_tensors

from oftsurgery.errors import InvalidCheckpointError, UnsupportedFormatError
from oftsurgery.quant.awq import pack_awq, unpack_awq
from oftsurgery.quant.bitpack import AWQ_PACK_ORDER
from oftsurgery.quant.codec import dequantize_layer, pack_layer, unpack_layer
from oftsurgery.quant.config import parse_quant_config
from oftsurgery.quant.grid import quantize_weight

SETTINGS = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _assert_same_tensors(actual: dict, expected: dict) -> None:
    assert set(actual) == set(expected)
    for name, tensor in expected.items():
        assert actual[name].dtype == tensor.dtype and actual[name].shape == tensor.shape, name
        assert torch.equal(actual[name], tensor), f"{name} differs"


def _gemm_reference_dequant(layer) -> torch.Tensor:
    """gptqmodel's AWQ GEMM dequantizer ([in, out], float16)."""
    from gptqmodel.quantization.awq.utils.packing_utils import dequantize_gemm

    return dequantize_gemm(layer.qweight, layer.qzeros, layer.scales, 4, layer.group_size)


@SETTINGS
@given(
    shape=st.sampled_from([(128, 64), (256, 32), (64, 128)]),
    group_size=st.sampled_from([32, 64, 128]),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_unpack_pack_reproduces_gptqmodel_awq_bytes(shape, group_size, bias, seed):
    in_f, out_f = shape
    if in_f % group_size:
        group_size = 32
    layer, _ = awq_reference(in_f, out_f, group_size, bias, seed)
    tensors = awq_tensors(layer)

    qw = unpack_awq(tensors, group_size)
    assert torch.equal(qw.dequantize(torch.float16), _gemm_reference_dequant(layer).T)
    _assert_same_tensors(pack_awq(qw, bias=tensors.get("bias")), tensors)

    x = torch.randn(3, in_f, generator=torch.Generator().manual_seed(seed)).to(torch.float16)
    with torch.no_grad():
        expected = layer(x).float()
    ours = x.float() @ qw.dequantize(torch.float16).float().T
    if bias:
        ours = ours + tensors["bias"].float()
    torch.testing.assert_close(ours, expected, atol=2e-3 * (ours.abs().max().item() + 1e-6), rtol=1e-2)


def test_awq_nibble_order_is_the_documented_interleave():
    """Column AWQ_PACK_ORDER[k] of each group of 8 lives in nibble k (formats.md)."""
    layer, _ = awq_reference(32, 64, 32, seed=4)
    qw = unpack_awq(awq_tensors(layer), 32)
    word = int(layer.qweight[0, 0]) & 0xFFFFFFFF
    nibbles = [(word >> (4 * k)) & 0xF for k in range(8)]
    assert nibbles == [int(qw.codes[AWQ_PACK_ORDER[k], 0]) for k in range(8)]


@pytest.mark.parametrize("bias", [False, True])
def test_autoawq_packer_gives_the_same_bytes(bias):
    layer, _ = awq_reference(128, 64, 32, bias=bias, seed=7)
    tensors = awq_tensors(layer)
    qw = unpack_awq(tensors, 32)
    via_autoawq = pack_awq(qw, bias=tensors.get("bias"), backend="autoawq")
    _assert_same_tensors(via_autoawq, tensors)
    _assert_same_tensors(via_autoawq, pack_awq(qw, bias=tensors.get("bias"), backend="gptqmodel"))


def test_requantized_layer_packs_identically_with_every_packer():
    """Ours (the default) writes the bytes of both real packers: autoawq's and gptqmodel's."""
    weight = torch.randn(64, 256, generator=torch.Generator().manual_seed(1)) * 0.05
    qw = quantize_weight(weight, 4, 64, sym=False)
    ours = pack_awq(qw)
    _assert_same_tensors(ours, pack_awq(qw, backend="autoawq"))
    _assert_same_tensors(ours, pack_awq(qw, backend="gptqmodel"))


def test_awq_refuses_what_the_gemm_layout_cannot_hold():
    weight = torch.randn(64, 128)
    with pytest.raises(UnsupportedFormatError):
        pack_awq(quantize_weight(weight, 3, 32, sym=False))
    perm = torch.randperm(128)
    with pytest.raises(UnsupportedFormatError):
        pack_awq(quantize_weight(weight, 4, 32, sym=False, g_idx=(perm // 32).to(torch.int32)))
    with pytest.raises(ValueError):
        pack_awq(quantize_weight(weight, 4, 32, sym=False), backend="marlin")
    tensors = awq_tensors(awq_reference(128, 64, 32)[0])
    with pytest.raises(InvalidCheckpointError):
        unpack_awq(tensors, 64)
    with pytest.raises(UnsupportedFormatError):
        unpack_awq({**tensors, "scales": tensors["scales"].float()}, 32)


def test_codec_dispatch_on_awq_config():
    layer, _ = awq_reference(128, 64, 32, bias=True, seed=2)
    tensors = awq_tensors(layer)
    qcfg = parse_quant_config({"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True, "version": "gemm"})
    qw = unpack_layer(tensors, qcfg)
    assert torch.equal(dequantize_layer(tensors, qcfg).to(torch.float16), _gemm_reference_dequant(layer).T)
    _assert_same_tensors(pack_layer(qw, qcfg, bias=tensors["bias"]), tensors)


@pytest.mark.parametrize("column", [0, 7, 8])  # nibble 0, nibble 7 (its spill falls off the word), next word
def test_packing_re_check_catches_uint8_codes_wider_than_4_bits(column):
    from oftsurgery.errors import MergeError
    from oftsurgery.quant.grid import QuantizedWeight

    qw = unpack_awq(awq_tensors(awq_reference(64, 32, 32, seed=3)[0]), 32)
    codes = qw.codes.T.contiguous()
    codes[5, AWQ_PACK_ORDER[column % 8] + 8 * (column // 8)] += 16
    with pytest.raises(MergeError):
        pack_awq(QuantizedWeight(codes.T, qw.scales, qw.zeros, qw.g_idx, 4, 32))
