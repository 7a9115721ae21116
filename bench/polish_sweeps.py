"""The code polish's sweeps against fidelity and solve time: the default calibrated merge of
`bench/fidelity.py`'s checkpoints and trained adapters with `requant.REFINE_SWEEPS` set to each
value given (sweeps of the polish before and after the scale refit), at each calibration budget.

    python bench/polish_sweeps.py                                   # gptq, (2,2) (2,1) (1,1), 8192 and 1024 tokens
    python bench/polish_sweeps.py --formats gptq awq gptq-asym --sweeps 2,1

The merges run in this process (REFINE_SWEEPS is a module constant); evaluation as in
bench/fidelity.py (gptqmodel's torch kernel, float32 on the CPU, held-out code text). Prints one line
per merge as it is measured, then a table: retention, the solve's seconds and the polishes' seconds
(merge_report.json `phase_seconds`).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fidelity  # noqa: E402  (bench/fidelity.py: inputs and evaluation)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default=os.path.expanduser("~/.cache/oftsurgery/bench-fidelity"))
    parser.add_argument("--formats", nargs="+", default=["gptq"], choices=["gptq", "gptq-asym", "awq"])
    parser.add_argument("--sweeps", nargs="+", default=["2,2", "2,1", "1,1"],
                        help="REFINE_SWEEPS values, each as BEFORE,AFTER (sweeps of the polish before and after the refit)")
    parser.add_argument("--calib-tokens", type=int, nargs="+", default=[8192, 1024])
    parser.add_argument("--calib", default="builtin:english")
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    from oftsurgery.evaluation.evaluate import retention
    from oftsurgery.merge import MergeOptions, merge_checkpoint
    from oftsurgery.merge.solve import requant

    work, inputs, windows = fidelity.smollm2_readme_inputs(args.workdir, args.formats, args.eval_tokens,
                                                           args.device)
    rows = []
    for fmt, (ckpt, adapter, base, attached) in inputs.items():
        for sweeps in args.sweeps:
            requant.REFINE_SWEEPS = tuple(int(x) for x in sweeps.split(","))
            for tokens in args.calib_tokens:
                out = work / f"polish-{fmt}-{sweeps.replace(',', '')}-{tokens}-{args.device.split(':')[0]}"
                started = time.perf_counter()
                report = merge_checkpoint(ckpt, adapter, out, MergeOptions(
                    method="calibrated", device=args.device, calib=args.calib, calib_tokens=tokens,
                    overwrite=True, progress=False))
                seconds = time.perf_counter() - started
                nll = fidelity.evaluate(out, windows, device=args.device)
                phases = report.phase_seconds
                row = (fmt, sweeps, tokens, math.exp(nll), retention(base, attached, nll), seconds,
                       phases.get("solve", 0.0), phases.get("solve/refine_codes", 0.0),
                       phases.get("solve/refine_codes again", 0.0))
                rows.append(row)
                print(f"[polish] {fmt} sweeps {sweeps} tokens {tokens}: ppl {row[3]:.3f}, retention {row[4]:.1%}, "
                      f"merge {seconds:.0f} s, solve {row[6]:.0f} s", flush=True)
    print("\n| format | sweeps | calib tokens | ppl | retention | merge s | solve s | polish s | polish again s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for fmt, sweeps, tokens, ppl, ret, seconds, solve, first, second in rows:
        print(f"| {fmt} | ({sweeps}) | {tokens} | {ppl:.2f} | {ret:.1%} | {seconds:.0f} | {solve:.0f} | "
              f"{first:.0f} | {second:.0f} |")


if __name__ == "__main__":
    main()
