"""The merge report: per-layer figures, a summary line, and the warnings a user must not miss; and the
progress bar shown while the layers are merged."""

from __future__ import annotations

import json
import os
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

NEGLIGIBLE_CHANGE = 1e-3  # fewer than 0.1% of codes (and of fp16 scales) changed across the merged layers


class PhaseClock:
    """Seconds per phase of a merge (the calibration forward, the statistics, each solver stage, ...),
    summed over the run and written to merge_report.json as `phase_seconds`: where a merge's time goes,
    for benches and for users asking why a merge is slow.

    GPU work is asynchronous, so without a wait a phase is charged for what it queued only where the
    CPU waits on its results. OFTSURGERY_PHASE_SYNC=1 makes every phase wait for the GPU at its end,
    which attributes GPU time exactly and costs a little overlap (for benches).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open = threading.local()  # each thread's stack of phases entered and not yet left
        self.reset()

    def reset(self) -> None:
        """Start a merge's count (and read OFTSURGERY_PHASE_SYNC again)."""
        with self._lock:
            self.seconds: dict[str, float] = {}
        self.sync = os.environ.get("OFTSURGERY_PHASE_SYNC") == "1"

    @contextmanager
    def phase(self, name: str):
        start = time.perf_counter()
        stack = self._open.__dict__.setdefault("stack", [])
        stack.append(name)
        try:
            yield
        finally:
            stack.pop()
            if self.sync:
                import torch

                if torch.cuda.is_available() and torch.cuda.is_initialized():
                    torch.cuda.synchronize()
            elapsed = time.perf_counter() - start
            with self._lock:
                self.seconds[name] = self.seconds.get(name, 0.0) + elapsed

    def current(self) -> str:
        """The innermost phase this thread is in ("" outside every phase)."""
        stack = getattr(self._open, "stack", None)
        return stack[-1] if stack else ""

    def snapshot(self) -> dict[str, float]:
        with self._lock:
            return {k: round(v, 4) for k, v in sorted(self.seconds.items())}


PHASES = PhaseClock()  # the running merge's (one merge per process at a time)


@dataclass
class LayerReport:
    name: str
    mode: str  # "compensated", "rtn", "kept" (codes kept: requantization would have made it worse)
    codes_changed: float  # fraction of integer codes that differ from the source
    residual_before: float  # ‖(W − W·Rᵀ)X‖ / ‖W·Rᵀ X‖: leaving the adapter out
    residual_after: float  # ‖(Ŵ − W·Rᵀ)X‖ / ‖W·Rᵀ X‖: the merged layer
    rotation_strength: float  # ‖R − I‖_F
    seconds: float = 0.0
    scales_changed: float = 0.0  # fraction of fp16 scales the merge refitted
    # None, or why this layer did not get the requested method: "<kind>: <reason>"[; …], kind one of
    # cholesky, gptq failed, <stage> failed, kept, rtn, not calibrated
    fallback: str | None = None
    # calibration tokens X of the residuals above were measured on, held out of the solve (0: the
    # residuals are on the fitted rows, or in weight space for rtn)
    heldout_tokens: int = 0
    rank: int = 0  # the rank that solved this layer in a distributed merge (0 in a single process)
    stages: list[str] = field(default_factory=list)  # solver stages accepted (gptq, refine_codes, refit_scales; rtn)
    kernel: str | None = None  # what ran the solver's column loops: "triton" or "torch" (None: no solve)
    damp: float | None = None  # the Hessian damping the GPTQ pass used (None: no GPTQ pass)
    residual_lora: float | None = None  # ‖(Ŵ + B·A − W·Rᵀ)X‖ / ‖W·Rᵀ X‖ with the residual LoRA (--residual-rank)


