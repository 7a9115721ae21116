"""Every architecture people quantize and serve: tiny random models quantized by GPTQModel on CPU.

Llama, Mistral with a sliding window shorter than the calibration rows, Qwen2, Qwen3, Gemma 2 and 3
(alternating sliding/full attention, scaled embeddings), Phi-3 (fused qkv_proj, gate/up split by
gptqmodel) and two MoE models (one linear per expert in the checkpoint, fused experts in
transformers 5). Checkpoints are cached under ~/.cache/oftsurgery/tiny (keyed by config, options and
library versions), so only the first run pays for GPTQModel's quantization.
"""

from __future__ import annotations

import contextlib
import importlib

import pytest
import torch

from merge_helpers import random_rotations
from oftsurgery.errors import UnsupportedFormatError
from oftsurgery.evaluation.evaluate import load_dequantized_model
from oftsurgery.merge import MergeOptions, merge_checkpoint
from oftsurgery.testing.models import TINY_ARCHITECTURES, TINY_SLIDING_WINDOW

SEQ_LEN = 64  # calibration rows longer than the tiny models' 16-token sliding windows
assert SEQ_LEN > TINY_SLIDING_WINDOW
FAST = dict(calib_tokens=512, seq_len=SEQ_LEN, progress=False)
MOE = ("qwen3_moe", "mixtral")


@pytest.fixture(scope="session", params=sorted(TINY_ARCHITECTURES))
def arch_checkpoint(request):
    """(architecture, its tiny model quantized by GPTQModel: 4-bit g32 sym, cached)."""
    from oftsurgery.testing.models import tiny_config, tiny_gptq

    # a first build quantizes in this process, and GPTQModel's loader patches transformers' MoE
    # classes for good: undone here, or later tests would build gptqmodel's layout, not transformers'
    with defuser_class_patches(tiny_config(request.param)["model_type"]):
        return request.param, tiny_gptq(request.param)


@contextlib.contextmanager
def defuser_class_patches(model_type: str, keep: bool = False):
    """Undo, on exit, the transformers classes gptqmodel's loader replaces globally (defuser's
    `replace_fused_blocks`), so one test's loading cannot change what later tests build. `keep`:
    apply them here (transformers needs them to load gptqmodel's MoE checkpoints)."""
    import defuser
    import transformers
    from defuser.model_registry import MODEL_CONFIG, PATCH
    from transformers import conversion_mapping

    saved = []
    for original, _ in MODEL_CONFIG.get(model_type, {}).get(PATCH.REPLACE_MODULE, []):
        module_path, name = original.rsplit(".", 1)
        module = importlib.import_module(module_path)
        saved.append((module, name, getattr(module, name)))
    getters = [(conversion_mapping, "get_checkpoint_conversion_mapping"),
               (transformers.modeling_utils, "get_checkpoint_conversion_mapping")]
    saved += [(module, name, getattr(module, name)) for module, name in getters if hasattr(module, name)]
    try:
        if keep:
            defuser.replace_fused_blocks(model_type)
        yield
    finally:
        for module, name, value in saved:
            setattr(module, name, value)


def _model_type(path) -> str:
    import json

    return json.loads((path / "config.json").read_text())["model_type"]


def _tokens(path, rows: int = 2, seq_len: int = 48) -> torch.Tensor:
    from transformers import AutoTokenizer

    from oftsurgery.texts import builtin_text

    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = tokenizer(builtin_text("english", "heldout", max_chars=20_000), return_tensors="pt")["input_ids"][0]
    return ids[: rows * seq_len].view(rows, seq_len)


def _gptqmodel_logits(path, ids) -> torch.Tensor:
    from oftsurgery.evaluation.evaluate import load_quantized_model

    with defuser_class_patches(_model_type(path)):
        model = load_quantized_model(path)
        with torch.no_grad():
            return model(input_ids=ids).logits.float()


def _transformers_load(path):
    """(model, loading info) from transformers' own loader (with gptqmodel's class patches for MoE)."""
    from transformers import AutoModelForCausalLM

    with defuser_class_patches(_model_type(path), keep=True):
        return AutoModelForCausalLM.from_pretrained(path, device_map="cpu", output_loading_info=True)


