"""The streaming merge: read → dequantize → rotate → requantize → pack → write.

Tensors are read and written in decoder-layer order, so memory holds one decoder layer (plus, in
calibrated mode, the calibration activations), never the model. Tensors the adapter does not touch
are copied with their bytes unchanged; layers it does touch get W′ = W·Rᵀ requantized on their
source grid and packed through gptqmodel's packers. The output directory appears only complete.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from oftsurgery.errors import MergeError, OftSurgeryError, UnsupportedFormatError
from oftsurgery.io import CheckpointReader, CheckpointWriter, atomic_output, check_output_path, copy_side_files
from oftsurgery.merge.plan import LayerPlan, MergePlan, decoder_layer_index, plan_merge
from oftsurgery.merge.report import LayerReport, MergeReport
from oftsurgery.quant.config import QuantConfig, load_quant_config

if TYPE_CHECKING:
    import torch

    from oftsurgery.quant.grid import QuantizedWeight

METHODS = ("calibrated", "rtn")
DEFAULT_CALIB_TOKENS = 8192
DEFAULT_SEQ_LEN = 256
REPORT_FILE = "merge_report.json"
SELF_CHECK_ROWS = 2  # calibration rows the layer runner is checked on against the model's own forward


@dataclass(frozen=True)
class MergeOptions:
    requant: str | None = None
    method: str = "calibrated"
    calib: str | None = None
    calib_tokens: int = DEFAULT_CALIB_TOKENS
    seq_len: int = DEFAULT_SEQ_LEN
    device: str = "cpu"
    overwrite: bool = False
    max_shard_size: int = 5 * 1024**3
    command: str | None = None
    progress: bool = True
    allow_pickle: bool = False  # read a pickle-only checkpoint with torch's weights-only loader


# ------------------------------------------------------------------------------------------------
# one layer
# ------------------------------------------------------------------------------------------------

def _layer_tensors(reader: CheckpointReader, prefix: str) -> dict[str, "torch.Tensor"]:
    return {n[len(prefix) + 1 :]: reader.get(n) for n in reader.tensors if n.startswith(prefix + ".") and "." not in n[len(prefix) + 1 :]}


def _to_target_grid(qw: "QuantizedWeight", source: QuantConfig, target: QuantConfig) -> "QuantizedWeight":
    """The same weights on the output format's grid (exact when the grids are compatible)."""
    import torch

    from oftsurgery.quant.grid import default_g_idx

    if source.method == target.method:
        return qw
    # GPTQ <-> AWQ with equal bits and contiguous groups: the codes/scales/zeros carry over exactly.
    return replace(qw, g_idx=default_g_idx(qw.in_features, target.group_size).to(torch.int32))


def _relative(err: float, ref: float) -> float:
    return math.sqrt(err / ref) if ref > 0 else 0.0


def requantize_layer(
    plan: LayerPlan, qw: "QuantizedWeight", method: str, hessian: "torch.Tensor | None"
) -> tuple["QuantizedWeight", LayerReport]:
    """Fold the rotation into one layer and requantize it; return the new codes and its report line."""
    import torch

    from oftsurgery.merge.requant import output_error, requantize_calibrated, requantize_rtn

    start = time.perf_counter()
    weight = qw.dequantize()
    target = plan.target_weight(weight)
    H = hessian if hessian is not None else torch.eye(weight.shape[1])
    candidates = {"rtn": requantize_rtn(qw, target)}
    if method == "calibrated" and hessian is not None:
        candidates["compensated"] = requantize_calibrated(qw, target, hessian)
    errors = {mode: output_error(c.dequantize(), target, H) for mode, c in candidates.items()}
    errors["kept"] = output_error(weight, target, H)
    candidates["kept"] = qw
    # prefer the requested mode; fall back to the best of the others only if it is better
    preferred = "compensated" if "compensated" in candidates else "rtn"
    best = min(errors, key=errors.get)
    mode = preferred if errors[preferred] <= errors[best] * (1 + 1e-9) else best
    chosen = candidates[mode]
    ref = output_error(torch.zeros_like(target), target, H)
    report = LayerReport(
        name=plan.prefix,
        mode=mode,
        codes_changed=float((chosen.codes != qw.codes).float().mean()),
        scales_changed=float((chosen.scales != qw.scales).float().mean()),
        residual_before=_relative(errors["kept"], ref),
        residual_after=_relative(errors[mode], ref),
        rotation_strength=plan.rotations.strength(plan.prefix, plan.in_features),
        seconds=time.perf_counter() - start,
    )
    return chosen, report