@dataclass
class MergeReport:
    checkpoint: str
    adapter: str
    output: str
    method: str
    source_format: str
    output_format: str
    calibration: str | None
    calib_tokens: int
    residual_space: str  # "activations" (calibrated) or "weights" (rtn: no data, H = I)
    layers: list[LayerReport] = field(default_factory=list)
    identity_modules: list[str] = field(default_factory=list)
    seconds: float = 0.0
    command: str | None = None
    fidelity: dict[str, Any] = field(default_factory=dict)
    checkpoint_fingerprint: str | None = None  # of the source checkpoint; `verify` checks it (oftsurgery.reporting.provenance)
    runner_check: float | None = None  # calibrated: largest relative error of the layer runner vs the model's own forward
    forward_dtype: str | None = None  # calibrated: what the layer-by-layer calibration forward computed in
    serving: dict[str, dict[str, str]] = field(default_factory=dict)  # engine -> {"input": ..., "output": ...} kernels
    serving_warnings: list[str] = field(default_factory=list)  # the output serves on slower kernels than the input
    world_size: int = 1  # processes the merge ran on (torchrun ranks)
    residual_rank: int = 0  # rank of the residual LoRA written to residual-lora/ (0: none)
    residual_lora_bytes: int = 0  # size of its weights
    tune_steps: int = 0  # --tune-steps as run (its default resolved: on a GPU, off on a CPU)
    layer_tuning: list[dict[str, Any]] = field(default_factory=list)  # per decoder layer: --tune-steps' outcome
    calib_tokens_requested: int = 0  # --calib-tokens (calib_tokens is what the text gave, in whole rows)
    calib_text_short: bool = False  # the calibration text held fewer rows than were asked for
    # where the merge's time went: seconds per phase summed over the run (`PhaseClock`; nested phases
    # are named "outer/inner" and counted in the outer one too; "pack+write" runs beside the loop)
    phase_seconds: dict[str, float] = field(default_factory=dict)

    # ---- aggregate figures ----
    @property
    def codes_changed(self) -> float:
        return sum(l.codes_changed for l in self.layers) / max(1, len(self.layers))

    @property
    def scales_changed(self) -> float:
        return sum(l.scales_changed for l in self.layers) / max(1, len(self.layers))

    @property
    def mean_residual_before(self) -> float:
        return sum(l.residual_before for l in self.layers) / max(1, len(self.layers))

    @property
    def mean_residual_after(self) -> float:
        return sum(l.residual_after for l in self.layers) / max(1, len(self.layers))

    @property
    def mean_residual_lora(self) -> float | None:
        """Mean per-layer residual with the residual LoRA added (None without one)."""
        vals = [l.residual_lora for l in self.layers if l.residual_lora is not None]
        return sum(vals) / len(vals) if vals else None

    @property
    def kept_fraction_lora(self) -> float | None:
        """`kept_fraction` of the merged layers plus their residual LoRA (None without one)."""
        vals = [1 - l.residual_lora / l.residual_before for l in self.layers
                if l.residual_before > 0 and l.residual_lora is not None]
        return sum(vals) / len(vals) if vals else None

    @property
    def kept_fraction(self) -> float:
        """1 − after/before, averaged: how much of each layer's fine-tune the requantized layer keeps."""
        vals = [1 - l.residual_after / l.residual_before for l in self.layers if l.residual_before > 0]
        return sum(vals) / max(1, len(vals))

    @property
    def fallbacks(self) -> list[tuple[str, str]]:
        """(layer, reason) of every layer that did not get the requested method."""
        return [(l.name, l.fallback) for l in self.layers if l.fallback]

    def warnings(self) -> list[str]:
        out = list(self.serving_warnings)
        fallbacks = self.fallbacks
        if fallbacks:
            kinds: dict[str, int] = {}
            for _, reason in fallbacks:
                for part in reason.split("; "):
                    kind = part.split(":", 1)[0].split(" (", 1)[0]
                    kinds[kind] = kinds.get(kind, 0) + 1
            counts = ", ".join(f"{n} {kind}" for kind, n in kinds.items())
            name, reason = fallbacks[0]
            out.append(f"WARNING: {len(fallbacks)} layer(s) fell back ({counts}); first: {name}: {reason} "
                       "(every layer's reason is in merge_report.json; --strict makes this an error).")
        # a gentle fine-tune can survive through refitted scales with well under 1% of codes changed,
        # so only a merge that moved neither is flagged
        if self.layers and max(self.codes_changed, self.scales_changed) < NEGLIGIBLE_CHANGE:
            out.append(
                f"WARNING: the merge changed only {self.codes_changed:.3%} of the codes and "
                f"{self.scales_changed:.3%} of the scales; the fine-tune is probably lost ({self._remedy()})."
            )
        if self.calib_text_short:
            out.append(f"WARNING: the calibration text holds only {self.calib_tokens} tokens in whole rows, fewer than "
                       f"the {self.calib_tokens_requested} asked for (--calib-tokens); pass a longer --calib text.")
        return out

    def _remedy(self) -> str:
        """What to try when a merge kept (almost) nothing, for the method that ran."""
        lora = "" if self.residual_rank else ", or add --residual-rank 16 to keep the rest in a LoRA"
        if self.method == "rtn":
            return f"was the adapter trained? rounding keeps only moves beyond half a grid step: use --method calibrated{lora}"
        tune = "" if self.tune_steps else ", tune each decoder layer with --tune-steps 20"
        return ("was the adapter trained? calibrate on text like the fine-tuning data (--calib FILE), "
                f"with more --calib-tokens{tune}{lora}")

    def summary(self) -> str:
        lines = [
            f"merged {len(self.layers)} layer(s) ({self.method}, {self.source_format} -> {self.output_format}) "
            f"in {self.seconds:.1f}s",
            f"codes changed {self.codes_changed:.2%}, scales refitted {self.scales_changed:.2%}; output residual {self.mean_residual_before:.4f} -> "
            f"{self.mean_residual_after:.4f} (per layer, {self.residual_space}); fine-tune kept per layer "
            f"{self.kept_fraction:.1%}",
        ]
        if self.residual_rank:
            lines.append(f"residual LoRA rank {self.residual_rank} ({self.residual_lora_bytes / 1e6:.1f} MB, "
                         f"residual-lora/): output residual {self.mean_residual_after:.4f} -> "
                         f"{self.mean_residual_lora or 0:.4f}; fine-tune kept per layer {self.kept_fraction_lora or 0:.1%}")
        if self.tune_steps and self.layer_tuning:
            kept = sum(1 for tuned in self.layer_tuning if tuned["accepted"])
            lines.append(f"layer tuning ({self.tune_steps} steps): kept in {kept} of {len(self.layer_tuning)} decoder layers")
        if self.identity_modules:
            lines.append(f"{len(self.identity_modules)} of the rotations are exactly the identity (untrained?)")
        if self.runner_check is not None:
            lines.append(f"calibration activations checked against the model's own forward: largest relative "
                         f"error per decoder layer {self.runner_check:.1e}")
        for engine, kernels in self.serving.items():
            same = kernels["input"] == kernels["output"]
            lines.append(f"serving in {engine}: {kernels['output']}" + ("" if same else f" (input: {kernels['input']})"))
        return "\n".join(lines + self.warnings())

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["summary"] = {
            "codes_changed": self.codes_changed,
            "scales_changed": self.scales_changed,
            "mean_residual_before": self.mean_residual_before,
            "mean_residual_after": self.mean_residual_after,
            "kept_fraction": self.kept_fraction,
            "mean_residual_lora": self.mean_residual_lora,
            "kept_fraction_lora": self.kept_fraction_lora,
            "fallbacks": len(self.fallbacks),
            "warnings": self.warnings(),
        }
        return data

    def write(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")


def _progress(iterable, total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit="layer", disable=not enabled, leave=False)
