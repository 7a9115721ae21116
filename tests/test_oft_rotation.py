"""The OFT math against PEFT's own implementation and the published formulas of older releases."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from oftsurgery.oft import rotation as rot

import peft.tuners.oft.layer as peft_layer  # a required test dependency: a missing one must fail, not skip
from peft import OFTConfig


def peft_rotation_module(r, b, in_features, *, coft=False, eps=6e-5, block_share=False, neumann=True, terms=5):
    return peft_layer.OFTRotationModule(
        1 if block_share else r, b * (b - 1) // 2, b, in_features, coft=coft, eps=eps, block_share=block_share,
        use_cayley_neumann=neumann, num_cayley_neumann_terms=terms,
    )


@settings(max_examples=25, deadline=None)
@given(
    b=st.sampled_from([2, 3, 4, 8, 16]),
    r=st.integers(1, 4),
    neumann=st.booleans(),
    terms=st.integers(1, 7),
    coft=st.booleans(),
    block_share=st.booleans(),
    scale=st.sampled_from([0.01, 0.1, 0.5]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float64]),
    seed=st.integers(0, 2**16),
)
def test_blocks_and_input_rotation_match_peft(b, r, neumann, terms, coft, block_share, scale, dtype, seed):
    torch.manual_seed(seed)
    in_features = r * b
    peft_mod = peft_rotation_module(r, b, in_features, coft=coft, eps=0.05, block_share=block_share,
                                    neumann=neumann, terms=terms).to(dtype)
    with torch.no_grad():
        peft_mod.weight.normal_(0, scale)
    params = peft_mod.weight.detach().clone()
    x = torch.randn(3, in_features, dtype=dtype)

    expected_x = peft_mod(x)  # projects its own weight in place when coft
    if coft:
        expected_params = peft_mod.weight.detach()
        assert torch.equal(rot.coft_project(params, b, 0.05), expected_params)
    with torch.no_grad():
        expected_blocks = peft_mod._cayley_batch(peft_mod.weight, b, neumann, terms)

    blocks = rot.rotation_blocks(params, b, use_cayley_neumann=neumann, num_terms=terms, coft=coft, eps=0.05,
                                 block_share=block_share)
    assert blocks.dtype == dtype
    torch.testing.assert_close(blocks, expected_blocks, rtol=0, atol=0)
    # same blocks (checked exactly above); applying them may sum in another order than PEFT's, which in
    # float32 moves the result by a few ulps (seen: 1.9e-6 on values of order 1)
    tol = {torch.float64: 1e-12, torch.float32: 1e-5}.get(dtype, 1e-6)
    torch.testing.assert_close(rot.apply_rotation_to_input(x, blocks), expected_x, rtol=tol, atol=tol)

    dense = peft_mod.get_weight() if not coft else None
    if dense is not None:
        torch.testing.assert_close(rot.block_diagonal(blocks, in_features), dense, rtol=0, atol=0)


def test_skew_layout_is_triu_order():
    params = torch.arange(1, 7, dtype=torch.float32)[None]  # b = 4
    q = rot.skew_from_params(params, 4)[0]
    rows, cols = torch.triu_indices(4, 4, 1)
    assert torch.equal(q[rows, cols], params[0])
    assert torch.equal(q, -q.T)
    assert torch.equal(rot.params_from_skew(q[None]), params)


@pytest.mark.parametrize("n,b", [(0, 1), (1, 2), (3, 3), (496, 32), (2016, 64)])
def test_block_size_from_params(n, b):
    assert rot.block_size_from_params(n) == b


@pytest.mark.parametrize("n", [2, 4, 5, 497])
def test_block_size_from_params_rejects_non_triangular(n):
    with pytest.raises(ValueError):
        rot.block_size_from_params(n)


@pytest.mark.parametrize("in_features", [64, 96, 576, 100, 7])
@pytest.mark.parametrize("r,block", [(0, 32), (0, 24), (0, 128), (8, 0), (7, 0), (200, 0)])
def test_block_layout_matches_peft(in_features, r, block):
    cfg = OFTConfig(r=r, oft_block_size=block, target_modules=["x"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layer = peft_layer.Linear(torch.nn.Linear(in_features, 4), "default", config=cfg, r=r)
    r_eff, b, adjusted = rot.resolve_block_layout(in_features, r, block)
    assert (r_eff, b) == (layer.r["default"], layer.oft_block_size["default"])
    assert adjusted == ((block or r) != (b if block else r_eff))


def test_block_layout_needs_exactly_one():
    with pytest.raises(ValueError):
        rot.resolve_block_layout(64, 0, 0)
    with pytest.raises(ValueError):
        rot.resolve_block_layout(64, 4, 16)


@pytest.mark.parametrize("terms", [1, 2, 3, 4, 5, 8])
def test_neumann_series_by_version(terms):
    """0.16-0.17: I + 2(Q + … + Q^(k-1)); ≥0.18: PEFT's current loop. Built here from the formulas."""
    torch.manual_seed(terms)
    q = rot.skew_from_params(torch.randn(2, 6, dtype=torch.float64) * 0.1, 4)
    eye = torch.eye(4, dtype=torch.float64)
    powers = [torch.linalg.matrix_power(q, i) for i in range(terms + 1)]
    legacy = eye + 2 * sum((powers[i] for i in range(1, terms)), torch.zeros_like(q))
    if terms <= 2:
        current = legacy
    elif terms == 3:
        current = eye + 2 * powers[1] + 2 * powers[2] + powers[3]
    else:
        current = eye + 2 * sum((powers[i] for i in range(1, terms - 1)), torch.zeros_like(q)) + powers[terms - 1]
    params = rot.params_from_skew(q)
    for version, expected in (("0.17.1", legacy), ("0.16.0", legacy), (None, current), ("0.18.0", current),
                              ("0.21.2@abcdef", current)):
        got = rot.rotation_blocks(params, 4, use_cayley_neumann=True, num_terms=terms, peft_version=version)
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_neumann_approximates_transpose_of_exact():
    q = rot.skew_from_params(torch.randn(3, 28, dtype=torch.float64) * 0.01, 8)
    exact = rot.cayley_exact(q)
    torch.testing.assert_close(rot.cayley_neumann(q, 12), exact.transpose(-2, -1), rtol=1e-10, atol=1e-10)
    eye = torch.eye(8, dtype=torch.float64)
    torch.testing.assert_close(exact, (eye - q) @ torch.linalg.inv(eye + q))


