"""Pictures: rotation strength per layer and module kind, and a merge's per-layer residuals.

matplotlib is an optional dependency (`pip install 'oftsurgery[plot]'`), imported only here and only
when a plot is drawn, with the non-interactive Agg backend (no display needed).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from oftsurgery.errors import InvalidAdapterError, OftSurgeryError
from oftsurgery.io import MERGE_REPORT


def _pyplot():
    from oftsurgery._deps import import_optional

    matplotlib = import_optional("matplotlib", "plot")
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, png: str | Path) -> Path:
    out = Path(png)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp.png")
    fig.savefig(tmp, dpi=130, bbox_inches="tight")
    tmp.replace(out)
    return out


def plot_rotation_strength(source, png: str | Path, *, title: str | None = None) -> Path:
    """Heatmap of ‖R − I‖_F: module kinds (rows) × decoder layers (columns).

    source: an adapter folder, a rotations file, or a `RotationSummary`.
    """
    import numpy as np

    from oftsurgery.reporting.rotation_summary import RotationSummary, summarize_rotations

    summary = source if isinstance(source, RotationSummary) else summarize_rotations(source)
    if not summary.layers:
        raise InvalidAdapterError(f"{summary.path} has no modules inside numbered decoder layers to plot.")
    plt = _pyplot()
    grid = np.array([[np.nan if v is None else v for v in row] for row in summary.grid()], dtype=float)
    kinds, layers = summary.kinds, summary.layers
    width = min(18.0, max(6.0, 0.32 * len(layers) + 2.5))
    height = max(2.4, 0.42 * len(kinds) + 1.4)
    fig, ax = plt.subplots(figsize=(width, height))
    cmap = plt.get_cmap("viridis").with_extremes(bad="#dddddd")
    image = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap=cmap, interpolation="nearest")
    ax.set_yticks(range(len(kinds)), kinds)
    if grid.size <= 60:  # few cells: print the values too
        for (i, j), value in np.ndenumerate(grid):
            if np.isfinite(value):
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8,
                        color="white" if value < np.nanmean(grid) else "black")
    step = 1 if len(layers) <= 32 else math.ceil(len(layers) / 32)
    ax.set_xticks(range(0, len(layers), step), [str(layers[i]) for i in range(0, len(layers), step)])
    ax.set_xlabel("decoder layer")
    bar = fig.colorbar(image, ax=ax, pad=0.01)
    bar.set_label(r"$\|R - I\|_F$ over the module's blocks (more inputs, more blocks)")
    finite = grid[np.isfinite(grid)]
    subtitle = (f"{len(summary.modules)} modules, block size "
                f"{', '.join(str(b) for b in sorted({m.block_size for m in summary.modules}))}; "
                f"mean {finite.mean():.3f}, max {finite.max():.3f}")
    ax.set_title(f"{title or 'Rotation strength per module'}\n{subtitle}", fontsize=10)
    outside = [m.name for m in summary.modules if m.layer is None]
    if outside:
        fig.text(0.01, -0.02, f"not shown (outside decoder layers): {', '.join(outside)}", fontsize=7)
    out = _save(fig, png)
    plt.close(fig)
    return out


def _load_report(report_json) -> dict[str, Any]:
    if isinstance(report_json, dict):
        return report_json
    path = Path(report_json)
    if path.is_dir():
        path = path / MERGE_REPORT
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise OftSurgeryError(f"Cannot read the merge report {path} ({exc}).") from None


def plot_merge_report(report_json, png: str | Path, *, title: str | None = None) -> Path:
    """Per decoder layer: output residual with the adapter left out (before) and after the merge.

    Left: mean over the layer's merged modules, log scale. Right: after/before per module kind and
    layer — the share of the fine-tune's effect the requantized module still misses (0 = kept all,
    1 = as if not merged). report_json: a merge_report.json path, its folder, or its dict.
    """
    import numpy as np

    from oftsurgery.quant.layout import decoder_layer_index
    from oftsurgery.reporting.rotation_summary import order_kinds

    report = _load_report(report_json)
    layers = report.get("layers") or []
    if not layers:
        raise OftSurgeryError("The merge report lists no merged layers; nothing to plot.")
    rows = []
    for entry in layers:
        layer = decoder_layer_index(entry["name"])
        rows.append((layer if layer is not None else -1, entry["name"].rsplit(".", 1)[-1],
                     float(entry["residual_before"]), float(entry["residual_after"])))
    layer_ids = sorted({r[0] for r in rows})
    kind_list = order_kinds(r[1] for r in rows)
    before = np.array([np.mean([r[2] for r in rows if r[0] == i]) for i in layer_ids])
    after = np.array([np.mean([r[3] for r in rows if r[0] == i]) for i in layer_ids])
    ratio = np.full((len(kind_list), len(layer_ids)), np.nan)
    for layer, kind, b, a in rows:
        if b > 0:
            ratio[kind_list.index(kind), layer_ids.index(layer)] = a / b

    plt = _pyplot()
    # stacked: residual lines on top, the per-module heatmap below, sharing the layer axis
    width = min(14.0, max(8.0, 0.34 * len(layer_ids) + 3))
    fig, (left, right) = plt.subplots(2, 1, figsize=(width, 4.2 + max(2.6, 0.4 * len(kind_list))),
                                      gridspec_kw={"height_ratios": [1.0, max(0.8, 0.11 * len(kind_list))]})
    x = np.arange(len(layer_ids))
    labels = [str(i) if i >= 0 else "other" for i in layer_ids]
    left.plot(x, before, "o-", color="#c44e52", label="before: adapter left out  ‖(W − WRᵀ)X‖ / ‖WRᵀX‖")
    left.plot(x, after, "o-", color="#4c72b0", label="after: merged checkpoint  ‖(Ŵ − WRᵀ)X‖ / ‖WRᵀX‖")
    if np.all(before > 0) and np.all(after > 0):
        left.set_yscale("log")
    step = 1 if len(layer_ids) <= 32 else math.ceil(len(layer_ids) / 32)
    left.set_xticks(x[::step], labels[::step])
    left.set_xlim(-0.5, len(layer_ids) - 0.5)
    left.set_xlabel("decoder layer")
    left.set_ylabel("relative output residual (mean over modules)")
    left.grid(True, which="both", alpha=0.3)
    left.legend(fontsize=9, loc="best")
    left.set_title("Distance from the fine-tuned layer outputs", fontsize=10)

    cmap = plt.get_cmap("magma_r").with_extremes(bad="#dddddd")
    vmax = max(1.0, float(np.nanmax(ratio))) if np.isfinite(ratio).any() else 1.0
    image = right.imshow(np.ma.masked_invalid(ratio), aspect="auto", cmap=cmap, vmin=0.0, vmax=vmax,
                         interpolation="nearest")
    right.set_yticks(range(len(kind_list)), kind_list)
    if ratio.size <= 60:
        for (i, j), value in np.ndenumerate(ratio):
            if np.isfinite(value):
                right.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8,
                           color="white" if value > 0.5 * vmax else "black")
    hstep = 1 if len(layer_ids) <= 32 else math.ceil(len(layer_ids) / 32)
    right.set_xticks(range(0, len(layer_ids), hstep), labels[::hstep])
    right.set_xlabel("decoder layer")
    bar = fig.colorbar(image, ax=right, pad=0.3, orientation="horizontal", fraction=0.1, aspect=60)
    bar.set_label("after / before  (0 = fine-tune kept, 1 = lost)")
    right.set_title("Share of the fine-tune the merge misses, per module", fontsize=10)

    summary = report.get("summary", {})
    heading = title or (f"Merge residuals — {report.get('method', '?')} merge, {report.get('output_format', '')}")
    figures = []
    if "codes_changed" in summary:
        figures.append(f"codes changed {summary['codes_changed']:.1%}")
    if "kept_fraction" in summary:
        figures.append(f"fine-tune kept per layer {summary['kept_fraction']:.1%}")
    if report.get("calib_tokens"):
        figures.append(f"{report['calib_tokens']} calibration tokens ({report.get('calibration')})")
    fig.suptitle(heading + ("\n" + "; ".join(figures) if figures else ""), fontsize=11)
    fig.tight_layout()
    out = _save(fig, png)
    plt.close(fig)
    return out