def _transformers_logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def _source_weight(path):
    from oftsurgery.io import CheckpointReader
    from oftsurgery.quant.codec import layer_quant_config, unpack_layer
    from oftsurgery.quant.config import load_quant_config

    reader, qcfg = CheckpointReader(path), load_quant_config(path)

    def weight(prefix: str) -> torch.Tensor:
        tensors = {n[len(prefix) + 1 :]: reader.get(n) for n in reader.tensors
                   if n.startswith(prefix + ".") and "." not in n[len(prefix) + 1 :]}
        return unpack_layer(tensors, layer_quant_config(qcfg, prefix) or qcfg).dequantize()

    return reader, weight


def _runner(path):
    from oftsurgery.merge.calibration.runner import LayerwiseModel

    reader, weight = _source_weight(path)
    return LayerwiseModel(reader.config, reader.get, tensor_names=reader.tensors, batch_tokens=2 * SEQ_LEN), weight


# ------------------------------------------------------------------------------------------------
# the layer runner
# ------------------------------------------------------------------------------------------------

def test_runner_layer_outputs_equal_the_models_own_forward(arch_checkpoint):
    """Against transformers' own full forward (output_hidden_states) of the stock model holding the
    same dequantized weights: no hooks of ours on that side."""
    arch, path = arch_checkpoint
    ids = _tokens(path, rows=3, seq_len=SEQ_LEN)
    reference = load_dequantized_model(path)
    if arch in MOE:  # the reference really is transformers' fused experts, not gptqmodel's per-expert layout
        assert isinstance(reference.model.layers[0].mlp.experts.gate_up_proj, torch.nn.Parameter)
    if arch == "phi3":
        assert hasattr(reference.model.layers[0].mlp, "gate_up_proj")
    with torch.no_grad():
        states = reference(input_ids=ids, output_hidden_states=True).hidden_states
    runner, weight = _runner(path)
    if arch == "gemma2":  # Gemma2PreTrainedModel._supports_sdpa is False (softcapping), so transformers picks eager
        assert runner.config._attn_implementation == "eager"
    hidden, _ = runner.first_layer_inputs(ids)
    assert (hidden - states[0]).norm() <= 1e-6 * states[0].norm(), arch  # the model's own (scaled) embedding
    for index in range(runner.num_layers):
        hidden = runner.forward_layer(runner.build_layer(index, weight), index, hidden)
        expected = states[index + 1]
        if index == runner.num_layers - 1:  # transformers reports the last layer after the final norm
            hidden = reference.model.norm(hidden)
        err = float((hidden - expected).norm() / expected.norm())
        assert err <= 1e-5, (arch, index, err)
    errors = runner.verify(ids[:2], weight)
    assert len(errors) == runner.num_layers and max(errors) <= 1e-5, (arch, errors)


@pytest.mark.parametrize("arch", ["gemma2", "gemma3_text"])
def test_self_check_refuses_wrong_layer_arguments_and_embeddings(arch, monkeypatch):
    """The two ways Gemma used to be calibrated on wrong activations are caught and refused."""
    from oftsurgery.testing.models import tiny_gptq

    path = tiny_gptq(arch)
    ids = _tokens(path, rows=2, seq_len=SEQ_LEN)
    runner, weight = _runner(path)
    layer0 = runner.layer_kwargs.__func__
    monkeypatch.setattr(type(runner), "layer_kwargs",  # layer 0's mask/rotary everywhere
                        lambda self, index, dtype=None: layer0(self, 0, dtype))
    with pytest.raises(UnsupportedFormatError, match=r"Gemma\dForCausalLM's own forward at decoder layer 1 "):
        runner.verify(ids, weight)
    monkeypatch.undo()
    runner, weight = _runner(path)
    runner.base.embed_tokens.embed_scale.fill_(1.0)  # a plain embedding instead of Gemma's scaled one
    with pytest.raises(UnsupportedFormatError, match=r"decoder layer 0 \(the embeddings\)"):
        runner.verify(ids, weight)


def test_merge_refuses_before_writing_when_the_runner_is_wrong(tmp_path, monkeypatch):
    from oftsurgery.merge.calibration import runner
    from oftsurgery.testing.models import tiny_gptq

    path = tiny_gptq("gemma3_text")
    rot = random_rotations(path, tmp_path / "r.safetensors", strength=0.05)
    original = runner.LayerwiseModel.layer_kwargs
    monkeypatch.setattr(runner.LayerwiseModel, "layer_kwargs", lambda self, index, dtype=None: original(self, 0, dtype))
    with pytest.raises(UnsupportedFormatError, match="Gemma3ForCausalLM.*decoder layer 1.*--method rtn"):
        merge_checkpoint(path, rot, tmp_path / "out", MergeOptions(**FAST))
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------
# merges, loaded back
# ------------------------------------------------------------------------------------------------

