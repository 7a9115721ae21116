"""The TF32 emulation bench/tf32_fidelity.py measures with: the rounding against a float64 reference,
and the dispatch mode rounding exactly the products of the phases it names."""

from __future__ import annotations

import math

import torch

from merge_helpers import all_tensors, assert_bytes_equal, random_rotations
from oftsurgery.merge import MergeOptions, merge_checkpoint
from oftsurgery.merge.report import PHASES
from oftsurgery.testing.tf32 import EmulatedTF32, round_to_tf32


def _tf32_reference(x: float) -> float:
    """The nearest value with a 10-bit mantissa (ties away from zero), in float64 arithmetic."""
    if x == 0 or not math.isfinite(x):
        return x
    mantissa, exponent = math.frexp(abs(x))  # abs(x) = mantissa * 2**exponent, mantissa in [0.5, 1)
    steps = math.floor(mantissa * 2**11 + 0.5)  # 1 implicit + 10 stored bits
    return math.copysign(math.ldexp(steps, exponent - 11), x)


def test_rounding_matches_a_float64_reference():
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(2000, generator=g) * 10.0 ** torch.randint(-20, 20, (2000,), generator=g),
                   torch.tensor([0.0, -0.0, 1.0, 1 + 2**-11, 1 + 3 * 2**-12, float("inf"), float("-inf")])])
    got = round_to_tf32(x)
    want = torch.tensor([_tf32_reference(v) for v in x.tolist()], dtype=torch.float32)
    assert torch.equal(got, want)
    assert torch.isnan(round_to_tf32(torch.tensor([float("nan")]))).all()


def test_products_are_rounded_only_inside_the_named_phases():
    g = torch.Generator().manual_seed(1)
    a, b, c = (torch.randn(32, 48, generator=g), torch.randn(48, 16, generator=g), torch.randn(32, 16, generator=g))
    mode = EmulatedTF32(("solve/refit",))
    with mode:
        outside = a @ b
        with PHASES.phase("solve/gptq"):
            other = torch.addmm(c, a, b)
        with PHASES.phase("solve/refit_scales"):
            inside = torch.addmm(c, a, b)
    assert torch.equal(outside, a @ b) and torch.equal(other, torch.addmm(c, a, b))
    assert torch.equal(inside, torch.addmm(c, round_to_tf32(a), round_to_tf32(b)))
    assert not torch.equal(inside, torch.addmm(c, a, b))
    assert dict(mode.counts) == {"solve/refit_scales": 1}


def test_a_merge_under_the_mode_rounds_its_solver_products(tiny_gptq_dir, tmp_path):
    rot = random_rotations(tiny_gptq_dir, tmp_path / "r.safetensors", strength=0.05)
    options = MergeOptions(method="calibrated", calib_tokens=512, seq_len=64, progress=False)
    plain = merge_checkpoint(tiny_gptq_dir, rot, tmp_path / "plain", options)
    off = EmulatedTF32(())
    with off:  # no phase named: the same bytes as without the mode
        merge_checkpoint(tiny_gptq_dir, rot, tmp_path / "off", options)
    expected = all_tensors(tmp_path / "plain")
    for name, tensor in all_tensors(tmp_path / "off").items():
        assert_bytes_equal(expected[name], tensor, name)
    on = EmulatedTF32(("solve/",))
    with on:
        merge_checkpoint(tiny_gptq_dir, rot, tmp_path / "on", options)
    assert not off.counts and on.counts["solve/gptq"] > 0 and on.counts["solve/refine_codes"] > 0
    assert all(phase.startswith("solve/") for phase in on.counts)
    assert plain.layers  # the merge solved layers (its products are what the mode saw)
