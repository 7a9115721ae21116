"""The GPTQ codec against gptqmodel itself: its packer, its v1/v2 conversion, its dequantizer, its kernel.

Reference layers come from `tests/quant_layers.py` (gptqmodel quantizes and packs random weights).
"""

from __future__ import annotations

import types
from unittest import mock

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quant_layers import (
    gptq_layer_from_tensors,
    gptq_reference,
    gptq_tensors,
    gptqmodel_grid,
    gptqmodel_modules,
    reference_g_idx,
)

from oftsurgery.errors import InvalidCheckpointError, MergeError, UnsupportedFormatError
from oftsurgery.quant import bitpack
from oftsurgery.quant.bitpack import AWQ_PACK_ORDER, pack_codes, pack_stream, packed_words, unpack_codes, unpack_stream
from oftsurgery.quant.codec import dequantize_layer, find_quantized_layers, layer_tensors, pack_layer, unpack_layer
from oftsurgery.quant.config import parse_quant_config
from oftsurgery.quant.gptq import gptq_module, pack_gptq, unpack_gptq, v1_qzeros_to_v2, v2_qzeros_to_v1
from oftsurgery.quant.grid import QuantizedWeight, default_g_idx, fit_grid, quantize_weight

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _assert_same_tensors(actual: dict, expected: dict) -> None:
    assert set(actual) == set(expected)
    for name, tensor in expected.items():
        assert actual[name].dtype == tensor.dtype, name
        assert actual[name].shape == tensor.shape, name
        assert torch.equal(actual[name], tensor), f"{name} differs"


def _kernel_forward_matches(layer, qw: QuantizedWeight, bias, seed: int = 0) -> None:
    """gptqmodel's CPU kernel forward equals x @ W.T with our dequantized weight."""
    x = torch.randn(3, qw.in_features, generator=torch.Generator().manual_seed(seed)).to(torch.float16)
    with torch.no_grad():
        expected = layer(x).float()
    ours = x.float() @ qw.dequantize(torch.float16).float().T
    if bias is not None:
        ours = ours + bias.float()
    scale = ours.abs().max().item() + 1e-6
    torch.testing.assert_close(ours, expected, atol=2e-3 * scale, rtol=1e-2)


shapes = st.sampled_from([(128, 64), (256, 32), (576, 64)])


