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
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from oftsurgery.errors import MergeError, OftSurgeryError
from oftsurgery.io import CheckpointReader, CheckpointWriter, atomic_output, check_output_path, copy_side_files
from oftsurgery.merge.distributed import SingleProcess, open_ranks
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
    def __init__(self, reader: CheckpointReader, plan: MergePlan, options: MergeOptions,
                 ranks: SingleProcess | None = None):
        self.reader = reader
        self.plan = plan
        self.options = options
        self.ranks = ranks or SingleProcess(options.device)
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

    def solve(self, prefixes: list[str], hessian_for) -> None:
        """Requantize the named targeted layers, each on the rank that owns it, and give every rank
        the results, in the order given (on one process: all here, in that order).

        `hessian_for(prefix)` is the layer's input Hessian, or None for a data-free requantization.
        """
        ranks = self.ranks
        owners = ranks.assign(prefixes, [self._solve_cost(p) for p in prefixes])
        for prefix in prefixes:
            if owners[prefix] == ranks.rank:
                self.current = prefix
                self.requantize(prefix, hessian_for(prefix))
                self.reports[-1].rank = ranks.rank
        if not ranks.distributed:
            return
        for prefix in prefixes:  # the same order on every rank
            mine = owners[prefix] == ranks.rank
            qw = self.merged.get(prefix) if mine else None
            tensors, info = ranks.share(
                owners[prefix],
                {"codes": qw.codes, "scales": qw.scales, "zeros": qw.zeros, "g_idx": qw.g_idx} if mine else None,
                asdict(next(r for r in reversed(self.reports) if r.name == prefix)) if mine else None)
            if not mine:
                source = _to_target_grid(self.source_weight(prefix), self.plan.source, self.plan.target)
                self.merged[prefix] = replace(source, **tensors)
                self.reports.append(LayerReport(**info))
        # every rank lists the layers in the same order, whoever solved them
        order = {p: i for i, p in enumerate(prefixes)}
        done = [r for r in self.reports if r.name in order]
        rest = [r for r in self.reports if r.name not in order]
        self.reports = rest + sorted(done, key=lambda r: order[r.name])

    def _solve_cost(self, prefix: str) -> float:
        """What requantizing a layer costs, roughly: the calibrated solve grows as out·in², rounding as out·in."""
        layer = self.plan.layers[prefix]
        return float(layer.out_features * layer.in_features * (layer.in_features if self.options.method == "calibrated" else 1))

    def merged_tensors(self, prefix: str) -> dict[str, "torch.Tensor"]:
        """Packed output tensors for one targeted layer (requantized data-free if not done yet)."""
        qw = self.merged[prefix] if prefix in self.merged else self.requantize(prefix, None)
        return self._pack(prefix, qw)

    def converted_tensors(self, prefix: str) -> dict[str, "torch.Tensor"]:
        """An untargeted layer rewritten in the output format (GPTQ <-> AWQ only)."""
        return self._pack(prefix, _to_target_grid(self.source_weight(prefix), self.plan.source, self.plan.target))

    def write_group(self, writer: CheckpointWriter | None, names: list[str]) -> None:
        """Write these tensors (writer None: a rank that does not write, which still solves its share)."""
        layers_here = sorted({p for p in self.plan.layers if any(n.startswith(p + ".") for n in names)})
        self.solve([p for p in layers_here if self.plan.layers[p].targeted and p not in self.merged], lambda p: None)
        if writer is None:
            return
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


def _input_groups(layer_module, names: list[str], sample, kwargs) -> list[list[str]]:
    """Targeted linears of a decoder layer grouped by the input they share, in execution order.

    For a Llama block this is [q, k, v], [o], [gate, up], [down]: each group's input depends only on
    the groups before it, so requantizing group by group lets every group see (and compensate) what
    the earlier groups of the same layer will really feed it.
    """
    import torch

    seen: list[tuple[str, torch.Tensor]] = []  # holding the inputs keeps them alive, so identity is meaningful
    hooks = [
        layer_module.get_submodule(name).register_forward_hook(
            lambda mod, inputs, output, name=name: seen.append((name, inputs[0]))
        )
        for name in names
    ]
    with torch.no_grad():
        layer_module(sample, **kwargs)
    for h in hooks:
        h.remove()
    groups: list[tuple[torch.Tensor, list[str]]] = []
    for name, tensor in seen:
        group = next((g for t, g in groups if t is tensor), None)
        if group is None:
            groups.append((tensor, [name]))
        elif name not in group:
            group.append(name)
    return [names for _, names in groups]


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


