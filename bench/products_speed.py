"""The solver's float32 products, plain against TF32 at float32's accuracy (oftsurgery/merge/solve/products.py):
seconds per stage and what the products change, on one problem in one process.

    python bench/products_speed.py --device cuda                                   # 70B down_proj, gate/up
    python bench/products_speed.py --device cuda --shapes 4096x11008 22016x4096    # 7B down_proj, gate/up
    OFTSURGERY_SOLVER_KERNELS=torch python bench/products_speed.py --shapes 512x1024 --tokens 2048

Shapes are OUTxIN; the problem is bench/solver_stages.py's (a random 4-bit g128 sym layer, a random
b=32 rotation, correlated unevenly scaled inputs), the inputs rounded to float16 as a half-precision
calibration forward gives them. For each of OFTSURGERY_SOLVER_PRODUCTS=float32 and auto (alternating,
after one untimed round of each), every phase waits for the device at its end: H's accumulation over
the inputs, then `requantize_calibrated`'s stages (merge_report.json's phase names). Then the codes
that differ between the two and their output errors' relative difference. On a CPU `auto` is plain
float32 (the same bytes); `split` there shows the algebra's cost, not a GPU's speed.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from solver_stages import make_problem  # noqa: E402

CHOICES = ("float32", "auto")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["8192x28672", "57344x8192"], help="OUTxIN per problem")
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=2, help="timed rounds per choice (medians)")
    parser.add_argument("--versus", default="auto", choices=["auto", "split"], help="the other side of float32")
    args = parser.parse_args()

    import statistics

    import torch

    from oftsurgery.merge.report import PHASES
    from oftsurgery.merge.solve import requant
    from oftsurgery.merge.solve.hessian import InputHessian
    from oftsurgery.quant.grid import QuantizedWeight

    choices = ("float32", args.versus)
    device = torch.device(args.device)
    os.environ["OFTSURGERY_PHASE_SYNC"] = "1"

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    if device.type == "cuda":
        print(f"device: {torch.cuda.get_device_name(device)}, torch {torch.__version__}")
    for shape in args.shapes:
        out_f, in_f = (int(v) for v in shape.lower().split("x"))
        qw, target, rows = make_problem(out_f, in_f, args.tokens)
        qw = QuantizedWeight(qw.codes.to(device), qw.scales.to(device), qw.zeros.to(device), qw.g_idx.to(device),
                             qw.bits, qw.group_size)
        target = target.to(device)
        rows = [r.to(device, torch.float16) for r in rows]
        seconds: dict[str, dict[str, list[float]]] = {c: {} for c in choices}
        last: dict[str, object] = {}
        for round_ in range(args.rounds + 1):
            for choice in choices:
                os.environ["OFTSURGERY_SOLVER_PRODUCTS"] = choice
                sync()
                started = time.perf_counter()
                hessian = InputHessian(in_f, device)
                for x in rows:
                    hessian.add(x)
                sync()
                stats = time.perf_counter() - started
                PHASES.reset()
                started = time.perf_counter()
                result = requant.requantize_calibrated(qw, target, hessian)
                sync()
                total = time.perf_counter() - started
                del hessian
                if round_ == 0:
                    continue  # warm-up: Triton compiles, cuBLAS picks its kernels
                found = {"statistics (H from float16 rows)": stats, **PHASES.snapshot(), "solve (all stages)": total}
                for phase, value in found.items():
                    seconds[choice].setdefault(phase, []).append(value)
                last[choice] = result
        a, b = (last[c] for c in choices)
        changed = float((a.weight.codes != b.weight.codes).float().mean())
        print(f"\n## {out_f}x{in_f} (OUTxIN), {args.tokens} tokens, {args.device}: medians of {args.rounds}")
        print(f"\n| phase | {choices[0]} s | {choices[1]} s | {choices[1]} / {choices[0]} |\n|---|---|---|---|")
        for phase in seconds[choices[0]]:
            x, y = (statistics.median(seconds[c].get(phase, [float("nan")])) for c in choices)
            print(f"| {phase} | {x:.3f} | {y:.3f} | {y / x:.2f} |" if x > 0 else f"| {phase} | {x:.3f} | {y:.3f} | - |")
        print(f"\ncodes that differ: {changed:.4%}; output error {a.error:.6g} vs {b.error:.6g} "
              f"(relative difference {(b.error - a.error) / a.error:+.2e}); stages {a.stages} / {b.stages}")
        del qw, target, rows, last, a, b
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
