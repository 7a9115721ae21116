"""The streaming merge: read → dequantize → rotate → requantize → pack → write.

Tensors are read and written in decoder-layer order, so memory holds one decoder layer (plus, in
calibrated mode, the calibration activations), never the model. Tensors the adapter does not touch
are copied with their bytes unchanged (file to file, never loaded); layers it does touch get
W′ = W·Rᵀ requantized on their source grid and packed back into the checkpoint's layout, byte-exact
with gptqmodel's packers. The work runs on one device (`--device`, default auto: the GPU when
there is one), resolved before anything else. While the main thread solves decoder layer i+1, one
worker thread packs and writes layer i (`pipeline.BackgroundWriter`); the data-free merge also
reads the next linear's packed tensors and rotation on a reader thread, and on a GPU each thread
queues its kernels on a stream of its own (`transfer.py`). The output directory
appears only complete. Under torchrun the work is spread over the ranks (`distributed.py`,
docs/distributed.md) and rank 0 writes.
"""

from __future__ import annotations

import json
import math
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from oftsurgery.device import AUTO
from oftsurgery.errors import MergeError, OftSurgeryError, UnsupportedFormatError
from oftsurgery.io import CheckpointReader, CheckpointWriter, atomic_output, check_output_path, copy_side_files
from oftsurgery.merge.distributed import SingleProcess, open_ranks, row_batches
from oftsurgery.merge.pipeline import BackgroundWriter, InlineWriter, WorkerFailed
from oftsurgery.merge.plan import LayerPlan, MergePlan, decoder_layer_index, plan_merge
from oftsurgery.merge.report import LayerReport, MergeReport
from oftsurgery.merge.transfer import adopt, continue_elsewhere, to_host, upload
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

def _layer_tensors(reader: CheckpointReader, prefix: str, pin_memory: bool = False) -> dict[str, "torch.Tensor"]:
    return {n[len(prefix) + 1 :]: reader.get(n, pin_memory)
            for n in reader.tensors if n.startswith(prefix + ".") and "." not in n[len(prefix) + 1 :]}


