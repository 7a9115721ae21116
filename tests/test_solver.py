"""The calibrated solver, stage by stage, against brute-force float64 references written here.

Each reference is the plainest form of the math: the GPTQ pass as the optimal-brain-surgeon update
of the full inverse Hessian one column at a time, the code polish as unblocked coordinate descent,
the scale refit as a dense least-squares problem per output row. The solver computes in the
Hessian's dtype, so float64 Hessians make the comparisons exact (the same codes).
"""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest
import torch
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from merge_helpers import all_tensors, assert_bytes_equal, assert_identity_merge, identity_rotations, random_rotations
from oftsurgery.cli import cli
from oftsurgery.errors import MergeError
from oftsurgery.merge import MergeOptions, merge_checkpoint
from oftsurgery.merge.solve import factor, requant
from oftsurgery.merge.solve.hessian import CalibrationInputs, InputHessian, holdout_rows
from oftsurgery.quant.grid import QuantizedWeight, default_g_idx, quantize_weight

FAST = dict(calib_tokens=512, seq_len=64, progress=False)
F64 = torch.float64


# ------------------------------------------------------------------------------------------------
# small random problems
# ------------------------------------------------------------------------------------------------

def _problem(seed, out_f=6, in_f=40, group_size=16, bits=4, sym=True, permuted=False, tokens=None, move=0.3):
    """A layer on a gptqmodel-style grid, a target near it (a fraction of a grid step away), and H."""
    g = torch.Generator().manual_seed(seed)
    g_idx = default_g_idx(in_f, group_size)
    if permuted:  # act-order checkpoints: groups scattered over the inputs
        g_idx = g_idx[torch.randperm(in_f, generator=g)].contiguous()
    weight = torch.randn(out_f, in_f, generator=g)
    qw = quantize_weight(weight, bits, group_size, sym, g_idx)
    step = qw.scales.float()[qw.g_idx.long()].T
    target = qw.dequantize() + move * step * torch.randn(out_f, in_f, generator=g)
    tokens = tokens or 3 * in_f
    # correlated inputs with uneven channel scales, like real activations
    x = torch.randn(tokens, in_f, generator=g, dtype=F64) @ (torch.eye(in_f, dtype=F64) + 0.3 * torch.randn(in_f, in_f, generator=g, dtype=F64))
    x = x * torch.exp(torch.randn(in_f, generator=g, dtype=F64))
    return qw, target, x.T @ x


def _damped(H, damp=requant.DAMP):
    return H + torch.eye(H.shape[0], dtype=H.dtype) * damp * torch.diagonal(H).mean()


def _columns(qw):
    g = qw.g_idx.long()
    return qw.scales.to(F64)[g].T, qw.zeros.to(F64)[g].T  # [out, in]


def _objective(codes, scales, zeros, target, H):
    err = scales * (codes.to(F64) - zeros) - target.to(F64)
    return float(torch.einsum("oi,ij,oj->", err, H, err))


# ------------------------------------------------------------------------------------------------
# 1. the GPTQ pass
# ------------------------------------------------------------------------------------------------

def _gptq_reference(qw, target, H, act_order):
    """Column by column: quantize, then the optimal-brain-surgeon update of every later column with
    the full inverse of the Hessian of the columns not yet quantized (no Cholesky, no blocks)."""
    s, z = _columns(qw)
    H = H.to(F64).clone()
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    H = _damped(H)
    order = torch.argsort(torch.diagonal(H), descending=True, stable=True) if act_order else torch.arange(H.shape[0])
    w = target.to(F64).clone()
    codes = torch.zeros_like(w)
    Hinv = torch.linalg.inv(H)
    left = list(order.tolist())
    for j in order.tolist():
        q = torch.clamp(torch.round(w[:, j] / s[:, j]) + z[:, j], 0, qw.maxq)
        codes[:, j] = q
        left.remove(j)
        err = (w[:, j] - s[:, j] * (q - z[:, j])) / Hinv[j, j]
        w[:, left] -= err[:, None] * Hinv[j, left][None, :]
        Hinv = Hinv - torch.outer(Hinv[:, j], Hinv[j, :]) / Hinv[j, j]  # remove column j
    return codes.to(torch.int32)


@pytest.mark.parametrize("act_order", [True, False])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("permuted", [False, True])
def test_gptq_pass_equals_a_column_by_column_reference(act_order, sym, permuted):
    for seed in range(3):
        qw, target, H = _problem(seed, sym=sym, permuted=permuted)
        expected = _gptq_reference(qw, target, H, act_order)
        for block in (16, 128):  # several blocks with a partial last one, and a single block
            got = requant.requantize_compensated(qw, target, H, act_order=act_order, block_size=block)
            assert torch.equal(got.codes, expected), (seed, block)
            assert torch.equal(got.scales, qw.scales) and torch.equal(got.zeros, qw.zeros)
        assert not torch.equal(expected, requant.requantize_rtn(qw, target).codes)  # the test can tell


def test_gptq_pass_in_float32_finds_an_equally_good_solution():
    """Production accumulates H in float32 and runs the pass in float32, like GPTQ implementations."""
    qw, target, H = _problem(5, out_f=32, in_f=96, group_size=32)
    s, z = _columns(qw)
    exact = _objective(_gptq_reference(qw, target, H, True), s, z, target, H)
    got = requant.requantize_compensated(qw, target, H.float())
    assert abs(_objective(got.codes, s, z, target, H) / exact - 1) < 0.02
    assert (got.codes == _gptq_reference(qw, target, H, True)).float().mean() > 0.95