# ------------------------------------------------------------------------------------------------
# the checkpoint
# ------------------------------------------------------------------------------------------------

def _progress(iterable, total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit="layer", disable=not enabled, leave=False)


def _group_by_decoder_layer(names: list[str]) -> tuple[list[str], dict[int, list[str]]]:
    outside: list[str] = []
    by_layer: dict[int, list[str]] = {}
    for name in names:
        index = decoder_layer_index(name)
        (outside if index is None else by_layer.setdefault(index, [])).append(name)
    return outside, dict(sorted(by_layer.items()))


class _Merger:
    def __init__(self, reader: CheckpointReader, plan: MergePlan, options: MergeOptions):
        self.reader = reader
        self.plan = plan
        self.options = options
        self.reports: list[LayerReport] = []
        # the requantized weights of the decoder layer just written, to feed the next layer
        self.merged: dict[str, "QuantizedWeight"] = {}
        self.current: str | None = None  # the layer being merged, named if something fails
        self._unpacked: dict[str, "QuantizedWeight"] = {}

    def source_weight(self, prefix: str) -> "QuantizedWeight":
        """A layer's stored codes and grid (per-module `dynamic` overrides applied), cached per decoder layer."""
        from oftsurgery.quant.codec import layer_quant_config, unpack_layer

        if prefix not in self._unpacked:
            cfg = layer_quant_config(self.plan.source, prefix) or self.plan.source
            self._unpacked[prefix] = unpack_layer(_layer_tensors(self.reader, prefix), cfg)
        return self._unpacked[prefix]

    def source_weight_float(self, prefix: str) -> "torch.Tensor":
        """A layer's stored weights dequantized (not cached: the runner's self-check runs once)."""
        from oftsurgery.quant.codec import layer_quant_config, unpack_layer

        cfg = layer_quant_config(self.plan.source, prefix) or self.plan.source
        return unpack_layer(_layer_tensors(self.reader, prefix), cfg).dequantize()

    def new_decoder_layer(self) -> None:
        self._unpacked.clear()
        self.merged.clear()

    def _pack(self, prefix: str, qw: "QuantizedWeight") -> dict[str, "torch.Tensor"]:
        from oftsurgery.quant.codec import layer_quant_config, pack_layer

        bias_name = f"{prefix}.bias"
        bias = self.reader.get(bias_name) if bias_name in self.reader else None
        cfg = layer_quant_config(self.plan.target, prefix) or self.plan.target
        return {f"{prefix}.{k}": v for k, v in pack_layer(qw, cfg, bias=bias).items()}

    def requantize(self, prefix: str, hessian) -> "QuantizedWeight":
        """Fold the rotation into one targeted layer and requantize it (kept until the layer is written)."""
        qw = _to_target_grid(self.source_weight(prefix), self.plan.source, self.plan.target)
        new_qw, report = requantize_layer(self.plan.layers[prefix], qw, self.options.method, hessian)
        self.reports.append(report)
        self.merged[prefix] = new_qw
        return new_qw

    def merged_tensors(self, prefix: str) -> dict[str, "torch.Tensor"]:
        """Packed output tensors for one targeted layer (requantized data-free if not done yet)."""
        qw = self.merged[prefix] if prefix in self.merged else self.requantize(prefix, None)
        return self._pack(prefix, qw)

    def converted_tensors(self, prefix: str) -> dict[str, "torch.Tensor"]:
        """An untargeted layer rewritten in the output format (GPTQ <-> AWQ only)."""
        return self._pack(prefix, _to_target_grid(self.source_weight(prefix), self.plan.source, self.plan.target))

    def write_group(self, writer: CheckpointWriter, names: list[str]) -> None:
        layers_here = sorted({p for p in self.plan.layers if any(n.startswith(p + ".") for n in names)})
        produced: dict[str, "torch.Tensor"] = {}
        for prefix in layers_here:
            self.current = prefix
            layer = self.plan.layers[prefix]
            if layer.targeted:
                produced.update(self.merged_tensors(prefix))
            elif self.plan.converts_format:
                produced.update(self.converted_tensors(prefix))
        owned = {n for n in names if any(n.startswith(p + ".") and "." not in n[len(p) + 1 :] for p in layers_here
                                         if self.plan.layers[p].targeted or self.plan.converts_format)}
        for name in names:
            if name not in owned:
                writer.add(name, self.reader.get(name))  # untouched: the stored bytes, unchanged
        for name in sorted(produced):
            writer.add(name, produced[name])


