"""The streaming merge: read → dequantize → rotate → requantize → pack → write.

Tensors are read and written in decoder-layer order, so memory holds one decoder layer (plus, in
calibrated mode, the calibration activations), never the model. Tensors the adapter does not touch
are copied with their bytes unchanged (file to file, never loaded); layers it does touch get
W′ = W·Rᵀ requantized on their source grid and packed back into the checkpoint's layout, byte-exact
with gptqmodel's packers. The work runs on one device (`--device`, default auto: the GPU when
there is one), resolved before anything else. While the main thread solves decoder layer i+1, one
worker thread packs and writes layer i (`pipeline.BackgroundWriter`). The output directory
appears only complete.
"""

from __future__ import annotations

import json
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from oftsurgery.device import AUTO, resolve_device
from oftsurgery.errors import MergeError, OftSurgeryError, UnsupportedFormatError
from oftsurgery.io import CheckpointReader, CheckpointWriter, atomic_output, check_output_path, copy_side_files
from oftsurgery.merge.pipeline import BackgroundWriter, InlineWriter, WorkerFailed
from oftsurgery.merge.plan import LayerPlan, MergePlan, decoder_layer_index, plan_merge
from oftsurgery.merge.report import LayerReport, MergeReport
from oftsurgery.quant.config import QuantConfig, load_quant_config

if TYPE_CHECKING:
    import torch

    from oftsurgery.merge.hessian import CalibrationInputs
    from oftsurgery.quant.grid import QuantizedWeight

METHODS = ("calibrated", "rtn")
DEFAULT_CALIB_TOKENS = 8192
DEFAULT_SEQ_LEN = 256
REPORT_FILE = "merge_report.json"
# decoder layers queued between the solve (main thread) and pack+write (worker); 0: no worker thread
PIPELINE_DEPTH = 1
SELF_CHECK_ROWS = 2  # calibration rows the layer runner is checked on against the model's own forward


