"""The model card (`README.md`) that travels with a checkpoint oftsurgery writes or publishes.

The YAML front matter is what the Hub reads (`base_model`, `base_model_relation`, `library_name`,
`tags`); the body says what was done and how faithfully. `render_model_card(...)` renders one from
facts at hand (`render_merge_card(report, plan)` for a `MergeReport`); `ensure_model_card(folder)`, for
`push`, writes README.md only when it is missing, from the folder's quantization config and its
merge report if there is one. docs/push.md ("The model card").
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from oftsurgery.io import MERGE_REPORT

CARD_FILE = "README.md"
QUANT_METHODS = ("gptq", "awq")
BASE_MODEL_RELATIONS = ("adapter", "merge", "quantized", "finetune")
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")

# Labels for the figures a merge report carries; figures not listed keep their own key as label.
_FIGURE_LABELS = {
    "codes_changed": "Integer codes changed by the merge",
    "mean_residual_before": "Mean per-layer output residual without the adapter",
    "mean_residual_after": "Mean per-layer output residual of the merged layers",
    "kept_fraction": "Fine-tune kept per layer (1 − after/before)",
    "mean_residual_lora": "Mean per-layer output residual of the merged layers + residual LoRA",
    "kept_fraction_lora": "Fine-tune kept per layer with the residual LoRA",
}


def is_hub_model_id(value: str | None) -> bool:
    """True for `namespace/name` strings the Hub accepts as `base_model` (a local path is not one)."""
    return bool(value) and _HUB_ID.match(value) is not None and ".." not in value and "--" not in value


def render_model_card(
    *,
    quant_method: str,
    base_model: str | None = None,
    adapter: str | None = None,
    command: str | None = None,
    fidelity: Mapping[str, Any] | None = None,
    quant_description: str | None = None,
    merge_method: str | None = None,
    repo_id: str | None = None,
    base_model_relation: str | None = None,
    extra_tags: Sequence[str] = (),
    warnings: Sequence[str] = (),
    residual_lora: Mapping[str, Any] | None = None,
) -> str:
    """Render a model card: YAML front matter plus a body describing the checkpoint.

    quant_method: "gptq" or "awq" (becomes a tag).
    base_model: the Hub id the weights derive from. Only a `namespace/name` id goes into the front
        matter (the Hub rejects anything else); a local path is mentioned in the body instead.
    adapter: the OFT adapter merged into the weights (Hub id or path), or None for a checkpoint
        published as it is.
    command: the exact command line that produced the checkpoint (shown verbatim).
    fidelity: figures of how well the merge kept the fine-tune, label -> value (floats are shown
        with 4 significant digits); see `card_fields_from_merge_report` for the merge report's.
    quant_description: e.g. "GPTQ 4-bit g128 sym (gptq)" (`QuantConfig.describe()`).
    merge_method: how the rotation was folded in ("rtn", "calibrated", …).
    repo_id: where the card will live, for the loading snippet.
    base_model_relation: defaults to "finetune" when an adapter was merged (the weights now carry a
        fine-tune of base_model; "adapter" would claim the repo *is* an adapter) and "quantized"
        otherwise. Written only together with a Hub-id base_model.
    warnings: lines the user must not miss (e.g. the merge report's warnings), shown in the body.
    residual_lora: {"rank": R, "bytes": N} when the folder holds the merge's residual LoRA
        (residual-lora/): the card says how to load it with PEFT and serve it with vLLM.
    """
    import yaml  # PyYAML comes with huggingface_hub and transformers

    method = quant_method.lower()
    if method not in QUANT_METHODS:
        raise ValueError(f"quant_method must be one of {QUANT_METHODS}, not {quant_method!r}")
    relation = base_model_relation or ("finetune" if adapter else "quantized")
    if relation not in BASE_MODEL_RELATIONS:
        raise ValueError(f"base_model_relation must be one of {BASE_MODEL_RELATIONS}, not {relation!r}")

    meta: dict[str, Any] = {}
    if is_hub_model_id(base_model):
        meta["base_model"] = base_model
        meta["base_model_relation"] = relation
    meta["library_name"] = "transformers"
    tags = ["oftsurgery", "oft", method]
    tags += [t for t in extra_tags if t not in tags]
    meta["tags"] = tags
    front = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True).strip()

    name = repo_id.split("/")[-1] if repo_id else "Quantized model with a merged OFT fine-tune" if adapter else "Quantized model"
    lines = [f"---\n{front}\n---", "", f"# {name}", ""]
    if adapter:
        lines.append(
            f"A {method.upper()} checkpoint with an OFT (orthogonal fine-tuning) adapter merged into its "
            "quantized weights by [oftsurgery](https://pypi.org/project/oftsurgery/): the rotation was "
            "folded into the weights (W′ = W·Rᵀ) and requantized, so it loads like any quantized model."
        )
    else:
        lines.append(f"A {method.upper()} quantized checkpoint published with oftsurgery.")
    lines.append("")
    facts = []
    if base_model:
        facts.append(f"- Base model: {_model_link(base_model)}")
    if adapter:
        facts.append(f"- Merged adapter: {_model_link(adapter)}")
    if quant_description:
        facts.append(f"- Quantization: {quant_description}")
    if merge_method:
        facts.append(f"- Merge method: `{merge_method}`")
    lines += facts + ([""] if facts else [])

    target = repo_id or "path/to/this/model"
    lines += [
        "## Use",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'model = AutoModelForCausalLM.from_pretrained("{target}", device_map="auto")',
        f'tokenizer = AutoTokenizer.from_pretrained("{target}")',
        "```",
        "",
        f"or serve it with vLLM: `vllm serve {target}`.",
        "",
    ]
    if residual_lora:
        lines += [
            "### With the residual LoRA",
            "",
            f"`residual-lora/` holds a rank-{residual_lora.get('rank')} LoRA adapter "
            f"({int(residual_lora.get('bytes') or 0) / 1e6:.1f} MB, fp16) with what the requantized layers could "
            "not hold of the fine-tune. Add it for the closest match to the fine-tuned model:",
            "",
            "```python",
            "from peft import PeftModel",
            "",
            f'model = PeftModel.from_pretrained(model, "{target}", subfolder="residual-lora")',
            "```",
            "",
            f"or with vLLM: `vllm serve {target} --enable-lora --max-lora-rank {residual_lora.get('rank')} "
            f"--lora-modules residual=<local copy of {target}>/residual-lora`, then request model `residual`.",
            "",
        ]
    if fidelity:
        lines += ["## Fidelity of the merge", "", "| Figure | Value |", "|---|---|"]
        lines += [f"| {_FIGURE_LABELS.get(k, k)} | {_format_value(v)} |" for k, v in fidelity.items()]
        lines.append("")
    if warnings:
        lines += ["## Warnings", ""] + [f"- {w}" for w in warnings] + [""]
    if command:
        lines += ["## How it was made", "", "```bash", command, "```", ""]
    return "\n".join(lines)


def _model_link(ref: str) -> str:
    return f"[{ref}](https://huggingface.co/{ref})" if is_hub_model_id(ref) and not Path(ref).exists() else f"`{ref}`"


def _format_value(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, float):
        return str(value)
    return f"{value:.4g}"


def card_fields_from_merge_report(report: Mapping[str, Any]) -> dict[str, Any]:
    """Turn a merge report (`MergeReport.to_dict()`, i.e. merge_report.json) into card fields.

    Reads `adapter`, `command`, `method` (the merge method), `output_format`, `fidelity` and the
    `summary` figures; `base_model` is taken from `base_model` if the report has one, else from
    `checkpoint` when that is a Hub id rather than a local directory.
    """
    fields: dict[str, Any] = {}
    if report.get("adapter"):
        fields["adapter"] = str(report["adapter"])
    if report.get("command"):
        fields["command"] = str(report["command"])
    if report.get("method"):
        fields["merge_method"] = str(report["method"])
    if report.get("output_format"):
        fields["quant_description"] = str(report["output_format"])
    base = report.get("base_model") or report.get("checkpoint")
    if base and is_hub_model_id(str(base)) and not Path(str(base)).exists():
        fields["base_model"] = str(base)
    figures: dict[str, Any] = {}
    summary = report.get("summary") or {}
    for key in ("codes_changed", "mean_residual_before", "mean_residual_after", "kept_fraction",
                "mean_residual_lora", "kept_fraction_lora"):
        if isinstance(summary.get(key), (int, float)):
            figures[key] = summary[key]
    figures.update(report.get("fidelity") or {})
    if figures:
        fields["fidelity"] = figures
    if summary.get("warnings"):
        fields["warnings"] = list(summary["warnings"])
    if report.get("residual_rank"):
        fields["residual_lora"] = {"rank": report["residual_rank"], "bytes": report.get("residual_lora_bytes", 0)}
    return fields


def render_merge_card(report: Any, plan: Any = None, *, base_model: str | None = None, repo_id: str | None = None) -> str:
    """The card for a merge's output, from its `MergeReport` (and `MergePlan`, for the quant method)."""
    fields = card_fields_from_merge_report(report.to_dict() if hasattr(report, "to_dict") else dict(report))
    quant_method = getattr(getattr(plan, "target", None), "method", None)
    if quant_method is None:
        quant_method = "awq" if "AWQ" in fields.get("quant_description", "") else "gptq"
    if base_model:
        fields["base_model"] = base_model
    return render_model_card(quant_method=quant_method, repo_id=repo_id, **fields)


def ensure_model_card(folder: str | Path, *, repo_id: str | None = None, base_model: str | None = None) -> Path | None:
    """Write README.md into `folder` if it has none; return its path, or None when one existed.

    Facts come from the folder itself: its quantization config and, when present, the merge report.
    The file is created exclusively, so a README.md that appears meanwhile is never overwritten.
    """
    from oftsurgery.quant.config import load_quant_config

    root = Path(folder)
    card = root / CARD_FILE
    if card.exists():
        return None
    quant = load_quant_config(root)
    fields: dict[str, Any] = {"quant_description": quant.describe()}
    report_path = root / MERGE_REPORT
    if report_path.is_file():
        try:
            fields.update(card_fields_from_merge_report(json.loads(report_path.read_text(encoding="utf-8"))))
        except (OSError, ValueError, AttributeError):
            pass  # an unreadable report only costs the card its figures
    if base_model:
        fields["base_model"] = base_model
    text = render_model_card(quant_method=quant.method, repo_id=repo_id, **fields)
    try:
        with open(card, "x", encoding="utf-8") as fh:  # "x": never overwrite a README.md that appeared meanwhile
            try:
                fh.write(text)
            except BaseException:
                card.unlink(missing_ok=True)  # no half-written card left behind
                raise
    except FileExistsError:
        return None
    return card