def _input_groups(runner, layer_module, index: int, names: list[str], hidden) -> tuple[list[list[str]], list[str]]:
    """Targeted linears of a decoder layer grouped by the input they share, in execution order, and the
    targeted linears no calibration row reaches.

    For a Llama block the groups are [q, k, v], [o], [gate, up], [down]: each group's input depends
    only on the groups before it, so requantizing group by group lets every group see (and
    compensate) what the earlier groups of the same layer will really feed it. MoE experts run only
    on the tokens routed to them, so batches of rows are run until every linear has been seen; an
    expert no calibration token is routed to is returned as unreached.
    """
    import torch

    kwargs = runner.layer_kwargs(index)
    rows = runner.batch_rows(hidden.shape[1])
    groups: list[list[str]] = []
    seen_names: set[str] = set()
    for start in range(0, hidden.shape[0], rows):
        seen: list[tuple[str, torch.Tensor]] = []  # holding the inputs keeps them alive, so identity is meaningful
        hooks = [
            layer_module.get_submodule(name).register_forward_hook(
                lambda mod, inputs, output, name=name: seen.append((name, inputs[0]))
            )
            for name in names
        ]
        try:
            with torch.no_grad():
                layer_module(hidden[start : start + rows], **kwargs)
        finally:
            for h in hooks:
                h.remove()
        batch_groups: list[tuple[torch.Tensor, list[str]]] = []
        for name, tensor in seen:
            group = next((g for t, g in batch_groups if t is tensor), None)
            if group is None:
                batch_groups.append((tensor, [name]))
            elif name not in group:
                group.append(name)
        for _, group in batch_groups:
            new = [n for n in group if n not in seen_names]
            if new:
                groups.append(new)
                seen_names.update(new)
        if len(seen_names) == len(names):
            break
    return groups, [n for n in names if n not in seen_names]


NO_CALIBRATION_TOKENS = ("not calibrated: no calibration token was routed to this MoE expert, "
                         "so it was rounded to nearest")


def _requantize_unreached(merger: "_Merger", name: str) -> None:
    """Requantize a linear no calibration token reached, without data, and say so in its report line."""
    merger.current = name
    merger.requantize(name, None)
    merger.reports[-1].fallback = merger.reports[-1].fallback or NO_CALIBRATION_TOKENS


def _collect_hessians(layer_module, names: list[str], hidden, kwargs) -> dict[str, Any]:
    """H = Σ x xᵀ over every calibration token at the inputs of the named linears."""
    import torch

    hessians: dict[str, torch.Tensor] = {}

    def hook(mod, inputs, output, name):
        x = inputs[0].reshape(-1, inputs[0].shape[-1]).to(torch.float64)
        hessians[name] = hessians.get(name, 0) + x.T @ x

    hooks = [layer_module.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: hook(m, i, o, n)) for n in names]
    with torch.no_grad():
        for row in range(hidden.shape[0]):  # one row at a time bounds the attention memory
            layer_module(hidden[row : row + 1], **kwargs)
    for h in hooks:
        h.remove()
    return hessians


