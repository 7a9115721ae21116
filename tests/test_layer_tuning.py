"""`merge --tune-steps`: a decoder layer's codes (±1) and scales tuned against its output, kept only
where the held-out rows improve."""

from __future__ import annotations

import json

import torch

from merge_helpers import all_tensors, assert_identity_merge, identity_rotations, random_rotations
from oftsurgery.io import CheckpointReader
from oftsurgery.merge import MergeOptions, merge_checkpoint
from oftsurgery.quant.codec import layer_quant_config, unpack_layer
from oftsurgery.quant.config import load_quant_config

FAST = dict(calib_tokens=1024, seq_len=64, progress=False)


def _unpacked(path, prefix):
    reader = CheckpointReader(path)
    cfg = load_quant_config(path)
    tensors = {n[len(prefix) + 1:]: reader.get(n) for n in reader.tensors
               if n.startswith(prefix + ".") and "." not in n[len(prefix) + 1:]}
    return unpack_layer(tensors, layer_quant_config(cfg, prefix) or cfg)


def test_identity_stays_byte_exact_with_tuning(tiny_gptq_dir, tmp_path):
    rot = identity_rotations(tiny_gptq_dir, tmp_path / "id.safetensors")
    report = merge_checkpoint(tiny_gptq_dir, rot, tmp_path / "out", MergeOptions(tune_steps=20, **FAST))
    assert [t["accepted"] for t in report.layer_tuning] == [False, False]  # nothing to gain on an exact fit
    assert_identity_merge(report, tiny_gptq_dir, tmp_path / "out")


def _scales_off_by(monkeypatch, factor):
    """A solve whose fp16 scales come out `factor` off: what tuning against the layer output can repair."""
    import dataclasses

    from oftsurgery.merge.solve import requant

    real = requant.requantize_calibrated_group  # what every calibrated solve goes through, alone or joint

    def solver(qws, targets, hessian, **kwargs):
        results = real(qws, targets, hessian, **kwargs)
        for result in results:
            result.weight = dataclasses.replace(result.weight, scales=(result.weight.scales.float() * factor).half())
        return results

    monkeypatch.setattr(requant, "requantize_calibrated_group", solver)


def test_tuning_repairs_a_layer_within_ten_percent_of_scale(monkeypatch, tiny_gptq_dir, tmp_path):
    rot = random_rotations(tiny_gptq_dir, tmp_path / "r.safetensors", strength=0.05)
    _scales_off_by(monkeypatch, 1.01)
    plain = merge_checkpoint(tiny_gptq_dir, rot, tmp_path / "plain", MergeOptions(**FAST))
    tuned = merge_checkpoint(tiny_gptq_dir, rot, tmp_path / "tuned", MergeOptions(tune_steps=100, **FAST))
    saved = json.loads((tmp_path / "tuned" / "merge_report.json").read_text())
    assert [t["layer"] for t in saved["layer_tuning"]] == [0, 1] and len(plain.layer_tuning) == 0
    assert all(t["accepted"] and t["heldout_after"] < t["heldout_before"] for t in saved["layer_tuning"])
    # decoder layer 0 sees the same inputs in both merges (layer 1 does not: layer 0 changed), so its
    # tuned weights compare with the solve's: codes kept (the merge tunes scales only), scales within 10%
    names = sorted({n.rsplit(".", 1)[0] for n in all_tensors(tmp_path / "plain")
                    if n.endswith(".qweight") and n.startswith("model.layers.0.")})
    for name in names:
        a, b = _unpacked(tmp_path / "plain", name), _unpacked(tmp_path / "tuned", name)
        assert torch.equal(a.codes, b.codes) and not torch.equal(a.scales, b.scales)
        assert ((b.scales.float() / a.scales.float() - 1).abs() <= 0.1 + 2e-3).all()
        assert torch.equal(a.zeros, b.zeros) and torch.equal(a.g_idx, b.g_idx)
    assert all(l.stages[-1] == "layer_tune" for l in tuned.layers)
    # the report's residuals are those of the tuned weights, measured again: layer 0's solve (same inputs,
    # same solve) reports exactly the plain merge's residuals, so each differs only if it was re-measured
    # (tuning lowers the layer's output error; a linear's own residual may go either way)
    first = [(a, b) for a, b in zip(plain.layers, tuned.layers) if a.name.startswith("model.layers.0.")]
    assert len(first) == len(names) and all(a.name == b.name for a, b in first)
    assert all(a.residual_after != b.residual_after for a, b in first)


def test_tuning_that_does_not_help_on_held_out_rows_leaves_the_solve(monkeypatch, tiny_gptq_dir, tmp_path):
    from oftsurgery.merge import layer_tuning

    rot = random_rotations(tiny_gptq_dir, tmp_path / "r.safetensors", strength=0.05)
    plain = merge_checkpoint(tiny_gptq_dir, rot, tmp_path / "plain", MergeOptions(**FAST))
    monkeypatch.setattr(layer_tuning, "ACCEPT", 1.0)  # nothing can drop the error by 100%
    tuned = merge_checkpoint(tiny_gptq_dir, rot, tmp_path / "tuned", MergeOptions(tune_steps=20, **FAST))
    assert [t["accepted"] for t in tuned.layer_tuning] == [False, False]
    before, after = all_tensors(tmp_path / "plain"), all_tensors(tmp_path / "tuned")
    assert before.keys() == after.keys() and all(torch.equal(before[n], after[n]) for n in before)
    assert [l.stages for l in tuned.layers] == [l.stages for l in plain.layers]


