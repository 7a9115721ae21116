"""compute_in_float32: the same quantized model as gptqmodel's own kernel computes, in float32."""

from __future__ import annotations

import torch

from oftsurgery.evaluation.cpu_float import compute_in_float32
from oftsurgery.evaluation.evaluate import load_quantized_model


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def test_float32_model_matches_gptqmodel_kernel(tiny_gptq_dir):
    ids = torch.randint(3, 400, (2, 48), generator=torch.Generator().manual_seed(0))
    reference = _logits(load_quantized_model(tiny_gptq_dir), ids)  # gptqmodel's TorchLinear, fp16
    model = load_quantized_model(tiny_gptq_dir)
    switched = compute_in_float32(model.model)
    assert switched == 14  # 2 layers x 7 linear kinds
    assert all(p.dtype == torch.float32 for p in model.model.parameters())
    ours = _logits(model, ids)
    # fp16 activations in the kernel vs fp32 here: equal up to fp16 rounding
    scale = reference.abs().max()
    assert (ours - reference).abs().max() <= 2e-2 * scale


def test_float32_awq_model_matches_gptqmodel_awq_kernel(tiny_awq_dir):
    ids = torch.randint(3, 400, (2, 48), generator=torch.Generator().manual_seed(0))
    reference = _logits(load_quantized_model(tiny_awq_dir), ids)  # gptqmodel's AwqTorchLinear, fp16
    model = load_quantized_model(tiny_awq_dir)
    assert "Awq" in type(model.model.model.layers[0].self_attn.q_proj).__name__
    assert compute_in_float32(model.model) == 14
    assert all(p.dtype == torch.float32 for p in model.model.parameters())
    ours = _logits(model, ids)
    assert (ours - reference).abs().max() <= 2e-2 * reference.abs().max()


def test_float32_model_with_oft_wrappers_trains_and_matches_kernel(tiny_gptq_dir, tmp_path):
    from oftsurgery.attach import attach_adapter
    from oftsurgery.oft.model import load_oft_adapter, oft_wrappers

    attach_adapter(tiny_gptq_dir, tmp_path / "adapter", block_size=32)
    ids = torch.randint(3, 400, (1, 32), generator=torch.Generator().manual_seed(1))
    models = []
    for to_float in (False, True):
        model = load_quantized_model(tiny_gptq_dir).model
        load_oft_adapter(model, tmp_path / "adapter")
        for wrapper in oft_wrappers(model).values():  # the same non-identity rotation in both models
            weight = wrapper.oft_R["default"].weight
            with torch.no_grad():
                weight.copy_(torch.randn(weight.shape, generator=torch.Generator().manual_seed(2)) * 0.05)
        if to_float:
            compute_in_float32(model)
        models.append(model)
    kernel, ours = (_logits(m, ids) for m in models)
    assert (ours - kernel).abs().max() <= 2e-2 * kernel.abs().max()
    # gradients reach the OFT parameters through the float32 layers
    loss = models[1](input_ids=ids).logits.float().logsumexp(-1).mean()
    loss.backward()
    grads = [w.oft_R["default"].weight.grad for w in oft_wrappers(models[1]).values()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