def _calibrate_decoder_layer(runner, merger: "_Merger", index: int, hidden, kwargs) -> None:
    """Requantize the targeted linears of decoder layer `index` group by group on real activations.

    `hidden` is the merged model's stream (what the already-requantized earlier layers produce), so
    each layer compensates what earlier layers lost. Within the layer, linears not yet requantized
    hold their full-precision merged weight W·Rᵀ; those already done hold their requantized weight.
    """
    plan = merger.plan
    prefix = runner.layer_prefix(index) + "."

    def current_weight(name: str):
        if name in merger.merged:
            return merger.merged[name].dequantize()
        return plan.layers[name].target_weight(merger.source_weight(name).dequantize()) if name in plan.layers \
            else merger.source_weight(name).dequantize()

    layer_module = runner.build_layer(index, current_weight)
    local = [n for n in runner.linear_names(layer_module)
             if prefix + n in plan.layers and plan.layers[prefix + n].targeted]
    groups, unreached = _input_groups(runner, layer_module, index, local, hidden)
    for name in unreached:
        _requantize_unreached(merger, prefix + name)
    for group in groups:
        layer_module = runner.build_layer(index, current_weight)
        hessians = _collect_hessians(layer_module, group, hidden, kwargs)
        for name in group:
            if name not in hessians:  # an expert's routing can shift once earlier groups are requantized
                _requantize_unreached(merger, prefix + name)
                continue
            merger.current = prefix + name
            merger.requantize(prefix + name, hessians[name])


def merge_checkpoint(checkpoint: str | Path, adapter: str | Path, out: str | Path,
                     options: MergeOptions = MergeOptions()) -> MergeReport:
    """Merge an OFT adapter (PEFT dir of any generation, or an `extract` rotations file) into a
    GPTQ/AWQ checkpoint and write a checkpoint of the requested format to `out`."""
    from oftsurgery.oft.adapter_io import load_rotations

    if options.method not in METHODS:
        raise MergeError(f"--method must be one of {', '.join(METHODS)}, not {options.method!r}.")
    started = time.perf_counter()
    reader = CheckpointReader(checkpoint, allow_pickle=options.allow_pickle)
    source = load_quant_config(checkpoint)
    rotations = load_rotations(adapter)
    plan = plan_merge(reader, source, rotations, options.requant)
    out_path = check_output_path(out, [checkpoint, adapter], overwrite=options.overwrite)
    if options.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise MergeError("--device cuda was requested but no CUDA device is available.")

    merger = _Merger(reader, plan, options)
    report = MergeReport(
        checkpoint=str(checkpoint), adapter=str(adapter), output=str(out_path), method=options.method,
        source_format=source.describe(), output_format=plan.target.describe(), calibration=None,
        calib_tokens=0, residual_space="activations" if options.method == "calibrated" else "weights",
        identity_modules=plan.identity_modules, command=options.command,
    )
    _describe_serving(plan, report)
    outside, by_layer = _group_by_decoder_layer(list(reader.tensors))
    try:
        with atomic_output(out_path, overwrite=options.overwrite) as tmp:
            writer = CheckpointWriter(tmp, max_shard_size=options.max_shard_size)
            merger.write_group(writer, outside)
            if options.method == "calibrated" and plan.targeted:
                _merge_calibrated(reader, merger, by_layer, writer, report)
            else:
                for index in _progress(by_layer, len(by_layer), "merging", options.progress):
                    merger.new_decoder_layer()
                    merger.write_group(writer, by_layer[index])
            writer.close()
            report.layers = merger.reports
            report.seconds = time.perf_counter() - started
            _write_configs(reader, plan, tmp)
            copy_side_files(reader.side_files(), tmp)
            report.write(tmp / REPORT_FILE)
            _write_card(tmp, report, plan)
    except OftSurgeryError:
        raise
    except Exception as exc:
        # a bug or an unforeseen input: atomic_output has already removed the temporary files
        where = f" at {merger.current}" if merger.current else ""
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else "no message"
        raise MergeError(
            f"The merge failed{where} ({type(exc).__name__}: {detail}); nothing was written to {out_path}."
        ) from exc
    return report


