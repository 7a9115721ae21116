"""The vectorised data-free merge of one layer (`merge.solve.rtn`) against a float64 brute-force reference.

The reference builds the dense block-diagonal R in float64, forms W·Rᵀ as a plain matrix product,
rounds every weight to its nearest code on the source grid one element at a time, and measures the
weight-space residuals with float64 sums. Our path works input-major, in float32, chunk by chunk.
"""

from __future__ import annotations

import math

import pytest
import torch

from oftsurgery.merge.plan import LayerPlan
from oftsurgery.merge.solve.rtn import rtn_merge_layer
from oftsurgery.oft.adapter_io import RotationSet
from oftsurgery.oft.rotation import cayley_exact, skew_from_params
from oftsurgery.quant.grid import QuantizedWeight, default_g_idx, quantize_weight


def _blocks(count: int, b: int, strength: float, seed: int) -> torch.Tensor:
    params = torch.randn(count, b * (b - 1) // 2, generator=torch.Generator().manual_seed(seed)) * strength
    return cayley_exact(skew_from_params(params, b)).contiguous()


def _source(out_f, in_f, bits, group_size, sym, desc_act, seed) -> QuantizedWeight:
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_f, in_f, generator=gen) * 0.05
    g_idx = None
    if desc_act:  # act-order: groups of contiguous size, inputs visited in a random order
        g_idx = (torch.randperm(in_f, generator=gen) // group_size).to(torch.int32)
    qw = quantize_weight(weight, bits, group_size, sym, g_idx=g_idx)
    # the merge hands rtn the codes as the unpackers return them: uint8, input-major
    return QuantizedWeight(qw.codes.T.contiguous().to(torch.uint8).T, qw.scales, qw.zeros, qw.g_idx, bits, group_size)


def _reference(qw: QuantizedWeight, dense_r: torch.Tensor, oft_s=None):
    """Codes and residuals by the book, in float64 (R dense, one weight at a time for the rounding)."""
    g = qw.g_idx.long()
    s = qw.scales.double()[g].T
    z = qw.zeros.double()[g].T
    weight = s * (qw.codes.double() - z)
    target = weight @ dense_r.T
    if oft_s is not None:
        target = target * oft_s.double()
    exact = target / s  # the value rounding looks at, in float64
    codes = torch.clamp(torch.round(exact) + z, 0, qw.maxq)
    merged = s * (codes - z)
    ref = float((target**2).sum())
    before = math.sqrt(float(((weight - target) ** 2).sum()) / ref)
    after = math.sqrt(float(((merged - target) ** 2).sum()) / ref)
    return codes, exact, before, after


def _plan(qw: QuantizedWeight, blocks: torch.Tensor, **rotation_set) -> LayerPlan:
    rotations = RotationSet({"layer": blocks}, {"parameterization": "cayley"}, **rotation_set)
    return LayerPlan("layer", qw.in_features, qw.out_features, rotations)


CASES = [  # out, in, bits, group_size, sym, desc_act, block size, shared block
    (96, 256, 4, 128, True, False, 32, False),
    (64, 576, 4, 128, False, False, 32, False),  # SmolLM2's 576: a partial last group of 64
    (48, 256, 3, 32, False, True, 16, False),  # act-order groups: the grid is gathered row by row
    (32, 192, 8, -1, True, False, 64, False),  # one group over all inputs
    (64, 256, 2, 64, False, False, 32, True),  # PEFT block_share: one block for every chunk
]


@pytest.mark.parametrize("out_f,in_f,bits,group_size,sym,desc_act,b,shared", CASES)
def test_rtn_layer_matches_the_float64_reference(out_f, in_f, bits, group_size, sym, desc_act, b, shared):
    qw = _source(out_f, in_f, bits, group_size, sym, desc_act, seed=in_f + bits)
    blocks = _blocks(1 if shared else in_f // b, b, 0.05, seed=bits)
    dense = torch.block_diag(*blocks.double().expand(in_f // b, b, b).unbind(0))
    ref_codes, exact, before, after = _reference(qw, dense)

    merged, report = rtn_merge_layer(_plan(qw, blocks), qw)

    codes = merged.codes.double()
    # float32 vs float64 can only disagree on a weight sitting (numerically) on a rounding boundary
    on_a_tie = (exact - exact.floor() - 0.5).abs() < 1e-4
    assert torch.equal(codes[~on_a_tie], ref_codes[~on_a_tie])
    assert int((codes != ref_codes).sum()) <= int(on_a_tie.sum())
    assert report.mode == "rtn" and report.scales_changed == 0.0
    assert report.codes_changed == pytest.approx(float((codes != qw.codes.double()).double().mean()))
    assert 0 < report.codes_changed < 1
    assert report.residual_before == pytest.approx(before, rel=1e-4)
    assert report.residual_after == pytest.approx(after, rel=1e-4)
    assert report.residual_after < report.residual_before
    assert merged.codes.dtype == torch.uint8
    assert torch.equal(merged.scales, qw.scales) and torch.equal(merged.zeros, qw.zeros)


def test_identity_rotation_returns_the_source_codes_exactly():
    qw = _source(64, 576, 4, 128, True, False, seed=0)
    merged, report = rtn_merge_layer(_plan(qw, torch.eye(32).expand(18, 32, 32).contiguous()), qw)
    assert torch.equal(merged.codes, qw.codes)
    assert report.codes_changed == 0.0 and report.residual_before == 0.0 and report.residual_after == 0.0


def test_chunking_does_not_change_the_result(monkeypatch):
    """Tiny chunks (many of them, a partial last one) give the same codes and figures as one chunk."""
    import oftsurgery.merge.solve.rtn as rtn

    qw = _source(64, 512, 4, 64, False, False, seed=3)
    plan = _plan(qw, _blocks(16, 32, 0.05, seed=3))
    whole, whole_report = rtn_merge_layer(plan, qw)
    monkeypatch.setattr(rtn, "CPU_CHUNK_ELEMENTS", 64 * 192)  # 192 rows: 3 groups, 6 blocks; 512 = 2·192 + 128
    chunked, chunked_report = rtn_merge_layer(plan, qw)
    assert torch.equal(whole.codes, chunked.codes)
    assert chunked_report.residual_after == pytest.approx(whole_report.residual_after, rel=1e-6)
    assert chunked_report.codes_changed == whole_report.codes_changed


def test_oft_scales_and_output_side_rotations_follow_merged_weight():
    """PEFT 0.14-0.15's oft_s and PEFT <= 0.13's output-side rotation: the rounding target is exactly
    RotationSet.merged_weight (the rules live in one place)."""
    from oftsurgery.quant.grid import quantize_to_codes

    qw = _source(64, 128, 4, 32, True, False, seed=5)
    oft_s = 1 + 0.1 * torch.randn(64, 1, generator=torch.Generator().manual_seed(5))
    for plan in (_plan(qw, _blocks(4, 32, 0.05, seed=1), scales={"layer": oft_s}),
                 _plan(qw, _blocks(2, 32, 0.05, seed=2), output_side={"layer"})):
        target = plan.rotations.merged_weight("layer", qw.dequantize().contiguous())
        expected = quantize_to_codes(target, qw.scales, qw.zeros, qw.g_idx, qw.bits)
        merged, report = rtn_merge_layer(plan, qw)
        assert (merged.codes.int() != expected).float().mean() < 1e-3  # float32 ties only
        assert report.residual_after < report.residual_before
