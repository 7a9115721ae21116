"""The calibrated merge's decoder-layer loop: what each layer's linears see, and the solve in that order.

Layer by layer: group the targeted linears by the input they share (q/k/v, o, gate/up, down, MoE
experts), gather each group's calibration statistics on the merged model's own activations, solve
the group (spread over the ranks), then run the layer forward to feed the next one. The rtn merge
has no such loop: `engine` writes its layers directly.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from oftsurgery.errors import MergeError, UnsupportedFormatError
from oftsurgery.merge.candidates import NOT_REACHED
from oftsurgery.merge.merger import Merger
from oftsurgery.merge.report import PHASES, MergeReport, _progress
from oftsurgery.merge.runtime.ranks import SingleProcess
from oftsurgery.merge.runtime.shards import row_batches

if TYPE_CHECKING:
    import torch

    from oftsurgery.merge.solve.hessian import CalibrationInputs
    from oftsurgery.quant.grid import QuantizedWeight

SELF_CHECK_ROWS = 2  # calibration rows the layer runner is checked on against the model's own forward


def _linears_by_input(layer_module, names: list[str], hidden, kwargs) -> list[list[str]]:
    """Run `hidden` through the layer once and group the named linears by the input tensor they read,
    in execution order (q/k/v share one, gate/up another). Linears no token reached are left out.

    A linear that reads two different tensors in one pass is refused here: the statistics are
    gathered from the first call of each linear (`statistics.py` stops the pass there)."""
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
    first: dict[str, torch.Tensor] = {}
    for name, x in seen:
        if first.setdefault(name, x) is not x:
            raise RuntimeError(f"{name} does not read one input")
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

    kwargs = runner.layer_kwargs(index, hidden.dtype)
    rows = runner.batch_rows(hidden.shape[1])
    if batches is None:
        batches = row_batches(range(hidden.shape[0]), rows)
    groups: list[list[str]] = []
    seen_names: set[str] = set()
    if batches:  # one row shows a dense layer's groups: every linear runs on every token
        start = batches[0].start
        groups = _linears_by_input(layer_module, names, hidden[start : start + 1], kwargs)
        seen_names = {n for group in groups for n in group}
        if len(seen_names) < len(names):  # routed (MoE): scan batches as below, in their order
            groups, seen_names = [], set()
    for batch in batches if len(seen_names) < len(names) else []:
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


NO_CALIBRATION_TOKENS = ("not calibrated: no calibration token was routed to this MoE expert, "
                         "so it was rounded to nearest")


def _requantize_unreached(merger: "Merger", name: str) -> "QuantizedWeight":
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
    order (`calibration/statistics.py`: the same bits on any number of ranks). Every 8th calibration row
    (`hessian.holdout_rows`) goes to the held-out statistics the report uses. `hidden` holds this
    rank's rows of `num_rows` (default: all of them, in one process).
    """
    import torch

    from oftsurgery.merge.calibration.statistics import collect_group_inputs

    ranks = ranks or SingleProcess(str(hidden.device))
    num_rows = hidden.shape[0] if num_rows is None else num_rows
    # which of the linears read the same tensor: one row shows it (zeros on a rank without rows)
    sample = hidden[:1] if hidden.shape[0] else torch.zeros((1, *hidden.shape[1:]), dtype=hidden.dtype,
                                                              device=hidden.device)
    shared: dict[str, "CalibrationInputs"] = {}
    for group in _linears_by_input(layer_module, names, sample, kwargs):
        shared.update(collect_group_inputs(ranks, layer_module, group, hidden, num_rows, kwargs))
    return shared


RELEASE_ABOVE = 0.25  # of the GPU's memory: a larger reserve held by the caching allocator is handed back


def _release_cached_blocks(device: str) -> None:
    """Hand the caching allocator's free blocks back to the GPU once its reserve passes RELEASE_ABOVE
    of the card: the next group's sizes differ, and blocks cached for this one would add to its peak
    (a 70B layer's solve reserves tens of GB). Below that, keeping them saves the next group's
    allocations (a 7B layer reserves a few GB; releasing after every group cost ~1 s per 7B)."""
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        return
    if torch.cuda.memory_reserved(device) > RELEASE_ABOVE * torch.cuda.get_device_properties(device).total_memory:
        torch.cuda.empty_cache()


