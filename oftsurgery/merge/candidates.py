"""One targeted linear: its candidates (compensated solve, round-to-nearest, the source codes kept),
the choice between them on held-out calibration rows, and the `LayerReport` line that records it.

`requantize_layer` is the calibrated merge's per-linear step (and the data-free one when a linear
has no calibration inputs); `requantize_group` solves linears that read one input as one problem
before each gets its own choice; the math of each candidate is in `solve/`.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace
from typing import TYPE_CHECKING

from oftsurgery.merge.plan import LayerPlan
from oftsurgery.merge.report import PHASES, LayerReport
from oftsurgery.quant.config import QuantConfig

if TYPE_CHECKING:
    import torch

    from oftsurgery.merge.solve.hessian import CalibrationInputs
    from oftsurgery.merge.solve.requant import CalibratedResult
    from oftsurgery.quant.grid import QuantizedWeight

NOT_REACHED = "not calibrated: the calibration never reached this module, so it was rounded to nearest"


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
    *, device: str = "cpu", target: "torch.Tensor | None" = None, solved: "CalibratedResult | None" = None,
) -> tuple["QuantizedWeight", LayerReport]:
    """Fold the rotation into one layer and requantize it; return the new codes and its report line.

    Calibrated (with `inputs`): the solver runs on the inputs' device; its result, round-to-nearest
    and the source codes are compared on the held-out calibration rows (the fitted ones when there
    are too few rows to hold any out), and the reported residuals are those errors. rtn: rounding
    and weight-space residuals ‖E‖_F on `device`, no Hessian at all. Choosing anything but the
    requested mode is recorded as a `fallback`.
    `target` is W·Rᵀ when the caller has it already; `solved`, the solver's result when the caller
    solved this linear together with others that read the same input (`requantize_group`).
    """
    import torch

    from oftsurgery.merge.solve import requant

    start = time.perf_counter() - (solved.seconds if solved is not None else 0.0)
    if target is None:
        target = plan.target_weight(qw.dequantize())
    calibrated = method == "calibrated" and inputs is not None and inputs.fit.reached
    if calibrated:
        dev = inputs.fit.device
    else:
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else torch.device(device)
    source = replace(qw, codes=qw.codes.to(dev), scales=qw.scales.to(dev), zeros=qw.zeros.to(dev), g_idx=qw.g_idx.to(dev))
    target = target.to(dev, torch.float32)
    fallbacks: list[str] = []
    heldout_tokens = 0
    if calibrated:
        fit, measured = inputs.fit, inputs.measured

        def residual(w, stats=measured) -> float:  # tr(E H Eᵀ), E = w − target
            return float(stats.error((w - target).T))

        if solved is None:
            solved = requant.requantize_calibrated(source, target, fit)
        weight = source.dequantize()  # after the solve: out·in·4 bytes it does not need
        fallbacks += solved.fallbacks
        stages, kernel, damp = solved.stages, solved.kernel, solved.damp
        with PHASES.phase("solve/held-out choice"):
            candidates = {"compensated": solved.weight, "rtn": requant.requantize_rtn(source, target)}
            # each candidate's error once, on the held-out rows: on the rows it fitted the solve always looks
            # best, also where it has only fitted their noise (few tokens for many inputs); held out, it can
            # lose to rounding or even to the source codes, and then the winner takes its place. Measured
            # here, never taken from the solver, also on the fitted rows (fewer than 8 rows: none held out)
            errors = {"compensated": residual(solved.weight.dequantize()),
                      "rtn": residual(candidates["rtn"].dequantize()), "kept": residual(weight)}
        preferred = "compensated"
        heldout_tokens = measured.tokens if measured is not fit else 0
    else:
        if method == "calibrated":
            fallbacks.append(NOT_REACHED)

        def residual(w) -> float:  # ‖E‖²_F in weight space: no data, H = I
            return float(torch.linalg.vector_norm(w - target, dtype=torch.float64) ** 2)

        weight = source.dequantize()
        candidates = {"rtn": requant.requantize_rtn(source, target)}
        errors = {"rtn": residual(candidates["rtn"].dequantize()), "kept": residual(weight)}
        preferred = "rtn"
        stages, kernel, damp = ["rtn"], None, None
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
        stages=stages if mode == "compensated" else [mode], kernel=kernel, damp=damp,
    )
    host = qw if mode == "kept" else replace(chosen, codes=chosen.codes.to(qw.codes.device),
                                               scales=chosen.scales.to(qw.scales.device), zeros=qw.zeros, g_idx=qw.g_idx)
    return host, report



def requantize_group(
    plans: list[LayerPlan], qws: "list[QuantizedWeight]", method: str, inputs: "CalibrationInputs | None",
    *, device: str = "cpu", targets: "list[torch.Tensor | None]",
) -> list[tuple["QuantizedWeight", LayerReport]]:
    """`requantize_layer` for linears that read one input (q/k/v; gate/up): their calibrated solves run
    as one problem (`requant.requantize_calibrated_group`: the same result per linear as alone), and
    each linear then gets its own held-out choice and report line. The joint solve's time is shared
    out among their reports by output rows."""
    import torch

    from oftsurgery.merge.solve import requant

    calibrated = method == "calibrated" and inputs is not None and inputs.fit.reached
    if not calibrated or len(plans) < 2:
        return [requantize_layer(p, q, method, inputs, device=device, target=t) for p, q, t in zip(plans, qws, targets)]
    start = time.perf_counter()
    dev = inputs.fit.device
    targets = [plan.target_weight(qw.dequantize()) if t is None else t for plan, qw, t in zip(plans, qws, targets)]
    sources = [replace(qw, codes=qw.codes.to(dev), scales=qw.scales.to(dev), zeros=qw.zeros.to(dev), g_idx=qw.g_idx.to(dev))
               for qw in qws]
    results = requant.requantize_calibrated_group(sources, [t.to(dev, torch.float32) for t in targets], inputs.fit)
    del sources
    seconds, rows = time.perf_counter() - start, sum(qw.out_features for qw in qws)
    for result, qw in zip(results, qws):
        result.seconds = seconds * qw.out_features / rows
    return [requantize_layer(p, q, method, inputs, device=device, target=t, solved=r)
            for p, q, t, r in zip(plans, qws, targets, results)]
