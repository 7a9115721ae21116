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


def test_tuning_moves_codes_by_one_at_most_and_is_taken_only_when_held_out_rows_improve(tiny_gptq_dir, tmp_path):
    rot = random_rotations(tiny_gptq_dir, tmp_path / "r.safetensors", strength=0.05)
    plain = merge_checkpoint(tiny_gptq_dir, rot, tmp_path / "plain", MergeOptions(**FAST))
    tuned = merge_checkpoint(tiny_gptq_dir, rot, tmp_path / "tuned", MergeOptions(tune_steps=40, **FAST))
    saved = json.loads((tmp_path / "tuned" / "merge_report.json").read_text())
    assert [t["layer"] for t in saved["layer_tuning"]] == [0, 1]
    before, after = all_tensors(tmp_path / "plain"), all_tensors(tmp_path / "tuned")
    for step in saved["layer_tuning"]:
        prefix = f"model.layers.{step['layer']}."
        names = sorted({n.rsplit(".", 1)[0] for n in before if n.startswith(prefix) and n.endswith(".qweight")})
        if not step["accepted"]:  # the solve's weights stay, byte for byte
            assert all(torch.equal(before[n], after[n]) for n in before if n.startswith(prefix))
            continue
        assert step["heldout_after"] < step["heldout_before"]
        for name in names:
            a, b = _unpacked(tmp_path / "plain", name), _unpacked(tmp_path / "tuned", name)
            assert (a.codes.int() - b.codes.int()).abs().max() <= 1
            ratio = b.scales.float() / a.scales.float()
            assert ((ratio - 1).abs() <= 0.1 + 2e-3).all()
            assert torch.equal(a.zeros, b.zeros) and torch.equal(a.g_idx, b.g_idx)
        lines = {l.name: l for l in tuned.layers if l.name.startswith(prefix)}
        assert all(l.stages[-1] == "layer_tune" for l in lines.values())
    assert any(t["accepted"] for t in saved["layer_tuning"]), saved["layer_tuning"]
    assert len(plain.layer_tuning) == 0
