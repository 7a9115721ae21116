"""verify: the three models, retention arithmetic, and the two ways of attaching agreeing."""

from __future__ import annotations

import json
import math

import torch
from click.testing import CliRunner

from merge_helpers import random_rotations
from oftsurgery.cli import cli
from oftsurgery.evaluation.evaluate import load_quantized_model, retention
from oftsurgery.merge import MergeOptions, merge_checkpoint
from oftsurgery.oft.adapter_io import load_rotations, save_rotations, write_peft_adapter
from oftsurgery.oft.config import OFTOptions
from oftsurgery.verify import attach_for_evaluation


def test_retention_formula():
    assert retention(3.0, 2.0, 2.0) == 1.0
    assert retention(3.0, 2.0, 3.0) == 0.0
    assert retention(3.0, 2.0, 2.5) == 0.5
    assert math.isnan(retention(2.0, 2.0, 2.0))


def test_adapter_folder_and_its_rotations_file_attach_identically(tiny_gptq_dir, tmp_path):
    g = torch.Generator().manual_seed(0)
    params = {f"model.layers.{i}.self_attn.{k}": torch.randn(4, 32 * 31 // 2, generator=g) * 0.05
              for i in range(2) for k in ("q_proj", "v_proj")}
    options = OFTOptions(r=0, oft_block_size=32, use_cayley_neumann=False, target_modules=["q_proj", "v_proj"],
                         peft_version="0.21.2")
    write_peft_adapter(tmp_path / "adapter", options, params)
    save_rotations(load_rotations(tmp_path / "adapter"), tmp_path / "rot.safetensors")
    ids = torch.randint(3, 400, (1, 32), generator=g)
    logits = []
    for adapter in (tmp_path / "adapter", tmp_path / "rot.safetensors", None):
        model = load_quantized_model(tiny_gptq_dir)
        if adapter is not None:
            assert attach_for_evaluation(model, adapter) == 4
        with torch.no_grad():
            logits.append(model(input_ids=ids).logits.float())
    wrappers, hooks, base = logits
    assert (wrappers - hooks).abs().max() < 1e-3
    assert (wrappers - base).abs().max() > 1e-2


def test_verify_cli_reports_three_models(tiny_gptq_dir, tmp_path):
    rot = random_rotations(tiny_gptq_dir, tmp_path / "r.safetensors", strength=0.05)
    merge_checkpoint(tiny_gptq_dir, rot, tmp_path / "m", MergeOptions(calib_tokens=512, seq_len=64, progress=False))
    result = CliRunner().invoke(cli, ["verify", str(tmp_path / "m"), "--base", str(tiny_gptq_dir), "--adapter", str(rot),
                                      "--tokens", "256", "--seq-len", "64", "--json"])
    assert result.exit_code == 0, result.output
    figures = json.loads(result.stdout)  # stdout is only our JSON; library chatter goes to stderr
    for key in ("ppl_base", "ppl_attached", "ppl_merged", "retention", "max_logit_diff"):
        assert key in figures, key
        assert math.isfinite(figures[key]), (key, figures[key])  # retention too: the adapter moved the loss
    assert figures["eval_tokens"] == 256
    expected = (figures["nll_base"] - figures["nll_merged"]) / (figures["nll_base"] - figures["nll_attached"])
    assert abs(figures["retention"] - expected) < 1e-9