def _calibrate_decoder_layer(runner, merger: "_Merger", index: int, hidden, kwargs, num_rows: int) -> None:
    """Requantize the targeted linears of decoder layer `index` group by group on real activations.

    `hidden` is the merged model's stream (what the already-requantized earlier layers produce), so
    each layer compensates what earlier layers lost. Within the layer, linears not yet requantized
    hold their full-precision merged weight W·Rᵀ; those already done hold their requantized weight.
    In a distributed merge `hidden` holds this rank's rows of the `num_rows` calibration rows.
    """
    plan = merger.plan
    prefix = runner.layer_prefix(index) + "."

    def current_weight(name: str):
        if name in merger.merged:
            return merger.merged[name].dequantize()
        return plan.layers[name].target_weight(merger.source_weight(name).dequantize()) if name in plan.layers \
            else merger.source_weight(name).dequantize()

    import torch

    ranks = merger.ranks
    layer_module = runner.build_layer(index, current_weight)
    local = [n for n in runner.linear_names(layer_module)
             if prefix + n in plan.layers and plan.layers[prefix + n].targeted]
    # any input shows which linears share one; a rank that carries no rows uses zeros
    sample = hidden[:1] if hidden.shape[0] else torch.zeros((1, *hidden.shape[1:]), dtype=hidden.dtype,
                                                              device=hidden.device)
    first_row = ranks.local_rows(num_rows).start
    for group in _input_groups(layer_module, local, sample, kwargs):
        layer_module = runner.build_layer(index, current_weight)
        # each rank sums the shards of its own rows; the shards are added in one fixed order
        hessians = ranks.sum_over_shards(num_rows, lambda rows: _collect_hessians(
            layer_module, group, hidden[rows.start - first_row : rows.stop - first_row], kwargs))
        merger.solve([prefix + name for name in group], lambda p: hessians[p[len(prefix):]])


def merge_checkpoint(checkpoint: str | Path, adapter: str | Path, out: str | Path,
                     options: MergeOptions = MergeOptions()) -> MergeReport:
    """Merge an OFT adapter (PEFT dir of any generation, or an `extract` rotations file) into a
    GPTQ/AWQ checkpoint and write a checkpoint of the requested format to `out`.

    Under `torchrun`, or inside a process group the caller initialised, every rank calls this and
    the merge runs across the ranks (docs/distributed.md): rank 0 writes the same bytes a single
    process would, and every rank returns the report.
    """
    with open_ranks(options.device) as ranks, ranks.guard(out):
        return _merge(checkpoint, adapter, out, replace(options, device=ranks.device), ranks)


def _merge(checkpoint, adapter, out, options: MergeOptions, ranks: SingleProcess) -> MergeReport:
    from oftsurgery.oft.adapter_io import load_rotations

    if options.method not in METHODS:
        raise MergeError(f"--method must be one of {', '.join(METHODS)}, not {options.method!r}.")
    ranks.check_device()
    started = time.perf_counter()
    reader = CheckpointReader(checkpoint, allow_pickle=options.allow_pickle)
    source = load_quant_config(checkpoint)
    rotations = load_rotations(adapter)
    plan = plan_merge(reader, source, rotations, options.requant)
    # only the writing rank's file system matters (other nodes may not even see it)
    out_path = check_output_path(out, [checkpoint, adapter], overwrite=options.overwrite) if ranks.is_writer \
        else Path(out).expanduser().resolve()
    ranks.sync()  # every rank's inputs checked: a rank that refused them stops the others here

    merger = _Merger(reader, plan, options, ranks)
    report = MergeReport(
        checkpoint=str(checkpoint), adapter=str(adapter), output=str(out_path), method=options.method,
        source_format=source.describe(), output_format=plan.target.describe(), calibration=None,
        calib_tokens=0, residual_space="activations" if options.method == "calibrated" else "weights",
        identity_modules=plan.identity_modules, command=options.command, world_size=ranks.world_size,
    )
    outside, by_layer = _group_by_decoder_layer(list(reader.tensors))
    progress = ranks.progress(options.progress)
    try:
        output = atomic_output(out_path, overwrite=options.overwrite) if ranks.is_writer else nullcontext(None)
        with output as tmp:
            writer = None
            if tmp is not None:
                ranks.track_temporary(tmp)
                writer = CheckpointWriter(tmp, max_shard_size=options.max_shard_size)
            merger.write_group(writer, outside)
            if options.method == "calibrated" and plan.targeted:
                _merge_calibrated(reader, merger, by_layer, writer, report, progress)
            else:
                for index in _progress(by_layer, len(by_layer), "merging", progress):
                    merger.new_decoder_layer()
                    merger.write_group(writer, by_layer[index])
            report.layers = merger.reports
            report.seconds = time.perf_counter() - started
            if writer is not None:
                writer.close()
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


def _merge_calibrated(reader, merger: _Merger, by_layer, writer, report: MergeReport, progress: bool) -> None:
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
    runner = LayerwiseModel(reader.config, reader.get, device=options.device)
    # each rank carries its own rows (all of them in one process); one without rows keeps row 0's
    # keyword arguments and an empty stream
    num_rows = ids.shape[0]
    mine = merger.ranks.local_rows(num_rows)
    hidden, kwargs = runner.first_layer_inputs(ids[mine.start : mine.stop] if mine else ids[:1])
    if not mine:
        hidden = hidden[:0]
    def merged_weight(name: str) -> torch.Tensor:
        """Float weight of a linear as the merged model will hold it."""
        if name in merger.merged:
            return merger.merged[name].dequantize()
        return merger.source_weight(name).dequantize()

    for index in _progress(by_layer, len(by_layer), "merging (calibrated)", progress):
        names = by_layer[index]
        merger.new_decoder_layer()
        prefix = runner.layer_prefix(index) + "."
        if any(p.prefix.startswith(prefix) for p in merger.plan.targeted):
            _calibrate_decoder_layer(runner, merger, index, hidden, kwargs, num_rows)
        merger.write_group(writer, names)
        layer_module = runner.build_layer(index, merged_weight)
        with torch.no_grad():
            if hidden.shape[0]:
                hidden = torch.cat([_first(layer_module(hidden[r : r + 1], **kwargs)) for r in range(hidden.shape[0])])


def _first(output):
    return output[0] if isinstance(output, tuple) else output


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