def test_merges_load_and_track_the_adapted_model(arch_checkpoint, tmp_path):
    """rtn and calibrated merges of a random OFT adapter on every quantized linear load in GPTQModel
    (torch kernel) and transformers, and their logits are closer to the adapted float model
    (dequantized base weights · Rᵀ, in the stock transformers classes) than the quantized base's."""
    from oftsurgery.oft.adapter_io import load_rotations

    arch, path = arch_checkpoint
    rot = random_rotations(path, tmp_path / "r.safetensors", strength=0.05)
    ids = _tokens(path)
    with torch.no_grad():
        adapted = load_dequantized_model(path, rotations=load_rotations(rot))(input_ids=ids).logits

    def gap(logits):
        assert torch.isfinite(logits).all()
        return float((logits - adapted).pow(2).mean())

    with torch.no_grad():  # the base's own weights in float (equal to gptqmodel's dequantizer: test_codec_gptq)
        base_gap = gap(load_dequantized_model(path)(input_ids=ids).logits)
    _, base_info = _transformers_load(path)
    base_missing = sorted(base_info["missing_keys"]) + sorted(base_info["unexpected_keys"])
    # Phi-3: transformers' model has gate_up_proj where GPTQModel's checkpoint has gate_proj + up_proj
    assert bool(base_missing) == (arch == "phi3"), (arch, base_missing[:4])
    for method in ("rtn", "calibrated"):
        out = tmp_path / method
        report = merge_checkpoint(path, rot, out, MergeOptions(method=method, **FAST))
        assert len(report.layers) == len(load_rotations(rot).blocks) and report.codes_changed > 0.05, (arch, method)
        # every module calibrated, no stage failed; with 448 fitted rows a down_proj's solve may lose to
        # plain rounding on the held-out rows, which then takes its place (an "rtn" fallback)
        assert not [l.fallback for l in report.layers if l.fallback and not l.fallback.startswith("rtn:")], (arch, method)
        assert gap(_gptqmodel_logits(out, ids)) < 0.5 * base_gap, (arch, method)
        model, info = _transformers_load(out)
        if base_missing:  # the merge loads exactly as well as its source: the same keys missing, no others
            assert sorted(info["missing_keys"]) + sorted(info["unexpected_keys"]) == base_missing
            assert any("gate_up_proj" in k for k in base_missing)
        else:
            assert gap(_transformers_logits(model, ids)) < 0.5 * base_gap, (arch, method)
        if method == "calibrated":
            assert report.runner_check is not None and report.runner_check <= 1e-4


def test_moe_expert_no_token_reaches_is_reported_not_silently_rounded(tmp_path):
    """One calibration token is routed to top_k=2 of the 4 experts of each layer: the other two
    experts' linears are requantized without data, and the report says so for each of them."""
    from oftsurgery.testing.models import tiny_gptq

    path = tiny_gptq("qwen3_moe")
    rot = random_rotations(path, tmp_path / "r.safetensors", strength=0.05)
    report = merge_checkpoint(path, rot, tmp_path / "out", MergeOptions(calib_tokens=1, seq_len=1, progress=False))
    unreached = [l for l in report.layers if l.fallback]
    assert all(".mlp.experts." in l.name and l.mode != "compensated" for l in unreached)
    for layer in (0, 1):
        experts = {l.name.split(".experts.")[1].split(".")[0] for l in unreached if f".layers.{layer}." in l.name}
        assert len(experts) == 2, (layer, experts)
        assert sum(f".layers.{layer}." in l.name for l in unreached) == 6  # gate, up and down of each
    # layer 0 sees the embedding of that one token: the router's own choice there is independent of the merge
    from transformers import AutoTokenizer

    from oftsurgery.merge.calibration.text import calibration_batches, load_calibration_text

    token = calibration_batches(load_calibration_text(None)[0], AutoTokenizer.from_pretrained(path), 1, 1)
    model = load_dequantized_model(path)
    routed = []
    hook = model.model.layers[0].mlp.gate.register_forward_hook(lambda m, i, out: routed.append(out[2]))
    with torch.no_grad():
        model(input_ids=token)
    hook.remove()
    chosen = set(routed[0].flatten().tolist())
    flagged = {int(l.name.split(".experts.")[1].split(".")[0]) for l in unreached if ".layers.0." in l.name}
    assert flagged == set(range(4)) - chosen
    assert any("fell back" in w and "MoE expert" in w for w in report.warnings())
    data = (tmp_path / "out" / "merge_report.json").read_text()
    assert "no calibration token was routed to this MoE expert" in data


