"""The serving contract: which kernel family vLLM and transformers load a checkpoint with, and why."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from merge_helpers import identity_rotations
from oftsurgery.cli import cli
from oftsurgery.merge import MergeOptions, merge_checkpoint
from oftsurgery.quant.config import parse_quant_config
from oftsurgery.reporting.serving import marlin_lost_warnings, serving_contract, transformers_kernel, vllm_kernel

# a 7B-shaped Llama decoder layer: in/out features as (in, out)
LLAMA_7B = {
    "model.layers.0.self_attn.q_proj": (4096, 4096), "model.layers.0.self_attn.k_proj": (4096, 4096),
    "model.layers.0.self_attn.v_proj": (4096, 4096), "model.layers.0.self_attn.o_proj": (4096, 4096),
    "model.layers.0.mlp.gate_proj": (4096, 11008), "model.layers.0.mlp.up_proj": (4096, 11008),
    "model.layers.0.mlp.down_proj": (11008, 4096),
}


def gptq(bits=4, group_size=128, sym=True, fmt="gptq", desc_act=False):
    return parse_quant_config({"quant_method": "gptq", "bits": bits, "group_size": group_size, "sym": sym,
                               "desc_act": desc_act, "checkpoint_format": fmt})


def awq(group_size=128):
    return parse_quant_config({"quant_method": "awq", "bits": 4, "group_size": group_size, "zero_point": True,
                               "version": "gemm"})


@pytest.mark.parametrize("config, kernel, marlin", [
    (gptq(4, 128, True), "gptq_marlin", True),
    (gptq(8, 32, True), "gptq_marlin", True),
    (gptq(4, -1, True, desc_act=True), "gptq_marlin", True),
    (gptq(4, 128, False), "gptq", False),  # Marlin's GPTQ types are symmetric only
    (gptq(3, 128, True), "gptq", False),
    (gptq(2, 64, True), "gptq", False),
    (awq(128), "awq_marlin", True),
    (awq(64), "awq_marlin", True),
])
def test_vllm_kernel_family_by_config(config, kernel, marlin):
    choice = vllm_kernel(config, LLAMA_7B)
    assert (choice.kernel, choice.marlin, choice.slower_count) == (kernel, marlin, 0)
    if not marlin:
        assert choice.reasons and "not Marlin" in choice.describe()


def test_vllm_marlin_shape_rules_per_tensor_parallel_shard():
    assert vllm_kernel(gptq(), LLAMA_7B, tensor_parallel=1).fully_marlin
    assert vllm_kernel(gptq(), LLAMA_7B, tensor_parallel=2).fully_marlin  # 11008 / 2 = 5504 = 43 * 128
    # tp 4: the row-parallel down_proj gets 2752 inputs per shard (% 128 = 64); gate/up's 2752 outputs are fine (% 64 = 0)
    tp4 = vllm_kernel(gptq(), LLAMA_7B, tensor_parallel=4)
    assert tp4.marlin and tp4.slower_count == 1 and "down_proj" in tp4.slower_layers[0] and "2752" in tp4.slower_layers[0]
    # tp 8: 1376 per shard misses both rules: gate/up outputs (% 64 = 32) and down inputs
    tp8 = vllm_kernel(gptq(), LLAMA_7B, tensor_parallel=8)
    assert tp8.slower_count == 3 and all(("gate_proj" in l) or ("up_proj" in l) or ("down_proj" in l) for l in tp8.slower_layers)
    # SmolLM2's 576-wide inputs miss Marlin's 128-divisibility even at tp=1
    smol = {"model.layers.0.self_attn.q_proj": (576, 576), "model.layers.0.mlp.down_proj": (1536, 576)}
    choice = vllm_kernel(gptq(), smol)
    assert choice.slower_count == 1 and "576" in choice.slower_layers[0]


def test_vllm_moe_experts_rule():
    experts = {f"model.layers.0.mlp.experts.{e}.{p}": shape for e in range(4)
               for p, shape in (("gate_proj", (2048, 768)), ("up_proj", (2048, 768)), ("down_proj", (768, 2048)))}
    assert vllm_kernel(gptq(4, 128), experts).fully_marlin
    assert vllm_kernel(gptq(4, 128), experts, tensor_parallel=8).slower_count == 1  # 768/8 = 96, not % 128


def test_gptq_v2_note_only_where_the_gptq_kernel_reads_zero_points():
    assert vllm_kernel(gptq(4, 128, True, "gptq_v2"), LLAMA_7B).notes == []  # Marlin ignores GPTQ zero points
    assert "PR #26092" in vllm_kernel(gptq(4, 128, False, "gptq_v2"), LLAMA_7B).notes[0]


def test_our_gptqmodel_marlin_constants_match_the_installed_gptqmodel():
    from gptqmodel.nn_modules.qlinear.marlin import MarlinLinear
    from gptqmodel.nn_modules.qlinear.marlin_awq import AwqMarlinLinear

    from oftsurgery.reporting import serving

    assert sorted(MarlinLinear.SUPPORTS_BITS) == sorted(serving.GPTQMODEL_MARLIN_BITS)
    assert sorted(AwqMarlinLinear.SUPPORTS_BITS) == sorted(serving.GPTQMODEL_MARLIN_BITS)
    assert sorted(MarlinLinear.SUPPORTS_GROUP_SIZE) == sorted(serving.GPTQMODEL_MARLIN_GROUP_SIZES)
    assert sorted(AwqMarlinLinear.SUPPORTS_GROUP_SIZE) == sorted(serving.GPTQMODEL_MARLIN_GROUP_SIZES)
    assert MarlinLinear.SUPPORTS_SYM == [True]
    assert not transformers_kernel(gptq(4, 128, False), LLAMA_7B).marlin
    assert transformers_kernel(awq(), LLAMA_7B).marlin


def test_inspect_reports_the_serving_kernels(tiny_gptq_dir):
    result = CliRunner().invoke(cli, ["inspect", str(tiny_gptq_dir)])
    assert result.exit_code == 0, result.output
    assert "serving:" in result.output and "gptq_marlin (Marlin)" in result.output
    data = json.loads(CliRunner().invoke(cli, ["inspect", str(tiny_gptq_dir), "--json", "--tp", "2"]).output)
    assert data["tensor_parallel"] == 2 and data["serving"]["vllm"]["kernel"] == "gptq_marlin"
    assert data["serving"]["transformers"]["marlin"] is True


def test_awq_to_gptq_merge_warns_that_marlin_is_lost(tiny_awq_dir, tiny_gptq_dir, tmp_path):
    rot = identity_rotations(tiny_awq_dir, tmp_path / "id.safetensors")
    report = merge_checkpoint(tiny_awq_dir, rot, tmp_path / "gptq", MergeOptions(method="rtn", requant="gptq", progress=False))
    lost = [w for w in report.warnings() if "runs on Marlin in vLLM (awq_marlin)" in w]
    assert lost and "asymmetric" in lost[0] and "without --requant" in lost[0]
    saved = json.loads((tmp_path / "gptq" / "merge_report.json").read_text())
    assert saved["serving"]["vLLM"]["input"].startswith("awq_marlin (Marlin)")
    assert saved["serving"]["vLLM"]["output"].startswith("gptq (not Marlin)")
    written = json.loads((tmp_path / "gptq" / "config.json").read_text())["quantization_config"]
    if written["checkpoint_format"] == "gptq_v2":  # a zero point of 0 forces v2: the vLLM version caveat is said too
        assert any("gptq_v2" in w for w in report.warnings())
    # same-format merges keep the kernels and say nothing
    rot = identity_rotations(tiny_gptq_dir, tmp_path / "id2.safetensors")
    report = merge_checkpoint(tiny_gptq_dir, rot, tmp_path / "same", MergeOptions(method="rtn", progress=False))
    assert report.serving_warnings == []
    assert "serving in vLLM: gptq_marlin (Marlin)" in report.summary()


def test_marlin_lost_warning_logic():
    src = serving_contract(gptq(), LLAMA_7B)
    assert marlin_lost_warnings(src, serving_contract(gptq(), LLAMA_7B)) == []
    assert len(marlin_lost_warnings(src, serving_contract(gptq(4, 128, False), LLAMA_7B))) == 2  # vLLM and transformers


def test_awq_with_midpoint_zero_points_converts_to_symmetric_gptq_that_keeps_marlin(tiny_fp_dir, tmp_path):
    """When every AWQ zero point is 8 the same weights are symmetric GPTQ: that variant is written."""
    import torch

    from oftsurgery.evaluation.evaluate import load_dequantized_model
    from oftsurgery.testing.models import make_awq_checkpoint

    awq_dir = make_awq_checkpoint(tiny_fp_dir, tmp_path / "awq", group_size=32, symmetric_grid=True)
    rot = identity_rotations(awq_dir, tmp_path / "id.safetensors")
    report = merge_checkpoint(awq_dir, rot, tmp_path / "gptq", MergeOptions(method="rtn", requant="gptq", progress=False))
    written = json.loads((tmp_path / "gptq" / "config.json").read_text())["quantization_config"]
    assert written["sym"] is True and written["checkpoint_format"] == "gptq"
    assert report.serving_warnings == []
    source, converted = load_dequantized_model(awq_dir), load_dequantized_model(tmp_path / "gptq")
    for (name, a), b in zip(source.state_dict().items(), converted.state_dict().values()):
        assert torch.equal(a, b), name
    from oftsurgery.evaluation.evaluate import load_quantized_model

    ids = torch.randint(3, 400, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # gptqmodel reads the symmetric v1 zero points as we meant them
        err = (load_quantized_model(tmp_path / "gptq")(input_ids=ids).logits.float() - source(input_ids=ids).logits).abs().max()
    assert err < 2e-2, float(err)
