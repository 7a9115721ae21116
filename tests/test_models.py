"""The model builders produce checkpoints that gptqmodel and transformers both load and run."""

from __future__ import annotations

import json

import pytest
import torch

from oftsurgery.texts import SPLITS, builtin_documents, builtin_text


def _gptqmodel_logits(model_dir, input_ids):
    from gptqmodel.utils.backend import BACKEND

    from oftsurgery._deps import gptqmodel

    model = gptqmodel().GPTQModel.load(str(model_dir), backend=BACKEND.TORCH, device="cpu")
    with torch.no_grad():
        return model.model(input_ids).logits.float()


def _transformers_logits(model_dir, input_ids):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, device_map="cpu")
    with torch.no_grad():
        return model(input_ids).logits.float(), model


def _tokens(model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = tokenizer(builtin_text("english", "heldout", max_chars=400), return_tensors="pt")["input_ids"][:, :24]
    assert ids.shape[1] == 24
    return ids


def test_builtin_splits_are_disjoint_and_nonempty():
    for kind in ("english", "code"):
        docs = {split: builtin_documents(kind, split) for split in SPLITS}
        for split in SPLITS:
            assert sum(map(len, docs[split])) > 10_000, (kind, split)
        for a, b in (("train", "calib"), ("train", "heldout"), ("calib", "heldout")):
            assert not set(docs[a]) & set(docs[b]), (kind, a, b)
        assert builtin_text(kind, "heldout", max_chars=None).startswith(docs["heldout"][0])


def test_builtin_text_is_deterministic_and_capped():
    assert builtin_text("code", "calib", max_chars=1000) == builtin_text("code", "calib", max_chars=5000)[:1000]
    with pytest.raises(ValueError):
        builtin_text("poetry")
    with pytest.raises(ValueError):
        builtin_text("english", "test")


def test_tiny_fp_reloads_with_tokenizer(tiny_fp_dir):
    from transformers import AutoModelForCausalLM

    ids = _tokens(tiny_fp_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_fp_dir)
    assert model.dtype == torch.float16
    with torch.no_grad():
        logits = model(ids).logits
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize(
    "fixture, expected",
    [
        ("tiny_gptq_dir", {"bits": 4, "group_size": 32, "sym": True, "desc_act": False, "format": "gptq"}),
        ("tiny_gptq_asym_descact_dir", {"bits": 4, "group_size": 32, "sym": False, "desc_act": True, "format": "gptq"}),
        ("tiny_gptq_v2_dir", {"bits": 4, "group_size": 32, "sym": True, "desc_act": False, "format": "gptq_v2"}),
    ],
)
def test_gptq_fixture_reloads_in_gptqmodel_and_transformers(request, fixture, expected):
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear

    model_dir = request.getfixturevalue(fixture)
    saved = json.loads((model_dir / "quantize_config.json").read_text())
    assert {key: saved[key] for key in expected} == expected

    ids = _tokens(model_dir)
    ref = _gptqmodel_logits(model_dir, ids)
    hf, hf_model = _transformers_logits(model_dir, ids)
    assert torch.isfinite(ref).all() and torch.isfinite(hf).all()
    # Both loaders must have swapped every decoder linear for a quantized kernel.
    layer = hf_model.model.layers[0]
    for module in (layer.self_attn.q_proj, layer.mlp.down_proj):
        assert isinstance(module, BaseQuantLinear)
    # Same tensors, different kernels: logits agree to bf16/fp16 accumulation noise.
    assert torch.allclose(ref, hf, atol=0.05, rtol=0.05), (ref - hf).abs().max()


def test_desc_act_fixture_has_permuted_groups(tiny_gptq_asym_descact_dir):
    from safetensors.torch import load_file

    tensors = load_file(tiny_gptq_asym_descact_dir / "model.safetensors")
    g_idx = tensors["model.layers.0.mlp.down_proj.g_idx"]
    assert not torch.equal(g_idx, torch.arange(g_idx.numel()) // 32)
    assert torch.equal(torch.bincount(g_idx), torch.full((g_idx.numel() // 32,), 32))


@pytest.mark.slow
def test_smollm2_gptq_reloads(smollm2_gptq_dir):
    ids = _tokens(smollm2_gptq_dir)
    logits = _gptqmodel_logits(smollm2_gptq_dir, ids)
    assert torch.isfinite(logits).all()
    # A real LM predicts real text far better than uniform over its 49152-token vocabulary.
    nll = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])
    assert nll < 0.6 * torch.log(torch.tensor(49152.0))
