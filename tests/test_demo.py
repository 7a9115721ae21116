"""The demo pipeline on the tiny model: every step wired, every artifact real, a second run reuses them.

Fidelity on SmolLM2 is the bench's business; here the pipeline's plumbing is checked against
independent evidence: files reloaded from disk, the Hub server's stored bytes, the merge report.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from click.testing import CliRunner

from oftsurgery.demo.run import PRESETS, STATE_FILE, SUMMARY_FILE, _State, run_demo

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def demo_run(tiny_fp_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("demo")
    result = run_demo(workdir, preset="tiny", base_fp16=tiny_fp_dir, quiet=True)
    return workdir, result


def test_every_step_runs_once_and_leaves_its_artifact(demo_run):
    workdir, result = demo_run
    names = [s.name for s in result.steps]
    assert names == ["fp16", "quantize", "attach", "train", "extract", "merge", "verify", "plots", "push"]
    assert not any(s.reused for s in result.steps)
    for step in result.steps:
        assert Path(step.artifact).exists(), step
    assert (workdir / "base-gptq" / "quantize_config.json").is_file()
    assert (workdir / "adapter-trained" / "adapter_config.json").is_file()
    assert (workdir / "merged-gptq" / "merge_report.json").is_file()
    summary = json.loads((workdir / SUMMARY_FILE).read_text())
    assert summary["fidelity"] == result.fidelity


def test_training_changed_the_model_and_the_merge_kept_some_of_it(demo_run):
    workdir, result = demo_run
    from oftsurgery.reporting.rotation_summary import summarize_rotations

    strengths = [m.strength for m in summarize_rotations(workdir / "rotations.safetensors").modules]
    assert len(strengths) == 14 and min(strengths) > 0  # every targeted module moved off the identity
    f = result.fidelity
    assert f["nll_attached"] < f["nll_base"]  # held-out text: the fine-tune generalises a little
    assert math.isfinite(f["retention"]) and f["retention"] > 0
    report = json.loads((workdir / "merged-gptq" / "merge_report.json").read_text())
    assert report["method"] == "calibrated" and len(report["layers"]) == 14


def test_the_pushed_repo_holds_the_merged_checkpoint_byte_for_byte(demo_run):
    workdir, result = demo_run
    push = result.step("push").figures
    assert push["repo_id"] == PRESETS["tiny"].repo_id
    hosted = Path(result.step("push").artifact)
    merged = workdir / "merged-gptq"
    for file in merged.iterdir():
        assert (hosted / file.name).read_bytes() == file.read_bytes(), file.name


def test_plots_are_pngs_drawn_from_this_run(demo_run):
    workdir, result = demo_run
    plots = result.step("plots").figures
    for key in ("rotation_strength", "merge_residual"):
        data = Path(plots[key]).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000


def test_second_run_reuses_everything_but_the_push(demo_run, tiny_fp_dir):
    workdir, first = demo_run
    merged_file = workdir / "merged-gptq" / "model.safetensors"
    stamp = merged_file.stat().st_mtime_ns
    second = run_demo(workdir, preset="tiny", base_fp16=tiny_fp_dir, quiet=True)
    reused = {s.name: s.reused for s in second.steps}
    assert reused == {**{n: True for n in reused if n != "push"}, "push": False}
    assert merged_file.stat().st_mtime_ns == stamp
    assert second.fidelity == first.fidelity


def test_a_missing_artifact_redoes_that_step_and_every_later_one(demo_run, tiny_fp_dir):
    workdir, _ = demo_run
    (workdir / "plots" / "merge-residual.png").unlink()
    again = run_demo(workdir, preset="tiny", base_fp16=tiny_fp_dir, quiet=True)
    redone = [s.name for s in again.steps if not s.reused]
    assert redone == ["plots", "push"]
    assert (workdir / "plots" / "merge-residual.png").read_bytes().startswith(PNG_MAGIC)


def test_state_of_another_config_is_not_reused(tmp_path):
    state = _State(tmp_path, PRESETS["tiny"])
    from oftsurgery.demo.run import StepRecord

    state.record(StepRecord("quantize", "q", str(tmp_path), 1.0))
    assert _State(tmp_path, PRESETS["tiny"]).done("quantize") is not None
    assert _State(tmp_path, PRESETS["smollm2"]).done("quantize") is None
    assert json.loads((tmp_path / STATE_FILE).read_text())["steps"]["quantize"]["seconds"] == 1.0


def test_demo_command_help_names_its_options():
    from oftsurgery.cli import cli

    result = CliRunner().invoke(cli, ["demo", "--help"])
    assert result.exit_code == 0
    for option in ("--workdir", "--tiny", "--quiet"):
        assert option in result.output
