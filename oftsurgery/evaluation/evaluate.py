"""Loading quantized checkpoints as models, and measuring them: perplexity and retention.

Retention (docs/merge-methods.md) = (L_base − L_merged) / (L_base − L_attached), with L the mean
next-token NLL on held-out text: 100% means the merged checkpoint kept the whole fine-tune, 0% that
the merge was a no-op.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from oftsurgery.reporting.console import third_party_output
from oftsurgery.errors import CalibrationError, InvalidCheckpointError

if TYPE_CHECKING:
    import torch

DEFAULT_EVAL_TEXT = "builtin:english"


def load_quantized_model(path: str | Path, device: str = "cpu", backend: str | None = None):
    """Load a GPTQ/AWQ checkpoint from disk with gptqmodel's kernels.

    backend: a gptqmodel BACKEND name ("torch", "marlin", ...); default torch on CPU, gptqmodel's
    automatic choice on CUDA.
    """
    from oftsurgery._deps import gptqmodel
    from oftsurgery.quant.config import load_quant_config

    load_quant_config(path)  # refuse unsupported formats with our own message first
    gm = gptqmodel()
    from gptqmodel.utils.backend import BACKEND

    if backend is not None:
        backend = BACKEND(backend)
    else:
        backend = BACKEND.TORCH if not str(device).startswith("cuda") else BACKEND.AUTO
    try:
        # gptqmodel prints its banner and config to stdout; keep stdout for our own output (--json)
        with third_party_output():
            model = gm.GPTQModel.load(str(path), backend=backend, device=device)
    except Exception as exc:
        raise InvalidCheckpointError(f"gptqmodel could not load {path} ({type(exc).__name__}: {exc}).") from None
    model.eval()
    return model


def eval_text(source: str | None, max_chars: int | None = None) -> tuple[str, str]:
    """(text, description) for evaluation: a file, or built-in held-out text (never calibration/training)."""
    from oftsurgery.texts import builtin_text

    source = source or DEFAULT_EVAL_TEXT
    if source.startswith("builtin:"):
        kind = source.split(":", 1)[1]
        return builtin_text(kind, "heldout", max_chars=max_chars), f"built-in {kind} text (held-out split)"
    path = Path(source)
    try:
        return path.read_text(encoding="utf-8")[:max_chars], f"file {path}"
    except (OSError, UnicodeDecodeError) as exc:
        raise CalibrationError(f"Evaluation text {path} cannot be read ({exc}).") from None


def token_windows(text: str, tokenizer, num_tokens: int, seq_len: int) -> "torch.Tensor":
    import torch

    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    rows = min(max(1, num_tokens // seq_len), ids.numel() // seq_len)
    if rows == 0:
        raise CalibrationError(f"The evaluation text has only {ids.numel()} tokens; {seq_len} are needed.")
    return ids[: rows * seq_len].view(rows, seq_len)


def _input_device(model):
    device = getattr(model, "device", None)
    if device is None:
        device = next(model.parameters()).device
    return device


def mean_nll(model, windows: "torch.Tensor") -> float:
    """Mean next-token negative log-likelihood of a causal LM over token windows."""
    import torch

    total, count = 0.0, 0
    with torch.no_grad():
        for row in windows:
            ids = row.unsqueeze(0).to(_input_device(model))
            logits = model(input_ids=ids).logits.float()
            loss = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum")
            total += float(loss)
            count += ids.shape[1] - 1
    return total / count


def logits_of(model, windows: "torch.Tensor") -> "torch.Tensor":
    import torch

    with torch.no_grad():
        device = _input_device(model)
        return torch.cat([model(input_ids=row.unsqueeze(0).to(device)).logits.float().cpu() for row in windows])


@dataclass
class FidelityFigures:
    nll_base: float
    nll_attached: float
    nll_merged: float
    max_logit_diff: float
    eval_tokens: int
    eval_text: str
    nll_merged_lora: float | None = None  # merged + its residual LoRA (merge --residual-rank), when it has one

    @property
    def ppl_base(self) -> float:
        return math.exp(self.nll_base)

    @property
    def ppl_attached(self) -> float:
        return math.exp(self.nll_attached)

    @property
    def ppl_merged(self) -> float:
        return math.exp(self.nll_merged)

    @property
    def retention(self) -> float:
        return retention(self.nll_base, self.nll_attached, self.nll_merged)

    @property
    def retention_lora(self) -> float | None:
        if self.nll_merged_lora is None:
            return None
        return retention(self.nll_base, self.nll_attached, self.nll_merged_lora)

    def to_dict(self) -> dict:
        lora = {} if self.nll_merged_lora is None else {
            "ppl_merged_lora": math.exp(self.nll_merged_lora), "nll_merged_lora": self.nll_merged_lora,
            "retention_lora": self.retention_lora}
        return {**lora,
            "ppl_base": self.ppl_base, "ppl_attached": self.ppl_attached, "ppl_merged": self.ppl_merged,
            "nll_base": self.nll_base, "nll_attached": self.nll_attached, "nll_merged": self.nll_merged,
            "retention": self.retention, "max_logit_diff": self.max_logit_diff,
            "eval_tokens": self.eval_tokens, "eval_text": self.eval_text,
        }

    def render(self) -> str:
        rows = [("quantized base", self.ppl_base, "0%"), ("attached (adapter)", self.ppl_attached, "100%"),
                ("merged", self.ppl_merged, f"{self.retention:.1%}")]
        if self.nll_merged_lora is not None:
            rows.append(("merged + residual LoRA", math.exp(self.nll_merged_lora), f"{self.retention_lora:.1%}"))
        lines = [f"{'model':<22} {'perplexity':>10}  retention", *(f"{n:<22} {p:>10.3f}  {r:>9}" for n, p, r in rows)]
        lines.append(f"max |logit(merged) - logit(attached)| = {self.max_logit_diff:.4f} "
                     f"on {self.eval_tokens} tokens of {self.eval_text}")
        return "\n".join(lines)


def retention(nll_base: float, nll_attached: float, nll_merged: float) -> float:
    gain = nll_base - nll_attached
    if abs(gain) < 1e-12:
        return float("nan")
    return (nll_base - nll_merged) / gain


def load_dequantized_model(path: str | Path, dtype=None, rotations=None):
    """A plain transformers model whose linears hold our dequantized weights (the reference forward).

    This is the independent check of a quantized checkpoint: our codec's float weights in the stock
    transformers classes (fused modules included: Phi-3's gate_up_proj and transformers 5's fused
    MoE experts are assembled from the split layers gptqmodel stores), against which gptqmodel's
    kernels and transformers' loader are compared. With `rotations` (a RotationSet), every layer it
    targets holds W·Rᵀ (and oft_s) instead: the adapted model, computed in float.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from oftsurgery.errors import OftSurgeryError
    from oftsurgery.io import CheckpointReader
    from oftsurgery.merge.calibration.skeleton import CheckpointTensors, hf_config_from, stock_tensor
    from oftsurgery.quant.codec import layer_quant_config, unpack_layer
    from oftsurgery.quant.config import load_quant_config

    dtype = dtype or torch.float32
    reader = CheckpointReader(path)
    qcfg = load_quant_config(path)

    def linear_weight(prefix: str):
        tensors = {n[len(prefix) + 1 :]: reader.get(n) for n in reader.tensors
                   if n.startswith(prefix + ".") and "." not in n[len(prefix) + 1 :]}
        weight = unpack_layer(tensors, layer_quant_config(qcfg, prefix) or qcfg).dequantize()
        if rotations is not None and prefix in rotations.blocks:
            weight = rotations.merged_weight(prefix, weight)
        return weight

    model = AutoModelForCausalLM.from_config(hf_config_from(reader.config), dtype=dtype)
    tensors = CheckpointTensors(reader.tensors, reader.get, linear_weight)
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    state = {}
    try:
        for name, _ in model.named_parameters():
            if tied and name == "lm_head.weight" and not tensors.has(name):
                continue
            state[name] = stock_tensor(model, "", name, tensors).to(dtype)
    except OftSurgeryError as exc:
        raise InvalidCheckpointError(f"{path} does not match its config: {str(exc).rstrip('.')}.") from None
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not m.endswith("lm_head.weight") or not tied]
    if missing or unexpected:
        raise InvalidCheckpointError(f"{path} does not match its config (missing {missing[:2]}, unexpected {unexpected[:2]}).")
    if tied:
        model.tie_weights()
    return model.eval()