def _layer_tensors_on(reader: CheckpointReader, prefix: str, device: "torch.device") -> dict[str, "torch.Tensor"]:
    """A layer's stored tensors on `device` (see `transfer.upload`: pass them through `adopt`)."""
    return upload(lambda pin: _layer_tensors(reader, prefix, pin), device)


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
    and the source codes are compared on the held-out calibration rows (the fitted ones when there
    are too few rows to hold any out), and the reported residuals are those errors. rtn: rounding
    and weight-space residuals ‖E‖_F on `device`, no Hessian at all. Choosing anything but the
    requested mode is recorded as a `fallback`.
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
        # each candidate's error once, on the held-out rows: on the rows it fitted the solve always looks
        # best, also where it has only fitted their noise (few tokens for many inputs); held out, it can
        # lose to rounding or even to the source codes, and then the winner takes its place
        errors = {"compensated": residual(solved.weight.dequantize()) if measured is not fit else solved.error,
                  "rtn": residual(candidates["rtn"].dequantize()), "kept": residual(weight)}
        preferred = "compensated"
        heldout_tokens = measured.tokens if measured is not fit else 0
    else:
        if method == "calibrated":
            fallbacks.append(NOT_REACHED)

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
        self._reads: dict[str, Any] = {}  # prefix -> Future of `_read_ahead`'s result
        self._rotations: dict[str, dict[str, "torch.Tensor"]] = {}  # prefix -> its rotation on the device, read ahead

    def source_weight(self, prefix: str, cache: bool = True) -> "QuantizedWeight":
        """A layer's stored codes (uint8) and grid (per-module `dynamic` overrides applied), unpacked on
        the merge's device; cached per decoder layer unless `cache` is False."""
        from oftsurgery.quant.codec import layer_quant_config, unpack_layer

        if prefix in self._unpacked:
            return self._unpacked[prefix]
        cfg = layer_quant_config(self.plan.source, prefix) or self.plan.source
        ahead = self._reads.pop(prefix, None)
        if ahead is not None:
            packed, rotation = ahead.result()
            if rotation:
                self._rotations[prefix] = adopt(rotation)
        else:
            packed = _layer_tensors_on(self.reader, prefix, self.options.device)
        qw = unpack_layer(adopt(packed), cfg)
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
        new_qw, report = rtn_merge_layer(self.plan.layers[prefix], qw, self._rotations.pop(prefix, None))
        self._record(prefix, report)
        return new_qw

    def solve(self, prefixes: list[str], solve_here) -> None:
        """Requantize the named targeted layers, each on the rank that owns it, and give every rank
        the results, listed in the order given (in one process: all of them here, in that order).

        `solve_here(prefix)` requantizes one layer in this process, records its report line and
        returns its weight; the results land in `self.merged`.
        """
        from oftsurgery.quant.grid import QuantizedWeight

        ranks = self.ranks
        owners = ranks.assign(prefixes, [self._solve_cost(p) for p in prefixes])
        for prefix in prefixes:
            if owners[prefix] == ranks.rank:
                self.current = prefix
                self.merged[prefix] = solve_here(prefix)
                self.reports[-1].rank = ranks.rank
        if not ranks.distributed:
            return
        for prefix in prefixes:  # the same order on every rank
            mine = owners[prefix] == ranks.rank
            qw = self.merged[prefix] if mine else None
            tensors, info = ranks.share(
                owners[prefix],
                {"codes": qw.codes, "scales": qw.scales, "zeros": qw.zeros, "g_idx": qw.g_idx} if mine else None,
                {"bits": qw.bits, "group_size": qw.group_size,
                 "report": asdict(next(r for r in reversed(self.reports) if r.name == prefix))} if mine else None)
            if not mine:
                self.merged[prefix] = QuantizedWeight(**tensors, bits=info["bits"], group_size=info["group_size"])
                self.reports.append(LayerReport(**info["report"]))
        # every rank lists the layers in the same order, whoever solved them
        order = {p: i for i, p in enumerate(prefixes)}
        done = sorted((r for r in self.reports if r.name in order), key=lambda r: order[r.name])
        self.reports = [r for r in self.reports if r.name not in order] + done

    def _solve_cost(self, prefix: str) -> float:
        """What requantizing a layer costs, roughly: the calibrated solve grows as out·in², rounding as out·in."""
        layer = self.plan.layers[prefix]
        calibrated = self.options.method == "calibrated"
        return float(layer.out_features * layer.in_features * (layer.in_features if calibrated else 1))

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

    def write_group(self, writer: "BackgroundWriter | InlineWriter | None", names: list[str]) -> None:
        """Write the tensors `names` (a decoder layer, or everything outside the layer stack); with
        `writer` None (a rank other than 0) only solve this rank's share of them.

        Requantization happens here, on the calling thread, one linear at a time; packing, the
        re-check, the copy to the host and the writing happen in `writer`'s jobs (on a worker thread
        for `BackgroundWriter`), one job per linear, so at most a few linears' codes exist at once.
        """
        layers_here = sorted({p for p in self.plan.layers if any(n.startswith(p + ".") for n in names)})
        # what is not requantized yet (rtn; no calibration): across ranks, dealt out and shared first;
        # in one process, requantized in the loop below, each linear as its packed tensors arrive
        if self.ranks.distributed:
            self.solve([p for p in layers_here if self.plan.layers[p].targeted and p not in self.merged],
                       self.solved_weight)
        if writer is None:  # a rank that does not write: its share is done
            return
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
                                self._reads[ahead] = reads.submit(self._read_ahead, ahead)
                    qw = self.solved_weight(prefix) if self.plan.layers[prefix].targeted else self._converted_weight(prefix)
                    writer.submit(prefix, partial(self._pack_to_host, prefix, qw, continue_elsewhere(self.options.device)))
            finally:
                for future in self._reads.values():
                    future.cancel()
                self._reads.clear()
                self._rotations.clear()

    def _pack_to_host(self, prefix: str, qw: "QuantizedWeight", on_own_stream) -> list[tuple[str, "torch.Tensor"]]:
        """The writer's job for one linear: packed on the device (on the writer thread's own stream,
        after the kernels that made `qw`), then copied to the host with one wait."""
        with on_own_stream():
            return sorted(to_host(self._pack(prefix, qw)).items())

    def _read_ahead(self, prefix: str) -> tuple[dict[str, "torch.Tensor"], dict[str, "torch.Tensor"]]:
        """On the reader thread: a linear's packed tensors and, for the rtn merge of a targeted linear,
        its rotation (`rtn.rotation_tensors`), both on the merge's device (pass them through `adopt`)."""
        from oftsurgery.merge.rtn import rotation_tensors

        packed = _layer_tensors_on(self.reader, prefix, self.options.device)
        layer = self.plan.layers[prefix]
        if not (layer.targeted and self.options.method == "rtn"):
            return packed, {}
        return packed, upload(lambda pin: rotation_tensors(layer, pin), self.options.device)


