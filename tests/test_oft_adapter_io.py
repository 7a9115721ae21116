"""Adapter files: old PEFT generations (built here from the published formulas), rotations files, CLI."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from oftsurgery.cli import cli
from oftsurgery.errors import InvalidAdapterError, OutputPathError
from oftsurgery.oft import rotation as rot
from oftsurgery.oft.adapter_io import load_rotations, read_peft_adapter, save_rotations

PATH = "model.layers.0.self_attn.q_proj"


def write_adapter(folder, config, tensors):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "adapter_model.safetensors"),
              metadata={"format": "pt"})
    return folder


def test_peft_0_15_oft_r_and_oft_s(tmp_path):
    """0.14-0.15: R = (I − S)(I + S)⁻¹, S = (A − Aᵀ)/2 on the input side; W' = s ⊙ (W·Rᵀ)."""
    torch.manual_seed(0)
    in_features, out_features, r = 24, 10, 3
    b = in_features // r
    raw = torch.randn(r, b, b) * 0.2
    scale = 1 + 0.1 * torch.randn(out_features, 1)
    folder = write_adapter(tmp_path / "a015", {
        "peft_type": "OFT", "r": r, "oft_block_size": 0, "module_dropout": 0.0, "coft": False, "eps": 6e-5,
        "block_share": False, "target_modules": ["q_proj"], "init_weights": True,
    }, {f"base_model.model.{PATH}.oft_r": raw, f"base_model.model.{PATH}.oft_s": scale})
    with pytest.warns(UserWarning, match="oft_s"):
        rotations = load_rotations(folder)
    eye = torch.eye(b, dtype=torch.float64)
    s = 0.5 * (raw.double() - raw.double().transpose(1, 2))
    expected_blocks = torch.stack([(eye - s[i]) @ torch.inverse(eye + s[i]) for i in range(r)])
    torch.testing.assert_close(rotations.blocks[PATH].double(), expected_blocks, rtol=1e-5, atol=1e-6)
    assert rotations.metadata["source_generation"] == "peft-0.14-0.15" and not rotations.output_side
    # 0.15 forward: F.linear(x, ((block_diag(R) @ Wᵀ)ᵀ) * s, bias)
    weight = torch.randn(out_features, in_features, dtype=torch.float64)
    dense = torch.block_diag(*expected_blocks)
    expected_weight = (dense @ weight.T).T * scale.double()
    torch.testing.assert_close(rotations.merged_weight(PATH, weight), expected_weight, rtol=1e-5, atol=1e-6)


def test_peft_0_13_output_side(tmp_path):
    """≤0.13: oft_r (r, ceil(out/r), ·); y = (x·Wᵀ)·R[:out,:out] + bias, i.e. W' = R[:out,:out]ᵀ·W."""
    torch.manual_seed(1)
    in_features, out_features, r = 12, 10, 4  # 10 is not divisible by 4: the last block is truncated
    b = math.ceil(out_features / r)
    raw = torch.randn(r, b, b) * 0.3
    folder = write_adapter(tmp_path / "a013", {
        "peft_type": "OFT", "r": r, "module_dropout": 0.0, "coft": False, "eps": 6e-5, "block_share": False,
        "target_modules": ["q_proj"], "init_weights": True,
    }, {f"base_model.model.{PATH}.oft_r": raw})
    rotations = load_rotations(folder)
    assert PATH in rotations.output_side and rotations.metadata["source_generation"] == "peft<=0.13"
    eye = torch.eye(b, dtype=torch.float64)
    s = 0.5 * (raw.double() - raw.double().transpose(1, 2))
    delta = torch.block_diag(*[(eye - s[i]) @ torch.inverse(eye + s[i]) for i in range(r)])[:out_features, :out_features]
    weight = torch.randn(out_features, in_features, dtype=torch.float64)
    x = torch.randn(5, in_features, dtype=torch.float64)
    merged = rotations.merged_weight(PATH, weight)
    torch.testing.assert_close(x @ merged.T, (x @ weight.T) @ delta, rtol=1e-5, atol=1e-6)