def _merge_calibrated(reader, merger: _Merger, by_layer, writer, report: MergeReport) -> None:
    import torch

    from oftsurgery.merge.calibration import calibration_batches, load_calibration_text
    from oftsurgery.merge.float_model import LayerwiseModel
    from transformers import AutoTokenizer

    options = merger.options
    text, desc = load_calibration_text(options.calib)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(reader.path))
    except Exception as exc:
        raise MergeError(f"Calibrated merge needs the checkpoint's tokenizer, which could not be loaded ({type(exc).__name__}); "
                         "use --method rtn or add the tokenizer files.") from None
    ids = calibration_batches(text, tokenizer, options.calib_tokens, options.seq_len)
    report.calibration, report.calib_tokens = desc, int(ids.numel())
    runner = LayerwiseModel(reader.config, reader.get, device=options.device, tensor_names=reader.tensors)
    unknown = [p.prefix for p in merger.plan.targeted if p.prefix not in runner.module_linears()]
    if unknown:
        raise UnsupportedFormatError(
            f"{unknown[0]} is a targeted quantized layer of the checkpoint but {runner.architecture} has no such "
            "decoder-layer module, so calibration could not reach it; use --method rtn."
        )
    # refuse before any merge work if the runner does not reproduce the model's own forward
    report.runner_check = max(runner.verify(ids[:SELF_CHECK_ROWS], merger.source_weight_float), default=0.0)
    hidden, _ = runner.first_layer_inputs(ids)

    def merged_weight(name: str) -> torch.Tensor:
        """Float weight of a linear as the merged model will hold it."""
        if name in merger.merged:
            return merger.merged[name].dequantize()
        return merger.source_weight(name).dequantize()

    for index in _progress(by_layer, len(by_layer), "merging (calibrated)", options.progress):
        names = by_layer[index]
        merger.new_decoder_layer()
        prefix = runner.layer_prefix(index) + "."
        if any(p.prefix.startswith(prefix) for p in merger.plan.targeted):
            _calibrate_decoder_layer(runner, merger, index, hidden, runner.layer_kwargs(index))
        merger.write_group(writer, names)
        layer_module = runner.build_layer(index, merged_weight)
        hidden = runner.forward_layer(layer_module, index, hidden)


def _describe_serving(plan: MergePlan, report: MergeReport) -> None:
    """Which vLLM/transformers kernels the input and the output load with; warn if the merge loses Marlin."""
    from oftsurgery.serving import marlin_lost_warnings, serving_contract

    shapes = {p: (l.in_features, l.out_features) for p, l in plan.layers.items()}
    source, output = serving_contract(plan.source, shapes), serving_contract(plan.target, shapes)
    names = {"vllm": "vLLM", "transformers": "transformers"}
    report.serving = {names[e]: {"input": source[e].describe(), "output": output[e].describe()} for e in source}
    report.serving_warnings = marlin_lost_warnings(source, output)


def _write_configs(reader: CheckpointReader, plan: MergePlan, out_dir: Path) -> None:
    config = dict(reader.config)
    qraw = dict(plan.target.raw)
    config["quantization_config"] = qraw
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    if plan.target.is_gptq:
        (out_dir / "quantize_config.json").write_text(json.dumps(qraw, indent=2) + "\n", encoding="utf-8")


def _write_card(out_dir: Path, report: MergeReport, plan: MergePlan) -> None:
    try:
        from oftsurgery.card import render_merge_card
    except ImportError:  # card module not available yet: a minimal card
        (out_dir / "README.md").write_text(f"# Merged with oftsurgery\n\n```\n{report.summary()}\n```\n", encoding="utf-8")
        return
    (out_dir / "README.md").write_text(render_merge_card(report, plan), encoding="utf-8")