@dataclass(frozen=True)
class MergeOptions:
    requant: str | None = None
    method: str = "calibrated"
    calib: str | None = None
    calib_tokens: int = DEFAULT_CALIB_TOKENS
    seq_len: int = DEFAULT_SEQ_LEN
    device: str = AUTO  # auto | cpu | cuda | cuda:N
    overwrite: bool = False
    max_shard_size: int = 5 * 1024**3
    command: str | None = None
    progress: bool = True
    allow_pickle: bool = False  # read a pickle-only checkpoint with torch's weights-only loader
    strict: bool = False  # any per-layer fallback (see LayerReport.fallback) is a MergeError


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
    plan: LayerPlan, qw: "QuantizedWeight", method: str, inputs: "CalibrationInputs | None" = None,
    *, device: str = "cpu", target: "torch.Tensor | None" = None,
) -> tuple["QuantizedWeight", LayerReport]:
    """Fold the rotation into one layer and requantize it; return the new codes and its report line.

    Calibrated (with `inputs`): the solver runs on the inputs' device; its result, round-to-nearest
    and the source codes are compared on the fitted calibration rows, and the reported residuals are
    measured on the held-out rows. rtn: rounding and weight-space residuals ‖E‖_F on `device`, no
    Hessian at all. Choosing anything but the requested mode is recorded as a `fallback`.
    `target` is W·Rᵀ when the caller has it already.
    """
    import torch

    from oftsurgery.merge import requant

    start = time.perf_counter()
    if target is None:
        target = plan.target_weight(qw.dequantize())
    calibrated = method == "calibrated" and inputs is not None and inputs.fit.reached
    if calibrated:
        dev = inputs.fit.device
    else:
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else torch.device(device)
    source = replace(qw, codes=qw.codes.to(dev), scales=qw.scales.to(dev), zeros=qw.zeros.to(dev), g_idx=qw.g_idx.to(dev))
    weight, target = source.dequantize(), target.to(dev, torch.float32)
    fallbacks: list[str] = []
    heldout_tokens = 0
    if calibrated:
        fit, measured = inputs.fit, inputs.measured

        def residual(w, stats=measured) -> float:  # tr(E H Eᵀ), E = w − target
            return float(stats.error((w - target).T))

        solved = requant.requantize_calibrated(source, target, fit)
        fallbacks += solved.fallbacks
        candidates = {"compensated": solved.weight, "rtn": requant.requantize_rtn(source, target)}
        errors = {"compensated": solved.error,  # each candidate's error once, on the rows the solver fitted
                  "rtn": residual(candidates["rtn"].dequantize(), fit), "kept": residual(weight, fit)}
        preferred = "compensated"
        heldout_tokens = measured.tokens if measured is not fit else 0
    else:
        if method == "calibrated":
            fallbacks.append("not calibrated: the calibration never reached this module, so it was rounded to nearest")

        def residual(w) -> float:  # ‖E‖²_F in weight space: no data, H = I
            return float(torch.linalg.vector_norm(w - target, dtype=torch.float64) ** 2)

        candidates = {"rtn": requant.requantize_rtn(source, target)}
        errors = {"rtn": residual(candidates["rtn"].dequantize()), "kept": residual(weight)}
        preferred = "rtn"
    candidates["kept"] = source
    best = min(errors, key=errors.get)
    mode = preferred if errors[preferred] <= errors[best] * (1 + 1e-9) else best
    if mode == "kept":
        fallbacks.append("kept: no requantized candidate beat the source codes, so the adapter is left out here")
    elif mode != preferred:
        fallbacks.append(f"{mode}: round-to-nearest beat the calibrated solve")
    chosen = candidates[mode]
    if calibrated:  # on held-out rows, so a merge worse than leaving the adapter out shows
        ref, before, after = (residual(w) for w in (torch.zeros_like(target), weight, chosen.dequantize()))
    else:
        ref, before, after = residual(torch.zeros_like(target)), errors["kept"], errors[mode]
    report = LayerReport(
        name=plan.prefix,
        mode=mode,
        codes_changed=float((chosen.codes != source.codes).float().mean()),
        scales_changed=float((chosen.scales != source.scales).float().mean()),
        residual_before=_relative(before, ref),
        residual_after=_relative(after, ref),
        rotation_strength=plan.rotations.strength(plan.prefix, plan.in_features),
        seconds=time.perf_counter() - start,
        fallback="; ".join(fallbacks) or None,
        heldout_tokens=heldout_tokens,
    )
    host = qw if mode == "kept" else replace(chosen, codes=chosen.codes.to(qw.codes.device),
                                               scales=chosen.scales.to(qw.scales.device), zeros=qw.zeros, g_idx=qw.g_idx)
    return host, report


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
        self._reads: dict[str, Any] = {}  # prefix -> Future of its packed tensors, read ahead

    def source_weight(self, prefix: str, cache: bool = True) -> "QuantizedWeight":
        """A layer's stored codes (uint8) and grid (per-module `dynamic` overrides applied), unpacked on
        the merge's device; cached per decoder layer unless `cache` is False."""
        from oftsurgery.quant.codec import layer_quant_config, unpack_layer

        if prefix in self._unpacked:
            return self._unpacked[prefix]
        cfg = layer_quant_config(self.plan.source, prefix) or self.plan.source
        ahead = self._reads.pop(prefix, None)
        stored = ahead.result() if ahead is not None else _layer_tensors(self.reader, prefix)
        packed = {k: v.to(self.options.device) for k, v in stored.items()}
        qw = unpack_layer(packed, cfg)
        if cache:
            self._unpacked[prefix] = qw
        return qw

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

    def requantize(self, prefix: str, inputs: "CalibrationInputs | None" = None,
                   target: "torch.Tensor | None" = None) -> "QuantizedWeight":
        """Fold the rotation into one targeted layer and requantize it (kept until the layer is written)."""
        qw = _to_target_grid(self.source_weight(prefix), self.plan.source, self.plan.target)
        new_qw, report = requantize_layer(self.plan.layers[prefix], qw, self.options.method, inputs,
                                          device=self.options.device, target=target)
        self._record(prefix, report)
        self.merged[prefix] = new_qw
        return new_qw

    def _record(self, prefix: str, report: LayerReport) -> None:
        """Keep a layer's report line; with `--strict` the first fallback stops the merge (nothing is
        written): a strict user wants to know at the first layer, not after an hour of merging."""
        if report.fallback and self.options.strict:
            raise MergeError(f"--strict: {prefix} fell back ({report.fallback}); nothing was written.")
        self.reports.append(report)

    def rtn_layer(self, prefix: str) -> "QuantizedWeight":
        """`--method rtn`: W·Rᵀ rounded on the source grid, vectorised on the device (no Hessian)."""
        from oftsurgery.merge.rtn import rtn_merge_layer

        qw = _to_target_grid(self.source_weight(prefix, cache=False), self.plan.source, self.plan.target)
        new_qw, report = rtn_merge_layer(self.plan.layers[prefix], qw)
        self._record(prefix, report)
        return new_qw

    def solved_weight(self, prefix: str) -> "QuantizedWeight":
        """The requantized weight of one targeted layer (requantized data-free if not done yet)."""
        if prefix in self.merged:
            return self.merged[prefix]
        if self.options.method == "rtn":
            return self.rtn_layer(prefix)
        return self.requantize(prefix, None)

    def merged_tensors(self, prefix: str) -> dict[str, "torch.Tensor"]:
        """Packed output tensors for one targeted layer."""
        return self._pack(prefix, self.solved_weight(prefix))

    def converted_tensors(self, prefix: str) -> dict[str, "torch.Tensor"]:
        """An untargeted layer rewritten in the output format (GPTQ <-> AWQ only)."""
        return self._pack(prefix, self._converted_weight(prefix))

    def _converted_weight(self, prefix: str) -> "QuantizedWeight":
        return _to_target_grid(self.source_weight(prefix, cache=False), self.plan.source, self.plan.target)

    def write_group(self, writer: "BackgroundWriter | InlineWriter", names: list[str]) -> None:
        """Write the tensors `names` (a decoder layer, or everything outside the layer stack).

        Requantization happens here, on the calling thread, one linear at a time; packing, the
        re-check, the copy to the host and the writing happen in `writer`'s jobs (on a worker thread
        for `BackgroundWriter`), one job per linear, so at most a few linears' codes exist at once.
        """
        layers_here = sorted({p for p in self.plan.layers if any(n.startswith(p + ".") for n in names)})
        rewritten = [p for p in layers_here if self.plan.layers[p].targeted or self.plan.converts_format]
        owned = {n for n in names if any(n.startswith(p + ".") and "." not in n[len(p) + 1 :] for p in rewritten)}
        untouched = [n for n in names if n not in owned]
        reader = self.reader

        def copy_untouched():  # the stored bytes, file to file
            for name in untouched:
                where = reader.locate(name)
                info = reader.tensors[name]
                yield name, reader.get(name) if where is None else ("file", info.dtype, info.shape, *where)

        if untouched:
            writer.submit(rewritten[0] if rewritten else "the tensors outside the decoder layers", copy_untouched)
        # the linears still to requantize here (rtn, conversion) read the next one's packed tensors on
        # a reader thread while this one computes: disk reads overlap the work
        unread = [p for p in rewritten if p not in self.merged and p not in self._unpacked]
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="oftsurgery-read") as reads:
            try:
                for prefix in rewritten:
                    self.current = prefix
                    if prefix in unread:
                        for ahead in unread[unread.index(prefix) : unread.index(prefix) + 2]:
                            if ahead not in self._reads:
                                self._reads[ahead] = reads.submit(_layer_tensors, reader, ahead)
                    qw = self.solved_weight(prefix) if self.plan.layers[prefix].targeted else self._converted_weight(prefix)
                    writer.submit(prefix, lambda prefix=prefix, qw=qw: sorted(self._pack(prefix, qw).items()))
            finally:
                for future in self._reads.values():
                    future.cancel()
                self._reads.clear()


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