@SETTINGS
@given(
    shape=shapes,
    bits=st.sampled_from([2, 3, 4, 8]),
    group_size=st.sampled_from([-1, 32, 64, 128]),
    sym=st.booleans(),
    desc_act=st.booleans(),
    fmt=st.sampled_from(["gptq", "gptq_v2"]),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_unpack_pack_reproduces_gptqmodel_bytes(shape, bits, group_size, sym, desc_act, fmt, bias, seed):
    in_f, out_f = shape
    layer, _ = gptq_reference(in_f, out_f, bits, group_size, sym, desc_act, bias, seed)
    tensors = gptq_tensors(layer, fmt)

    qw = unpack_gptq(tensors, bits, fmt, group_size)

    # Our dequantization is gptqmodel's, exactly (it returns [in, out]).
    assert torch.equal(qw.dequantize(torch.float16), layer.dequantize_weight().T)
    if fmt == "gptq":
        # ... also when gptqmodel itself loads the v1 tensors.
        loaded = gptq_layer_from_tensors(tensors, bits, group_size, fmt)
        assert torch.equal(qw.dequantize(torch.float16), loaded.dequantize_weight().T)

    packed = pack_gptq(qw, fmt, bias=tensors.get("bias"))
    _assert_same_tensors(packed, tensors)
    _kernel_forward_matches(layer, qw, tensors.get("bias"), seed)


def test_partial_last_group_smollm_shape():
    """in=576 with g=128: five groups, the last one of 64 inputs (SmolLM2's hidden size)."""
    layer, _ = gptq_reference(576, 192, 4, 128, True, seed=3)
    tensors = gptq_tensors(layer, "gptq")
    qw = unpack_gptq(tensors, 4, "gptq", 128)
    assert qw.num_groups == 5 and int((qw.g_idx == 4).sum()) == 64
    _assert_same_tensors(pack_gptq(qw, "gptq"), tensors)


def test_desc_act_g_idx_is_kept_non_monotonic():
    layer, _ = gptq_reference(256, 32, 4, 32, False, desc_act=True, seed=5)
    tensors = gptq_tensors(layer, "gptq_v2")
    assert bool((tensors["g_idx"][1:] < tensors["g_idx"][:-1]).any())
    qw = unpack_gptq(tensors, 4, "gptq_v2", 32)
    assert torch.equal(qw.g_idx, tensors["g_idx"])
    _assert_same_tensors(pack_gptq(qw, "gptq_v2"), tensors)


def test_group_size_is_inferred_from_contiguous_g_idx():
    layer, _ = gptq_reference(256, 32, 4, 64, True, seed=1)
    tensors = gptq_tensors(layer, "gptq")
    assert unpack_gptq(tensors, 4, "gptq").group_size == 64
    without_g_idx = {k: v for k, v in tensors.items() if k != "g_idx"}
    qw = unpack_gptq(without_g_idx, 4, "gptq")
    assert qw.group_size == 64 and torch.equal(qw.g_idx, tensors["g_idx"])


def test_out_features_not_multiple_of_32_uses_gptqmodel_pack_original():
    layer, _ = gptq_reference(64, 48, 4, 32, False, seed=2)
    for fmt in ("gptq", "gptq_v2"):
        tensors = gptq_tensors(layer, fmt)
        _assert_same_tensors(pack_gptq(unpack_gptq(tensors, 4, fmt, 32), fmt), tensors)
    three_bit = quantize_weight(torch.randn(48, 64), 3, 32, True)
    with pytest.raises(UnsupportedFormatError):
        pack_gptq(three_bit, "gptq")


# ---- GPTQ v1 zero points -------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_v1_v2_qzeros_conversion_is_gptqmodel_s(bits):
    """Our word arithmetic equals gptqmodel's converters on arbitrary words, in both directions."""
    gm = gptqmodel_modules()
    out_f = 64
    words = torch.randint(-(2**31), 2**31 - 1, (3, out_f * bits // 32), dtype=torch.int32)
    layer = gm.TorchLinear(bits=bits, group_size=32, sym=False, desc_act=False, in_features=96,
                           out_features=out_f, bias=False, register_buffers=True)
    layer.qzeros.data.copy_(words)
    gm.v1_to_v2(layer, bits=bits, pack_dtype=layer.pack_dtype)
    assert torch.equal(v1_qzeros_to_v2(words, bits, out_f), layer.qzeros)
    gm.v2_to_v1(layer, types.SimpleNamespace(bits=bits, pack_dtype=layer.pack_dtype))
    assert torch.equal(v2_qzeros_to_v1(v1_qzeros_to_v2(words, bits, out_f), bits, out_f), layer.qzeros)
    if bits == 3:
        return  # 3-bit words carry a field across words; the field-wise shift need not restore stray words
    assert torch.equal(layer.qzeros, words)


@pytest.mark.parametrize("bits", [3, 4])
def test_v1_asymmetric_zero_point_zero_follows_gptqmodel(bits):
    """z = 0 cannot be stored as z - 1: gptqmodel's export borrows (4-bit) or wraps (3-bit) and its
    loader undoes that. We read and write exactly like gptqmodel, and `v1_zero_points="error"` refuses."""
    weight = torch.randn(32, 64, generator=torch.Generator().manual_seed(0)) * 0.05
    weight[:, :32] = weight[:, :32].abs() + 0.01  # first group all positive -> asymmetric z = 0
    layer, _ = gptq_reference(64, 32, bits, 32, sym=False, weight=weight)
    v2 = gptq_tensors(layer, "gptq_v2")
    true_zeros = unpack_stream(v2["qzeros"], bits, 32)
    assert bool((true_zeros[0] == 0).all())

    v1 = gptq_tensors(layer, "gptq")
    qw = unpack_gptq(v1, bits, "gptq", 32)
    assert torch.equal(qw.zeros, true_zeros)
    loaded = gptq_layer_from_tensors(v1, bits, 32, "gptq")
    assert torch.equal(qw.dequantize(torch.float16), loaded.dequantize_weight().T)
    _assert_same_tensors(pack_gptq(qw, "gptq"), v1)

    # A reader that adds 1 field by field does not see z = 0 there (why "error" exists).
    naive = (unpack_stream(v1["qzeros"], bits, 32) + 1)
    assert not torch.equal(naive, true_zeros)
    with pytest.raises(MergeError):
        pack_gptq(qw, "gptq", v1_zero_points="error")
    _assert_same_tensors(pack_gptq(qw, "gptq_v2"), v2)


# ---- Grid fitting and rounding -------------------------------------------------------------------


@SETTINGS
@given(
    bits=st.sampled_from([2, 3, 4, 8]),
    group_size=st.sampled_from([-1, 32, 128]),
    sym=st.booleans(),
    desc_act=st.booleans(),
    positive_group=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_fit_grid_is_gptqmodels_quantizer(bits, group_size, sym, desc_act, positive_group, seed):
    gen = torch.Generator().manual_seed(seed)
    in_f, out_f = 160, 32  # 160 = 128 + a partial group of 32
    weight = torch.randn(out_f, in_f, generator=gen) * 0.05
    if positive_group:
        weight[:, :32] = weight[:, :32].abs()
    weight[0, :] = 0  # an all-zero row: gptqmodel widens its range to [-1, 1]
    g_idx = reference_g_idx(in_f, group_size, desc_act, gen)
    n_groups = 1 if group_size == -1 else -(-in_f // group_size)
    ref_scale, ref_zero = gptqmodel_grid(weight, bits, sym, g_idx, n_groups)
    scales, zeros = fit_grid(weight, bits, group_size, sym, g_idx)
    assert torch.equal(scales, ref_scale.T.to(torch.float16))
    assert torch.equal(zeros, ref_zero.T.to(torch.int32))


@pytest.mark.parametrize("bits,sym", [(4, True), (4, False), (3, False), (8, True), (2, False)])
def test_quantize_weight_codes_match_gptqmodel_packer_rounding(bits, sym):
    """Our codes = what gptqmodel's packer computes from the float weight with the same grid."""
    gm = gptqmodel_modules()
    weight = torch.randn(64, 256, generator=torch.Generator().manual_seed(bits)) * 0.05
    qw = quantize_weight(weight, bits, 64, sym)
    layer = gm.TorchLinear(bits=bits, group_size=64, sym=sym, desc_act=False, in_features=256,
                           out_features=64, bias=False, register_buffers=True)
    linear = torch.nn.Linear(256, 64, bias=False)
    linear.weight.data = weight.clone()
    layer.pack_original(linear, qw.scales.float().T.contiguous(), qw.zeros.T.contiguous(), qw.g_idx)
    ref = unpack_gptq({n: getattr(layer, n) for n in ("qweight", "qzeros", "scales", "g_idx")}, bits, "gptq_v2")
    assert torch.equal(ref.codes, qw.codes)
    # And packing our requantized layer gives gptqmodel's bytes.
    _assert_same_tensors(
        pack_gptq(qw, "gptq_v2"),
        {n: getattr(layer, n) for n in ("qweight", "qzeros", "scales", "g_idx")},
    )


def test_quantize_weight_clamps_codes_to_the_grid():
    weight = torch.randn(32, 64, generator=torch.Generator().manual_seed(0))
    qw = quantize_weight(weight, 4, 32, True)
    # Round onto a grid fitted to a smaller weight: out-of-range values must clamp, not wrap.
    from oftsurgery.quant.grid import quantize_to_codes

    codes = quantize_to_codes(weight * 3, qw.scales, qw.zeros, qw.g_idx, 4)
    assert int(codes.min()) == 0 and int(codes.max()) == 15


# ---- Bit streams and errors ----------------------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_bit_stream_round_trip(bits):
    codes = torch.randint(0, 2**bits, (5, 96), dtype=torch.int32)
    words = pack_stream(codes, bits)
    assert words.shape == (5, 96 * bits // 32)
    assert torch.equal(unpack_stream(words, bits, 96), codes)


def _reference_words(codes: list[int], bits: int, order=None) -> list[int]:
    """The little-endian bit stream, bit by bit in plain Python, as signed int32 words."""
    if order is not None:  # field k of each word holds code order[k] of its group
        per = 32 // bits
        codes = [codes[g + order[k]] for g in range(0, len(codes), per) for k in range(per)]
    n_words = -(-len(codes) * bits // 32)
    words = [0] * n_words
    for j, code in enumerate(codes):
        for bit in range(bits):
            if code >> bit & 1:
                pos = j * bits + bit
                words[pos // 32] |= 1 << (pos % 32)
    return [w - (1 << 32) if w >= 1 << 31 else w for w in words]


def _byte_path(on: bool):
    """Take the GPU's byte-view bit packer (2/4/8 bits) on the CPU too, or never take it."""
    return mock.patch.object(bitpack, "_through_bytes", lambda bits, device: on and bits in (2, 4, 8))


@SETTINGS
@given(bits=st.sampled_from([2, 3, 4, 8]), count=st.integers(1, 200), rows=st.integers(1, 3),
       awq_order=st.booleans(), seed=st.integers(0, 2**16), byte_path=st.booleans())
def test_vectorised_bit_packer_is_the_plain_bit_stream(bits, count, rows, awq_order, seed, byte_path):
    """pack_codes / unpack_codes along either dimension, partial words and 3-bit straddles included,
    equal a bit-by-bit reference, through int32 fields (CPU) or a byte view of the words (GPU);
    garbage in unused high bits of the last word is ignored."""
    with _byte_path(byte_path):
        _check_bit_packer(bits, count, rows, awq_order, seed)


def _check_bit_packer(bits, count, rows, awq_order, seed):
    order = AWQ_PACK_ORDER if awq_order and bits == 4 else None
    if order is not None:
        count = -(-count // 8) * 8
    codes = torch.randint(0, 2**bits, (rows, count), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    expected = torch.tensor([_reference_words(row, bits, order) for row in codes.tolist()], dtype=torch.int32)
    assert torch.equal(pack_codes(codes, bits, dim=-1, order=order), expected)
    assert torch.equal(pack_codes(codes.T.contiguous(), bits, dim=0, order=order), expected.T)
    assert torch.equal(pack_codes(codes.to(torch.int32), bits, dim=-1, order=order), expected)
    back = unpack_codes(expected, bits, count, dim=-1, order=order)
    assert back.dtype == torch.uint8 and torch.equal(back, codes)
    assert torch.equal(unpack_codes(expected.T.contiguous(), bits, count, dim=0, order=order), codes.T)
    spare = packed_words(count, bits) * 32 - count * bits
    if spare:  # set the unused top bits of the last word: they carry no code
        noisy = expected.clone()
        noisy[:, -1] |= torch.tensor(((1 << spare) - 1) << (32 - spare), dtype=torch.int64).to(torch.int32)
        assert torch.equal(unpack_codes(noisy, bits, count, dim=-1, order=order), codes)


@pytest.mark.parametrize("byte_path", [False, True])
@pytest.mark.parametrize("bits, order", [(2, None), (3, None), (4, None), (8, None), (4, AWQ_PACK_ORDER)])
def test_bit_packer_in_small_chunks_along_a_middle_dimension(monkeypatch, bits, order, byte_path):
    """Many chunks and codes packed along the middle of a 3-D tensor (several rows before and after
    it) still give the plain bit stream of every line, both ways, on either path."""
    monkeypatch.setattr(bitpack, "CPU_CHUNK_ELEMENTS", 40)
    monkeypatch.setattr(bitpack, "_through_bytes", lambda bits, device: byte_path and bits in (2, 4, 8))
    codes = torch.randint(0, 2**bits, (3, 96, 5), generator=torch.Generator().manual_seed(bits), dtype=torch.uint8)
    expected = torch.tensor([[_reference_words(codes[b, :, a].tolist(), bits, order) for a in range(5)] for b in range(3)],
                            dtype=torch.int32).permute(0, 2, 1)  # [3, words, 5]
    assert torch.equal(pack_codes(codes, bits, dim=1, order=order), expected)
    assert torch.equal(unpack_codes(expected, bits, 96, dim=1, order=order), codes)


def test_malformed_layers_are_refused():
    layer, _ = gptq_reference(128, 32, 4, 32, True)
    tensors = gptq_tensors(layer, "gptq")
    with pytest.raises(InvalidCheckpointError):
        unpack_gptq({**tensors, "qweight": tensors["qweight"][:-1]}, 4, "gptq", 32)
    with pytest.raises(InvalidCheckpointError):
        unpack_gptq({k: v for k, v in tensors.items() if k != "qzeros"}, 4, "gptq", 32)
    with pytest.raises(InvalidCheckpointError):
        unpack_gptq(tensors, 4, "gptq", 64)  # 4 groups stored, group_size 64 needs 2
    with pytest.raises(UnsupportedFormatError):
        unpack_gptq({**tensors, "scales": tensors["scales"].to(torch.bfloat16)}, 4, "gptq", 32)
    with pytest.raises(UnsupportedFormatError):
        unpack_gptq(tensors, 5, "gptq", 32)
    with pytest.raises(UnsupportedFormatError):
        unpack_gptq(tensors, 4, "marlin", 32)


# ---- Dispatch through a QuantConfig --------------------------------------------------------------


def test_codec_dispatch_on_quant_config():
    layer, _ = gptq_reference(128, 64, 4, 32, False, bias=True, seed=9)
    stored = {f"model.layers.0.mlp.up_proj.{k}": v for k, v in gptq_tensors(layer, "gptq").items()}
    stored["model.embed_tokens.weight"] = torch.zeros(2, 2)
    stored["model.layers.0.mlp.down_proj.qweight"] = torch.zeros(1, dtype=torch.int32)  # incomplete
    assert find_quantized_layers(stored) == ["model.layers.0.mlp.up_proj"]

    qcfg = parse_quant_config({"quant_method": "gptq", "bits": 4, "group_size": 32, "sym": False,
                               "desc_act": False, "checkpoint_format": "gptq"})
    tensors = layer_tensors(stored, "model.layers.0.mlp.up_proj")
    qw = unpack_layer(tensors, qcfg)
    dense = dequantize_layer(tensors, qcfg)
    assert dense.dtype == torch.float32
    assert torch.equal(dense.to(torch.float16), layer.dequantize_weight().T)
    _assert_same_tensors(pack_layer(qw, qcfg, bias=tensors["bias"]), tensors)


def test_quantized_weight_validates_its_parts():
    codes = torch.zeros(4, 8, dtype=torch.int32)
    scales = torch.ones(1, 4, dtype=torch.float16)
    zeros = torch.zeros(1, 4, dtype=torch.int32)
    qw = QuantizedWeight(codes, scales, zeros, default_g_idx(8, -1), 4, -1)
    assert (qw.in_features, qw.out_features, qw.num_groups, qw.maxq) == (8, 4, 1, 15)
    assert QuantizedWeight(codes.to(torch.uint8), scales, zeros, default_g_idx(8, -1), 4, -1).in_features == 8
    with pytest.raises(ValueError):
        QuantizedWeight(codes.long(), scales, zeros, default_g_idx(8, -1), 4, -1)
    with pytest.raises(ValueError):
        QuantizedWeight(codes, scales.float(), zeros, default_g_idx(8, -1), 4, -1)
    with pytest.raises(ValueError):
        QuantizedWeight(codes, scales, zeros, default_g_idx(8, 4), 4, 4)  # g_idx names group 1 of 1


def test_deepcopy_of_reference_layer_is_independent():
    """Guard for the helper: exporting v1 must not change the reference layer's v2 zero points."""
    layer, _ = gptq_reference(64, 32, 4, 32, False)
    before = layer.qzeros.clone()
    gptq_tensors(layer, "gptq")
    assert torch.equal(layer.qzeros, before)


# ---- Real checkpoints quantized by gptqmodel -----------------------------------------------------


@pytest.fixture(scope="module")
def tiny_gptq_3bit_dir(tiny_fp_dir, tmp_path_factory):
    """tiny_fp_dir quantized 3-bit g32, asymmetric, act-order, v1 format (codes straddle int32 words)."""
    from oftsurgery.testing.models import quantize_gptq

    return quantize_gptq(tiny_fp_dir, tmp_path_factory.mktemp("tiny_gptq_3bit"), bits=3, group_size=32,
                         sym=False, desc_act=True, format="gptq")


@pytest.mark.parametrize(
    "checkpoint", ["tiny_gptq_dir", "tiny_gptq_asym_descact_dir", "tiny_gptq_v2_dir", "tiny_gptq_3bit_dir"]
)
def test_every_layer_of_a_gptqmodel_checkpoint_round_trips(checkpoint, request):
    """Unpack -> pack gives back every stored tensor byte for byte, and our dequantized weights equal
    those of the same checkpoint loaded by gptqmodel (its loader, its v1 conversion, its kernel)."""
    from gptqmodel import GPTQModel
    from gptqmodel.utils.backend import BACKEND

    from oftsurgery.io import CheckpointReader
    from oftsurgery.quant.config import load_quant_config

    path = request.getfixturevalue(checkpoint)
    reader, qcfg = CheckpointReader(path), load_quant_config(path)
    layers = find_quantized_layers(reader.names())
    assert len(layers) == 2 * 7  # 2 decoder layers x (q, k, v, o, gate, up, down)
    unpacked = {}
    for prefix in layers:
        stored = {s: reader.get(f"{prefix}.{s}") for s in ("qweight", "qzeros", "scales", "g_idx", "bias")
                  if f"{prefix}.{s}" in reader}
        unpacked[prefix] = qw = unpack_layer(stored, qcfg)
        _assert_same_tensors(pack_layer(qw, qcfg, bias=stored.get("bias")), stored)

    model = GPTQModel.load(str(path), device="cpu", backend=BACKEND.TORCH, dtype=torch.float16)
    for prefix, qw in unpacked.items():
        module = model.model.get_submodule(prefix).eval()
        assert torch.equal(qw.dequantize(torch.float16), module.dequantize_weight().T), prefix


# ---- Exactness of the codes -> float -> packer route -----------------------------------------------


def _random_layer(bits, group_size, seed, in_f=128, out_f=64, zero_scales=False):
    gen = torch.Generator().manual_seed(seed)
    n_groups = 1 if group_size == -1 else in_f // group_size
    # float16 scales spread over the whole useful range, subnormals included.
    exponents = torch.randint(-24, 6, (n_groups, out_f), generator=gen).float()
    scales = (torch.rand(n_groups, out_f, generator=gen) + 1) * 2.0**exponents
    scales = scales.to(torch.float16)
    if zero_scales:
        scales[0, :5] = 0
    return QuantizedWeight(
        codes=torch.randint(0, 2**bits, (out_f, in_f), generator=gen, dtype=torch.int32),
        scales=scales,
        zeros=torch.randint(0, 2**bits, (n_groups, out_f), generator=gen, dtype=torch.int32),
        g_idx=default_g_idx(in_f, group_size),
        bits=bits,
        group_size=group_size,
    )


@SETTINGS
@given(bits=st.sampled_from([2, 3, 4, 8]), group_size=st.sampled_from([-1, 32]), seed=st.integers(0, 2**16))
def test_any_codes_on_any_float16_grid_pack_like_gptqmodels_packer(bits, group_size, seed):
    """Arbitrary codes, zero points and float16 scales (tiny, subnormal, large): our packer writes
    gptqmodel's packer's bytes (gptq_module: its pack_block), and they unpack to the same codes."""
    qw = _random_layer(bits, group_size, seed)
    reference = gptq_module(qw)
    _assert_same_tensors(pack_gptq(qw, "gptq_v2"),
                         {n: getattr(reference, n) for n in ("qweight", "qzeros", "scales", "g_idx")})
    for fmt in ("gptq", "gptq_v2"):
        back = unpack_gptq(pack_gptq(qw, fmt), bits, fmt, group_size)
        assert torch.equal(back.codes, qw.codes) and torch.equal(back.zeros, qw.zeros)
        assert torch.equal(back.scales, qw.scales)


def test_packing_re_check_refuses_codes_out_of_range():
    qw = _random_layer(4, 32, 1)
    qw.codes[0, 0] = 16  # one code that does not fit 4 bits
    with pytest.raises(ValueError):
        pack_gptq(qw, "gptq_v2")


def test_zero_scales_keep_their_codes():
    """A float16 scale of 0 (an underflowed group) still packs its codes exactly."""
    qw = _random_layer(4, 32, 0, zero_scales=True)
    back = unpack_gptq(pack_gptq(qw, "gptq_v2"), 4, "gptq_v2", 32)
    assert torch.equal(back.codes, qw.codes)


def test_dynamic_per_module_overrides():
    from oftsurgery.quant.codec import layer_quant_config

    qcfg = parse_quant_config({"quant_method": "gptq", "bits": 4, "group_size": 128, "checkpoint_format": "gptq",
                               "dynamic": {r"+:.*\.down_proj": {"bits": 8, "group_size": 32},
                                           r"-:.*\.lm_head": {}}})
    down = layer_quant_config(qcfg, "model.layers.0.mlp.down_proj")
    assert (down.bits, down.group_size) == (8, 32)
    assert layer_quant_config(qcfg, "model.layers.0.mlp.up_proj") == qcfg
    assert layer_quant_config(qcfg, "model.lm_head") is None


@pytest.mark.parametrize("position", [0, 7, 8])  # first field, last field of a word (spills off), next word
def test_packing_re_check_catches_uint8_codes_wider_than_bits(position):
    """uint8 codes skip the range pass: the re-check after packing must catch a code that does not
    fit, wherever its spilled bits go."""
    qw = _random_layer(4, 32, 2)
    codes = qw.codes.T.contiguous().to(torch.uint8)
    codes[position, 3] = 16 + int(codes[position, 3])
    wide = QuantizedWeight(codes.T, qw.scales, qw.zeros, qw.g_idx, 4, 32)
    with pytest.raises(MergeError):
        pack_gptq(wide, "gptq_v2")