# ------------------------------------------------------------------------------------------------
# adapters trained on fused modules, checkpoints that store them split
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("side", ["input", "input+oft_s", "output"])
def test_fused_rotation_moves_onto_split_layers_exactly(side):
    """W_fused·Rᵀ (and oft_s, or an output-side R) cut into the split layers equals each split layer's own merge."""
    from oftsurgery.merge.plan import LayerPlan, split_fused_targets
    from oftsurgery.oft.adapter_io import RotationSet
    from oftsurgery.oft.rotation import cayley_exact, skew_from_params

    g = torch.Generator().manual_seed(0)
    b, hidden, inter = 16, 64, 96
    features = hidden if side != "output" else 2 * inter
    blocks = cayley_exact(skew_from_params(torch.randn(features // b, b * (b - 1) // 2, generator=g) * 0.1, b))
    fused = "model.layers.0.mlp.gate_up_proj"
    scales = {fused: torch.rand(2 * inter, 1, generator=g) + 0.5} if side == "input+oft_s" else {}
    rotations = RotationSet({fused: blocks}, {}, scales, {fused} if side == "output" else set())
    layers = {f"model.layers.0.mlp.{p}": LayerPlan(f"model.layers.0.mlp.{p}", hidden, inter) for p in ("gate_proj", "up_proj")}
    split = split_fused_targets(rotations, layers)
    assert set(split.blocks) == set(layers)
    gate, up = torch.randn(inter, hidden, generator=g), torch.randn(inter, hidden, generator=g)
    whole = rotations.merged_weight(fused, torch.cat([gate, up]))
    torch.testing.assert_close(split.merged_weight("model.layers.0.mlp.gate_proj", gate), whole[:inter])
    torch.testing.assert_close(split.merged_weight("model.layers.0.mlp.up_proj", up), whole[inter:])


def test_output_side_rotation_straddling_split_layers_is_refused():
    from oftsurgery.errors import InvalidAdapterError
    from oftsurgery.merge.plan import LayerPlan, split_fused_targets
    from oftsurgery.oft.adapter_io import RotationSet

    fused = "model.layers.0.mlp.gate_up_proj"
    rotations = RotationSet({fused: torch.eye(64).expand(3, 64, 64).clone()}, {}, {}, {fused})
    layers = {f"model.layers.0.mlp.{p}": LayerPlan(f"model.layers.0.mlp.{p}", 64, 96) for p in ("gate_proj", "up_proj")}
    with pytest.raises(InvalidAdapterError, match="straddle"):
        split_fused_targets(rotations, layers)


def test_phi3_adapter_on_fused_gate_up_merges_into_gptqmodels_split_layers(tmp_path):
    """An adapter trained on the float Phi-3 (targets mlp.gate_up_proj) merged into GPTQModel's Phi-3,
    against the stock float model with that fused weight rotated directly."""
    from oftsurgery.testing.models import tiny_gptq
    from oftsurgery.oft.adapter_io import RotationSet, save_rotations
    from oftsurgery.oft.rotation import cayley_exact, skew_from_params

    path = tiny_gptq("phi3")
    g = torch.Generator().manual_seed(3)
    fused = {f"model.layers.{i}.mlp.gate_up_proj": cayley_exact(skew_from_params(torch.randn(2, 32 * 31 // 2, generator=g) * 0.08, 32))
             for i in (0, 1)}
    rotations = RotationSet(fused, {"parameterization": "cayley"})
    save_rotations(rotations, tmp_path / "r.safetensors")
    report = merge_checkpoint(path, tmp_path / "r.safetensors", tmp_path / "out", MergeOptions(**FAST))
    assert sorted(l.name.rsplit(".", 1)[1] for l in report.layers) == ["gate_proj", "gate_proj", "up_proj", "up_proj"]
    reference = load_dequantized_model(path)
    with torch.no_grad():
        for name in fused:
            linear = reference.get_submodule(name)
            linear.weight.copy_(rotations.merged_weight(name, linear.weight))
    ids = _tokens(path)
    with torch.no_grad():
        adapted = reference(input_ids=ids).logits
        base_gap = float((load_dequantized_model(path)(input_ids=ids).logits - adapted).pow(2).mean())
        merged_gap = float((load_dequantized_model(tmp_path / "out")(input_ids=ids).logits - adapted).pow(2).mean())
    assert merged_gap < 0.3 * base_gap, (merged_gap, base_gap)


def test_a_targeted_layer_the_model_has_no_module_for_is_refused_not_rounded(tmp_path):
    """Checkpoint names the model class does not have would never be calibrated: refused up front."""
    import shutil

    from safetensors.torch import load_file, save_file

    from oftsurgery.testing.models import tiny_gptq

    source = tiny_gptq("llama")
    path = tmp_path / "renamed"
    shutil.copytree(source, path)
    tensors = load_file(path / "model.safetensors")
    renamed = {k.replace("layers.0.mlp.up_proj.", "layers.0.mlp.extra_proj."): v for k, v in tensors.items()}
    save_file(renamed, path / "model.safetensors", metadata={"format": "pt"})
    rot = random_rotations(path, tmp_path / "r.safetensors", strength=0.05, select=lambda n: "extra_proj" in n)
    with pytest.raises(UnsupportedFormatError, match=r"model\.layers\.0\.mlp\.extra_proj .*LlamaForCausalLM has no such"):
        merge_checkpoint(path, rot, tmp_path / "out", MergeOptions(**FAST))
    assert not (tmp_path / "out").exists()
    merge_checkpoint(path, rot, tmp_path / "rtn", MergeOptions(method="rtn", **FAST))  # data-free still works


@pytest.mark.parametrize("arch", ["phi3", "qwen3_moe", "mixtral"])
def test_stock_tensor_inverts_defusers_split(arch):
    """defuser splits a real stock model (what gptqmodel does before quantizing); assembling the stock
    parameters back from the split tensors gives the originals exactly."""
    import copy
    import io
    from contextlib import redirect_stdout

    import defuser
    from transformers import AutoModelForCausalLM

    from oftsurgery.merge.calibration.skeleton import CheckpointTensors, hf_config_from, stock_tensor
    from oftsurgery.testing.models import tiny_config

    torch.manual_seed(0)
    stock = AutoModelForCausalLM.from_config(hf_config_from(tiny_config(arch) | {"vocab_size": 64, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}), dtype=torch.float32)
    split = copy.deepcopy(stock)
    with redirect_stdout(io.StringIO()):
        assert defuser.convert_model(split, cleanup_original=True)
    state = split.state_dict()
    tensors = CheckpointTensors(state, state.__getitem__, lambda prefix: state[f"{prefix}.weight"])
    fused = [n for n in dict(stock.named_parameters()) if n not in state]
    assert fused, "defuser split nothing"
    for name, param in stock.named_parameters():
        assert torch.equal(stock_tensor(stock, "", name, tensors), param.detach()), name


@pytest.mark.parametrize("arch", sorted(TINY_ARCHITECTURES))
@pytest.mark.parametrize("checkpoint_layout", [True, False])
def test_skeletons_skip_only_the_meta_parameters_initialisation(arch, checkpoint_layout, monkeypatch):
    """build_skeleton marks its meta parameters initialised, so transformers does not draw random values
    into them (a second per 7B skeleton); what it does build is unchanged: the same parameters, and
    buffers (rotary tables, embedding scales) bit for bit those of the full initialisation."""
    from oftsurgery.merge.calibration import skeleton
    from oftsurgery.testing.models import tiny_config

    config = tiny_config(arch)
    fast = skeleton.build_skeleton(config, checkpoint_layout=checkpoint_layout)
    monkeypatch.setattr(skeleton, "_meta_parameters_initialized", contextlib.nullcontext)
    full = skeleton.build_skeleton(config, checkpoint_layout=checkpoint_layout)
    assert {n: (p.shape, p.dtype, p.device.type) for n, p in fast.named_parameters()} == \
        {n: (p.shape, p.dtype, p.device.type) for n, p in full.named_parameters()}
    assert all(p.device.type == "meta" for p in fast.parameters())
    fast_buffers, full_buffers = dict(fast.named_buffers()), dict(full.named_buffers())
    assert fast_buffers.keys() == full_buffers.keys()
    for name, buffer in full_buffers.items():
        assert buffer.device.type != "meta", name
        assert buffer.dtype == fast_buffers[name].dtype and torch.equal(buffer, fast_buffers[name]), name
