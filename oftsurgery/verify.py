"""`verify`: does the merged checkpoint behave like the attached model it came from?

Three models are loaded from disk with gptqmodel's kernels: the quantized base, the base with the
adapter attached (oftsurgery's OFT wrappers for adapter folders; input/output hooks applying the
materialized blocks for rotations files), and the merged checkpoint. On held-out text (never the
calibration or training split) we report their perplexities, the retention and the largest logit
difference between merged and attached.
"""

from __future__ import annotations

from pathlib import Path

from oftsurgery.errors import InvalidAdapterError, InvalidCheckpointError
from oftsurgery.evaluation.evaluate import FidelityFigures, eval_text, load_quantized_model, logits_of, mean_nll, token_windows
from oftsurgery.io.ownership import RESIDUAL_LORA_DIR

DEFAULT_EVAL_TOKENS = 4096
DEFAULT_SEQ_LEN = 256


def attach_for_evaluation(model, adapter: str | Path) -> int:
    """Attach an adapter folder or rotations file to a loaded quantized model, in place; return #modules."""
    import torch
    from transformers import PreTrainedModel

    # gptqmodel returns a wrapper whose `.model` is the transformers model the module paths refer to
    inner = model if isinstance(model, PreTrainedModel) else model.model
    source = Path(adapter)
    if source.is_dir():
        from oftsurgery.oft.adapter_io import read_peft_adapter
        from oftsurgery.oft.config import GENERATION_OUTPUT_SIDE

        peft_adapter = read_peft_adapter(source)
        if peft_adapter.generation != GENERATION_OUTPUT_SIDE and not peft_adapter.legacy_s:
            from oftsurgery.oft.model import load_oft_adapter

            inner.eval()
            report = load_oft_adapter(inner, source, freeze_base=False)
            return len(report.modules)
    from oftsurgery.oft.adapter_io import load_rotations
    from oftsurgery.oft.rotation import apply_rotation_to_input

    rotations = load_rotations(source)
    for name, blocks in rotations.blocks.items():
        try:
            module = inner.get_submodule(name)
        except AttributeError:
            raise InvalidAdapterError(f"The adapter targets {name}, which the base model does not have.") from None
        scale = rotations.scales.get(name)
        if name in rotations.output_side:
            def rotate_output(mod, inputs, output, blocks=blocks):
                dense = torch.block_diag(*blocks.expand(-(-output.shape[-1] // blocks.shape[-1]), -1, -1))
                return (output.float() @ dense[: output.shape[-1], : output.shape[-1]]).to(output.dtype)
            module.register_forward_hook(rotate_output)
        else:
            def rotate_input(mod, inputs, blocks=blocks):
                x = inputs[0]
                b = blocks.shape[-1]
                full = blocks.expand(x.shape[-1] // b, -1, -1) if blocks.shape[0] == 1 else blocks
                return (apply_rotation_to_input(x.float(), full).to(x.dtype),) + tuple(inputs[1:])
            module.register_forward_pre_hook(rotate_input)
        if scale is not None:
            def rescale(mod, inputs, output, scale=scale):
                return (output.float() * scale.reshape(-1)).to(output.dtype)
            module.register_forward_hook(rescale)
    return len(rotations.blocks)


def check_verify_inputs(merged: str | Path, base: str | Path, adapter: str | Path) -> None:
    """Refuse broken, unsupported or mismatched inputs before three models are loaded: headers,
    the adapter against BASE, and MERGED's provenance (its merge_report.json and shapes) against
    BASE and the adapter (`oftsurgery.reporting.provenance`)."""
    from oftsurgery.io import CheckpointReader
    from oftsurgery.merge.plan import plan_merge
    from oftsurgery.oft.adapter_io import load_rotations
    from oftsurgery.reporting.provenance import check_provenance
    from oftsurgery.quant.config import load_quant_config

    merged_reader = CheckpointReader(merged)
    merged_quant = load_quant_config(merged)
    base_reader = CheckpointReader(base)
    base_quant = load_quant_config(base)
    rotations = load_rotations(adapter)
    plan_merge(base_reader, base_quant, rotations)
    check_provenance(merged_reader, merged_quant, base_reader, base_quant, rotations)


def verify_merge(merged: str | Path, base: str | Path, adapter: str | Path, *, text: str | None = None,
                 num_tokens: int = DEFAULT_EVAL_TOKENS, seq_len: int = DEFAULT_SEQ_LEN,
                 device: str = "cpu", float32: bool | None = None) -> FidelityFigures:
    """Perplexity of base / attached / merged on held-out text, retention and max logit difference.

    float32 (default: on CPU): compute with the dequantized weights in float32 (`cpu_float`), since
    gptqmodel's fp16 kernel is tens of times slower on CPUs; same weights, wider arithmetic.
    """
    from transformers import AutoTokenizer

    check_verify_inputs(merged, base, adapter)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(base))
    except Exception as exc:  # noqa: BLE001 - transformers raises many types for a missing/broken tokenizer
        raise InvalidCheckpointError(
            f"The tokenizer of {base} cannot be loaded ({type(exc).__name__}); verify needs it to tokenize the text."
        ) from None
    content, description = eval_text(text, max_chars=num_tokens * 12)
    windows = token_windows(content, tokenizer, num_tokens, seq_len)

    if float32 is None:
        float32 = not str(device).startswith("cuda")

    def load(path):
        loaded = load_quantized_model(path, device=device)
        if float32:
            from oftsurgery.evaluation.cpu_float import compute_in_float32

            compute_in_float32(getattr(loaded, "model", loaded))
        return loaded

    model = load(base)
    nll_base = mean_nll(model, windows)
    attach_for_evaluation(model, adapter)
    nll_attached = mean_nll(model, windows)
    attached_logits = logits_of(model, windows)
    del model

    merged_model = load(merged)
    nll_merged = mean_nll(merged_model, windows)
    merged_logits = logits_of(merged_model, windows)
    nll_lora = None
    residual = Path(merged) / RESIDUAL_LORA_DIR
    if residual.is_dir():
        attach_residual_lora(merged_model, residual, float32=float32)
        nll_lora = mean_nll(merged_model, windows)
    return FidelityFigures(
        nll_base=nll_base, nll_attached=nll_attached, nll_merged=nll_merged,
        max_logit_diff=float((merged_logits - attached_logits).abs().max()),
        eval_tokens=int(windows.numel()), eval_text=description, nll_merged_lora=nll_lora,
    )


def attach_residual_lora(model, folder: str | Path, *, float32: bool = False) -> None:
    """Add a merge's residual LoRA to a loaded merged model in place, with PEFT (as a user loads it)."""
    import torch
    from transformers import PreTrainedModel

    from oftsurgery._deps import import_optional

    peft = import_optional("peft", "lora")
    inner = model if isinstance(model, PreTrainedModel) else model.model
    peft.PeftModel.from_pretrained(inner, str(folder))  # injects the LoRA layers into `inner`'s modules
    if float32:  # the float32 evaluation path: the adapter's fp16 weights in float32 too
        for name, param in inner.named_parameters():
            if ".lora_" in name:
                param.data = param.data.to(torch.float32)