_CALIB_BATCH_TOKENS = 4096  # calibration tokens per forward pass while collecting Hessians


def _collect_hessians(layer_module, names: list[str], hidden, kwargs) -> dict[str, "CalibrationInputs"]:
    """H = Σ x xᵀ at the inputs of the named linears, one per distinct input tensor.

    Linears that read the same tensor (q/k/v; gate/up) share one `CalibrationInputs`, so H and what
    the solver derives from it are built once. H accumulates in float32 on the run device. Every
    8th calibration row (`hessian.holdout_rows`) goes to the held-out statistics the report uses.
    Rows go through the layer in batches of about `_CALIB_BATCH_TOKENS` tokens: few launches, and
    the attention memory of a batch stays small.
    """
    import torch

    from oftsurgery.merge.hessian import CalibrationInputs, InputHessian, holdout_rows

    num_rows = hidden.shape[0]
    held_out = holdout_rows(num_rows)
    batch = max(1, _CALIB_BATCH_TOKENS // max(1, hidden.shape[1]))  # rows per forward
    shared: dict[str, CalibrationInputs] = {}
    seen: list[tuple[str, torch.Tensor]] = []
    hooks = [layer_module.get_submodule(n).register_forward_hook(
        lambda mod, inputs, output, n=n: seen.append((n, inputs[0]))) for n in names]
    # fitted and held-out rows never share a forward pass: an MoE expert's input holds only the
    # tokens routed to it, so it could not be split by row afterwards
    parts = (("fit", [r for r in range(num_rows) if r not in held_out]), ("holdout", sorted(held_out)))
    try:
        with torch.no_grad():
            for part, rows in parts:
                for first in range(0, len(rows), batch):
                    chunk = rows[first : first + batch]
                    seen.clear()
                    layer_module(hidden[chunk[0] : chunk[-1] + 1] if chunk[-1] - chunk[0] == len(chunk) - 1
                                 else hidden[chunk], **kwargs)
                    distinct: list[tuple[torch.Tensor, list[str]]] = []
                    for name, x in seen:
                        group = next((g for t, g in distinct if t is x), None)
                        if group is None:
                            distinct.append((x, [name]))
                        elif name not in group:
                            group.append(name)
                    for x, group in distinct:
                        stats = next((shared[n] for n in group if n in shared), None)
                        if stats is None:
                            size, dev = x.shape[-1], x.device
                            stats = CalibrationInputs(InputHessian(size, dev),
                                                      InputHessian(size, dev, need_matrix=False) if held_out else None)
                        for n in group:
                            shared[n] = stats
                        getattr(stats, part).add(x)
    finally:
        seen.clear()
        for h in hooks:
            h.remove()
    return shared


def _calibrate_decoder_layer(runner, merger: "_Merger", index: int, hidden, kwargs) -> None:
    """Requantize the targeted linears of decoder layer `index` group by group on real activations.

    `hidden` is the merged model's stream (what the already-requantized earlier layers produce), so
    each layer compensates what earlier layers lost. Within the layer, linears not yet requantized
    hold their full-precision merged weight W·Rᵀ; those already done hold their requantized weight.
    A targeted linear no calibration row reached is requantized without inputs, which the report
    records as a fallback.
    """
    plan = merger.plan
    prefix = runner.layer_prefix(index) + "."
    # the layer is rebuilt once per input group: dequantize and rotate each weight once, not each time
    unmerged: dict[str, "torch.Tensor"] = {}

    def current_weight(name: str):
        if name in merger.merged:
            return merger.merged[name].dequantize()
        if name not in unmerged:
            weight = merger.source_weight(name).dequantize()
            unmerged[name] = plan.layers[name].target_weight(weight) if name in plan.layers else weight
        return unmerged[name]

    layer_module = runner.build_layer(index, current_weight)
    local = [n for n in runner.linear_names(layer_module)
             if prefix + n in plan.layers and plan.layers[prefix + n].targeted]
    groups, unreached = _input_groups(runner, layer_module, index, local, hidden)
    for name in unreached:
        _requantize_unreached(merger, prefix + name)
    for group in groups:
        layer_module = runner.build_layer(index, current_weight)
        inputs = _collect_hessians(layer_module, group, hidden, kwargs)
        for name in group:
            if name not in inputs:  # an expert's routing can shift once earlier groups are requantized
                _requantize_unreached(merger, prefix + name)
                continue
            merger.current = prefix + name
            merger.requantize(prefix + name, inputs.get(name), target=unmerged.pop(prefix + name, None))
        del inputs  # frees the group's Hessian and the solver's factors before the next group


def merge_checkpoint(checkpoint: str | Path, adapter: str | Path, out: str | Path,
                     options: MergeOptions = MergeOptions()) -> MergeReport:
    """Merge an OFT adapter (PEFT dir of any generation, or an `extract` rotations file) into a
    GPTQ/AWQ checkpoint and write a checkpoint of the requested format to `out`."""
    from oftsurgery.oft.adapter_io import load_rotations

    if options.method not in METHODS:
        raise MergeError(f"--method must be one of {', '.join(METHODS)}, not {options.method!r}.")
    options = replace(options, device=str(resolve_device(options.device, MergeError)))  # once, before any work
    started = time.perf_counter()
    reader = CheckpointReader(checkpoint, allow_pickle=options.allow_pickle)
    source = load_quant_config(checkpoint)
    rotations = load_rotations(adapter)
    plan = plan_merge(reader, source, rotations, options.requant)
    out_path = check_output_path(out, [checkpoint, adapter], overwrite=options.overwrite)
    if options.method == "calibrated" and plan.targeted:
        from oftsurgery.merge.calibration import load_calibration_text

        load_calibration_text(options.calib)  # a bad source fails now, not after the first layers (read once)
    elif options.calib is not None and options.method == "rtn":
        import warnings

        warnings.warn(f"The rtn method reads no calibration text; calib={options.calib!r} is ignored.", stacklevel=2)
    from oftsurgery.provenance import checkpoint_fingerprint

    fingerprint = checkpoint_fingerprint(reader, source)  # lets `verify` check what this was merged from

    merger = _Merger(reader, plan, options)
    report = MergeReport(
        checkpoint=str(checkpoint), adapter=str(adapter), output=str(out_path), method=options.method,
        source_format=source.describe(), output_format=plan.target.describe(), calibration=None,
        calib_tokens=0, residual_space="activations" if options.method == "calibrated" else "weights",
        identity_modules=plan.identity_modules, command=options.command, checkpoint_fingerprint=fingerprint,
    )
    _describe_serving(plan, report)
    outside, by_layer = _group_by_decoder_layer(list(reader.tensors))
    try:
        with atomic_output(out_path, overwrite=options.overwrite) as tmp:
            writer = CheckpointWriter(tmp, max_shard_size=options.max_shard_size)
            sink = BackgroundWriter(writer, PIPELINE_DEPTH) if PIPELINE_DEPTH > 0 else InlineWriter(writer)
            try:
                merger.write_group(sink, outside)
                if options.method == "calibrated" and plan.targeted:
                    _merge_calibrated(reader, merger, by_layer, sink, report)
                else:
                    for index in _progress(by_layer, len(by_layer), "merging", options.progress):
                        merger.new_decoder_layer()
                        merger.write_group(sink, by_layer[index])
                sink.close()
                writer.close()
            except WorkerFailed as failed:  # raise what failed in the worker as if it failed here
                merger.current = failed.label
                raise failed.error from None
            finally:
                sink.abort()  # stop and wait for the worker before the temporary directory goes
                writer.abort()
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