def _calibrate_decoder_layer(runner, merger: "Merger", index: int, hidden, kwargs, num_rows: int) -> "torch.nn.Module":
    """Requantize the targeted linears of decoder layer `index` group by group on real activations;
    return the layer, which then holds every requantized weight (what feeds the next layer).

    `hidden` is the merged model's stream (what the already-requantized earlier layers produce), so
    each layer compensates what earlier layers lost. Within the layer, linears not yet requantized
    hold their full-precision merged weight W·Rᵀ; those already done hold their requantized weight.
    A targeted linear no calibration row reached is requantized without inputs, which the report
    records as a fallback. In a distributed merge `hidden` holds this rank's rows of the `num_rows`
    calibration rows, and the linears of a group are solved on different ranks. The layer computes
    in `hidden`'s dtype (`_forward_dtype`); the statistics are float32 whatever it is.
    """
    import torch

    from oftsurgery.merge.calibration.statistics import collect_group_inputs

    plan = merger.plan
    ranks = merger.ranks
    prefix = runner.layer_prefix(index) + "."
    # W·Rᵀ of the targeted linears not requantized yet: their weight in a float32 layer, kept as their
    # solve's target (a half-precision layer holds a rounded copy: the solve computes W·Rᵀ again)
    unmerged: dict[str, "torch.Tensor"] = {}

    def current_weight(name: str):
        if name in merger.merged:
            return merger.merged[name].dequantize()
        weight = merger.source_weight(name).dequantize()
        if name in plan.layers and plan.layers[name].targeted:
            weight = plan.layers[name].target_weight(weight)
            if hidden.dtype == torch.float32:
                unmerged[name] = weight
        return weight

    def put_requantized(names: list[str]) -> None:  # each weight in place as soon as it is requantized
        for name in names:
            unmerged.pop(prefix + name, None)
            runner.set_linear_weight(layer_module, name, merger.merged[prefix + name].dequantize())

    with PHASES.phase("build layer"):
        layer_module = runner.build_layer(index, current_weight, hidden.dtype)  # built once per decoder layer
    local = [n for n in runner.linear_names(layer_module)
             if prefix + n in plan.layers and plan.layers[prefix + n].targeted]
    with PHASES.phase("input groups"):
        groups, unreached = _input_groups(runner, layer_module, index, local, hidden,
                                          _local_batches(runner, ranks, hidden, num_rows), ranks)
    merger.solve([prefix + name for name in unreached], lambda p: _requantize_unreached(merger, p))
    put_requantized(unreached)
    for group in groups:
        with PHASES.phase("statistics"):
            inputs = collect_group_inputs(ranks, layer_module, group, hidden, num_rows, kwargs)

        def unreached(name: str) -> bool:  # routing can shift once earlier groups are requantized
            stats = inputs[name[len(prefix):]]
            return stats.fit.tokens == 0 and (stats.holdout is None or stats.holdout.tokens == 0)

        def solve_here(name: str) -> "QuantizedWeight":
            if unreached(name):
                return _requantize_unreached(merger, name)
            return merger.requantize(name, inputs[name[len(prefix):]], target=unmerged.pop(name, None))

        def solve_together(names: list[str]) -> list["QuantizedWeight"]:  # one input: one problem
            if unreached(names[0]):
                return [_requantize_unreached(merger, name) for name in names]
            return merger.requantize_group(names, inputs[names[0][len(prefix):]],
                                           [unmerged.pop(name, None) for name in names])

        with PHASES.phase("solve"):
            merger.solve([prefix + name for name in group], solve_here, solve_together)
        with PHASES.phase("free"):
            del inputs  # frees the group's Hessian and the solver's factors before the next group
            _release_cached_blocks(ranks.device)
        with PHASES.phase("put weights"):
            put_requantized(group)
    return layer_module


def _tune(runner, merger: Merger, index: int, hidden, num_rows: int, report: MergeReport):
    """`--tune-steps`: tune decoder layer `index` against its output. Where the tuning is taken, the
    layer's residuals (and residual LoRA) are measured again on the tuned weights, and the float
    layer holding them (in `hidden`'s dtype) is returned for the forward to the next layer. Without a
    residual LoRA only the held-out rows are run again: the residuals are measured there."""
    from oftsurgery.merge.calibration.statistics import collect_group_inputs
    from oftsurgery.merge.layer_tuning import tune_decoder_layer

    result = tune_decoder_layer(runner, merger, index, hidden, merger.options.tune_steps)
    if result is None:
        return None
    report.layer_tuning.append({"layer": index, "accepted": result.accepted, "steps": result.steps,
                                "heldout_before": result.heldout_before, "heldout_after": result.heldout_after,
                                "seconds": result.seconds})
    if not result.accepted:
        return None
    prefix = runner.layer_prefix(index) + "."
    layer_module = runner.build_layer(index, lambda n: (merger.merged[n] if n in merger.merged
                                                        else merger.source_weight(n)).dequantize(), hidden.dtype)
    tuned = [n[len(prefix):] for n in merger.merged if n.startswith(prefix)]
    groups, _ = _input_groups(runner, layer_module, index, tuned, hidden, _local_batches(runner, merger.ranks, hidden,
                                                                                           num_rows), merger.ranks)
    for group in groups:
        kwargs, fitted = runner.layer_kwargs(index, hidden.dtype), merger.options.residual_rank > 0
        inputs = collect_group_inputs(merger.ranks, layer_module, group, hidden, num_rows, kwargs, fitted=fitted)
        if not fitted and not all(inputs[n].holdout is not None and inputs[n].holdout.tokens for n in group):
            # no held-out token reached them (an MoE expert): measured on the fitted rows, as the solve's were
            inputs = collect_group_inputs(merger.ranks, layer_module, group, hidden, num_rows, kwargs)
        for name in group:
            merger.remeasure(prefix + name, inputs[name])
    return layer_module


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


