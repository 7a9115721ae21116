"""`Merger`: one merge's stored weights in, packed tensors out.

It unpacks a linear's stored codes on the merge's device (reading the next ones ahead on a reader
thread), has each targeted linear requantized (`candidates.requantize_layer`, or `solve.rtn` for
`--method rtn`) on the rank that owns it and shares the result with every rank, and hands each
linear's packing and writing to the writer (`runtime.writer`), one decoder layer at a time.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from functools import partial
from typing import TYPE_CHECKING, Any

from oftsurgery.errors import MergeError
from oftsurgery.io import CheckpointReader
from oftsurgery.merge.candidates import _relative, _to_target_grid, requantize_group, requantize_layer
from oftsurgery.merge.options import MergeOptions
from oftsurgery.merge.plan import MergePlan
from oftsurgery.merge.report import PHASES, LayerReport
from oftsurgery.merge.runtime.ranks import SingleProcess
from oftsurgery.merge.runtime.transfer import adopt, continue_elsewhere, to_host, upload

if TYPE_CHECKING:
    import torch

    from oftsurgery.merge.runtime.writer import BackgroundWriter, InlineWriter
    from oftsurgery.merge.solve.hessian import CalibrationInputs
    from oftsurgery.quant.grid import QuantizedWeight


def _layer_tensors(reader: CheckpointReader, prefix: str, pin_memory: bool = False) -> dict[str, "torch.Tensor"]:
    return {n[len(prefix) + 1 :]: reader.get(n, pin_memory)
            for n in reader.tensors if n.startswith(prefix + ".") and "." not in n[len(prefix) + 1 :]}


def _layer_tensors_on(reader: CheckpointReader, prefix: str, device: "torch.device") -> dict[str, "torch.Tensor"]:
    """A layer's stored tensors on `device` (see `transfer.upload`: pass them through `adopt`)."""
    return upload(lambda pin: _layer_tensors(reader, prefix, pin), device)