def test_legacy_cayley_is_published_formula():
    """PEFT ≤ 0.15: S = (A − Aᵀ)/2, R = (I − S)(I + S)⁻¹ from a full (r, b, b) oft_r."""
    raw = torch.randn(3, 5, 5, dtype=torch.float64) * 0.2
    s = 0.5 * (raw - raw.transpose(1, 2))
    eye = torch.eye(5, dtype=torch.float64)
    expected = torch.bmm(eye - s, torch.inverse(eye + s))
    torch.testing.assert_close(rot.legacy_cayley(raw), expected)


def test_cayley_inverse_round_trip():
    q = rot.skew_from_params(torch.randn(4, 120, dtype=torch.float64) * 0.3, 16)
    torch.testing.assert_close(rot.cayley_inverse(rot.cayley_exact(q)), q, rtol=1e-10, atol=1e-10)


@settings(max_examples=20, deadline=None)
@given(b=st.sampled_from([1, 2, 4, 8]), r=st.integers(1, 5), shared=st.booleans(), seed=st.integers(0, 999))
def test_rotate_weight_equals_rotated_input(b, r, shared, seed):
    torch.manual_seed(seed)
    in_features = r * b
    blocks = rot.cayley_exact(rot.skew_from_params(torch.randn(1 if shared else r, b * (b - 1) // 2,
                                                               dtype=torch.float64), b))
    weight = torch.randn(5, in_features, dtype=torch.float64)
    x = torch.randn(7, in_features, dtype=torch.float64)
    dense = rot.block_diagonal(blocks, in_features)
    torch.testing.assert_close(rot.rotate_weight(weight, blocks), weight @ dense.T)
    torch.testing.assert_close(x @ rot.rotate_weight(weight, blocks).T, rot.apply_rotation_to_input(x, blocks) @ weight.T)


def test_coft_projection_radius():
    params = torch.randn(4, 28) * 10
    projected = rot.coft_project(params, 8, eps=0.2)
    norms = torch.linalg.matrix_norm(rot.skew_from_params(projected, 8))
    torch.testing.assert_close(norms, torch.full((4,), 0.2 / math.sqrt(4)))
    small = params * 1e-6
    assert torch.equal(rot.coft_project(small, 8, eps=0.2), small)


def test_multiplicative_dropout_replaces_blocks_by_identity():
    blocks = rot.cayley_exact(rot.skew_from_params(torch.randn(10, 6), 4))
    dropped = rot.multiplicative_dropout(blocks, 0.3, generator=torch.Generator().manual_seed(0))
    is_eye = [(d == torch.eye(4)).all().item() for d in dropped]
    assert sum(is_eye) == 3
    kept = [i for i, e in enumerate(is_eye) if not e]
    assert torch.equal(dropped[kept], blocks[kept])
    assert torch.equal(rot.multiplicative_dropout(blocks[:1], 0.9), blocks[:1])  # shared block untouched


def test_strength_and_orthogonality():
    blocks = rot.cayley_exact(rot.skew_from_params(torch.randn(3, 6, dtype=torch.float64), 4))
    assert rot.orthogonality_error(blocks) < 1e-12
    dense = rot.block_diagonal(blocks)
    assert rot.rotation_strength(blocks) == pytest.approx(float(torch.linalg.norm(dense - torch.eye(12))), rel=1e-12)
    assert rot.rotation_strength(torch.eye(4).expand(2, 4, 4)) == 0.0