def test_peft_0_13_coft_eps_scaling(tmp_path):
    """≤0.15 COFT: eps is scaled by ceil(out/r)² and projects the full oft_r matrix."""
    raw = torch.randn(2, 4, 4)
    eps = 0.01
    folder = write_adapter(tmp_path / "c013", {"peft_type": "OFT", "r": 2, "coft": True, "eps": eps,
                                               "block_share": False, "target_modules": ["q_proj"]},
                           {f"base_model.model.{PATH}.oft_r": raw})
    rotations = load_rotations(folder)
    radius = eps * 4 * 4 / math.sqrt(2)
    projected = raw * (radius / torch.linalg.matrix_norm(raw))[:, None, None]
    torch.testing.assert_close(rotations.blocks[PATH], rot.legacy_cayley(projected))


def test_peft_0_17_neumann_series_by_missing_version(tmp_path):
    params = torch.randn(2, 6) * 0.2
    base_config = {"peft_type": "OFT", "r": 0, "oft_block_size": 4, "use_cayley_neumann": True,
                   "num_cayley_neumann_terms": 5, "coft": False, "eps": 6e-5, "block_share": False,
                   "target_modules": ["q_proj"]}
    old = load_rotations(write_adapter(tmp_path / "a017", base_config,
                                       {f"base_model.model.{PATH}.oft_R.weight": params}))
    new = load_rotations(write_adapter(tmp_path / "a018", dict(base_config, peft_version="0.18.1"),
                                       {f"base_model.model.{PATH}.oft_R.weight": params}))
    q = rot.skew_from_params(params, 4)
    eye = torch.eye(4)
    torch.testing.assert_close(old.blocks[PATH], eye + 2 * (q + q @ q + q @ q @ q + q @ q @ q @ q))
    torch.testing.assert_close(new.blocks[PATH], eye + 2 * (q + q @ q + q @ q @ q) + q @ q @ q @ q)
    assert old.metadata["source_generation"] == "peft-0.16-0.17"


def test_rotations_file_round_trip_and_validation(tmp_path):
    torch.manual_seed(2)
    params = torch.randn(3, 28) * 0.1
    folder = write_adapter(tmp_path / "cur", {"peft_type": "OFT", "r": 0, "oft_block_size": 8,
                                              "use_cayley_neumann": False, "peft_version": "0.21.2",
                                              "base_model_name_or_path": "tiny", "target_modules": ["q_proj"]},
                           {f"base_model.model.{PATH}.oft_R.weight": params})
    result = CliRunner().invoke(cli, ["extract", str(folder), "--out", str(tmp_path / "rot.safetensors")])
    assert result.exit_code == 0, result.output
    assert PATH in result.output and "||R-I||" in result.output
    stored = load_file(str(tmp_path / "rot.safetensors"))
    assert stored[PATH + ".rotation"].dtype == torch.float32 and stored[PATH + ".rotation"].shape == (3, 8, 8)
    back = load_rotations(tmp_path / "rot.safetensors")
    assert torch.equal(back.blocks[PATH], rot.cayley_exact(rot.skew_from_params(params, 8)))
    assert back.metadata["base_model"] == "tiny" and back.metadata["parameterization"] == "cayley"
    assert back.metadata["block_sizes"] == {PATH: 8}
    # refuses to overwrite, then overwrites when asked
    again = CliRunner().invoke(cli, ["extract", str(folder), "--out", str(tmp_path / "rot.safetensors")])
    assert again.exit_code != 0 and "overwrite" in again.output
    assert CliRunner().invoke(cli, ["extract", str(folder), "--out", str(tmp_path / "rot.safetensors"),
                                    "--overwrite"]).exit_code == 0
    # corrupt files are refused
    bad = dict(back.blocks)
    bad[PATH] = bad[PATH] * 1.5
    save_rotations(type(back)(bad, back.metadata), tmp_path / "bad.safetensors")
    with pytest.raises(InvalidAdapterError, match="not a rotation"):
        load_rotations(tmp_path / "bad.safetensors")
    nan = {PATH: back.blocks[PATH].clone()}
    nan[PATH][0, 0, 0] = float("nan")
    with pytest.raises(InvalidAdapterError, match="NaN"):
        save_rotations(type(back)(nan, back.metadata), tmp_path / "nan.safetensors")