class Merger:
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
        self.residual: dict[str, dict[str, "torch.Tensor"]] = {}  # prefix -> its residual LoRA (lora_A, lora_B), host

    def source_weight(self, prefix: str, cache: bool = True) -> "QuantizedWeight":
        """A layer's stored codes (uint8) and grid (per-module `dynamic` overrides applied), unpacked on
        the merge's device; cached per decoder layer unless `cache` is False."""
        from oftsurgery.quant.codec import layer_quant_config, unpack_layer

        if prefix in self._unpacked:
            return self._unpacked[prefix]
        cfg = layer_quant_config(self.plan.source, prefix) or self.plan.source
        with PHASES.phase("read+unpack"):  # the wait for a read ahead, or the read itself
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
        """A layer's stored weights dequantized on the merge's device (not cached: the runner's
        self-check runs once). s·(q − z) is exact in float32, so any device gives the same values."""
        from oftsurgery.quant.codec import layer_quant_config, unpack_layer

        cfg = layer_quant_config(self.plan.source, prefix) or self.plan.source
        return unpack_layer(adopt(_layer_tensors_on(self.reader, prefix, self.options.device)), cfg).dequantize()

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
        if self.options.residual_rank and target is None:
            target = self.plan.layers[prefix].target_weight(qw.dequantize())
        new_qw, report = requantize_layer(self.plan.layers[prefix], qw, self.options.method, inputs,
                                          device=self.options.device, target=target)
        self._fit_residual(prefix, new_qw, target, inputs, report)
        self._record(prefix, report)
        self.merged[prefix] = new_qw
        return new_qw

    def requantize_group(self, prefixes: list[str], inputs: "CalibrationInputs",
                         targets: "list[torch.Tensor | None]") -> list["QuantizedWeight"]:
        """`requantize` for targeted linears that read one input, solved as one problem (the same
        results, reports and residual adapters as one by one)."""
        qws = [_to_target_grid(self.source_weight(p), self.plan.source, self.plan.target) for p in prefixes]
        if self.options.residual_rank:
            targets = [self.plan.layers[p].target_weight(qw.dequantize()) if t is None else t
                       for p, qw, t in zip(prefixes, qws, targets)]
        self.current = prefixes[0]
        results = requantize_group([self.plan.layers[p] for p in prefixes], qws, self.options.method, inputs,
                                   device=self.options.device, targets=targets)
        for prefix, target, (new_qw, report) in zip(prefixes, targets, results):
            self.current = prefix
            self._fit_residual(prefix, new_qw, target, inputs, report)
            self._record(prefix, report)
            self.merged[prefix] = new_qw
        return [self.merged[p] for p in prefixes]

    def _fit_residual(self, prefix: str, merged: "QuantizedWeight", target: "torch.Tensor | None",
                      inputs: "CalibrationInputs | None", report: LayerReport) -> None:
        """With --residual-rank: the layer's residual LoRA (kept for OUT/residual-lora), its figure in `report`."""
        from oftsurgery.merge.residual_adapter import fit_residual_adapter

        if not self.options.residual_rank:
            return
        if target is None:
            source = _to_target_grid(self.source_weight(prefix, cache=False), self.plan.source, self.plan.target)
            target = self.plan.layers[prefix].target_weight(source.dequantize())
        calibrated = inputs is not None and inputs.fit.reached
        with PHASES.phase("solve/residual lora"):
            self.residual[prefix], report.residual_lora = fit_residual_adapter(
                merged, target, self.options.residual_rank, inputs if calibrated else None,
                device=inputs.fit.device if calibrated else merged.codes.device)

    def report_line(self, prefix: str) -> LayerReport:
        """The latest report line of linear `prefix`."""
        return next(r for r in reversed(self.reports) if r.name == prefix)

    def remeasure(self, prefix: str, inputs: "CalibrationInputs") -> None:
        """After a layer's weights changed (--tune-steps): its report residuals, measured again on
        `inputs` (the tuned layer's own activations), and its residual LoRA fitted again."""
        import torch

        report = self.report_line(prefix)
        source = _to_target_grid(self.source_weight(prefix), self.plan.source, self.plan.target)
        device = inputs.fit.device
        target = self.plan.layers[prefix].target_weight(source.dequantize()).to(device, torch.float32)

        def error(weight) -> float:
            return float(inputs.measured.error((weight.to(device, torch.float32) - target).T))

        ref = error(torch.zeros_like(target))
        report.residual_before = _relative(error(source.dequantize()), ref)
        report.residual_after = _relative(error(self.merged[prefix].dequantize()), ref)
        self._fit_residual(prefix, self.merged[prefix], target, inputs, report)

    def _record(self, prefix: str, report: LayerReport) -> None:
        """Keep a layer's report line; with `--strict` the first fallback stops the merge (nothing is
        written): a strict user wants to know at the first layer, not after an hour of merging."""
        if report.fallback and self.options.strict:
            raise MergeError(f"--strict: {prefix} fell back ({report.fallback}); nothing was written.")
        self.reports.append(report)

    def rtn_layer(self, prefix: str) -> "QuantizedWeight":
        """`--method rtn`: W·Rᵀ rounded on the source grid, vectorised on the device (no Hessian)."""
        from oftsurgery.merge.solve.rtn import rtn_merge_layer

        qw = _to_target_grid(self.source_weight(prefix, cache=False), self.plan.source, self.plan.target)
        new_qw, report = rtn_merge_layer(self.plan.layers[prefix], qw, self._rotations.pop(prefix, None))
        self._fit_residual(prefix, new_qw, None, None, report)
        self._record(prefix, report)
        return new_qw

    def solve(self, prefixes: list[str], solve_here, solve_together=None) -> None:
        """Requantize the named targeted layers, each on the rank that owns it, and give every rank
        the results, listed in the order given (in one process: all of them here, in that order).

        `solve_here(prefix)` requantizes one layer in this process, records its report line and
        returns its weight; the results land in `self.merged`. `solve_together(prefixes)`, when
        given, does the same for several layers at once (linears that read one input, solved as one
        problem): one process hands it all of them; with several ranks each layer is dealt out alone.
        """
        from oftsurgery.quant.grid import QuantizedWeight

        ranks = self.ranks
        owners = ranks.assign(prefixes, [self._solve_cost(p) for p in prefixes])
        mine = [p for p in prefixes if owners[p] == ranks.rank]
        if solve_together is not None and ranks.world_size == 1 and len(mine) > 1:
            self.current = mine[0]
            for prefix, qw in zip(mine, solve_together(mine)):
                self.merged[prefix] = qw
            for report in self.reports[-len(mine):]:
                report.rank = ranks.rank
            mine = []
        for prefix in mine:
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
                {"codes": qw.codes, "scales": qw.scales, "zeros": qw.zeros, "g_idx": qw.g_idx,
                 **self.residual.get(prefix, {})} if mine else None,
                {"bits": qw.bits, "group_size": qw.group_size,
                 "report": asdict(self.report_line(prefix))} if mine else None)
            if not mine:
                lora = {k: tensors.pop(k) for k in list(tensors) if k.startswith("lora_")}
                if lora:
                    self.residual[prefix] = lora
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
            finally:  # this group's reads only: those of the next decoder layer may be under way
                for prefix in rewritten:
                    future = self._reads.pop(prefix, None)
                    if future is not None:
                        future.cancel()
                self._rotations.clear()

    def read_ahead(self, prefixes: list[str], reads: ThreadPoolExecutor) -> None:
        """Start reading the named layers' packed tensors onto the merge's device on `reads` (the
        calibrated merge: the next decoder layer's, while this one is solved); `source_weight`
        takes them over."""
        for prefix in prefixes:
            if prefix not in self._reads and prefix not in self._unpacked:
                self._reads[prefix] = reads.submit(self._read_ahead, prefix)

    def cancel_reads(self) -> None:
        for future in self._reads.values():
            future.cancel()
        self._reads.clear()

    def _pack_to_host(self, prefix: str, qw: "QuantizedWeight", on_own_stream) -> list[tuple[str, "torch.Tensor"]]:
        """The writer's job for one linear: packed on the device (on the writer thread's own stream,
        after the kernels that made `qw`), then copied to the host with one wait."""
        with PHASES.phase("pack (writer thread)"), on_own_stream():
            return sorted(to_host(self._pack(prefix, qw)).items())

    def _read_ahead(self, prefix: str) -> tuple[dict[str, "torch.Tensor"], dict[str, "torch.Tensor"]]:
        """On the reader thread: a linear's packed tensors and, for the rtn merge of a targeted linear,
        its rotation (`rtn.rotation_tensors`), both on the merge's device (pass them through `adopt`)."""
        from oftsurgery.merge.solve.rtn import rotation_tensors

        packed = _layer_tensors_on(self.reader, prefix, self.options.device)
        layer = self.plan.layers[prefix]
        if not (layer.targeted and self.options.method == "rtn"):
            return packed, {}
        return packed, upload(lambda pin: rotation_tensors(layer, pin), self.options.device)
