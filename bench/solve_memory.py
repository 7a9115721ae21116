"""Peak tensor memory of a calibrated merge of one decoder layer, stage by stage, measured on the CPU.

    OMP_NUM_THREADS=2 python bench/solve_memory.py --divide 8            # a 70B layer scaled down 8x
    OMP_NUM_THREADS=2 python bench/solve_memory.py --preset 7b --divide 4
    OMP_NUM_THREADS=2 python bench/solve_memory.py --divide 8 --products split --tune-steps 20   # GPU products, tuning

Builds (or reuses) a one-layer synthetic GPTQ checkpoint whose shape is --preset's with hidden and
intermediate size and the head counts divided by --divide, and merges it with `--method calibrated`
on the CPU under `oftsurgery.testing.memory.LiveBytes`, which counts the bytes of every live tensor
storage (what a GPU's caching allocator calls allocated). Calibration keeps the GPU's defaults,
scaled alike: 32 rows of --seq-len (256 / divide) tokens, and the forward in float16 as on a GPU
(`--forward-dtype`), so the same tensors are alive as on a GPU. Every term of the peak is a product
of two of (hidden, intermediate, tokens), so the full-size peak is the measured one times divide²;
`oftsurgery.testing.memory.predict_peak` is the formula of docs/performance.md, checked here against
the measurement. The table: each stage's peak (the live bytes while it ran), the formula at this
shape, and the formula at the 7B and 70B shapes (8192 tokens).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="70b", choices=["7b", "70b"])
    ap.add_argument("--divide", type=int, default=8, help="divide hidden/intermediate size and head counts by this")
    ap.add_argument("--calib-tokens", type=int, default=None, help="default: 8192 / divide (32 rows)")
    ap.add_argument("--seq-len", type=int, default=None, help="default: 256 / divide")
    ap.add_argument("--forward-dtype", default="float16", help="the calibration forward's dtype (GPU default: float16)")
    ap.add_argument("--tune-steps", type=int, default=0, help="also tune each decoder layer (merge --tune-steps)")
    ap.add_argument("--products", default="auto", choices=["auto", "split"],
                    help="split: the GPU's split TF32 products (solve/products.py), whose temporaries a GPU holds")
    ap.add_argument("--workdir", default=None, help="synthetic checkpoint cache (default ~/.cache/oftsurgery/synthetic)")
    ap.add_argument("--json", default=None, help="also write the table here")
    args = ap.parse_args()

    import contextlib
    import os

    import torch

    os.environ["OFTSURGERY_SOLVER_PRODUCTS"] = args.products
    from oftsurgery.merge import MergeOptions, merge_checkpoint
    from oftsurgery.merge import calibrated_loop, candidates, layer_tuning, merger
    from oftsurgery.merge.calibration import runner, statistics
    from oftsurgery.merge.solve import hessian, refit, requant
    from oftsurgery.testing import synthetic
    from oftsurgery.testing.memory import LiveBytes, instrument, predict_peak

    full = synthetic.PRESETS[args.preset]
    d = args.divide
    shape = synthetic.LlamaShape(hidden_size=full.hidden_size // d, intermediate_size=full.intermediate_size // d,
                                 num_heads=max(1, full.num_heads // d), num_kv_heads=max(1, full.num_kv_heads // d),
                                 vocab_size=4096)
    name = args.preset if d == 1 else f"{args.preset}-div{d}"
    synthetic.PRESETS.setdefault(name, shape)
    tokens = args.calib_tokens or 8192 // d
    seq_len = args.seq_len or max(1, 256 // d)
    ck = synthetic.synthetic_checkpoint(name, num_layers=1, vocab_size=4096, cache_dir=args.workdir)

    tracker = LiveBytes("cpu")
    undo = [instrument(tracker, *where) for where in [
        (statistics, "collect_group_inputs", "statistics"),
        (runner.LayerwiseModel, "build_layer", "build layer"),
        (calibrated_loop, "_forward_local", "forward"),
        (merger.Merger, "write_group", "write"),
        (candidates, "requantize_layer", "choose + report"),
        (requant, "requantize_calibrated_group", "solve"),
        (requant._Layer, "_build", "solve: problem"),
        (requant, "_gptq_factor", "solve: factor"),
        (requant, "_gptq_pass", "solve: gptq pass"),
        (requant, "_refine", "solve: refine"),
        (requant, "_refit", "solve: refit"),
        (requant._Layer, "errors", "solve: errors"),
        (layer_tuning, "tune_decoder_layer", "tune"),
    ]]
    del hessian, refit
    with tempfile.TemporaryDirectory(prefix="oftsurgery-solve-memory-") as tmp:
        options = MergeOptions(method="calibrated", device="cpu", calib_tokens=tokens, seq_len=seq_len,
                               forward_dtype=args.forward_dtype, progress=False, tune_steps=args.tune_steps)
        # the tuning computes gradients; everything else runs without them
        with (contextlib.nullcontext() if args.tune_steps else torch.no_grad()), tracker:
            report = merge_checkpoint(ck.gptq, ck.rotations, Path(tmp) / "merged", options)
    for u in undo:
        u()
    fit_tokens = report.calib_tokens - report.calib_tokens // 8
    here = predict_peak(shape.hidden_size, shape.intermediate_size, fit_tokens, report.calib_tokens - fit_tokens,
                        kv=shape.num_kv_heads * shape.head_dim, detail=True)
    at7 = predict_peak(4096, 11008, 7168, 1024, kv=4096, detail=True)
    at70 = predict_peak(8192, 28672, 7168, 1024, kv=1024, detail=True)
    gb = 1e9
    rows = []
    print(f"{name}: hidden {shape.hidden_size}, intermediate {shape.intermediate_size}, {report.calib_tokens} tokens "
          f"(seq {seq_len}), forward {args.forward_dtype}, products {args.products}, tune steps {args.tune_steps}")
    print(f"{'stage':<18}{'measured MB':>13}{'formula MB':>12}{'x divide^2 GB':>15}{'7B GB':>8}{'70B GB':>8}")
    for stage in ["statistics", "solve: problem", "solve: factor", "solve: gptq pass", "solve: refine",
                  "solve: refit", "solve: errors", "choose + report", "forward", "write",
                  *(["tune"] if args.tune_steps else []), "peak"]:
        measured = tracker.peak if stage == "peak" else tracker.stage_peak.get(stage, 0)
        rows.append({"stage": stage, "measured": measured, "formula": here.get(stage), "7b": at7.get(stage),
                     "70b": at70.get(stage), "scaled": measured * d * d})
        fmt = lambda v, unit: f"{v / unit:.2f}" if v is not None else "-"  # noqa: E731
        print(f"{stage:<18}{measured / 1e6:>13.1f}{fmt(here.get(stage), 1e6):>12}{measured * d * d / gb:>15.2f}"
              f"{fmt(at7.get(stage), gb):>8}{fmt(at70.get(stage), gb):>8}")
    print(f"at the peak: {' > '.join(tracker.peak_stack)}; its largest tensors (MB):")
    print("  " + ", ".join(f"{what} {nbytes / 1e6:.1f}" for nbytes, what in tracker.peak_tensors))
    if args.json:
        Path(args.json).write_text(json.dumps({"shape": name, "tokens": report.calib_tokens, "rows": rows,
                                               "peak_stack": tracker.peak_stack,
                                               "peak_tensors": tracker.peak_tensors}, indent=1))


if __name__ == "__main__":
    main()
