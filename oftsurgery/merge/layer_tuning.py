"""Tuning a requantized decoder layer against its output (`merge --tune-steps N`), on the fixed grid.

After the per-linear solve, each targeted linear's fp16 scales may change by a factor (1 + a),
|a| ≤ MAX_SCALE_CHANGE, and (with `code_lr` > 0) its codes by ±1 from the solve's (rounding through
a straight-through estimator); both are learned with signed gradient steps so that the decoder
layer's output on the fitted calibration rows approaches the adapted layer's (W·Rᵀ in float, same
inputs). The result is taken only if the held-out rows' output error drops. The merge tunes scales
only: code moves measured worse on held-out rows (docs/merge-methods.md).

Everything runs in float32: the gradient is driven by the layer's output residual (relative to the
output 8e-4 to 2e-2 on SmolLM2), not far above TF32's rounding (~5e-4), and TF32 steps measured
0.6–1.1 points of retention worse (docs/merge-methods.md). Phases (merge_report.json
`phase_seconds`): tune/reference, tune/held-out, tune/steps.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from oftsurgery.quant.grid import QuantizedWeight

MAX_SCALE_CHANGE = 0.1  # scales move by at most ±10%
SCALE_LR = 5e-4  # signed step of the scale factors (decays linearly to 0)
ROWS_PER_STEP = 4  # calibration rows per gradient step
ACCEPT = 1e-3  # the held-out output error must drop by more than this relative amount


@dataclass
class TuneResult:
    """What tuning one decoder layer did."""

    accepted: bool
    heldout_before: float  # ‖Y − Y*‖² / ‖Y*‖² on the held-out rows, the solve's weights
    heldout_after: float  # the same with the tuned weights (rounded and in fp16, as written)
    steps: int
    seconds: float


class _Tuned:
    """One linear's learnable offsets around its solved codes and scales."""

    def __init__(self, qw: "QuantizedWeight", device, dtype, codes_move: bool):
        import torch

        self.qw = qw
        g_idx = qw.g_idx.to(device).long()
        self.codes = qw.codes.to(device, dtype)  # [out, in]
        self.scales = qw.scales.to(device, dtype)  # [G, out]
        zeros_full = qw.zeros.to(device, dtype)[g_idx].T  # [out, in]
        self.g_idx = g_idx
        self.maxq = float(qw.maxq)
        # codes move by round(offset) ∈ {-1, 0, 1}; with codes fixed, q − z is one tensor for every step
        self.offset = torch.zeros_like(self.codes, requires_grad=True) if codes_move else None
        self.zeros_full = zeros_full if codes_move else None
        self.centred = None if codes_move else self.codes - zeros_full
        self.factor = torch.zeros_like(self.scales, requires_grad=True)  # scales × (1 + factor)

    def weight(self, *, exact: bool = False) -> "torch.Tensor":
        """The float weight [out, in]; `exact`: rounded codes and fp16 scales, as they would be written."""
        import torch

        centred = self.centred
        if self.offset is not None:
            offset = self.offset
            moved = torch.round(offset) if exact else offset + (torch.round(offset) - offset).detach()
            centred = torch.clamp(self.codes + moved, 0, self.maxq) - self.zeros_full
        scales = self.scales * (1 + self.factor)
        if exact:
            scales = scales.to(torch.float16).to(self.scales.dtype)
        return centred * scales[self.g_idx].T

    def step(self, code_lr: float, scale_lr: float) -> None:
        import torch

        with torch.no_grad():
            if self.offset is not None and self.offset.grad is not None:
                self.offset.sub_(code_lr * torch.sign(self.offset.grad)).clamp_(-1, 1)
                self.offset.grad = None
            if self.factor.grad is not None:
                self.factor.sub_(scale_lr * torch.sign(self.factor.grad)).clamp_(-MAX_SCALE_CHANGE, MAX_SCALE_CHANGE)
                self.factor.grad = None

    def result(self) -> "QuantizedWeight":
        """The tuned codes and scales on the solve's grid (host, the solver's layout)."""
        import torch

        with torch.no_grad():
            codes = self.codes if self.offset is None else torch.clamp(self.codes + torch.round(self.offset), 0, self.maxq)
            scales = (self.scales * (1 + self.factor)).to(torch.float16)
        # uint8, input-major as the solver returns them
        codes_t = codes.T.to(torch.uint8).contiguous().to(self.qw.codes.device)
        return replace(self.qw, codes=codes_t.T, scales=scales.to(self.qw.scales.device).contiguous())