def test_cholesky_failure_is_not_silent():
    qw, target, H = _problem(0)
    bad = H.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(requant.SolverError, match="not positive definite"):
        requant.requantize_compensated(qw, target, bad)
    result = requant.requantize_calibrated(qw, target, bad)
    assert result.stages[0] == "rtn" and result.fallbacks[0].startswith("cholesky:")
    assert "round-to-nearest" in result.fallbacks[0]
    # indefinite at the default damping, definite with more: the GPTQ pass runs, and says so
    v = torch.randn(H.shape[0], generator=torch.Generator().manual_seed(1), dtype=F64)
    v /= v.norm()
    shift = float(torch.linalg.eigvalsh(H)[0]) + 0.05 * float(torch.diagonal(H).mean())
    indefinite = H - shift * torch.eye(H.shape[0], dtype=F64)
    result = requant.requantize_calibrated(qw, target, indefinite)
    assert result.stages[0] == "gptq"
    assert result.fallbacks == ["cholesky: the Hessian is not positive definite at damp 0.01, so the GPTQ pass used damp 0.1"]


@pytest.mark.parametrize("n", [5, 13, 37])
def test_lower_inverse_by_blocks_is_the_inverse(monkeypatch, n):
    # blocks of at most 4 and corner products of 7 elements: every level of the recursion and chunking
    monkeypatch.setattr(factor, "TRIANGLE_BASE", 4)
    monkeypatch.setattr(factor, "TRIANGLE_CHUNK", 7)
    g = torch.Generator().manual_seed(n)
    L = torch.tril(torch.randn(n, n, generator=g, dtype=F64)) + 4 * torch.eye(n, dtype=F64)
    got = factor.lower_inverse(L)
    torch.testing.assert_close(got, torch.linalg.inv(L), rtol=1e-12, atol=1e-12)
    assert torch.equal(got, torch.tril(got))


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_factor_is_the_upper_cholesky_factor_of_the_inverse(monkeypatch, act_order):
    monkeypatch.setattr(factor, "TRIANGLE_BASE", 16)  # the block path, as at real widths
    qw, target, H = _problem(3, in_f=72, group_size=24)
    perm, U = requant._gptq_factor(InputHessian.from_matrix(H), requant.DAMP, act_order, F64)
    Hd = _damped(H)
    if act_order:
        assert torch.equal(perm, torch.argsort(torch.diagonal(Hd), descending=True, stable=True))
    Hp = Hd[perm][:, perm]
    want = torch.linalg.cholesky(torch.linalg.inv(Hp), upper=True)  # the definition GPTQ uses
    torch.testing.assert_close(U, want, rtol=1e-9, atol=1e-12)


# ------------------------------------------------------------------------------------------------
# 2. the code polish
# ------------------------------------------------------------------------------------------------

def _refine_reference(qw, target, H, sweeps):
    """Unblocked coordinate descent: each column's exact 1-D minimiser, full gradient after each column."""
    s, z = _columns(qw)
    Hd = _damped(H.to(F64))
    codes = qw.codes.to(F64).clone()
    grad = (s * (codes - z) - target.to(F64)) @ Hd
    for _ in range(sweeps):
        changed = 0
        for i in range(codes.shape[1]):
            new = torch.clamp(codes[:, i] + torch.round(-grad[:, i] / (s[:, i] * Hd[i, i])), 0, qw.maxq)
            delta = s[:, i] * (new - codes[:, i])
            changed += int((delta != 0).sum())
            codes[:, i] = new
            grad += delta[:, None] * Hd[i][None, :]
        if changed == 0:
            break
    return codes.to(torch.int32)


@pytest.mark.parametrize("permuted", [False, True])
@pytest.mark.parametrize("sym", [True, False])
def test_code_polish_equals_unblocked_coordinate_descent(permuted, sym):
    for seed in range(3):
        qw, target, H = _problem(seed, in_f=50, sym=sym, permuted=permuted, move=0.8)
        start = requant.requantize_rtn(qw, target)
        for sweeps in (1, 3):
            expected = _refine_reference(start, target, H, sweeps)
            for block in (16, 128):
                got = requant.refine_codes(start, target, H, sweeps=sweeps, block_size=block)
                assert torch.equal(got.codes, expected), (seed, sweeps, block)
        assert not torch.equal(expected, start.codes)  # it did move codes


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), out_f=st.integers(1, 6), in_f=st.integers(2, 40), bits=st.sampled_from([2, 3, 4]),
       group_size=st.sampled_from([4, 8, 16]), sym=st.booleans(), block=st.sampled_from([3, 8, 128]),
       start=st.sampled_from(["source", "rtn"]))
