"""`--device`: auto by default, resolved once, and a device torch cannot use is refused before any work."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from merge_helpers import random_rotations
from oftsurgery.cli import cli
from oftsurgery.device import resolve_device
from oftsurgery.errors import MergeError


def test_auto_is_the_cpu_without_cuda_and_cpu_is_cpu():
    if torch.cuda.is_available():
        assert resolve_device("auto").type == "cuda"
    else:
        assert resolve_device("auto") == torch.device("cpu")
        assert resolve_device(None) == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(" CPU ".strip().lower()) == torch.device("cpu")


@pytest.mark.parametrize("spec,words", [
    ("tpu", "not a device"),
    ("gpu", "not a device"),
    ("cuda:x", "not a device"),
    ("meta", "not supported"),
    ("mps", "not supported"),
])
def test_unusable_device_names_are_refused(spec, words):
    with pytest.raises(MergeError, match=words):
        resolve_device(spec, MergeError)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
@pytest.mark.parametrize("spec", ["cuda", "cuda:0"])
def test_cuda_without_cuda_is_refused(spec):
    with pytest.raises(MergeError, match="no usable CUDA GPU"):
        resolve_device(spec, MergeError)


def test_a_gpu_index_beyond_the_machine_is_refused(monkeypatch):
    """cuda:7 on a one-GPU machine (CUDA faked as present: the check runs before any allocation)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    with pytest.raises(MergeError, match=r"names GPU 7, but this machine has 1 \(cuda:0 to cuda:0\)"):
        resolve_device("cuda:7", MergeError)


@pytest.mark.parametrize("method", ["rtn", "calibrated"])
@pytest.mark.parametrize("device", ["tpu", "cuda:7"])
def test_merge_refuses_a_bad_device_before_any_work(method, device, tiny_gptq_dir, tmp_path):
    rot = random_rotations(tiny_gptq_dir, tmp_path / "r.safetensors", strength=0.03)
    out = tmp_path / "merged"
    result = CliRunner().invoke(cli, ["merge", str(tiny_gptq_dir), str(rot), "--out", str(out), "--method", method,
                                      "--device", device, "-q"])
    assert result.exit_code == MergeError.exit_code, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and "--device" in errors[0], result.output
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["r.safetensors"]


def test_merge_defaults_to_auto_and_records_the_result(tiny_gptq_dir, tmp_path):
    from oftsurgery.merge import MergeOptions, merge_checkpoint

    assert MergeOptions().device == "auto"
    rot = random_rotations(tiny_gptq_dir, tmp_path / "r.safetensors", strength=0.03)
    report = merge_checkpoint(tiny_gptq_dir, rot, tmp_path / "out", MergeOptions(method="rtn", progress=False))
    assert len(report.layers) == 14
    assert "--device" in CliRunner().invoke(cli, ["merge", "--help"]).output
    assert "default: auto" in CliRunner().invoke(cli, ["merge", "--help"]).output
