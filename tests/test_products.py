"""The solver's float32 products on TF32 tensor cores (oftsurgery/merge/solve/products.py), checked on the
CPU with the GPU's input rounding emulated (oftsurgery.testing.tf32) against float64 references: the
split products are as accurate as float32's, plain TF32 is not, and values from float16/bfloat16 are
TF32's own."""

from __future__ import annotations

import pytest
import torch

from oftsurgery.merge.report import PHASES
from oftsurgery.merge.solve import products
from oftsurgery.merge.solve.requant import requantize_calibrated
from oftsurgery.quant.grid import quantize_weight
from oftsurgery.testing.tf32 import EmulatedTF32, round_to_tf32


@pytest.fixture
def split_mode(monkeypatch):
    monkeypatch.setenv("OFTSURGERY_SOLVER_PRODUCTS", "split")


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want).norm() / want.norm())


def _operands(n: int, k: int, m: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    # spread over several binades, as Hessians and weights are
    a = torch.randn(n, k, generator=g) * torch.exp2(torch.randint(-6, 6, (n, 1), generator=g).float())
    b = torch.randn(k, m, generator=g)
    return a, b


def test_split_is_exact_and_its_high_part_is_a_tf32_value():
    a, _ = _operands(64, 300, 1)
    hi, lo = products.split(a)
    assert torch.equal(hi + lo, a)
    assert torch.equal(round_to_tf32(hi), hi)
    assert bool((lo.abs() <= a.abs() * 2.0**-10).all())
    strided = a[:, 10:138]  # a view, as the solver's H[rows, block] is
    hi_s, lo_s = products.split(strided)
    assert torch.equal(hi_s + lo_s, strided)


def test_mode_is_plain_on_the_cpu_unless_asked(monkeypatch):
    x = torch.zeros(2, 2)
    assert products.mode(x) == "plain"
    monkeypatch.setenv("OFTSURGERY_SOLVER_PRODUCTS", "split")
    assert products.mode(x) == "tf32" and products.mode(x.double()) == "plain"
    monkeypatch.setenv("OFTSURGERY_SOLVER_PRODUCTS", "tf32")
    with pytest.raises(ValueError, match="auto, float32 or split"):
        products.mode(x)


@pytest.mark.parametrize("k", [128, 3000])  # the stacked product (block updates) and three products
def test_split_products_under_tf32_rounding_are_as_accurate_as_float32(split_mode, k):
    a, b = _operands(96, k, 80)
    c = torch.randn(96, 80, generator=torch.Generator().manual_seed(5))
    want = c.double() - 0.5 * (a.double() @ b.double())
    plain = _relative(c.clone().addmm_(a, b, alpha=-0.5), want)  # float32 on the CPU
    emulated = EmulatedTF32(("solve/",))
    with emulated, PHASES.phase("solve/test"):
        split = _relative(products.addmm_(c.clone(), a, b, alpha=-0.5), want)
        tf32 = _relative(c.clone().addmm_(a, b, alpha=-0.5), want)  # what TF32 alone gives
        mm = _relative(products.mm(a, b), a.double() @ b.double())
    assert emulated.counts["solve/test"] >= 3  # the rounding really applied to the products
    assert split <= 4 * plain + 1e-7 and mm <= 1e-6
    assert tf32 > 50 * split  # the loss the split avoids


def test_mm_splits_rows_in_chunks(split_mode, monkeypatch):
    monkeypatch.setattr(products, "CHUNK_ELEMENTS", 3 * 1200)  # three rows of `a` per chunk
    a, b = _operands(10, 1200, 7, seed=3)
    got = products.mm(a, b)
    assert _relative(got, a.double() @ b.double()) < 1e-6


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_values_from_half_precision_are_exact_in_tf32(split_mode, dtype):
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(256, 64, generator=g) * 30).to(dtype)
    x = torch.cat([x, torch.tensor([[6e-8] * 64], dtype=torch.float32).to(dtype)])  # float16's subnormals
    wide = x.float()
    assert torch.equal(round_to_tf32(wide), wide)
    fit = torch.zeros(64, 64)
    with EmulatedTF32(("statistics",)), PHASES.phase("statistics"):
        products.addmm_(fit, wide.T, wide, exact=True)
    assert torch.equal(fit, torch.zeros(64, 64).addmm_(wide.T, wide))


