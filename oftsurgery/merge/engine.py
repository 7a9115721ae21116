"""The merge: `merge_checkpoint`, from the inputs to the output folder that appears only complete.

Resolves the ranks and the device, plans the merge, writes in decoder-layer order into an atomic
output (rank 0 writes; a worker thread packs and writes layer i while layer i+1 is solved), runs
the rtn loop itself or hands the layers to `calibrated_loop`, and writes the report, the configs and
the model card. Threads, streams and memory: docs/performance.md; ranks: docs/distributed.md.
"""

from __future__ import annotations

import json
import time
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

from oftsurgery.errors import MergeError, OftSurgeryError
from oftsurgery.io import (MERGE_REPORT, CheckpointReader, CheckpointWriter, atomic_output, check_output_path,
                           copy_side_files)
from oftsurgery.io.ownership import RESIDUAL_LORA_DIR
from oftsurgery.merge.merger import Merger
from oftsurgery.merge.options import FORWARD_DTYPES, METHODS, MergeOptions, default_tune_steps
from oftsurgery.merge.plan import MergePlan, plan_merge
from oftsurgery.merge.report import PHASES, MergeReport, _progress
from oftsurgery.merge.runtime.ranks import SingleProcess, open_ranks
from oftsurgery.merge.runtime.writer import BackgroundWriter, InlineWriter, WorkerFailed
from oftsurgery.quant.config import load_quant_config
from oftsurgery.quant.layout import decoder_layer_index

# jobs (one per linear) queued between the main thread and pack+write (worker); 0: no worker thread
PIPELINE_DEPTH = 1
# the calibrated merge queues a whole decoder layer, so the main thread goes on to the next layer at
# once (the queued jobs hold only the codes the layer's solve made anyway)
CALIBRATED_PIPELINE_DEPTH = 64


def _group_by_decoder_layer(names: list[str]) -> tuple[list[str], dict[int, list[str]]]:
    outside: list[str] = []
    by_layer: dict[int, list[str]] = {}
    for name in names:
        index = decoder_layer_index(name)
        (outside if index is None else by_layer.setdefault(index, [])).append(name)
    return outside, dict(sorted(by_layer.items()))


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
    if options.forward_dtype not in FORWARD_DTYPES:
        raise MergeError(f"forward_dtype must be one of {', '.join(FORWARD_DTYPES)}, not {options.forward_dtype!r}.")
    if options.residual_rank < 0:
        raise MergeError(f"--residual-rank must be 0 (none) or positive, not {options.residual_rank}.")
    if options.tune_steps is not None and options.tune_steps < 0:
        raise MergeError(f"--tune-steps must be 0 (off) or positive, not {options.tune_steps}.")
    if options.tune_steps and ranks.distributed:
        raise MergeError("--tune-steps runs in one process (it needs every calibration row in one place); "
                         "drop it under torchrun.")
    ranks.check_device()  # resolved once, before any work (cuda under torchrun: each rank its own GPU)
    tune_steps = options.tune_steps if options.tune_steps is not None else \
        default_tune_steps(options.method, ranks.device, ranks.distributed)
    options = replace(options, device=ranks.device, tune_steps=tune_steps)
    started = time.perf_counter()
    PHASES.reset()
    reader = CheckpointReader(checkpoint, allow_pickle=options.allow_pickle)
    source = load_quant_config(checkpoint)
    rotations = load_rotations(adapter)
    plan = plan_merge(reader, source, rotations, options.requant)
    # only the writing rank's file system matters (other machines may not even see it)
    out_path = check_output_path(out, [checkpoint, adapter], overwrite=options.overwrite) if ranks.is_writer \
        else Path(out).expanduser().absolute()
    if options.method == "calibrated" and plan.targeted:
        from oftsurgery.merge.calibration.text import load_calibration_text

        load_calibration_text(options.calib)  # a bad source fails now, not after the first layers (read once)
    elif options.calib is not None and options.method == "rtn" and ranks.is_writer:
        import warnings

        warnings.warn(f"The rtn method reads no calibration text; calib={options.calib!r} is ignored.", stacklevel=2)
    from oftsurgery.reporting.provenance import checkpoint_fingerprint

    fingerprint = checkpoint_fingerprint(reader, source)  # lets `verify` check what this was merged from
    ranks.sync()  # every rank has checked its inputs: one that refused them stops the others here

    merger = Merger(reader, plan, options, ranks)
    report = MergeReport(
        checkpoint=str(checkpoint), adapter=str(adapter), output=str(out_path), method=options.method,
        source_format=source.describe(), output_format=plan.target.describe(), calibration=None,
        calib_tokens=0, residual_space="activations" if options.method == "calibrated" else "weights",
        identity_modules=plan.identity_modules, command=options.command, checkpoint_fingerprint=fingerprint,
        world_size=ranks.world_size, residual_rank=options.residual_rank,
        tune_steps=options.tune_steps if options.method == "calibrated" else 0,
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
                depth = CALIBRATED_PIPELINE_DEPTH if options.method == "calibrated" and PIPELINE_DEPTH > 0 \
                    else PIPELINE_DEPTH
                sink = BackgroundWriter(writer, depth) if depth > 0 else InlineWriter(writer)
            try:
                merger.write_group(sink, outside)
                if options.method == "calibrated" and plan.targeted:
                    from oftsurgery.merge.calibrated_loop import _merge_calibrated  # not imported for rtn

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
            report.phase_seconds = PHASES.snapshot()
            if tmp is not None:
                _write_configs(reader, plan, tmp)
                copy_side_files(reader.side_files(), tmp)
                if options.residual_rank:
                    from oftsurgery.merge.residual_adapter import write_residual_adapter

                    report.residual_lora_bytes = write_residual_adapter(
                        tmp / RESIDUAL_LORA_DIR, merger.residual, options.residual_rank)
                report.write(tmp / MERGE_REPORT)
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


def _describe_serving(plan: MergePlan, report: MergeReport) -> None:
    """Which vLLM/transformers kernels the input and the output load with; warn if the merge loses Marlin."""
    from oftsurgery.reporting.serving import marlin_lost_warnings, serving_contract

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
        from oftsurgery.reporting.card import render_merge_card
    except ImportError:  # card module not available yet: a minimal card
        (out_dir / "README.md").write_text(f"# Merged with oftsurgery\n\n```\n{report.summary()}\n```\n", encoding="utf-8")
        return
    (out_dir / "README.md").write_text(render_merge_card(report, plan), encoding="utf-8")
