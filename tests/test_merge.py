"""The merge: exactness guarantees, loading in gptqmodel/transformers, fidelity vs plain rounding."""

from __future__ import annotations

from dataclasses import replace

import json

import pytest
import torch
from click.testing import CliRunner

from merge_helpers import (all_tensors, assert_bytes_equal, assert_identity_merge, heldout_ids, identity_rotations,
                           random_rotations)
from oftsurgery.cli import cli
from oftsurgery.errors import InvalidAdapterError, OutputPathError, UnsupportedFormatError
from oftsurgery.evaluation.evaluate import load_dequantized_model, load_quantized_model
from oftsurgery.merge import MergeOptions, merge_checkpoint

FAST = dict(calib_tokens=512, seq_len=64, progress=False)


@pytest.fixture(params=["tiny_gptq_dir", "tiny_gptq_asym_descact_dir", "tiny_gptq_v2_dir", "tiny_awq_dir"])
def any_checkpoint(request):
    return request.getfixturevalue(request.param)


@pytest.mark.parametrize("method", ["rtn", "calibrated"])
def test_identity_merge_reproduces_every_tensor_byte_for_byte(any_checkpoint, method, tmp_path):
    rot = identity_rotations(any_checkpoint, tmp_path / "identity.safetensors")
    report = merge_checkpoint(any_checkpoint, rot, tmp_path / "out", MergeOptions(method=method, **FAST))
    assert len(report.layers) == 14
    assert_identity_merge(report, any_checkpoint, tmp_path / "out")  # tests/test_solver.py shows it can fail


def test_untouched_tensors_are_copied_and_targeted_ones_change(tiny_gptq_asym_descact_dir, tmp_path):
    ckpt = tiny_gptq_asym_descact_dir
    rot = random_rotations(ckpt, tmp_path / "r.safetensors", strength=0.05,
                           select=lambda n: n.endswith(("q_proj", "v_proj")) and ".layers.0." in n)
    report = merge_checkpoint(ckpt, rot, tmp_path / "out", MergeOptions(method="calibrated", **FAST))
    assert {l.name for l in report.layers} == {"model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"}
    src, out = all_tensors(ckpt), all_tensors(tmp_path / "out")
    for name in src:
        if name.startswith(("model.layers.0.self_attn.q_proj.", "model.layers.0.self_attn.v_proj.")):
            if name.endswith("qweight"):
                assert not torch.equal(src[name], out[name]), name
            if name.endswith(("g_idx", "qzeros")):  # the grid's groups and zero points are kept
                assert_bytes_equal(src[name], out[name], name)
        else:
            assert_bytes_equal(src[name], out[name], name)