def tune_layer(forward, weights: dict[str, "QuantizedWeight"], hidden: "torch.Tensor", reference: "torch.Tensor",
               fit_rows: list[int], held_rows: list[int], *, steps: int, code_lr: float = 0.0, seed: int = 0,
               ) -> tuple[dict[str, "QuantizedWeight"], TuneResult]:
    """Tune the solved `weights` (name → QuantizedWeight) of one decoder layer.

    `forward(float_weights, x)` runs the layer on rows x with the named linears holding the given
    float weights [out, in] (the rest as stored); `reference` holds the adapted layer's outputs for
    every row of `hidden`. `code_lr` > 0 lets codes move by ±1 (signed steps of code_lr / steps).
    Returns the tuned weights (or `weights` unchanged) and what happened.
    """
    import torch

    from oftsurgery.merge.report import PHASES

    start = time.perf_counter()
    device, dtype = hidden.device, torch.float32
    tuned = {name: _Tuned(qw, device, dtype, codes_move=code_lr > 0) for name, qw in weights.items()}

    def error(rows: list[int], exact: bool) -> float:
        with torch.no_grad():
            floats = {n: t.weight(exact=exact) for n, t in tuned.items()}
            num = den = 0.0
            for r in range(0, len(rows), ROWS_PER_STEP):
                index = torch.tensor(rows[r : r + ROWS_PER_STEP], device=device)
                want = reference.index_select(0, index).to(dtype)
                got = forward(floats, hidden.index_select(0, index)).to(dtype)
                num += float((got - want).square().sum())
                den += float(want.square().sum())
        return num / den if den > 0 else 0.0

    with PHASES.phase("tune/held-out"):
        before = error(held_rows, exact=True)
    generator = torch.Generator().manual_seed(seed)
    order = torch.tensor(fit_rows)[torch.randperm(len(fit_rows), generator=generator)].tolist()
    code_lr = code_lr / max(1, steps)
    with PHASES.phase("tune/steps"):
        for step in range(steps):
            picks = [order[(step * ROWS_PER_STEP + i) % len(order)] for i in range(min(ROWS_PER_STEP, len(order)))]
            index = torch.tensor(picks, device=device)
            want = reference.index_select(0, index).to(dtype)
            got = forward({n: t.weight() for n, t in tuned.items()}, hidden.index_select(0, index)).to(dtype)
            loss = (got - want).square().mean()
            loss.backward()
            decay = 1 - step / steps
            for t in tuned.values():
                t.step(code_lr * decay, SCALE_LR * decay)
    with PHASES.phase("tune/held-out"):
        after = error(held_rows, exact=True)
    accepted = after < before * (1 - ACCEPT)
    result = {n: t.result() for n, t in tuned.items()} if accepted else dict(weights)
    return result, TuneResult(accepted, before, after, steps, time.perf_counter() - start)


def tune_decoder_layer(runner, merger, index: int, hidden: "torch.Tensor", steps: int) -> TuneResult | None:
    """Tune the requantized linears of decoder layer `index` (in `merger.merged`) in place; None when
    the layer has none. `hidden` holds every calibration row entering the layer (one process)."""
    import torch
    from torch.func import functional_call

    from oftsurgery.merge.report import PHASES
    from oftsurgery.merge.solve.hessian import holdout_rows

    plan = merger.plan
    prefix = runner.layer_prefix(index) + "."
    names = [p for p in merger.merged if p.startswith(prefix) and p in plan.layers and plan.layers[p].targeted]
    if not names:
        return None

    def adapted(name: str) -> "torch.Tensor":
        weight = merger.source_weight(name).dequantize()
        return plan.layers[name].target_weight(weight) if name in plan.layers and plan.layers[name].targeted else weight

    hidden = hidden.float()  # tuned in float32, whatever the calibration forward's dtype
    with PHASES.phase("tune/reference"):
        reference = runner.forward_layer(runner.build_layer(index, adapted), index, hidden)
        module = runner.build_layer(index, lambda n: (merger.merged[n] if n in merger.merged
                                                      else merger.source_weight(n)).dequantize())
    kwargs = runner.layer_kwargs(index)

    def forward(floats: dict[str, "torch.Tensor"], x: "torch.Tensor") -> "torch.Tensor":
        out = functional_call(module, {f"{n[len(prefix):]}.weight": w for n, w in floats.items()}, (x,), kwargs)
        return out[0] if isinstance(out, (tuple, list)) else out

    rows = hidden.shape[0]
    held = holdout_rows(rows)
    fit = [r for r in range(rows) if r not in held]
    tuned, result = tune_layer(forward, {n: merger.merged[n] for n in names}, hidden, reference, fit,
                               sorted(held) or fit, steps=steps)
    if result.accepted:
        for name in names:
            source, new = merger.source_weight(name), tuned[name]
            line = merger.report_line(name)
            line.codes_changed = float((new.codes != source.codes.to(new.codes.device)).float().mean())
            line.scales_changed = float((new.scales != source.scales.to(new.scales.device)).float().mean())
            line.stages = [*line.stages, "layer_tune"]
            merger.merged[name] = new
    return result