def _linears_by_input(layer_module, names: list[str], hidden, kwargs) -> list[list[str]]:
    """Run `hidden` through the layer once and group the named linears by the input tensor they read,
    in execution order (q/k/v share one, gate/up another). Linears no token reached are left out."""
    import torch

    seen: list[tuple[str, torch.Tensor]] = []  # holding the inputs keeps them alive, so identity is meaningful
    hooks = [layer_module.get_submodule(name).register_forward_hook(
        lambda mod, inputs, output, name=name: seen.append((name, inputs[0]))) for name in names]
    try:
        with torch.no_grad():
            layer_module(hidden, **kwargs)
    finally:
        for h in hooks:
            h.remove()
    groups: list[tuple[torch.Tensor, list[str]]] = []
    for name, x in seen:
        group = next((g for t, g in groups if t is x), None)
        if group is None:
            groups.append((x, [name]))
        elif name not in group:
            group.append(name)
    return [group for _, group in groups]


def _input_groups(runner, layer_module, index: int, names: list[str], hidden, batches: list[range] | None = None,
                  ranks: SingleProcess | None = None) -> tuple[list[list[str]], list[str]]:
    """Targeted linears of a decoder layer grouped by the input they share, in execution order, and the
    targeted linears no calibration row reaches.

    For a Llama block the groups are [q, k, v], [o], [gate, up], [down]: each group's input depends
    only on the groups before it, so requantizing group by group lets every group see (and
    compensate) what the earlier groups of the same layer will really feed it. MoE experts run only
    on the tokens routed to them, so batches of rows are run until every linear has been seen; an
    expert no calibration token is routed to is returned as unreached.

    `batches`: the row ranges of `hidden` to run, in order (default: runner.batch_rows rows at a
    time). With several ranks each scans its own rows and their findings are joined in rank order,
    which is row order: the groups come out as if one process had scanned every batch.
    """
    import torch

    kwargs = runner.layer_kwargs(index)
    rows = runner.batch_rows(hidden.shape[1])
    if batches is None:
        batches = row_batches(range(hidden.shape[0]), rows)
    groups: list[list[str]] = []
    seen_names: set[str] = set()
    for batch in batches:
        start, stop = batch.start, batch.stop
        batch_groups = _linears_by_input(layer_module, names, hidden[start:stop], kwargs)
        for group in batch_groups:
            new = [n for n in group if n not in seen_names]
            if new:
                groups.append(new)
                seen_names.update(new)
        if len(seen_names) == len(names):
            break
    if ranks is not None and ranks.distributed:
        found, groups, seen_names = ranks.gather_json(groups), [], set()
        for group in (g for rank_groups in found for g in rank_groups):
            new = [n for n in group if n not in seen_names]
            if new:
                groups.append(new)
                seen_names.update(new)
    return groups, [n for n in names if n not in seen_names]


NOT_REACHED = "not calibrated: the calibration never reached this module, so it was rounded to nearest"
NO_CALIBRATION_TOKENS = ("not calibrated: no calibration token was routed to this MoE expert, "
                         "so it was rounded to nearest")


def _requantize_unreached(merger: "_Merger", name: str) -> "QuantizedWeight":
    """Requantize a linear no calibration token reached, without data, and say so in its report line."""
    merger.current = name
    weight = merger.requantize(name, None)
    report = merger.reports[-1]
    # the solver's generic reason, made specific: a router chose no calibration token for this expert
    report.fallback = (report.fallback or NOT_REACHED).replace(NOT_REACHED, NO_CALIBRATION_TOKENS)
    return weight


def _collect_hessians(layer_module, names: list[str], hidden, kwargs,
                      ranks: SingleProcess | None = None, num_rows: int | None = None) -> dict[str, "CalibrationInputs"]:
    """H = Σ x xᵀ at the inputs of the named linears, one `CalibrationInputs` per distinct input.

    Linears that read the same tensor (q/k/v; gate/up) share one, so H and what the solver derives
    from it are built once. H accumulates in float32 on the run device, shard by shard in a fixed
    order (`sharded_inputs.py`: the same bits on any number of ranks). Every 8th calibration row
    (`hessian.holdout_rows`) goes to the held-out statistics the report uses. `hidden` holds this
    rank's rows of `num_rows` (default: all of them, in one process).
    """
    import torch

    from oftsurgery.merge.sharded_inputs import collect_group_inputs

    ranks = ranks or SingleProcess(str(hidden.device))
    num_rows = hidden.shape[0] if num_rows is None else num_rows
    # which of the linears read the same tensor: one row shows it (zeros on a rank without rows)
    sample = hidden[:1] if hidden.shape[0] else torch.zeros((1, *hidden.shape[1:]), dtype=hidden.dtype,
                                                              device=hidden.device)
    shared: dict[str, "CalibrationInputs"] = {}
    for group in _linears_by_input(layer_module, names, sample, kwargs):
        shared.update(collect_group_inputs(ranks, layer_module, group, hidden, num_rows, kwargs))
    return shared