def _forward_dtype(requested: str, device: str, config: dict) -> "torch.dtype":
    """What the calibration forward computes in. `auto`: float32 on the CPU (whose half-precision
    matmuls are slow); on a GPU the checkpoint's own half precision, bfloat16 when its config names
    it (and the GPU has it), else float16 — what GPTQ/AWQ kernels compute in when it is served."""
    import torch

    if requested != "auto":
        return getattr(torch, requested)
    if torch.device(device).type != "cuda":
        return torch.float32
    named = str(config.get("dtype") or config.get("torch_dtype") or "float16").removeprefix("torch.")
    return torch.bfloat16 if named == "bfloat16" and torch.cuda.is_bf16_supported() else torch.float16


def _merge_calibrated(reader, merger: Merger, by_layer, writer, report: MergeReport, progress: bool) -> None:
    import torch

    from oftsurgery.merge.calibration.runner import LayerwiseModel
    from oftsurgery.merge.calibration.text import calibration_batches, load_calibration_text
    from transformers import AutoTokenizer

    options = merger.options
    text, desc = load_calibration_text(options.calib)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(reader.path))
    except Exception as exc:
        raise MergeError(f"Calibrated merge needs the checkpoint's tokenizer, which could not be loaded ({type(exc).__name__}); "
                         "use --method rtn or add the tokenizer files.") from None
    with PHASES.phase("tokenize"):
        ids = calibration_batches(text, tokenizer, options.calib_tokens, options.seq_len)
    dtype = _forward_dtype(options.forward_dtype, options.device, reader.config)
    report.forward_dtype = str(dtype).removeprefix("torch.")
    report.calibration, report.calib_tokens = desc, int(ids.numel())
    report.calib_tokens_requested = options.calib_tokens
    report.calib_text_short = ids.shape[0] < max(1, options.calib_tokens // options.seq_len)
    runner = LayerwiseModel(reader.config, reader.get, device=options.device, tensor_names=reader.tensors)
    unknown = [p.prefix for p in merger.plan.targeted if p.prefix not in runner.module_linears()]
    if unknown:
        raise UnsupportedFormatError(
            f"{unknown[0]} is a targeted quantized layer of the checkpoint but {runner.architecture} has no such "
            "decoder-layer module, so calibration could not reach it; use --method rtn."
        )
    # refuse before any merge work if the runner does not reproduce the model's own forward
    with PHASES.phase("runner check"):
        report.runner_check = max(runner.verify(ids[:SELF_CHECK_ROWS], merger.source_weight_float), default=0.0)
    # each rank carries its own rows (all of them in one process), shard by shard; one without rows
    # still runs row 0 once, for the layers' keyword arguments
    ranks, num_rows = merger.ranks, ids.shape[0]
    shards = ranks.local_shards(num_rows)
    with PHASES.phase("embeddings"):
        hidden = (torch.cat([runner.first_layer_inputs(ids[s.start : s.stop])[0] for s in shards]) if shards
                  else runner.first_layer_inputs(ids[:1])[0][:0]).to(dtype)

    def source_weight(name: str) -> torch.Tensor:
        return merger.source_weight(name).dequantize()

    order = list(by_layer)
    # a reader thread reads the next decoder layer's stored codes while this one is solved; the
    # writer thread packs and writes this one while the next is solved (engine.py)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="oftsurgery-read") as reads:
        try:
            for position, index in enumerate(_progress(by_layer, len(by_layer), "merging (calibrated)", progress)):
                names = by_layer[index]
                merger.new_decoder_layer()
                if position + 1 < len(order):
                    following = runner.layer_prefix(order[position + 1]) + "."
                    merger.read_ahead([p for p in merger.plan.layers if p.startswith(following)], reads)
                prefix = runner.layer_prefix(index) + "."
                if any(p.prefix.startswith(prefix) for p in merger.plan.targeted):
                    layer_module = _calibrate_decoder_layer(runner, merger, index, hidden,
                                                            runner.layer_kwargs(index, dtype), num_rows)
                    if options.tune_steps:
                        with PHASES.phase("tune"):
                            layer_module = _tune(runner, merger, index, hidden, num_rows, report) or layer_module
                else:  # nothing to requantize: the layer as stored
                    layer_module = runner.build_layer(index, source_weight, dtype)
                with PHASES.phase("write (hand-off)"):
                    merger.write_group(writer, names)
                with PHASES.phase("forward"):
                    hidden = _forward_local(runner, ranks, layer_module, index, hidden, num_rows)
                del layer_module
                if dtype != torch.float32 and not bool(torch.isfinite(hidden).all()):
                    raise MergeError(f"Decoder layer {index}'s output overflows {report.forward_dtype} on the "
                                     "calibration text, so its statistics would be meaningless; rerun with "
                                     "--forward-dtype float32.")
        finally:
            merger.cancel_reads()

