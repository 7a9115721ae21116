"""Model-level interoperability with PEFT on a gptqmodel-loaded tiny GPTQ checkpoint.

attach (CLI library) -> train with our wrappers -> save -> PeftModel.from_pretrained: same logits;
PEFT get_peft_model -> train -> save_pretrained -> our loader: same logits; extract of a PEFT
adapter == PEFT's own materialized blocks.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from oftsurgery.oft import rotation as rot
from oftsurgery.oft.adapter_io import load_rotations
from oftsurgery.oft.config import OFTOptions
from oftsurgery.oft.layer import OFTQuantLinear
from oftsurgery.oft.model import attach_oft, load_oft_adapter, oft_wrappers, save_oft_adapter

import peft  # noqa: E402  (a required test dependency: a missing one must fail, not skip)


def load_gptq(path):
    from oftsurgery._deps import gptqmodel

    gptqmodel()
    from gptqmodel import GPTQModel
    from gptqmodel.utils.backend import BACKEND

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return GPTQModel.load(str(path), device="cpu", backend=BACKEND.TORCH).model


def tokens(seed=0, batch=2, length=12, vocab=300):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, length), generator=g)


def train_steps(model, params, steps=3, seed=0):
    model.train()
    optimizer = torch.optim.SGD(params, lr=0.5)
    for step in range(steps):
        ids = tokens(seed + step)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def logits(model, seed=99):
    with torch.no_grad():
        return model(input_ids=tokens(seed)).logits.float()


@pytest.mark.parametrize("neumann", [True, False])
def test_attach_train_ours_then_peft_loads_same_logits(tiny_gptq_dir, tmp_path, neumann):
    from oftsurgery.attach import attach_adapter

    result = attach_adapter(tiny_gptq_dir, tmp_path / "start", target_modules=["q_proj", "v_proj", "down_proj"],
                            block_size=16, use_cayley_neumann=neumann)
    assert {m.name.rsplit(".", 1)[-1] for m in result.modules} == {"q_proj", "v_proj", "down_proj"}

    ours = load_gptq(tiny_gptq_dir)
    base_logits = logits(ours)
    report = load_oft_adapter(ours, tmp_path / "start")
    assert report.trainable_params == sum(p.numel() for p in ours.parameters() if p.requires_grad) > 0
    torch.testing.assert_close(logits(ours), base_logits, rtol=0, atol=0)  # identity rotations
    train_steps(ours, [p for p in ours.parameters() if p.requires_grad])
    trained = logits(ours)
    assert not torch.allclose(trained, base_logits)
    options = OFTOptions.from_peft_dict(json.loads((tmp_path / "start" / "adapter_config.json").read_text()))
    save_oft_adapter(ours, tmp_path / "trained", options)

    theirs = peft.PeftModel.from_pretrained(load_gptq(tiny_gptq_dir), str(tmp_path / "trained")).eval()
    peft_layers = [m for m in theirs.modules() if isinstance(m, peft.tuners.oft.layer.Linear)]
    assert len(peft_layers) == len(oft_wrappers(ours)) == 6
    torch.testing.assert_close(logits(theirs), trained, rtol=0, atol=0)


def test_peft_trained_adapter_loads_into_our_wrappers(tiny_gptq_dir, tmp_path):
    config = peft.OFTConfig(r=0, oft_block_size=32, target_modules=["k_proj", "o_proj", "up_proj"],
                            use_cayley_neumann=True, num_cayley_neumann_terms=4, coft=True, eps=0.3)
    theirs = peft.get_peft_model(load_gptq(tiny_gptq_dir), config)
    train_steps(theirs, [p for p in theirs.parameters() if p.requires_grad])
    expected = logits(theirs)
    theirs.save_pretrained(str(tmp_path / "peft"))

    ours = load_gptq(tiny_gptq_dir)
    load_oft_adapter(ours, tmp_path / "peft")
    ours.eval()
    assert len(oft_wrappers(ours)) == 6
    wrapper = next(iter(oft_wrappers(ours).values()))
    assert wrapper.oft_R["default"].coft and wrapper.oft_R["default"].num_cayley_neumann_terms == 4
    torch.testing.assert_close(logits(ours), expected, rtol=0, atol=0)

    # extract gives exactly PEFT's materialized blocks (computed by PEFT on float32 parameters)
    rotations = load_rotations(tmp_path / "peft")
    for name, module in theirs.base_model.model.named_modules():
        if isinstance(module, peft.tuners.oft.layer.Linear):
            rmod = module.oft_R["default"]
            with torch.no_grad():  # what PEFT's next forward / get_weight computes: COFT projection, then the map
                projected = rmod._project_batch(rmod.weight.float(), eps=rmod.eps)
                peft_blocks = rmod._cayley_batch(projected, rmod.block_size, True, 4)
            assert torch.equal(rotations.blocks[name], peft_blocks), name
    assert rotations.metadata["parameterization"] == "cayley_neumann"


def test_attach_oft_python_api_targets_and_adapters(tiny_gptq_dir):
    model = load_gptq(tiny_gptq_dir)
    report = attach_oft(model, OFTOptions(oft_block_size=32, target_modules=r".*layers\.0\.mlp\..*_proj",
                                          use_cayley_neumann=False))
    assert report.modules == [f"model.layers.0.mlp.{n}" for n in ("gate_proj", "up_proj", "down_proj")]
    assert "trainable params" in report.summary()
    report = attach_oft(model, OFTOptions(oft_block_size=16, target_modules="all-linear",
                                          exclude_modules=["o_proj"]), adapter_name="second")
    assert "lm_head" not in report.modules and not any(n.endswith("o_proj") for n in report.modules)
    wrapper = model.get_submodule("model.layers.0.mlp.up_proj")
    assert isinstance(wrapper, OFTQuantLinear) and set(wrapper.oft_R) == {"default", "second"}
    assert wrapper.active_adapters == ["default", "second"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".oft_R.second." in n for n in trainable)
    # the blocks PEFT would resolve for the stored shapes
    assert rot.block_size_from_params(wrapper.oft_R["second"].weight.shape[1]) == 16