@pytest.mark.parametrize("tokens", [2048, 384])  # H given; X kept (the stage errors by split products)
def test_the_solver_under_split_tf32_matches_its_float32_solve(monkeypatch, tokens):
    # a layer GPTQ's pass and the polish work on: its codes under emulated split TF32 are the float32
    # solve's but for near-ties, and its output error the same to float32's accuracy
    from oftsurgery.merge.solve.hessian import InputHessian

    g = torch.Generator().manual_seed(4)
    out_f, in_f = 96, 512
    weight = torch.randn(out_f, in_f, generator=g) * 0.02
    qw = quantize_weight(weight, bits=4, group_size=128, sym=True)
    x = torch.randn(tokens, in_f, generator=g) * torch.exp(torch.randn(in_f, generator=g))
    if tokens > in_f:
        hessian = x.T @ x
    else:
        hessian = InputHessian(in_f, "cpu")
        hessian.add(x)
        assert hessian.rows is not None
    target = weight + 0.002 * torch.randn(out_f, in_f, generator=g)
    plain = requantize_calibrated(qw, target, hessian)
    monkeypatch.setenv("OFTSURGERY_SOLVER_PRODUCTS", "split")
    with EmulatedTF32(("solve/",)):
        split = requantize_calibrated(qw, target, hessian)
    monkeypatch.setenv("OFTSURGERY_SOLVER_PRODUCTS", "float32")
    with EmulatedTF32(("solve/",)):
        tf32 = requantize_calibrated(qw, target, hessian)
    changed = float((split.weight.codes != plain.weight.codes).float().mean())
    changed_tf32 = float((tf32.weight.codes != plain.weight.codes).float().mean())
    assert changed <= 0.002 and changed < changed_tf32
    assert abs(split.error - plain.error) <= 1e-4 * plain.error
    assert split.stages == plain.stages


def test_a_merge_with_the_gpus_products_matches_the_plain_one(tiny_gptq_dir, tmp_path, monkeypatch):
    # the whole calibrated merge through the split and exact products (statistics of a float16 forward
    # included), with the GPU's input rounding emulated: the same residuals as the plain merge's
    from merge_helpers import random_rotations
    from oftsurgery.merge import MergeOptions, merge_checkpoint

    rot = random_rotations(tiny_gptq_dir, tmp_path / "r.safetensors", strength=0.05)
    options = MergeOptions(method="calibrated", calib_tokens=512, seq_len=64, progress=False, forward_dtype="float16")
    plain = merge_checkpoint(tiny_gptq_dir, rot, tmp_path / "plain", options)
    monkeypatch.setenv("OFTSURGERY_SOLVER_PRODUCTS", "split")
    emulated = EmulatedTF32(("solve/", "statistics"))
    with emulated:
        split = merge_checkpoint(tiny_gptq_dir, rot, tmp_path / "split", options)
    assert emulated.counts["statistics"] > 0 and emulated.counts["solve/refine_codes"] > 0
    assert len(split.layers) == len(plain.layers)
    for a, b in zip(plain.layers, split.layers):
        assert a.name == b.name
        assert abs(a.residual_after - b.residual_after) <= 0.02 * a.residual_after + 1e-6, a.name


@pytest.mark.parametrize("tokens", [384, 4096])  # X kept (fewer rows than inputs), then H
def test_the_stage_errors_by_split_products_are_float64s_to_far_inside_the_acceptance_margin(split_mode, tokens):
    """`InputHessian.error_split` (the solver's stage errors on a GPU) against the float64 `error`, with
    TF32's input rounding emulated: the solver accepts a stage that lowers the error by more than a
    relative ACCEPT = 1e-6, and the split form of ‖X·E‖² is within a tenth of that (3.5e-8 here)."""
    from oftsurgery.merge.solve.hessian import InputHessian
    from oftsurgery.merge.solve.requant import ACCEPT

    g = torch.Generator().manual_seed(6)
    in_f, out_f = 512, 256
    scale = torch.exp(2 * torch.randn(in_f, generator=g))  # uneven input channels, as real activations
    x = (torch.randn(tokens, in_f, generator=g) * scale).half()
    stats = InputHessian(in_f, "cpu")
    stats.add(x)
    assert (stats.rows is not None) == (tokens <= in_f)
    err = 1e-3 * torch.randn(in_f, out_f, generator=g)  # a requantization's E: small, every sign
    want = stats.error(err)
    with PHASES.phase("solve/errors"), EmulatedTF32(("solve/",)) as mode:
        got = stats.error_split(err)
    assert got.dtype == torch.float64
    if tokens > in_f:  # from H: tr(E H Eᵀ) cancels, so it stays float64
        assert mode.counts["solve/errors"] == 0 and torch.equal(got, want)
        return
    assert mode.counts["solve/errors"] == 3  # the three split products, every input rounded
    assert abs(float(got) / float(want) - 1) < ACCEPT / 10