def test_pickle_and_foreign_adapters_refused(tmp_path):
    (tmp_path / "lora").mkdir()
    (tmp_path / "lora" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    with pytest.raises(InvalidAdapterError, match="not an OFT adapter"):
        read_peft_adapter(tmp_path / "lora")


# ---- attach on a real checkpoint ----------------------------------------------------------------


def test_attach_cli_identity_and_from_rotations(tiny_gptq_dir, tmp_path):
    runner = CliRunner()
    out = tmp_path / "adapter"
    result = runner.invoke(cli, ["attach", str(tiny_gptq_dir), "--out", str(out), "--target-modules",
                                 "q_proj,down_proj", "--block-size", "32", "--no-cayley-neumann"])
    assert result.exit_code == 0, result.output
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "OFT" and config["oft_block_size"] == 32 and config["r"] == 0
    assert config["use_cayley_neumann"] is False and sorted(config["target_modules"]) == ["down_proj", "q_proj"]
    tensors = load_file(str(out / "adapter_model.safetensors"))
    assert set(tensors) == {f"base_model.model.model.layers.{i}.{m}.oft_R.weight"
                            for i in (0, 1) for m in ("self_attn.q_proj", "mlp.down_proj")}
    assert all(torch.count_nonzero(t) == 0 for t in tensors.values())
    assert tensors["base_model.model.model.layers.0.mlp.down_proj.oft_R.weight"].shape == (256 // 32, 496)
    again = runner.invoke(cli, ["attach", str(tiny_gptq_dir), "--out", str(out)])
    assert again.exit_code != 0 and "overwrite" in again.output
    assert runner.invoke(cli, ["attach", str(tiny_gptq_dir), "--out", str(out), "--r", "2",
                               "--block-size", "4"]).exit_code != 0

    # rotations in, PEFT parameters out: exact Cayley inverts exactly; Neumann is fitted
    torch.manual_seed(3)
    trained = {k: torch.randn_like(v) * 0.05 for k, v in tensors.items()}
    save_file(trained, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    rotations_file = tmp_path / "rot.safetensors"
    assert runner.invoke(cli, ["extract", str(out), "--out", str(rotations_file)]).exit_code == 0
    exact = tmp_path / "exact"
    result = runner.invoke(cli, ["attach", str(tiny_gptq_dir), "--out", str(exact), "--from", str(rotations_file),
                                 "--no-cayley-neumann"])
    assert result.exit_code == 0, result.output
    converted = load_file(str(exact / "adapter_model.safetensors"))
    assert set(converted) == set(trained)
    for key in trained:
        torch.testing.assert_close(converted[key], trained[key], rtol=1e-4, atol=1e-6)
    from oftsurgery.attach import attach_adapter

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = attach_adapter(tiny_gptq_dir, tmp_path / "neumann", from_path=out, use_cayley_neumann=True,
                             neumann_terms=8)
    assert 0 < fit.max_fit_residual < 1e-4  # a truncated series cannot be exactly orthogonal
    source = load_rotations(out)
    fitted = load_rotations(tmp_path / "neumann")
    for name, blocks in source.blocks.items():
        error = (fitted.blocks[name] - blocks).abs().max().item()
        assert error <= fit.max_fit_residual + 1e-6


def test_attach_library_refuses_output_inside_input(tiny_gptq_dir):
    from oftsurgery.attach import attach_adapter

    with pytest.raises(OutputPathError):
        attach_adapter(tiny_gptq_dir, tiny_gptq_dir / "adapter")