def test_code_polish_never_raises_its_objective(seed, out_f, in_f, bits, group_size, sym, block, start):
    qw, target, H = _problem(seed, out_f=out_f, in_f=in_f, group_size=group_size, bits=bits, sym=sym,
                             tokens=max(2, in_f // 2), move=1.5)  # rank-deficient H too
    s, z = _columns(qw)
    Hd = _damped(H)
    current = requant.requantize_rtn(qw, target) if start == "rtn" else qw
    before = _objective(current.codes, s, z, target, Hd)
    for _ in range(3):
        current = requant.refine_codes(current, target, H, sweeps=1, block_size=block)
        after = _objective(current.codes, s, z, target, Hd)
        assert after <= before * (1 + 1e-12) + 1e-12
        before = after
    assert int(current.codes.min()) >= 0 and int(current.codes.max()) <= qw.maxq


# ------------------------------------------------------------------------------------------------
# 3. the scale refit
# ------------------------------------------------------------------------------------------------

def _refit_reference(qw, target, H):
    """Per output row, the dense least-squares problem min_s ‖(Σ_g s_g·D_g − t) L‖ with H̃ = L Lᵀ."""
    s, z = _columns(qw)
    L = torch.linalg.cholesky(_damped(H.to(F64)))
    D = qw.codes.to(F64) - z
    member = torch.nn.functional.one_hot(qw.g_idx.long(), qw.num_groups).to(F64)  # [in, G]
    rows = []
    for o in range(D.shape[0]):
        design = (D[o][:, None] * member).T @ L  # [G, in]: group g's part of the row, through L
        rhs = target[o].to(F64) @ L
        rows.append(torch.linalg.lstsq(design.T, rhs[:, None]).solution[:, 0])
    return torch.stack(rows, 1)  # [G, out]


@pytest.mark.parametrize("permuted", [False, True])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("in_f", [48, 40])  # whole groups, and a partial last group
def test_scale_refit_equals_the_dense_least_squares_solution(permuted, sym, in_f):
    for seed in range(3):
        qw, target, H = _problem(seed, in_f=in_f, sym=sym, permuted=permuted)
        qw = requant.requantize_compensated(qw, target, H)
        expected = _refit_reference(qw, target, H)
        layer = requant._Layer(qw, target, requant._as_hessian(H))
        solved, ok = requant._refit_solution(layer, layer.source_codes_t, damp=requant.DAMP)
        assert bool(ok.all())
        torch.testing.assert_close(solved, expected, rtol=1e-7, atol=1e-12)
        got = requant.refit_scales(qw, target, H)
        assert torch.equal(got.scales, expected.to(torch.float16)) and torch.equal(got.codes, qw.codes)
        assert not torch.equal(got.scales, qw.scales)
        # the exact minimiser over the scales never raises the (damped) objective
        s, z = _columns(qw)
        Hd = _damped(H)
        refitted = solved.to(F64)[qw.g_idx.long()].T
        assert _objective(qw.codes, refitted, z, target, Hd) <= _objective(qw.codes, s, z, target, Hd)


def test_scale_refit_keeps_scales_it_cannot_determine():
    """A group whose codes all sit on the zero point has no information: its scale stays."""
    qw, target, H = _problem(3, in_f=32)
    codes = qw.codes.clone()
    codes[:, :16] = qw.zeros[0].unsqueeze(1)  # group 0 of every row: all at the zero point
    qw = QuantizedWeight(codes, qw.scales, qw.zeros, qw.g_idx, qw.bits, qw.group_size)
    got = requant.refit_scales(qw, target, H)
    assert torch.equal(got.scales[0], qw.scales[0]) and not torch.equal(got.scales[1], qw.scales[1])


_REFIT_MEMORY_CHILD = """
import resource, torch
from oftsurgery.merge.solve import requant
from oftsurgery.quant.grid import quantize_weight
g = torch.Generator().manual_seed(0)
qw = quantize_weight(torch.randn(512, 2048, generator=g), 4, 32, True)
target = qw.dequantize() + 0.01 * torch.randn(512, 2048, generator=g)
x = torch.randn(3000, 2048, generator=g, dtype=torch.float64)
H = x.T @ x
del x
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
requant.refit_scales(qw, target, H)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
"""


def test_scale_refit_memory_does_not_grow_with_the_number_of_groups():
    """512×2048 with 64 groups: one [out, in] float64 matrix per group would be 512 MiB (the refit
    before the group-block assembly grew the process by 1083 MiB here); it needs a few [out, in]."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", _REFIT_MEMORY_CHILD], capture_output=True, text=True, check=True,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    grown_mib = float(proc.stdout.strip().splitlines()[-1])
    assert grown_mib < 128, grown_mib


# ------------------------------------------------------------------------------------------------
# the pipeline and identity
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sym,permuted", [(True, False), (False, True)])
def test_identity_is_exact_by_the_solver_itself(sym, permuted):
    """On an identity target every stage, and the pipeline, returns the source codes and scales —
    without the engine's kept-codes safety net."""
    qw, _, H = _problem(7, out_f=16, in_f=64, sym=sym, permuted=permuted)
    target = qw.dequantize()
    for H_ in (H, H.float()):
        result = requant.requantize_calibrated(qw, target, H_)
        assert result.error == 0.0 and result.fallbacks == [] and result.stages == ["gptq"]
        stages = [requant.requantize_compensated(qw, target, H_), requant.refine_codes(qw, target, H_, sweeps=3),
                  requant.refit_scales(qw, target, H_)]
        for got in [result.weight, *stages]:
            assert torch.equal(got.codes, qw.codes) and torch.equal(got.scales, qw.scales)


def test_each_accepted_stage_lowers_the_output_error():
    qw, target, H = _problem(11, out_f=24, in_f=96, group_size=32, move=0.6)
    s, z = _columns(qw)
    result = requant.requantize_calibrated(qw, target, H)
    gptq_only = requant.requantize_compensated(qw, target, H)
    assert result.stages[0] == "gptq" and len(result.stages) > 1 and result.fallbacks == []
    final = _objective(result.weight.codes, result.weight.scales.to(F64)[qw.g_idx.long()].T, z, target, H)
    assert final == pytest.approx(result.error, rel=1e-9)
    assert final < _objective(gptq_only.codes, s, z, target, H) * (1 - requant.ACCEPT)


def test_a_failing_stage_is_recorded_and_skipped(monkeypatch):
    qw, target, H = _problem(2, move=0.6)

    def broken(*args, **kwargs):
        raise RuntimeError("injected")

    monkeypatch.setattr(requant, "_refit", broken)
    result = requant.requantize_calibrated(qw, target, H)
    assert result.fallbacks == ["refit_scales failed (RuntimeError: injected), stage skipped"]
    assert "refit_scales" not in result.stages and torch.equal(result.weight.scales, qw.scales)


# ------------------------------------------------------------------------------------------------
# linears that read one input, solved as one problem
# ------------------------------------------------------------------------------------------------

def _reading_one_input(outs, *, in_f=96, group_size=32, permuted=False, seed=0):
    """Linears (q/k/v-like: several output sizes) on one grid layout, each its own weights, grid and
    target, and the one H they share."""
    g = torch.Generator().manual_seed(seed)
    g_idx = default_g_idx(in_f, group_size)
    if permuted:
        g_idx = g_idx[torch.randperm(in_f, generator=g)].contiguous()
    qws, targets = [], []
    for out_f in outs:
        qw = quantize_weight(torch.randn(out_f, in_f, generator=g), 4, group_size, False, g_idx)
        step = qw.scales.float()[qw.g_idx.long()].T
        qws.append(qw)
        targets.append(qw.dequantize() + 0.6 * step * torch.randn(out_f, in_f, generator=g))
    return qws, targets, _problem(seed, in_f=in_f, group_size=group_size)[2]


def _assert_same_result(got, alone):
    assert torch.equal(got.weight.codes, alone.weight.codes) and torch.equal(got.weight.scales, alone.weight.scales)
    assert (got.error, got.stages, got.fallbacks, got.damp, got.kernel) == \
        (alone.error, alone.stages, alone.fallbacks, alone.damp, alone.kernel)


@pytest.mark.parametrize("permuted", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_linears_solved_together_get_what_each_gets_alone(permuted, dtype):
    """Bit for bit: codes, scales, the error, the accepted stages. One linear is exact already (its
    stages stop at once, the others' go on), one is on another layout (solved apart)."""
    qws, targets, H = _reading_one_input([24, 8, 40, 8], permuted=permuted)
    targets[1] = qws[1].dequantize()  # exact: error 0, no later stage
    other, other_target, _ = _reading_one_input([16], permuted=not permuted, seed=3)
    qws.append(other[0])
    targets.append(other_target[0])
    assert requant._same_layout(qws) == [[0, 1, 2, 3], [4]]
    together = requant.requantize_calibrated_group(qws, targets, H.to(dtype))
    alone = [requant.requantize_calibrated(qw, t, H.to(dtype)) for qw, t in zip(qws, targets)]
    for got, expected in zip(together, alone):
        _assert_same_result(got, expected)
    assert together[1].stages == ["gptq"] and together[1].error == 0.0
    assert all(len(r.stages) > 1 for i, r in enumerate(together) if i != 1)  # the test can tell


@pytest.mark.parametrize("fails", ["gptq", "refit"])
def test_a_joint_solve_that_fails_solves_each_linear_alone(fails, monkeypatch):
    """An error of the joint problem itself (out of memory, say): each linear is solved alone, and
    gets exactly what it gets alone, fallbacks included."""
    qws, targets, H = _reading_one_input([24, 8, 8])
    alone = [requant.requantize_calibrated(qw, t, H) for qw, t in zip(qws, targets)]
    name = "_gptq_pass" if fails == "gptq" else "_refit"
    real = getattr(requant, name)

    def only_alone(layer, *args, **kwargs):
        if len(layer.parts) > 1:
            raise RuntimeError("CUDA out of memory (injected)")
        return real(layer, *args, **kwargs)

    monkeypatch.setattr(requant, name, only_alone)
    for got, expected in zip(requant.requantize_calibrated_group(qws, targets, H), alone):
        _assert_same_result(got, expected)


def test_a_stage_failing_for_every_linear_is_recorded_for_each(monkeypatch):
    qws, targets, H = _reading_one_input([24, 8])

    def broken(*args, **kwargs):
        raise RuntimeError("injected")

    monkeypatch.setattr(requant, "_refit", broken)
    for result in requant.requantize_calibrated_group(qws, targets, H):
        assert result.fallbacks == ["refit_scales failed (RuntimeError: injected), stage skipped"]


def test_the_merge_writes_the_same_bytes_with_input_groups_solved_together(monkeypatch, tiny_gptq_dir, tmp_path):
    """q/k/v and gate/up solved as one problem each, against each linear on its own: the same
    shards, and the same report line per linear (seconds apart)."""
    from oftsurgery.merge.merger import Merger

    rot = random_rotations(tiny_gptq_dir, tmp_path / "r.safetensors", strength=0.05)
    options = MergeOptions(**{**FAST, "calib_tokens": 1024})
    together = merge_checkpoint(tiny_gptq_dir, rot, tmp_path / "together", options)
    real = Merger.solve
    monkeypatch.setattr(Merger, "solve", lambda self, prefixes, solve_here, solve_together=None:
                        real(self, prefixes, solve_here))
    alone = merge_checkpoint(tiny_gptq_dir, rot, tmp_path / "alone", options)
    got, expected = all_tensors(tmp_path / "together"), all_tensors(tmp_path / "alone")
    assert got.keys() == expected.keys()
    for name in got:
        assert_bytes_equal(got[name], expected[name], name)
    assert together.codes_changed > 0 and "compensated" in {l.mode for l in together.layers}
    for got, expected in zip(together.layers, alone.layers):
        assert {**asdict(got), "seconds": 0} == {**asdict(expected), "seconds": 0}


def test_a_decoder_layer_is_built_once_and_a_statistics_pass_stops_at_its_group(monkeypatch, tiny_gptq_dir, tmp_path):
    """The float layer is built once per decoder layer (its weights replaced as they are requantized),
    and the pass that gathers a group's inputs ends once the group has read them: only down_proj's
    own pass runs the MLP's last linear."""
    from oftsurgery.merge.calibration import statistics
    from oftsurgery.merge.calibration.runner import LayerwiseModel

    builds, reached = [], []
    real_build, real_collect = LayerwiseModel.build_layer, statistics.collect_group_inputs

    def build_layer(self, index, *args, **kwargs):
        builds.append(index)
        return real_build(self, index, *args, **kwargs)

    def collect(ranks, layer_module, names, *args, **kwargs):
        hook = layer_module.mlp.down_proj.register_forward_hook(lambda *_: reached.append(tuple(names)))
        try:
            return real_collect(ranks, layer_module, names, *args, **kwargs)
        finally:
            hook.remove()

    monkeypatch.setattr(LayerwiseModel, "build_layer", build_layer)
    monkeypatch.setattr(statistics, "collect_group_inputs", collect)
    rot = random_rotations(tiny_gptq_dir, tmp_path / "r.safetensors", strength=0.05)
    report = merge_checkpoint(tiny_gptq_dir, rot, tmp_path / "out", MergeOptions(**FAST))
    assert len(report.layers) == 14
    assert builds == [0, 1, 0, 1]  # the runner's self-check, then the merge: once per decoder layer
    assert set(reached) == {("mlp.down_proj",)}


# ------------------------------------------------------------------------------------------------
# input statistics
# ------------------------------------------------------------------------------------------------

def test_error_from_rows_and_from_the_hessian_agree():
    g = torch.Generator().manual_seed(0)
    err = torch.randn(30, 5, generator=g, dtype=F64)  # [in, out]
    for tokens in (12, 90):  # X kept (n ≤ in), and H only
        stats = InputHessian(30, "cpu")
        x = torch.randn(tokens, 30, generator=g)
        stats.add(x[: tokens // 2])
        stats.add(x[tokens // 2:])
        assert (stats.rows is not None) == (tokens <= 30)
        expected = float(((x.to(F64) @ err) ** 2).sum())
        assert float(stats.error(err)) == pytest.approx(expected, rel=1e-5)
        torch.testing.assert_close(stats.matrix, x.T @ x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("batch_tokens", [4096, 48])  # all 9 rows in one forward pass; 3 rows per pass
def test_hessians_are_collected_once_per_input_with_held_out_rows(batch_tokens, monkeypatch, tiny_gptq_dir):
    from oftsurgery.io import CheckpointReader
    from oftsurgery.merge.calibrated_loop import _collect_hessians
    from oftsurgery.merge.calibration import statistics

    monkeypatch.setattr(statistics, "BATCH_TOKENS", batch_tokens)
    from oftsurgery.merge.calibration.runner import LayerwiseModel

    reader = CheckpointReader(tiny_gptq_dir)
    runner = LayerwiseModel(reader.config, reader.get)
    ids = torch.randint(3, 400, (9, 16), generator=torch.Generator().manual_seed(0))
    hidden, kwargs = runner.first_layer_inputs(ids)
    from oftsurgery.quant.codec import unpack_layer
    from oftsurgery.quant.config import load_quant_config

    config = load_quant_config(tiny_gptq_dir)

    def weight(name):
        return unpack_layer({k[len(name) + 1:]: reader.get(k) for k in reader.tensors if k.startswith(name + ".")}, config).dequantize()

    layer = runner.build_layer(0, weight)
    names = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"]
    stats = _collect_hessians(layer, names, hidden, kwargs)
    assert stats["self_attn.q_proj"] is stats["self_attn.k_proj"] is stats["self_attn.v_proj"]
    assert stats["mlp.gate_proj"] is stats["mlp.up_proj"] and stats["mlp.gate_proj"] is not stats["self_attn.q_proj"]
    # brute force: the inputs recorded by independent hooks, float64, split by row
    held = holdout_rows(9)
    assert held == {7}
    seen = {}
    hooks = [layer.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: seen.setdefault(n, []).append(i[0].reshape(-1, i[0].shape[-1]).to(F64)))
             for n in ("self_attn.q_proj", "mlp.gate_proj")]
    with torch.no_grad():
        for r in range(9):
            layer(hidden[r: r + 1], **kwargs)
    for h in hooks:
        h.remove()
    for name, xs in seen.items():
        fit = torch.cat([x for r, x in enumerate(xs) if r not in held])
        out = torch.cat([x for r, x in enumerate(xs) if r in held])
        s = stats[name]
        assert s.fit.matrix.dtype == torch.float32 and s.fit.tokens == 8 * 16 and s.holdout.tokens == 16
        torch.testing.assert_close(s.fit.matrix.to(F64), fit.T @ fit, rtol=1e-5, atol=1e-4)
        assert s.measured is s.holdout
        err = torch.randn(out.shape[1], 3, dtype=F64)
        assert float(s.holdout.error(err)) == pytest.approx(float(((out @ err) ** 2).sum()), rel=1e-5)


# ------------------------------------------------------------------------------------------------
# the engine: fallbacks, --strict, honest residuals
# ------------------------------------------------------------------------------------------------

def _perturb_one_code(qw):
    codes = qw.codes.clone()
    codes[0, 0] = (codes[0, 0] + 1) % (qw.maxq + 1)
    return QuantizedWeight(codes, qw.scales, qw.zeros, qw.g_idx, qw.bits, qw.group_size)


@pytest.mark.parametrize("rows", [8, 7])  # one held-out row; too few rows to hold any out
@pytest.mark.parametrize("broken", ["calibrated", "calibrated-misreporting", "rtn"])
def test_a_broken_solver_fails_the_identity_checks(broken, rows, monkeypatch, tiny_gptq_dir, tmp_path):
    """The engine keeps the source codes when the solver's result is worse, so byte-identity alone
    cannot catch a broken solver; the identity checks also demand that no layer fell back. The engine
    measures the solver's result itself on the held-out rows (on the fitted ones when there are fewer
    than 8 rows), so a solver that misreports its own error is caught the same way; a broken
    rounding gets its codes written, and the bytes differ."""
    rot = identity_rotations(tiny_gptq_dir, tmp_path / "identity.safetensors")
    if broken.startswith("calibrated"):
        real = requant.requantize_calibrated_group  # linears solved alone go through it too

        def solver(qws, targets, hessian, **kwargs):
            results = real(qws, targets, hessian, **kwargs)
            for result, target in zip(results, targets):
                result.weight = _perturb_one_code(result.weight)
                if broken == "calibrated":
                    result.error = requant.output_error(result.weight.dequantize(), target, hessian)
            return results

        monkeypatch.setattr(requant, "requantize_calibrated_group", solver)
    else:  # a round-to-nearest that gets one code wrong and does not notice
        from oftsurgery.merge.solve import rtn

        real = rtn.rtn_merge_layer

        def broken_rtn(plan, qw, rotation=None):
            chosen, report = real(plan, qw, rotation)
            return _perturb_one_code(chosen), report

        monkeypatch.setattr(rtn, "rtn_merge_layer", broken_rtn)
    method = broken.split("-")[0]
    options = MergeOptions(method=method, **{**FAST, "calib_tokens": rows * FAST["seq_len"]})
    report = merge_checkpoint(tiny_gptq_dir, rot, tmp_path / "out", options)
    if method == "calibrated":
        assert all(l.heldout_tokens == (64 if rows == 8 else 0) for l in report.layers)
    with pytest.raises(AssertionError):
        assert_identity_merge(report, tiny_gptq_dir, tmp_path / "out")
    if broken == "rtn":  # wrong codes written, and nothing reported
        assert report.fallbacks == []
    else:  # the source codes, or round-to-nearest which on an identity target is the same: a fallback
        assert all(l.mode in ("kept", "rtn") and l.fallback.startswith(f"{l.mode}:") for l in report.layers)
        assert any("WARNING: 14 layer(s) fell back" in w for w in report.warnings())


def _inject_fallback(monkeypatch):
    real = requant.requantize_calibrated_group

    def with_fallback(*args, **kwargs):
        results = real(*args, **kwargs)
        for result in results:
            result.fallbacks.append("cholesky: injected for the test")
        return results

    monkeypatch.setattr(requant, "requantize_calibrated_group", with_fallback)


def test_fallbacks_are_reported_and_strict_refuses_them(monkeypatch, tiny_gptq_dir, tmp_path):
    _inject_fallback(monkeypatch)
    rot = random_rotations(tiny_gptq_dir, tmp_path / "r.safetensors", strength=0.03)
    report = merge_checkpoint(tiny_gptq_dir, rot, tmp_path / "out", MergeOptions(**FAST))
    saved = json.loads((tmp_path / "out" / "merge_report.json").read_text())
    # (with 64 held-out tokens a layer may also take round-to-nearest: "cholesky: …; rtn: …")
    assert all(l["fallback"].startswith("cholesky: injected for the test") for l in saved["layers"])
    assert saved["summary"]["fallbacks"] == 14
    assert any(w.startswith("WARNING: 14 layer(s) fell back (14 cholesky") and "first: model.layers.0." in w
               for w in report.warnings())
    with pytest.raises(MergeError, match=r"--strict: model\.layers\.0\.\S+ fell back \(cholesky: injected"):
        merge_checkpoint(tiny_gptq_dir, rot, tmp_path / "strict", MergeOptions(strict=True, **FAST))
    assert not (tmp_path / "strict").exists()
    result = CliRunner().invoke(cli, ["merge", str(tiny_gptq_dir), str(rot), "--out", str(tmp_path / "cli"),
                                      "--calib-tokens", "512", "--seq-len", "64", "--strict", "-q"])
    assert result.exit_code == MergeError.exit_code and "--strict" in result.output
    assert not (tmp_path / "cli").exists()


def test_strict_accepts_a_clean_merge(tiny_gptq_dir, tmp_path):
    rot = random_rotations(tiny_gptq_dir, tmp_path / "r.safetensors", strength=0.03)
    # enough rows that the solve generalises (with 448 fitted tokens a layer can lose to rounding)
    options = MergeOptions(strict=True, **{**FAST, "calib_tokens": 2048})
    report = merge_checkpoint(tiny_gptq_dir, rot, tmp_path / "out", options)
    assert report.fallbacks == [] and all(l.mode == "compensated" for l in report.layers)
    assert all(l.heldout_tokens == 256 for l in report.layers)  # 32 rows of 64: rows 7, 15, 23, 31 held out


def test_a_module_the_calibration_never_reached_is_a_fallback(tiny_gptq_dir, tmp_path):
    from oftsurgery.merge.candidates import requantize_layer
    from oftsurgery.merge.plan import plan_merge
    from oftsurgery.io import CheckpointReader
    from oftsurgery.oft.adapter_io import load_rotations
    from oftsurgery.quant.config import load_quant_config

    rot = random_rotations(tiny_gptq_dir, tmp_path / "r.safetensors", strength=0.03)
    reader = CheckpointReader(tiny_gptq_dir)
    plan = plan_merge(reader, load_quant_config(tiny_gptq_dir), load_rotations(rot), None)
    layer = plan.layers["model.layers.0.mlp.down_proj"]
    from oftsurgery.quant.codec import unpack_layer

    prefix = layer.prefix
    qw = unpack_layer({k[len(prefix) + 1:]: reader.get(k) for k in reader.tensors if k.startswith(prefix + ".")}, plan.source)
    unreached = CalibrationInputs(InputHessian(qw.in_features, "cpu"))
    unreached.fit.add(torch.zeros(10, qw.in_features))
    for inputs in (None, unreached):
        new, report = requantize_layer(layer, qw, "calibrated", inputs)
        assert report.mode == "rtn" and report.fallback.startswith("not calibrated:")
        assert torch.equal(new.codes, requant.requantize_rtn(qw, layer.target_weight(qw.dequantize())).codes)


def test_rtn_does_no_hessian_work_and_reports_weight_space_residuals(monkeypatch, tiny_gptq_dir, tmp_path):
    from oftsurgery.merge.solve import hessian
    from oftsurgery.oft.adapter_io import load_rotations

    def forbidden(*args, **kwargs):
        raise AssertionError("rtn touched the calibrated solver")

    rot = random_rotations(tiny_gptq_dir, tmp_path / "r.safetensors", strength=0.05)
    for owner, name in ((hessian.InputHessian, "__init__"), (requant, "_Layer"), (requant, "requantize_calibrated"),
                        (requant, "requantize_calibrated_group")):
        monkeypatch.setattr(owner, name, forbidden)
    report = merge_checkpoint(tiny_gptq_dir, rot, tmp_path / "out", MergeOptions(method="rtn", **FAST))
    monkeypatch.undo()
    rotations = load_rotations(rot)
    src, out = all_tensors(tiny_gptq_dir), all_tensors(tmp_path / "out")
    from oftsurgery.quant.codec import unpack_layer
    from oftsurgery.quant.config import load_quant_config

    config = load_quant_config(tiny_gptq_dir)
    for line in report.layers[:3]:
        def weight(tensors):
            return unpack_layer({k[len(line.name) + 1:]: v for k, v in tensors.items() if k.startswith(line.name + ".")}, config).dequantize().to(F64)

        w, merged = weight(src), weight(out)
        t = rotations.merged_weight(line.name, w)
        assert line.residual_before == pytest.approx(float((w - t).norm() / t.norm()), rel=1e-6)
        assert line.residual_after == pytest.approx(float((merged - t).norm() / t.norm()), rel=1e-6)
        assert line.fallback is None and line.heldout_tokens == 0


def test_a_solve_worse_than_leaving_the_adapter_out_on_held_out_rows_is_not_taken():
    """Fitted on inputs in a low-dimensional subspace, the solver is free outside it; held-out inputs
    that leave the subspace see it further from the fine-tuned layer than the unmerged one. The merge
    then takes the best of round-to-nearest and the source codes on those rows and says so; judged
    on the fitted rows it would have taken the solve."""
    from oftsurgery.merge.candidates import requantize_layer
    from oftsurgery.merge.plan import LayerPlan
    from oftsurgery.merge.report import MergeReport
    from oftsurgery.oft.adapter_io import RotationSet
    from oftsurgery.oft.rotation import cayley_exact, skew_from_params

    g = torch.Generator().manual_seed(0)
    out_f, in_f = 32, 64
    qw = quantize_weight(torch.randn(out_f, in_f, generator=g), 4, 32, True)
    blocks = cayley_exact(skew_from_params(torch.randn(2, 32 * 31 // 2, generator=g) * 0.01, 32))
    plan = LayerPlan("layer", in_f, out_f, RotationSet({"layer": blocks}))
    basis = torch.randn(4, in_f, generator=g)
    fit, holdout = InputHessian(in_f, "cpu"), InputHessian(in_f, "cpu", need_matrix=False)
    fit.add(torch.randn(256, 4, generator=g) @ basis)
    x_out = torch.randn(32, in_f, generator=g)
    holdout.add(x_out)
    merged, line = requantize_layer(plan, qw, "calibrated", CalibrationInputs(fit, holdout))
    assert line.mode == "rtn" and line.fallback.startswith("rtn:") and line.heldout_tokens == 32
    assert torch.equal(merged.codes, requant.requantize_rtn(qw, plan.rotations.merged_weight("layer", qw.dequantize())).codes)
    assert line.residual_after <= line.residual_before
    # the reason, checked directly: the solve's outputs on the held-out rows are further from W·Rᵀ's
    solved, on_fit = requantize_layer(plan, qw, "calibrated", CalibrationInputs(fit, None))
    assert on_fit.mode == "compensated" and on_fit.residual_after < on_fit.residual_before
    target = plan.rotations.merged_weight("layer", qw.dequantize())
    solved_err = float(((x_out @ (solved.dequantize() - target).T) ** 2).sum())
    kept_err = float(((x_out @ (qw.dequantize() - target).T) ** 2).sum())
    rtn_err = float(((x_out @ (merged.dequantize() - target).T) ** 2).sum())
    assert solved_err > kept_err >= rtn_err
    report = MergeReport(checkpoint="c", adapter="a", output="o", method="calibrated", source_format="gptq",
                         output_format="gptq", calibration=None, calib_tokens=0, residual_space="activations",
                         layers=[line])
    assert any("1 rtn" in w for w in report.warnings())


def test_the_fallback_warning_counts_each_kind():
    from oftsurgery.merge.report import LayerReport, MergeReport

    def line(name, fallback):
        return LayerReport(name=name, mode="compensated", codes_changed=0.1, residual_before=0.02, residual_after=0.01,
                           rotation_strength=0.3, fallback=fallback)

    report = MergeReport(checkpoint="c", adapter="a", output="o", method="calibrated", source_format="gptq",
                         output_format="gptq", calibration=None, calib_tokens=0, residual_space="activations",
                         layers=[line("a", "cholesky: not definite at damp 0.01, so the GPTQ pass used damp 0.1; kept: x"),
                                 line("b", None), line("c", "refit_scales failed (RuntimeError: m), stage skipped")])
    assert report.fallbacks == [("a", report.layers[0].fallback), ("c", report.layers[2].fallback)]
    warning = next(w for w in report.warnings() if "fell back" in w)
    assert warning.startswith("WARNING: 2 layer(s) fell back (1 cholesky, 1 kept, 1 refit_scales failed); first: a: cholesky:")
    assert report.to_dict()["summary"]["fallbacks"] == 2


_KERNELS_CHILD = """
import os, sys
import torch
sys.path.insert(0, sys.argv[1])
from test_solver import _problem
from oftsurgery.merge.solve import requant
device = "cuda" if torch.cuda.is_available() else "cpu"
mismatch = total = 0
for dtype in (torch.float64, torch.float32):
    for seed in range(2):
        qw, target, H = _problem(seed, out_f=36, in_f=40, sym=seed == 0, permuted=seed == 1, move=0.8)
        H = H.to(device, dtype)
        start = requant.requantize_rtn(qw, target)
        codes = {}
        for kernels in ("torch", "triton"):
            os.environ["OFTSURGERY_SOLVER_KERNELS"] = kernels
            codes[kernels] = (requant.requantize_compensated(qw, target, H, block_size=16).codes,
                              requant.refine_codes(start, target, H, sweeps=2, block_size=16).codes)
        for a, b in zip(codes["torch"], codes["triton"]):
            mismatch += int((a != b).sum()); total += a.numel()
        assert not torch.equal(codes["torch"][0], start.codes)
print(device, mismatch, total)
"""


def test_triton_block_kernels_do_what_the_torch_loops_do():
    """The GPU kernels of kernels.py against the torch loops: in Triton's interpreter on a CPU
    (exactly the same codes), compiled on a GPU (the same up to fused multiply-adds)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("triton")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run([sys.executable, "-c", _KERNELS_CHILD, str(Path(__file__).parent)], capture_output=True,
                          text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    device, mismatch, total = proc.stdout.split()
    assert int(mismatch) <= (0 if device == "cpu" else int(total) // 1000), (device, mismatch, total)


def test_a_failing_gptq_pass_is_recorded_and_polishing_starts_from_rounding(monkeypatch):
    qw, target, H = _problem(4, move=0.6)

    def broken(*args, **kwargs):
        raise RuntimeError("CUDA out of memory; injected")

    monkeypatch.setattr(requant, "_gptq_pass", broken)
    result = requant.requantize_calibrated(qw, target, H)
    assert result.fallbacks == ["gptq failed (RuntimeError: CUDA out of memory, injected), "
                                "so the codes start from round-to-nearest"]
    assert result.stages[0] == "rtn" and "refine_codes" in result.stages
    s, z = _columns(qw)
    rtn = requant.requantize_rtn(qw, target)
    assert result.error < _objective(rtn.codes, s, z, target, H)
