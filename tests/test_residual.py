"""The residual LoRA's math against independent references: exact SVD and alternating least squares."""

from __future__ import annotations

import pytest
import torch

from oftsurgery.merge.solve import residual as res


def _damped(h: torch.Tensor, damp: float = res.DAMP) -> torch.Tensor:
    h = h.double().clone()
    h.diagonal().masked_fill_(h.diagonal() == 0, 1.0)
    h.diagonal().add_(h.diagonal().mean() * damp)
    return h


def _objective(d: torch.Tensor, approx: torch.Tensor, h: torch.Tensor) -> float:
    e = (d - approx).double()
    return float(torch.einsum("oi,ij,oj->", e, h, e))


def _als(d: torch.Tensor, h: torch.Tensor, rank: int, steps: int = 400) -> float:
    """Alternating least squares on tr((D − BA) H (D − BA)ᵀ): each half-step is exact."""
    g = torch.Generator().manual_seed(1)
    a = torch.randn(rank, d.shape[1], generator=g, dtype=torch.float64)
    d = d.double()
    for _ in range(steps):
        b = d @ h @ a.T @ torch.linalg.inv(a @ h @ a.T)
        a = torch.linalg.solve(b.T @ b, b.T @ d)
    return _objective(d, b @ a, h)


def _layer(out_f: int, in_f: int, tokens: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    # activations with a few loud channels, as trained LMs have
    x = torch.randn(tokens, in_f, generator=g, dtype=torch.float64)
    x[:, : max(1, in_f // 16)] *= 20
    d = torch.randn(out_f, in_f, generator=g, dtype=torch.float64)
    return d, x.T @ x


@pytest.mark.parametrize("out_f,in_f,tokens,rank", [(24, 40, 200, 4), (64, 48, 30, 8), (96, 128, 512, 8)])
def test_activation_space_fit_is_the_optimum(out_f, in_f, tokens, rank):
    d, h = _layer(out_f, in_f, tokens)
    a, b = res.residual_lora(d, rank, h)
    assert a.shape == (rank, in_f) and b.shape == (out_f, rank) and a.dtype == torch.float32
    hd = _damped(h)
    ours = _objective(d, b.double() @ a.double(), hd)
    best = _als(d, hd, rank)
    assert ours == pytest.approx(best, rel=2e-3)
    # and it beats the weight-space truncation on the activation objective
    a_w, b_w = res.residual_lora(d, rank, None)
    assert ours < _objective(d, b_w.double() @ a_w.double(), hd)


def test_weight_space_fit_is_the_truncated_svd():
    d, _ = _layer(80, 20, 10)  # 6 + 16 >= 20: the exact path
    a, b = res.residual_lora(d, 6, None)
    u, s, vh = torch.linalg.svd(d)
    exact = (u[:, :6] * s[:6]) @ vh[:6]
    assert torch.linalg.matrix_norm(b.double() @ a.double() - exact) / torch.linalg.matrix_norm(exact) < 1e-6
    # a flat spectrum (rounding noise) on the randomized path: within 2% of the optimal error
    d, _ = _layer(200, 160, 10)
    a, b = res.residual_lora(d, 8, None)
    s = torch.linalg.svdvals(d)
    optimum = float(s[8:].square().sum())
    assert float(torch.linalg.matrix_norm(d - b.double() @ a.double()) ** 2) <= optimum * 1.02


def test_randomized_path_matches_exact_svd_on_a_decaying_spectrum():
    g = torch.Generator().manual_seed(3)
    q1, _ = torch.linalg.qr(torch.randn(300, 300, generator=g, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(200, 200, generator=g, dtype=torch.float64))
    s = 0.9 ** torch.arange(200, dtype=torch.float64)
    m = (q1[:, :200] * s) @ q2.T
    u, sv, vh = res.top_singular(m, 8)  # 8 + 16 < 200: the randomized path
    assert torch.allclose(sv, s[:8], rtol=1e-6)
    assert torch.allclose((u * sv) @ vh, (q1[:, :8] * s[:8]) @ q2[:, :8].T, atol=1e-6)


def test_deterministic_and_exact_residuals_vanish():
    d, h = _layer(32, 64, 100)
    first = res.residual_lora(d, 4, h)
    again = res.residual_lora(d, 4, h)
    assert all(torch.equal(x, y) for x, y in zip(first, again))
    low = torch.randn(32, 2, dtype=torch.float64) @ torch.randn(2, 64, dtype=torch.float64)
    a, b = res.residual_lora(low, 4, h)
    assert torch.allclose(b.double() @ a.double(), low, atol=1e-5)
    zero_a, zero_b = res.residual_lora(torch.zeros(32, 64), 4, h)
    assert not (zero_b @ zero_a).any()


# ---- the adapter a merge writes ------------------------------------------------------------------

def _plus_lora(model, weights: dict[str, torch.Tensor]):
    """The dense float model with each linear's W + B·A from the adapter's weights (the reference)."""
    with torch.no_grad():
        for name, module in model.named_modules():
            key = f"base_model.model.{name}.lora_A.weight"
            if key in weights:
                module.weight += weights[key.replace("lora_A", "lora_B")].float() @ weights[key].float()
    return model


@pytest.mark.parametrize("method", ["calibrated", "rtn"])
def test_merge_writes_a_peft_lora_that_brings_the_merged_model_closer(tiny_gptq_dir, tmp_path, method):
    """PEFT loads OUT/residual-lora onto the merged checkpoint as gptqmodel loads it; the result is the
    merged model plus B·A (checked against the dense float model) and closer to the adapted model."""
    import json

    from peft import PeftModel

    from merge_helpers import heldout_ids, random_rotations
    from oftsurgery.evaluation.evaluate import load_dequantized_model, load_quantized_model
    from oftsurgery.merge import MergeOptions, merge_checkpoint
    from oftsurgery.oft.adapter_io import load_rotations
    from safetensors.torch import load_file

    rot = random_rotations(tiny_gptq_dir, tmp_path / "r.safetensors", strength=0.05)
    out = tmp_path / "out"
    report = merge_checkpoint(tiny_gptq_dir, rot, out, MergeOptions(method=method, calib_tokens=512, seq_len=64,
                                                                    progress=False, residual_rank=4))
    config = json.loads((out / "residual-lora" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 4
    weights = load_file(str(out / "residual-lora" / "adapter_model.safetensors"))
    assert len(weights) == 2 * len(report.layers) and report.residual_lora_bytes == sum(
        t.numel() * t.element_size() for t in weights.values())
    assert all(l.residual_lora is not None and l.residual_lora < l.residual_after for l in report.layers)
    assert json.loads((out / "merge_report.json").read_text())["summary"]["kept_fraction_lora"] > report.kept_fraction
    card = (out / "README.md").read_text()
    assert 'subfolder="residual-lora"' in card and "--enable-lora --max-lora-rank 4" in card

    ids = heldout_ids(tiny_gptq_dir, 1, 24)
    merged_float = load_dequantized_model(out)
    adapted = load_dequantized_model(tiny_gptq_dir, rotations=load_rotations(rot))
    with_lora = _plus_lora(load_dequantized_model(out), weights)
    with torch.no_grad():
        expected = with_lora(input_ids=ids).logits
        # gptqmodel's wrapper holds the transformers model PEFT (and transformers' own loader) sees
        peft_model = PeftModel.from_pretrained(load_quantized_model(out).model, str(out / "residual-lora"))
        got = peft_model(input_ids=ids).logits.float()
        target = adapted(input_ids=ids).logits
        merged = merged_float(input_ids=ids).logits
    # gptqmodel's fp16 kernel vs float, far below what the LoRA changes
    assert (got - expected).abs().max() < min(2e-2, float((expected - merged).abs().max()) / 3)
    assert (expected - target).pow(2).mean() < (merged - target).pow(2).mean()


def test_verify_reports_merged_and_merged_plus_lora(tiny_gptq_dir, tmp_path):
    """verify's merged + LoRA figure is the NLL of the dense float model holding Ŵ + B·A."""
    from merge_helpers import random_rotations
    from oftsurgery.evaluation.evaluate import eval_text, load_dequantized_model, mean_nll, token_windows
    from oftsurgery.merge import MergeOptions, merge_checkpoint
    from oftsurgery.verify import verify_merge
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    rot = random_rotations(tiny_gptq_dir, tmp_path / "r.safetensors", strength=0.05)
    out = tmp_path / "out"
    merge_checkpoint(tiny_gptq_dir, rot, out, MergeOptions(method="rtn", progress=False, residual_rank=8))
    figures = verify_merge(out, tiny_gptq_dir, rot, num_tokens=256, seq_len=64)
    assert "merged + residual LoRA" in figures.render() and "retention_lora" in figures.to_dict()

    weights = load_file(str(out / "residual-lora" / "adapter_model.safetensors"))
    model = _plus_lora(load_dequantized_model(out), weights)
    windows = token_windows(eval_text(None, max_chars=256 * 12)[0], AutoTokenizer.from_pretrained(str(tiny_gptq_dir)),
                            256, 64)
    expected = mean_nll(model, windows)
    assert figures.nll_merged_lora == pytest.approx(expected, abs=1e-4)
    assert abs(figures.nll_merged_lora - figures.nll_merged) > 1e-4  # the LoRA was really applied