def _calibrate_decoder_layer(runner, merger: "_Merger", index: int, hidden, kwargs, num_rows: int) -> None:
    """Requantize the targeted linears of decoder layer `index` group by group on real activations.

    `hidden` is the merged model's stream (what the already-requantized earlier layers produce), so
    each layer compensates what earlier layers lost. Within the layer, linears not yet requantized
    hold their full-precision merged weight W·Rᵀ; those already done hold their requantized weight.
    A targeted linear no calibration row reached is requantized without inputs, which the report
    records as a fallback. In a distributed merge `hidden` holds this rank's rows of the `num_rows`
    calibration rows, and the linears of a group are solved on different ranks.
    """
    from oftsurgery.merge.sharded_inputs import collect_group_inputs

    plan = merger.plan
    ranks = merger.ranks
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
    groups, unreached = _input_groups(runner, layer_module, index, local, hidden,
                                      _local_batches(runner, ranks, hidden, num_rows), ranks)
    merger.solve([prefix + name for name in unreached], lambda p: _requantize_unreached(merger, p))
    for group in groups:
        layer_module = runner.build_layer(index, current_weight)
        inputs = collect_group_inputs(ranks, layer_module, group, hidden, num_rows, kwargs)

        def solve_here(name: str) -> "QuantizedWeight":
            stats = inputs[name[len(prefix):]]
            if stats.fit.tokens == 0 and (stats.holdout is None or stats.holdout.tokens == 0):
                return _requantize_unreached(merger, name)  # routing can shift once earlier groups are requantized
            return merger.requantize(name, stats, target=unmerged.pop(name, None))

        merger.solve([prefix + name for name in group], solve_here)
        del inputs  # frees the group's Hessian and the solver's factors before the next group


def _local_batches(runner, ranks: SingleProcess, hidden, num_rows: int) -> list[range]:
    """This rank's rows of `hidden` in batches of runner.batch_rows, each inside one calibration shard:
    batch shapes (and with them the float results) then do not depend on the number of ranks."""
    first = ranks.local_rows(num_rows).start
    size = runner.batch_rows(hidden.shape[1])
    return [b for shard in ranks.local_shards(num_rows)
            for b in row_batches(range(shard.start - first, shard.stop - first), size)]


def _forward_local(runner, ranks: SingleProcess, layer_module, index: int, hidden, num_rows: int):
    """Decoder layer `index` applied to this rank's rows, one calibration shard at a time."""
    import torch

    if not hidden.shape[0]:
        return hidden
    first = ranks.local_rows(num_rows).start
    return torch.cat([runner.forward_layer(layer_module, index, hidden[s.start - first : s.stop - first])
                      for s in ranks.local_shards(num_rows)])


def merge_checkpoint(checkpoint: str | Path, adapter: str | Path, out: str | Path,
                     options: MergeOptions = MergeOptions()) -> MergeReport:
    """Merge an OFT adapter (PEFT dir of any generation, or an `extract` rotations file) into a
    GPTQ/AWQ checkpoint and write a checkpoint of the requested format to `out`.

    Under `torchrun`, or inside a process group the caller initialised, every rank calls this and
    the merge runs across the ranks (docs/distributed.md): rank 0 writes the same bytes a single
    process would, and every rank returns the report.
    """
    with open_ranks(options.device) as ranks, ranks.guard(out):
        return _merge(checkpoint, adapter, out, options, ranks)


