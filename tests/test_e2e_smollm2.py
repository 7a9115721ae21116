"""One end-to-end run on the real SmolLM2-135M, quantized to GPTQ 4-bit g128 by gptqmodel.

Exercises what tiny random models cannot: a real tokenizer, 576 inputs with a partial last group
(g128), 30 decoder layers, GQA 9/3 heads. Codec exactness on real layers, attach → merge (calibrated)
→ reload with gptqmodel, untouched tensors byte-identical.
"""

from __future__ import annotations

import pytest
import torch

from merge_helpers import all_tensors, assert_bytes_equal, random_rotations
from oftsurgery.io import CheckpointReader
from oftsurgery.quant.codec import find_quantized_layers, layer_tensors, pack_layer, unpack_layer
from oftsurgery.quant.config import load_quant_config

pytestmark = pytest.mark.slow

SELECTED = ("model.layers.0.", "model.layers.29.")


def test_codec_round_trips_real_smollm2_layers(smollm2_gptq_dir):
    reader = CheckpointReader(smollm2_gptq_dir)
    qcfg = load_quant_config(smollm2_gptq_dir)
    layers = [p for p in find_quantized_layers(reader.tensors) if p.startswith(SELECTED)]
    assert len(layers) == 14
    for prefix in layers:
        stored = layer_tensors({n: reader.get(n) for n in reader.tensors if n.startswith(prefix + ".")}, prefix)
        packed = pack_layer(unpack_layer(stored, qcfg), qcfg, bias=stored.get("bias"))
        for key, tensor in stored.items():
            assert_bytes_equal(tensor, packed[key], f"{prefix}.{key}")


def test_merge_on_smollm2_loads_and_matches_our_forward(smollm2_gptq_dir, tmp_path):
    from oftsurgery.evaluation.evaluate import load_dequantized_model, load_quantized_model
    from oftsurgery.merge import MergeOptions, merge_checkpoint

    rot = random_rotations(smollm2_gptq_dir, tmp_path / "r.safetensors", strength=0.02,
                           select=lambda n: n.startswith(SELECTED) and n.endswith(("q_proj", "down_proj")))
    report = merge_checkpoint(smollm2_gptq_dir, rot, tmp_path / "merged",
                              MergeOptions(calib_tokens=1024, seq_len=128, progress=False))
    assert len(report.layers) == 4 and report.codes_changed > 0.001
    assert report.mean_residual_after < report.mean_residual_before
    src, out = all_tensors(smollm2_gptq_dir), all_tensors(tmp_path / "merged")
    for name in src:
        if not any(name.startswith(f"{layer}{kind}.") for layer in SELECTED for kind in ("self_attn.q_proj", "mlp.down_proj")):
            assert_bytes_equal(src[name], out[name], name)
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(str(smollm2_gptq_dir))("def fibonacci(n):\n    return", return_tensors="pt")["input_ids"]
    from oftsurgery.evaluation.cpu_float import compute_in_float32

    def discrepancy(path):
        """max |gptqmodel − our reference| on the same tokens, and both argmax sequences."""
        with torch.no_grad():
            reference = load_dequantized_model(path)(input_ids=ids).logits
            loaded = load_quantized_model(path)
            kernel = loaded(input_ids=ids).logits.float()
            compute_in_float32(loaded.model)  # gptqmodel's own dequantize_weight(), float32 arithmetic
            dequantized = loaded(input_ids=ids).logits.float()
        return float((dequantized - reference).abs().max()), kernel[0].argmax(-1), reference[0].argmax(-1)

    # gptqmodel loads the unquantized tensors (embeddings, norms) in bf16, so its logits differ from a
    # float32 reference by a floor that the source checkpoint shows too; the merge must add nothing
    floor, _, _ = discrepancy(smollm2_gptq_dir)
    merged, kernel_tokens, reference_tokens = discrepancy(tmp_path / "merged")
    assert merged <= 1.5 * floor + 1e-3, (merged, floor)
    assert (kernel_tokens == reference_tokens).float().mean() >= 0.9
