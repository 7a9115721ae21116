"""Synthetic real-shaped checkpoints (`oftsurgery.testing.synthetic`), checked on the tiny preset.

The references are independent of our codec: gptqmodel's own loader and `dequantize_weight()`,
transformers loading the fp16 twin, the `inspect` command on the files, and a merge reloaded from disk.
"""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from oftsurgery.io import CheckpointReader
from oftsurgery.testing.synthetic import (
    LINEARS,
    PRESETS,
    decoder_layer_bytes,
    expected_size_bytes,
    random_rotations,
    synthetic_checkpoint,
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return synthetic_checkpoint("tiny", num_layers=2, cache_dir=tmp_path_factory.mktemp("synthetic"))


def _tensors(path) -> dict[str, torch.Tensor]:
    return dict(CheckpointReader(path).iter_tensors())


def test_tiny_preset_builds_every_part_with_the_preset_shapes(tiny):
    from transformers import AutoConfig

    shape = PRESETS["tiny"]
    config = AutoConfig.from_pretrained(str(tiny.gptq))
    assert (config.model_type, config.hidden_size, config.intermediate_size) == ("llama", shape.hidden_size,
                                                                               shape.intermediate_size)
    assert (config.num_attention_heads, config.num_key_value_heads, config.num_hidden_layers) == (4, 2, 2)
    quant = json.loads((tiny.gptq / "quantize_config.json").read_text())
    assert quant == config.quantization_config
    assert (quant["bits"], quant["group_size"], quant["sym"], quant["desc_act"], quant["format"]) == (4, 128, True,
                                                                                                     False, "gptq")
    assert "quantization_config" not in json.loads((tiny.fp16 / "config.json").read_text())
    reader = CheckpointReader(tiny.gptq)
    for layer in range(2):
        for linear, (out_f, in_f) in shape.linear_shapes().items():
            prefix = f"model.layers.{layer}.{linear}"
            assert reader.shape(f"{prefix}.qweight") == (in_f // 8, out_f), prefix
            assert reader.shape(f"{prefix}.scales") == (in_f // 128, out_f), prefix
    total = sum(info.nbytes for info in reader.tensors.values())
    assert total == pytest.approx(expected_size_bytes("tiny", 2)["gptq"], rel=0.01)
    assert 0 < decoder_layer_bytes(tiny.gptq) < total


def test_reloads_in_gptqmodel_and_its_dequantized_weights_equal_the_fp16_twin(tiny):
    from gptqmodel import GPTQModel
    from gptqmodel.utils.backend import BACKEND

    fp16 = _tensors(tiny.fp16)
    quantized = _tensors(tiny.gptq)
    model = GPTQModel.load(str(tiny.gptq), device="cpu", backend=BACKEND.TORCH, dtype=torch.float16)
    for layer in range(2):
        for linear in LINEARS:
            prefix = f"model.layers.{layer}.{linear}"
            dense = model.model.get_submodule(prefix).dequantize_weight().T
            assert torch.equal(dense, fp16[f"{prefix}.weight"]), prefix
            # weights drawn like a trained layer: the bulk near std 0.02, group ranges set by outliers
            assert 0.01 < float(dense.float().std()) < 0.05, prefix
            assert float(dense.abs().max()) > 4 * float(dense.float().std()), prefix
    for name, tensor in fp16.items():  # everything that is not a quantized linear is shared byte for byte
        if not name.endswith("_proj.weight"):
            assert torch.equal(tensor, quantized[name]), name


def test_fp16_twin_loads_in_transformers_and_the_tokenizer_covers_the_default_calibration(tiny):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from oftsurgery.merge.calibration.text import calibration_batches, load_calibration_text

    model = AutoModelForCausalLM.from_pretrained(str(tiny.fp16), dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(tiny.gptq))
    text, _ = load_calibration_text("builtin:english")
    ids = calibration_batches(text, tokenizer, 8192, 256)
    assert ids.numel() == 8192  # the bench's default calibration is fully available
    with torch.no_grad():
        logits = model(ids[:1, :32]).logits
    assert logits.shape == (1, 32, PRESETS["tiny"].vocab_size) and torch.isfinite(logits).all()


def test_inspect_reads_the_checkpoint(tiny):
    from oftsurgery.cli import cli

    result = CliRunner().invoke(cli, ["inspect", str(tiny.gptq), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert (data["method"], data["bits"], data["group_size"], data["num_quantized_layers"]) == ("gptq", 4, 128, 14)
    assert data["shapes_by_kind"]["down_proj"] == [[256, 512]]


def test_rotations_cover_every_linear_and_move_weights_like_a_trained_adapter(tiny):
    from oftsurgery.oft.adapter_io import load_rotations
    from oftsurgery.oft.rotation import orthogonality_error

    rotations = load_rotations(tiny.rotations)
    fp16 = _tensors(tiny.fp16)
    assert sorted(rotations.blocks) == sorted(f"model.layers.{l}.{n}" for l in range(2) for n in LINEARS)
    for module, blocks in rotations.blocks.items():
        in_f = PRESETS["tiny"].linear_shapes()[module.split(".", 3)[3]][1]
        assert blocks.shape == (in_f // 32, 32, 32), module
        assert orthogonality_error(blocks) < 1e-5, module
        # the documented default: W·Rᵀ differs from W by about 2%, dense float64 reference
        weight = fp16[f"{module}.weight"].double()
        dense = torch.block_diag(*blocks.double())
        change = float((weight @ dense.T - weight).norm() / weight.norm())
        assert 0.01 < change < 0.04, (module, change)


def test_identity_rtn_merge_returns_the_source_tensors_byte_for_byte(tiny, tmp_path):
    from oftsurgery.merge import MergeOptions, merge_checkpoint

    identity = random_rotations(tiny.gptq, tmp_path / "identity.safetensors", strength=0.0)
    merge_checkpoint(tiny.gptq, identity, tmp_path / "merged", MergeOptions(method="rtn", progress=False))
    source, merged = _tensors(tiny.gptq), _tensors(tmp_path / "merged")
    assert sorted(source) == sorted(merged)
    for name, tensor in source.items():
        assert tensor.dtype == merged[name].dtype and tensor.shape == merged[name].shape, name
        assert torch.equal(tensor.view(torch.uint8), merged[name].view(torch.uint8)), name


def test_builds_are_deterministic_and_reused_from_the_cache(tiny, tmp_path):
    again = synthetic_checkpoint("tiny", num_layers=2, cache_dir=tiny.root.parent)
    assert again.root == tiny.root and again.spec == tiny.spec  # reused, not rebuilt
    fresh = synthetic_checkpoint("tiny", num_layers=2, cache_dir=tmp_path)
    other_seed = synthetic_checkpoint("tiny", num_layers=1, seed=1, vocab_size=1024, cache_dir=tmp_path)
    first, second = _tensors(tiny.gptq), _tensors(fresh.gptq)
    assert all(torch.equal(first[n], second[n]) for n in first)
    assert not torch.equal(first["model.layers.0.mlp.down_proj.qweight"],
                           _tensors(other_seed.gptq)["model.layers.0.mlp.down_proj.qweight"])
    assert CheckpointReader(other_seed.gptq).shape("model.embed_tokens.weight") == (1024, 256)
    # another rotation strength is added next to the cached weights, which are not rebuilt
    weights = tiny.gptq / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    stronger = synthetic_checkpoint("tiny", num_layers=2, rotation_strength=0.02, cache_dir=tiny.root.parent)
    assert stronger.gptq == tiny.gptq and stronger.rotations != tiny.rotations and stronger.rotations.is_file()
    assert weights.stat().st_mtime_ns == stamp


def test_bad_parameters_are_refused_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="preset"):
        synthetic_checkpoint("13b", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="num_layers"):
        synthetic_checkpoint("tiny", num_layers=0, cache_dir=tmp_path)
    assert not any(tmp_path.iterdir())