def _merge(checkpoint, adapter, out, options: MergeOptions, ranks: SingleProcess) -> MergeReport:
    from oftsurgery.oft.adapter_io import load_rotations

    if options.method not in METHODS:
        raise MergeError(f"--method must be one of {', '.join(METHODS)}, not {options.method!r}.")
    ranks.check_device()  # resolved once, before any work (cuda under torchrun: each rank its own GPU)
    options = replace(options, device=ranks.device)
    started = time.perf_counter()
    reader = CheckpointReader(checkpoint, allow_pickle=options.allow_pickle)
    source = load_quant_config(checkpoint)
    rotations = load_rotations(adapter)
    plan = plan_merge(reader, source, rotations, options.requant)
    # only the writing rank's file system matters (other machines may not even see it)
    out_path = check_output_path(out, [checkpoint, adapter], overwrite=options.overwrite) if ranks.is_writer \
        else Path(out).expanduser().absolute()
    if options.method == "calibrated" and plan.targeted:
        from oftsurgery.merge.calibration import load_calibration_text

        load_calibration_text(options.calib)  # a bad source fails now, not after the first layers (read once)
    elif options.calib is not None and options.method == "rtn" and ranks.is_writer:
        import warnings

        warnings.warn(f"The rtn method reads no calibration text; calib={options.calib!r} is ignored.", stacklevel=2)
    from oftsurgery.provenance import checkpoint_fingerprint

    fingerprint = checkpoint_fingerprint(reader, source)  # lets `verify` check what this was merged from
    ranks.sync()  # every rank has checked its inputs: one that refused them stops the others here

    merger = _Merger(reader, plan, options, ranks)
    report = MergeReport(
        checkpoint=str(checkpoint), adapter=str(adapter), output=str(out_path), method=options.method,
        source_format=source.describe(), output_format=plan.target.describe(), calibration=None,
        calib_tokens=0, residual_space="activations" if options.method == "calibrated" else "weights",
        identity_modules=plan.identity_modules, command=options.command, checkpoint_fingerprint=fingerprint,
        world_size=ranks.world_size,
    )
    _describe_serving(plan, report)
    outside, by_layer = _group_by_decoder_layer(list(reader.tensors))
    progress = ranks.progress(options.progress)
    try:
        # rank 0 writes; the other ranks solve their share and write nothing
        with atomic_output(out_path, overwrite=options.overwrite) if ranks.is_writer else nullcontext() as tmp:
            writer = sink = None
            if tmp is not None:
                ranks.track_temporary(tmp)
                writer = CheckpointWriter(tmp, max_shard_size=options.max_shard_size)
                sink = BackgroundWriter(writer, PIPELINE_DEPTH) if PIPELINE_DEPTH > 0 else InlineWriter(writer)
            try:
                merger.write_group(sink, outside)
                if options.method == "calibrated" and plan.targeted:
                    _merge_calibrated(reader, merger, by_layer, sink, report, progress)
                else:
                    for index in _progress(by_layer, len(by_layer), "merging", progress):
                        merger.new_decoder_layer()
                        merger.write_group(sink, by_layer[index])
                if sink is not None:
                    sink.close()
                    writer.close()
            except WorkerFailed as failed:  # raise what failed in the worker as if it failed here
                merger.current = failed.label
                raise failed.error from None
            finally:
                if sink is not None:
                    sink.abort()  # stop and wait for the worker before the temporary directory goes
                    writer.abort()
            report.layers = merger.reports
            report.seconds = time.perf_counter() - started
            if tmp is not None:
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
    runner = LayerwiseModel(reader.config, reader.get, device=options.device, tensor_names=reader.tensors)
    unknown = [p.prefix for p in merger.plan.targeted if p.prefix not in runner.module_linears()]
    if unknown:
        raise UnsupportedFormatError(
            f"{unknown[0]} is a targeted quantized layer of the checkpoint but {runner.architecture} has no such "
            "decoder-layer module, so calibration could not reach it; use --method rtn."
        )
    # refuse before any merge work if the runner does not reproduce the model's own forward
    report.runner_check = max(runner.verify(ids[:SELF_CHECK_ROWS], merger.source_weight_float), default=0.0)
    # each rank carries its own rows (all of them in one process), shard by shard; one without rows
    # still runs row 0 once, for the layers' keyword arguments
    ranks, num_rows = merger.ranks, ids.shape[0]
    shards = ranks.local_shards(num_rows)
    hidden = (torch.cat([runner.first_layer_inputs(ids[s.start : s.stop])[0] for s in shards]) if shards
              else runner.first_layer_inputs(ids[:1])[0][:0])

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
            _calibrate_decoder_layer(runner, merger, index, hidden, runner.layer_kwargs(index), num_rows)
        merger.write_group(writer, names)
        layer_module = runner.build_layer(index, merged_weight)
        hidden = _forward_local(runner, ranks, layer_module, index, hidden, num_rows)


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
