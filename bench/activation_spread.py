"""How unevenly a model's linears see their inputs: the statistic that decides how much room the
calibrated merge has to hide a fine-tune's rounding (issue 20, fidelity at width).

For each decoder layer's q_proj, o_proj, gate_proj and down_proj input, over calibration text, with
H = Σ x xᵀ (float64):
  - participation ratio, as a fraction of the width: (tr H)² / (‖H‖_F² · in). 1 for isotropic inputs
    (every direction as loud: rounding to nearest is near-optimal and an error-compensating solve
    has nowhere cheap to put a fine-tune's rounding); a trained LLM's inputs sit far below.
  - outlier ratio: the largest diagonal entry of H over its median (massive activations).
  - the share of tr H held by the top 1% of eigen-directions.
One row per linear kind: the mean over layers, and the range.

    python bench/activation_spread.py --model ~/.cache/oftsurgery/smollm2-135m-gptq-group_size128
    python bench/activation_spread.py --model /tmp/wide --device cuda     # bench/wide_model.py's fp16 model

The checkpoint may be quantized (GPTQ/AWQ: dequantized, computed in float32) or a plain fp16 one.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

KINDS = ("q_proj", "o_proj", "gate_proj", "down_proj")


def load_model(path: Path, device: str):
    import torch
    from transformers import AutoModelForCausalLM

    config = json.loads((path / "config.json").read_text())
    if "quantization_config" in config or (path / "quantize_config.json").exists():
        from oftsurgery.evaluation.evaluate import load_dequantized_model

        model = load_dequantized_model(path)
    else:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    return model.to(device).eval()


def spread(model, windows) -> dict[str, list[dict]]:
    """Per linear kind, one dict of the three statistics per decoder layer."""
    import torch

    sums: dict[str, torch.Tensor] = {}
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in KINDS:
            def add(mod, inputs, name=name):
                x = inputs[0].reshape(-1, inputs[0].shape[-1]).double()
                sums[name] = sums.get(name, 0) + x.T @ x
            hooks.append(module.register_forward_pre_hook(add))
    with torch.no_grad():
        for row in windows:
            model(row.unsqueeze(0).to(next(model.parameters()).device))
    for hook in hooks:
        hook.remove()
    found: dict[str, list[dict]] = {kind: [] for kind in KINDS}
    for name, H in sums.items():
        n = H.shape[0]
        eig = torch.linalg.eigvalsh(H).clamp_min(0).flip(0)
        diag = H.diagonal()
        found[name.rsplit(".", 1)[-1]].append({
            "participation": float(eig.sum() ** 2 / (eig.square().sum() * n)),
            "outlier": float(diag.max() / diag.median().clamp_min(1e-30)),
            "top1pct": float(eig[: max(1, n // 100)].sum() / eig.sum()),
            "width": n,
        })
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--calib", default="english", choices=["english", "code"], help="built-in text (calib split)")
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", default=None, help="also write the per-layer figures here")
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from oftsurgery.evaluation.evaluate import token_windows
    from oftsurgery.texts import builtin_text

    path = Path(args.model).expanduser()
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    windows = token_windows(builtin_text(args.calib, "calib", max_chars=args.tokens * 8), tokenizer, args.tokens, 256)
    found = spread(load_model(path, args.device), windows)
    print(f"{path.name}: {windows.numel()} tokens of built-in {args.calib} (calib split)")
    print("| input of | width | participation / width | largest / median diag | top 1% directions' share |")
    print("|---|---|---|---|---|")
    for kind, rows in found.items():
        if not rows:
            continue
        cells = []
        for key, fmt in (("participation", "{:.3f}"), ("outlier", "{:.0f}"), ("top1pct", "{:.0%}")):
            values = [r[key] for r in rows]
            cells.append(f"{fmt.format(sum(values) / len(values))} ({fmt.format(min(values))}–{fmt.format(max(values))})")
        print(f"| {kind} | {rows[0]['width']} | " + " | ".join(cells) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(found, indent=1))


if __name__ == "__main__":
    main()