@pytest.mark.parametrize("fixture", ["tiny_gptq_dir", "tiny_awq_dir"])
def test_merged_checkpoint_loads_in_gptqmodel_and_transformers(fixture, request, tmp_path):
    from transformers import AutoModelForCausalLM

    ckpt = request.getfixturevalue(fixture)
    rot = random_rotations(ckpt, tmp_path / "r.safetensors", strength=0.05)
    merge_checkpoint(ckpt, rot, tmp_path / "out", MergeOptions(method="calibrated", **FAST))
    ids = torch.randint(0, 400, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = load_dequantized_model(tmp_path / "out")(input_ids=ids).logits
        base = load_dequantized_model(ckpt)(input_ids=ids).logits
        via_gptqmodel = load_quantized_model(tmp_path / "out")(input_ids=ids).logits.float()
        via_transformers = AutoModelForCausalLM.from_pretrained(tmp_path / "out", device_map="cpu")(input_ids=ids).logits.float()
    change = (reference - base).abs().max()
    # the kernels run in fp16; their error is far below what the merge changed
    for logits in (via_gptqmodel, via_transformers):
        err = (logits - reference).abs().max()
        assert err < 2e-2 and err < change / 5, (float(err), float(change))


def _logits_gap(merged_dir, target_model, ids):
    with torch.no_grad():
        merged = load_dequantized_model(merged_dir)(input_ids=ids).logits
        return float((merged - target_model(input_ids=ids).logits).pow(2).mean())


def test_calibrated_merge_tracks_the_adapted_model_better_than_rounding(tiny_gptq_dir, tmp_path):
    """Against the attached model computed independently (dense W·Rᵀ in float), on unseen tokens."""
    from oftsurgery.oft.adapter_io import load_rotations

    rot = random_rotations(tiny_gptq_dir, tmp_path / "r.safetensors", strength=0.02)
    rotations = load_rotations(rot)
    attached = load_dequantized_model(tiny_gptq_dir)
    with torch.no_grad():
        for name, blocks in rotations.blocks.items():
            lin = attached.get_submodule(name)
            lin.weight.copy_(rotations.merged_weight(name, lin.weight))
    reports = {}
    for method in ("rtn", "calibrated"):
        reports[method] = merge_checkpoint(tiny_gptq_dir, rot, tmp_path / method,
                                           MergeOptions(method=method, calib_tokens=2048, seq_len=64, progress=False))
    ids = heldout_ids(tiny_gptq_dir, 2, 64)
    base_gap = _logits_gap(tiny_gptq_dir, attached, ids)
    rtn_gap = _logits_gap(tmp_path / "rtn", attached, ids)
    cal_gap = _logits_gap(tmp_path / "calibrated", attached, ids)
    assert cal_gap < rtn_gap < base_gap
    assert reports["calibrated"].mean_residual_after < reports["rtn"].mean_residual_after


def test_same_inputs_give_the_same_bytes(tiny_gptq_dir, tmp_path):
    rot = random_rotations(tiny_gptq_dir, tmp_path / "r.safetensors", strength=0.03)
    for out in ("a", "b"):
        merge_checkpoint(tiny_gptq_dir, rot, tmp_path / out, MergeOptions(method="calibrated", **FAST))
    for file in ("model.safetensors", "config.json", "quantize_config.json"):
        assert (tmp_path / "a" / file).read_bytes() == (tmp_path / "b" / file).read_bytes(), file


def test_gptq_to_awq_and_back_keeps_the_weights_exactly(tiny_gptq_dir, tmp_path):
    rot = identity_rotations(tiny_gptq_dir, tmp_path / "id.safetensors")
    merge_checkpoint(tiny_gptq_dir, rot, tmp_path / "awq", MergeOptions(method="rtn", requant="awq", **FAST))
    config = json.loads((tmp_path / "awq" / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "awq" and config["version"] == "gemm" and not (tmp_path / "awq" / "quantize_config.json").exists()
    rot_awq = identity_rotations(tmp_path / "awq", tmp_path / "id2.safetensors")
    merge_checkpoint(tmp_path / "awq", rot_awq, tmp_path / "gptq", MergeOptions(method="rtn", requant="gptq", **FAST))
    src, awq, back = (load_dequantized_model(p) for p in (tiny_gptq_dir, tmp_path / "awq", tmp_path / "gptq"))
    for (name, a), b, c in zip(src.state_dict().items(), awq.state_dict().values(), back.state_dict().values()):
        assert torch.equal(a, b) and torch.equal(a, c), name
    ids = torch.randint(0, 400, (1, 16))
    with torch.no_grad():
        logits = load_quantized_model(tmp_path / "awq")(input_ids=ids).logits.float()
        assert (logits - src(input_ids=ids).logits).abs().max() < 2e-2


def test_requant_awq_refuses_what_awq_cannot_hold(tiny_gptq_asym_descact_dir, tmp_path):
    rot = identity_rotations(tiny_gptq_asym_descact_dir, tmp_path / "id.safetensors")
    with pytest.raises(UnsupportedFormatError, match="desc_act"):
        merge_checkpoint(tiny_gptq_asym_descact_dir, rot, tmp_path / "out", MergeOptions(requant="awq", **FAST))
    assert not (tmp_path / "out").exists()


def test_adapter_for_another_model_is_refused(tiny_gptq_dir, tmp_path):
    from oftsurgery.oft.adapter_io import RotationSet, save_rotations

    save_rotations(RotationSet({"model.layers.7.mlp.up_proj": torch.eye(32).expand(4, 32, 32).clone()}), tmp_path / "x.safetensors")
    with pytest.raises(InvalidAdapterError, match="does not have"):
        merge_checkpoint(tiny_gptq_dir, tmp_path / "x.safetensors", tmp_path / "out")
    save_rotations(RotationSet({"model.layers.0.mlp.up_proj": torch.eye(32).expand(3, 32, 32).clone()}), tmp_path / "y.safetensors")
    with pytest.raises(InvalidAdapterError, match="does not fit"):
        merge_checkpoint(tiny_gptq_dir, tmp_path / "y.safetensors", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_existing_output_needs_overwrite(tiny_gptq_dir, tmp_path):
    rot = identity_rotations(tiny_gptq_dir, tmp_path / "id.safetensors")
    (tmp_path / "out").mkdir()
    with pytest.raises(OutputPathError, match="--overwrite"):
        merge_checkpoint(tiny_gptq_dir, rot, tmp_path / "out", MergeOptions(method="rtn", **FAST))
    merge_checkpoint(tiny_gptq_dir, rot, tmp_path / "out", MergeOptions(method="rtn", overwrite=True, **FAST))
    assert (tmp_path / "out" / "model.safetensors").exists()


def test_merge_cli_writes_checkpoint_card_and_report(tiny_gptq_dir, tmp_path):
    rot = random_rotations(tiny_gptq_dir, tmp_path / "r.safetensors", strength=0.03)
    result = CliRunner().invoke(cli, ["merge", str(tiny_gptq_dir), str(rot), "--out", str(tmp_path / "m"),
                                      "--calib-tokens", "512", "--seq-len", "64", "-q"])
    assert result.exit_code == 0, result.output
    assert "codes changed" in result.output
    out = tmp_path / "m"
    report = json.loads((out / "merge_report.json").read_text())
    assert len(report["layers"]) == 14 and report["method"] == "calibrated"
    assert all(0 <= l["codes_changed"] <= 1 and 0 <= l["scales_changed"] <= 1 for l in report["layers"])
    assert "scales refitted" in result.output
    card = (out / "README.md").read_text()
    assert card.startswith("---") and "oftsurgery" in card
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json", "quantize_config.json"):
        assert (out / name).exists(), name
    # inputs untouched: a second merge of the same inputs still works and the source still loads
    assert CliRunner().invoke(cli, ["merge", str(tiny_gptq_dir), str(rot), "--out", str(out), "-q"]).exit_code == 6


def test_nothing_changed_warning_needs_both_codes_and_scales_unchanged(tiny_gptq_dir, tmp_path):
    """A gentle fine-tune can live in refitted scales with almost no codes changed: no false alarm."""
    from oftsurgery.merge.report import LayerReport, MergeReport

    def report(codes, scales):
        layer = LayerReport(name="l", mode="compensated", codes_changed=codes, residual_before=0.02,
                            residual_after=0.01, rotation_strength=0.3, scales_changed=scales)
        return MergeReport(checkpoint="c", adapter="a", output="o", method="calibrated", source_format="gptq",
                           output_format="gptq", calibration=None, calib_tokens=0, residual_space="activations",
                           layers=[layer])

    assert any("probably lost" in w for w in report(0.0, 0.0).warnings())
    assert not any("probably lost" in w for w in report(0.0002, 0.4).warnings())
    assert not any("probably lost" in w for w in report(0.01, 0.0).warnings())
    # and end to end: an identity adapter changes nothing, and the CLI says so
    rot = identity_rotations(tiny_gptq_dir, tmp_path / "id.safetensors")
    result = CliRunner().invoke(cli, ["merge", str(tiny_gptq_dir), str(rot), "--out", str(tmp_path / "m"),
                                      "--calib-tokens", "512", "--seq-len", "64", "-q"])
    assert result.exit_code == 0, result.output
    assert "probably lost" in result.output and "0.000% of the scales" in result.output


def test_report_says_per_layer_how_it_was_solved_and_when_the_text_ran_short(tiny_gptq_dir, tmp_path):
    """Per layer: the solver stages accepted, the kernel and the damping; one warning when the
    calibration text holds fewer rows than --calib-tokens asks for; the remedy fits the method."""
    from oftsurgery.texts import builtin_text

    rot = random_rotations(tiny_gptq_dir, tmp_path / "r.safetensors", strength=0.05)
    short = tmp_path / "short.txt"
    short.write_text(builtin_text("english", "calib", max_chars=6000))
    report = merge_checkpoint(tiny_gptq_dir, rot, tmp_path / "out",
                              MergeOptions(calib=str(short), calib_tokens=1 << 20, seq_len=64, progress=False))
    saved = json.loads((tmp_path / "out" / "merge_report.json").read_text())
    for layer in saved["layers"]:
        if layer["mode"] == "compensated":
            assert layer["stages"][0] == "gptq" and layer["kernel"] == "torch" and layer["damp"] == 0.01
        else:
            assert layer["stages"] == [layer["mode"]]
    assert report.calib_tokens < report.calib_tokens_requested == 1 << 20
    assert [w for w in report.warnings() if "calibration text holds only" in w] == [
        f"WARNING: the calibration text holds only {report.calib_tokens} tokens in whole rows, fewer than the "
        f"{1 << 20} asked for (--calib-tokens); pass a longer --calib text."]
    enough = merge_checkpoint(tiny_gptq_dir, rot, tmp_path / "out2", MergeOptions(**FAST))
    assert not any("calibration text holds only" in w for w in enough.warnings())
    rtn = merge_checkpoint(tiny_gptq_dir, rot, tmp_path / "out3", MergeOptions(method="rtn", progress=False))
    assert all(l.stages in (["rtn"], ["kept"]) and l.kernel is None for l in rtn.layers)
    assert "use --method calibrated" in rtn._remedy() and "--calib FILE" in report._remedy()
    assert "--residual-rank" in report._remedy()
    assert "--tune-steps 20" in report._remedy()  # a CPU merge does not tune by default: the remedy says so
    assert "--tune-steps" not in replace(report, tune_steps=20)._remedy()
    # where the time went: each phase of the loop and each solver stage, within the merge's own clock
    phases = saved["phase_seconds"]
    for phase in ("runner check", "embeddings", "build layer", "statistics", "solve", "solve/gptq",
                  "solve/refine_codes", "solve/held-out choice", "forward", "read+unpack", "pack (writer thread)"):
        assert phases.get(phase, 0) > 0, phase
    top = sum(v for k, v in phases.items() if "/" not in k and k != "pack (writer thread)")
    assert top <= saved["seconds"] and phases["solve/gptq"] <= phases["solve"]
    assert "solve/gptq" not in rtn.phase_seconds and rtn.phase_seconds.get("read+unpack", 0) > 0


# -- the calibration forward's dtype ------------------------------------------------------------------

def test_the_forward_dtype_is_float32_on_the_cpu_and_the_checkpoints_half_precision_on_a_gpu(monkeypatch):
    from oftsurgery.merge.calibrated_loop import _forward_dtype

    assert _forward_dtype("auto", "cpu", {"dtype": "bfloat16"}) == torch.float32
    assert _forward_dtype("bfloat16", "cpu", {}) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert _forward_dtype("auto", "cuda:0", {"dtype": "bfloat16"}) == torch.bfloat16
    assert _forward_dtype("auto", "cuda", {"torch_dtype": "float16"}) == torch.float16
    assert _forward_dtype("auto", "cuda", {"dtype": "float32"}) == torch.float16  # what GPTQ kernels compute in
    assert _forward_dtype("float32", "cuda", {"dtype": "bfloat16"}) == torch.float32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert _forward_dtype("auto", "cuda", {"dtype": "bfloat16"}) == torch.float16


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_a_half_precision_forward_merges_about_as_well(dtype, tiny_gptq_dir, tmp_path):
    """The layers run in half precision (what a GPU does by default), the statistics stay float32:
    the same modes, output errors within a few percent of the float32 forward's."""
    rot = random_rotations(tiny_gptq_dir, tmp_path / "r.safetensors", strength=0.05)
    full = merge_checkpoint(tiny_gptq_dir, rot, tmp_path / "f32", MergeOptions(**FAST))
    half = merge_checkpoint(tiny_gptq_dir, rot, tmp_path / dtype, MergeOptions(forward_dtype=dtype, **FAST))
    assert (full.forward_dtype, half.forward_dtype) == ("float32", dtype)
    assert json.loads((tmp_path / dtype / "merge_report.json").read_text())["forward_dtype"] == dtype
    # on 448 fitted tokens round-to-nearest wins a few held-out choices either way; nothing else falls back
    assert all(text.startswith("rtn:") for _, text in half.fallbacks + full.fallbacks)
    assert half.mean_residual_after == pytest.approx(full.mean_residual_after, rel=0.05)
    assert half.codes_changed == pytest.approx(full.codes_changed, rel=0.05)


def test_a_half_precision_forward_that_overflows_stops_the_merge(monkeypatch, tiny_gptq_dir, tmp_path):
    from oftsurgery.errors import MergeError
    from oftsurgery.merge.calibration.runner import LayerwiseModel

    real = LayerwiseModel.forward_layer

    def overflowing(self, layer, index, hidden):  # the merge's float16 forward only, not the float32 self-check
        out = real(self, layer, index, hidden)
        return out * torch.inf if hidden.dtype == torch.float16 else out

    monkeypatch.setattr(LayerwiseModel, "forward_layer", overflowing)
    rot = random_rotations(tiny_gptq_dir, tmp_path / "r.safetensors", strength=0.05)
    with pytest.raises(MergeError, match=r"Decoder layer 0's output overflows float16 .* --forward-dtype float32"):
        merge_checkpoint(tiny_gptq_dir, rot, tmp_path / "out", MergeOptions(forward_dtype="float16", **FAST))
    assert not (tmp_path / "out").exists()