def test_code_moves_stay_within_one_and_are_taken_only_when_held_out_rows_improve():
    """tune_layer with code moves on, on one linear layer: against a reference the grid can reach by
    moving codes, the tuned codes move (by one at most) and the held-out error drops."""
    from oftsurgery.merge.layer_tuning import tune_layer
    from oftsurgery.quant.grid import QuantizedWeight

    g = torch.Generator().manual_seed(0)
    out_f, in_f = 16, 64
    codes = torch.randint(2, 14, (out_f, in_f), generator=g, dtype=torch.uint8)
    scales = torch.full((2, out_f), 0.05, dtype=torch.float16)
    zeros = torch.full((2, out_f), 8, dtype=torch.int32)
    g_idx = (torch.arange(in_f) // 32).to(torch.int32)
    solved = QuantizedWeight(codes, scales, zeros, g_idx, 4, 32)
    better = solved.with_codes((codes.int() + torch.randint(-1, 2, codes.shape, generator=g)).clamp(0, 15).to(torch.uint8))
    x = torch.randn(24, 8, in_f, generator=g)
    reference = x @ better.dequantize().T

    def forward(floats, rows):
        return rows @ floats["l"].T

    tuned, result = tune_layer(forward, {"l": solved}, x, reference, list(range(20)), list(range(20, 24)),
                               steps=300, code_lr=1.0)
    assert result.accepted and result.heldout_after < 0.8 * result.heldout_before
    moved = tuned["l"].codes.int() - codes.int()
    assert moved.abs().max() == 1 and (moved != 0).any()
    same, none = tune_layer(forward, {"l": better}, x, reference, list(range(20)), list(range(20, 24)), steps=50,
                            code_lr=1.0)
    assert not none.accepted and same["l"] is better  # nothing to gain on an exact fit: the solve stays


def test_tuning_is_on_by_default_on_a_gpu_only():
    """`tune_steps=None` (the CLI without --tune-steps): DEFAULT_GPU_TUNE_STEPS for a calibrated merge on a
    GPU in one process; off on a CPU, under torchrun and for rtn."""
    from oftsurgery.merge.options import DEFAULT_GPU_TUNE_STEPS, default_tune_steps

    assert DEFAULT_GPU_TUNE_STEPS > 0
    assert default_tune_steps("calibrated", "cuda", False) == DEFAULT_GPU_TUNE_STEPS
    assert default_tune_steps("calibrated", "cuda:1", False) == DEFAULT_GPU_TUNE_STEPS
    assert default_tune_steps("calibrated", "cuda:0", True) == 0  # torchrun: rows spread over ranks
    assert default_tune_steps("calibrated", "cpu", False) == 0
    assert default_tune_steps("rtn", "cuda", False) == 0


def test_a_cpu_merge_without_the_option_does_not_tune_and_a_tuned_one_says_so(tiny_gptq_dir, tmp_path):
    rot = random_rotations(tiny_gptq_dir, tmp_path / "r.safetensors", strength=0.05)
    plain = merge_checkpoint(tiny_gptq_dir, rot, tmp_path / "plain", MergeOptions(device="cpu", **FAST))
    assert plain.tune_steps == 0 and plain.layer_tuning == [] and "layer tuning" not in plain.summary()
    assert not any(k.startswith("tune") for k in plain.phase_seconds)
    tuned = merge_checkpoint(tiny_gptq_dir, rot, tmp_path / "tuned", MergeOptions(device="cpu", tune_steps=5, **FAST))
    saved = json.loads((tmp_path / "tuned" / "merge_report.json").read_text())
    assert saved["tune_steps"] == 5 and len(saved["layer_tuning"]) == 2
    kept = sum(t["accepted"] for t in saved["layer_tuning"])
    assert f"layer tuning (5 steps): kept in {kept} of 2 decoder layers" in tuned.summary()
    # where its time went: the reference forward, the held-out errors and the steps, each a phase
    assert {"tune", "tune/reference", "tune/held-out", "tune/steps"} <= set(saved["phase_seconds"])


def test_the_re_measure_after_tuning_runs_only_the_held_out_rows_and_reports_the_same(
        monkeypatch, tiny_gptq_dir, tmp_path):
    """Without a residual LoRA the tuned layer's residuals are measured on the held-out rows alone; the
    report is the one a full re-collection (fitted rows too) gives, bit for bit."""
    from oftsurgery.merge.calibration import statistics

    rot = random_rotations(tiny_gptq_dir, tmp_path / "r.safetensors", strength=0.05)
    _scales_off_by(monkeypatch, 1.01)  # so the tuning is taken and the layers are measured again
    real, calls = statistics.collect_group_inputs, []

    def counting(*args, fitted=True, **kwargs):
        calls.append(fitted)
        return real(*args, fitted=fitted, **kwargs)

    monkeypatch.setattr(statistics, "collect_group_inputs", counting)
    quick = merge_checkpoint(tiny_gptq_dir, rot, tmp_path / "quick", MergeOptions(tune_steps=50, **FAST))
    assert all(t["accepted"] for t in quick.layer_tuning) and False in calls
    monkeypatch.setattr(statistics, "collect_group_inputs", lambda *a, fitted=True, **k: real(*a, **k))
    full = merge_checkpoint(tiny_gptq_dir, rot, tmp_path / "full", MergeOptions(tune_steps=50, **FAST))
    assert [(l.name, l.residual_before, l.residual_after) for l in quick.layers] == \
        [(l.name, l.residual_before, l.residual_after) for l in full.layers]
    before, after = all_tensors(tmp_path / "quick"), all_tensors(tmp_path / "full")
    assert all(torch.equal(before[n], after[n]) for n in before)
