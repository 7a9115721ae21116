"""`merge --residual-rank R`: the residual LoRA of each requantized linear, and the PEFT adapter folder.

Per targeted linear, `fit_residual_adapter` fits B·A ≈ W·Rᵀ − Ŵ (solve/residual math) on the
solver's calibration statistics (weight space for data-free merges) and measures what it leaves on
the held-out rows. `write_residual_adapter` writes OUT/residual-lora: a PEFT LoRA adapter
(`PeftModel.from_pretrained(merged_model, OUT/residual-lora)`, vLLM `--enable-lora`), fp16.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from oftsurgery.merge.solve.hessian import CalibrationInputs
    from oftsurgery.quant.grid import QuantizedWeight

from oftsurgery.io.ownership import ADAPTER_WEIGHTS as WEIGHTS_FILE
from oftsurgery.io.ownership import FORMAT_KEY, RESIDUAL_LORA_FORMAT

CONFIG_FILE = "adapter_config.json"


def fit_residual_adapter(merged: "QuantizedWeight", target: "torch.Tensor", rank: int,
                         inputs: "CalibrationInputs | None", *, device) -> tuple[dict[str, "torch.Tensor"], float]:
    """({"lora_A": [R, in], "lora_B": [out, R]} on the host in fp16, ‖(Ŵ + B·A − T)X‖ / ‖T X‖).

    With `inputs` the fit uses the fitted rows' H and the figure is measured on the held-out rows
    (as the report's other residuals); without, both are in weight space.
    """
    import torch

    from oftsurgery.merge.solve.residual import DAMP, damped_factor, residual_lora

    weight = merged.dequantize().to(device, torch.float32)
    target = target.to(device, torch.float32)
    residual = target - weight
    lower = None
    if inputs is not None:  # one factor per input, shared by the linears that read it (q/k/v, gate/up)
        key = ("residual_factor", DAMP)
        if key not in inputs.fit.cache:
            inputs.fit.cache[key] = damped_factor(inputs.fit.matrix, DAMP)
        lower = inputs.fit.cache[key]
    a, b = residual_lora(residual, rank, lower=lower)
    a16, b16 = a.to(torch.float16), b.to(torch.float16)
    if not (torch.isfinite(a16).all() and torch.isfinite(b16).all()):  # beyond fp16's range: keep float32
        a16, b16 = a, b
    left = residual - b16.float() @ a16.float()
    if inputs is not None:
        measured = inputs.measured
        err, ref = float(measured.error(left.T)), float(measured.error(target.T))
    else:
        err = float(torch.linalg.vector_norm(left, dtype=torch.float64) ** 2)
        ref = float(torch.linalg.vector_norm(target, dtype=torch.float64) ** 2)
    return {"lora_A": a16.cpu().contiguous(), "lora_B": b16.cpu().contiguous()}, math.sqrt(err / ref) if ref > 0 else 0.0


def target_modules(prefixes: list[str]) -> list[str]:
    """PEFT's `target_modules`: the linears' last names (q_proj, …), the form vLLM expects."""
    return sorted({p.rsplit(".", 1)[-1] for p in prefixes})


def write_residual_adapter(folder: Path, adapters: dict[str, dict[str, "torch.Tensor"]], rank: int) -> int:
    """Write the PEFT LoRA adapter folder; return its weights' size in bytes.

    lora_alpha = rank, so PEFT's scaling alpha/r is 1 and B·A is added as fitted. A linear of a kind
    listed in target_modules that has no entry here (none in a merge of every linear of the kind)
    gets PEFT's zero-initialised B, i.e. no change.
    """
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"base_model.model.{prefix}.{part}.weight": tensor
               for prefix, parts in sorted(adapters.items()) for part, tensor in parts.items()}
    save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": "pt", FORMAT_KEY: RESIDUAL_LORA_FORMAT})
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": None,
        "r": rank, "lora_alpha": rank, "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
        "use_rslora": False, "use_dora": False, "init_lora_weights": True, "inference_mode": True,
        "target_modules": target_modules(list(adapters)), "modules_to_save": None,
        "rank_pattern": {}, "alpha_pattern": {},
    }
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return sum(t.numel() * t.element_size() for t in tensors.values())
