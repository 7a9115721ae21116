"""`inspect ADAPTER_OR_ROTATIONS`: per-module ‖R − I‖, the heatmap, and the merge-residual plot."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from oftsurgery.cli import cli
from oftsurgery.oft.adapter_io import RotationSet, save_rotations
from oftsurgery.oft.rotation import cayley_exact

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
KINDS = ("q_proj", "v_proj", "down_proj")


def _random_blocks(count: int, b: int, scale: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(count, b, b, generator=g, dtype=torch.float64) * scale
    return cayley_exact(a - a.transpose(-2, -1)).float()


@pytest.fixture()
def rotations_file(tmp_path):
    """Three layers × three kinds, strength growing with the layer; layer 0's v_proj is the identity."""
    blocks = {}
    for layer in range(3):
        for k, kind in enumerate(KINDS):
            parent = "mlp" if kind == "down_proj" else "self_attn"
            name = f"model.layers.{layer}.{parent}.{kind}"
            blocks[name] = (torch.eye(8).expand(4, 8, 8).clone() if (layer, kind) == (0, "v_proj")
                            else _random_blocks(4, 8, 0.02 * (layer + 1), seed=10 * layer + k))
    path = tmp_path / "rot.safetensors"
    save_rotations(RotationSet(blocks, {"parameterization": "cayley"}), path)
    return path, blocks


def test_strength_per_module_matches_frobenius_norm(rotations_file):
    path, blocks = rotations_file
    result = CliRunner().invoke(cli, ["inspect", str(path), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["source"] == "rotations"
    got = {m["name"]: m for m in data["modules"]}
    assert set(got) == set(blocks)
    for name, b in blocks.items():
        expected = torch.linalg.norm((b.double() - torch.eye(8, dtype=torch.float64)).reshape(-1)).item()
        assert got[name]["strength"] == pytest.approx(expected, rel=1e-6, abs=1e-9)
        assert got[name]["layer"] == int(name.split(".")[2])
        assert got[name]["kind"] == name.rsplit(".", 1)[-1]
    assert got["model.layers.0.self_attn.v_proj"]["strength"] == 0.0


def test_table_lists_strongest_first_and_counts_identities(rotations_file):
    path, _ = rotations_file
    result = CliRunner().invoke(cli, ["inspect", str(path)])
    assert result.exit_code == 0, result.output
    rows = [line for line in result.output.splitlines() if line.startswith("model.layers.")]
    values = [float(r.split()[-1]) for r in rows]
    assert values == sorted(values, reverse=True) and len(rows) == 9
    assert "1 module(s) are exactly the identity" in result.output


def test_plot_writes_a_heatmap_png(rotations_file, tmp_path):
    path, _ = rotations_file
    png = tmp_path / "plots" / "rot.png"
    result = CliRunner().invoke(cli, ["inspect", str(path), "--plot", str(png)])
    assert result.exit_code == 0, result.output
    assert png.read_bytes().startswith(PNG_MAGIC)
    import matplotlib.image

    height, width, _ = matplotlib.image.imread(png).shape
    assert width > height > 100


def test_identity_adapter_folder_from_attach(tiny_gptq_dir, tmp_path):
    from oftsurgery.attach import attach_adapter

    attach_adapter(tiny_gptq_dir, tmp_path / "adapter", target_modules=["q_proj", "up_proj"], block_size=32)
    result = CliRunner().invoke(cli, ["inspect", str(tmp_path / "adapter"), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["source"] == "adapter"
    assert sorted({m["kind"] for m in data["modules"]}) == ["q_proj", "up_proj"]
    assert all(m["strength"] == 0.0 for m in data["modules"])


def test_plot_on_a_checkpoint_is_a_usage_error(tiny_gptq_dir, tmp_path):
    result = CliRunner().invoke(cli, ["inspect", str(tiny_gptq_dir), "--plot", str(tmp_path / "x.png")])
    assert result.exit_code == 2
    assert "adapter folder or rotations file" in result.output
    assert not (tmp_path / "x.png").exists()


def test_merge_report_plot(tmp_path):
    from oftsurgery.errors import OftSurgeryError
    from oftsurgery.reporting.plots import plot_merge_report

    layers = [{"name": f"model.layers.{i}.self_attn.{k}", "residual_before": 0.1 * (i + 1),
               "residual_after": 0.02 * (i + 1)} for i in range(4) for k in ("q_proj", "o_proj")]
    report = {"method": "calibrated", "output_format": "GPTQ 4-bit", "layers": layers,
              "summary": {"codes_changed": 0.3, "kept_fraction": 0.8}}
    (tmp_path / "merged").mkdir()
    (tmp_path / "merged" / "merge_report.json").write_text(json.dumps(report))
    out = plot_merge_report(tmp_path / "merged", tmp_path / "residual.png")  # the folder finds its report
    assert out.read_bytes().startswith(PNG_MAGIC)
    with pytest.raises(OftSurgeryError, match="no merged layers"):
        plot_merge_report({"layers": []}, tmp_path / "empty.png")
    assert not (tmp_path / "empty.png").exists()
