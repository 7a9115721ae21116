"""What TF32 matrix products in the solver would cost in fidelity, measured on the CPU: the default
calibrated merge of `bench/fidelity.py`'s checkpoints and trained adapters with the float32 inputs of
every matrix product rounded to TF32 inside the chosen merge phases (`oftsurgery.testing.tf32`), at
each calibration budget. On an H100 TF32 runs float32 products several times faster; the merge keeps
it off until this says what it costs.

    python bench/tf32_fidelity.py                                         # none, the polish and refit, the whole solve
    python bench/tf32_fidelity.py --stages none solve/refine_codes --calib-tokens 8192
    python bench/tf32_fidelity.py --stages none tune/steps --tune-steps 20 --calib-tokens 8192   # the tuning's steps

Each `--stages` value is a comma-separated list of phase-name prefixes (merge_report.json
`phase_seconds`: solve/gptq, solve/refine_codes, solve/refit_scales, solve/errors, statistics, ...),
`none` for the merge as it is. The merges run in this process; evaluation as in bench/fidelity.py
(gptqmodel's torch kernel, float32 on the CPU, held-out code text). Prints one line per merge as it
is measured (with how many products were rounded per phase), then a table.
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
    parser.add_argument("--stages", nargs="+", default=["none", "solve/refine_codes,solve/refit_scales", "solve/"])
    parser.add_argument("--calib-tokens", type=int, nargs="+", default=[8192, 1024])
    parser.add_argument("--calib", default="builtin:english")
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--tune-steps", type=int, default=0, help="merge --tune-steps (its phases: tune/...)")
    parser.add_argument("--seed", type=int, default=0,
                        help="the adapter bench/fidelity.py --seeds N trained (already in --workdir)")
    args = parser.parse_args()

    from oftsurgery.evaluation.evaluate import retention
    from oftsurgery.merge import MergeOptions, merge_checkpoint
    from oftsurgery.testing.tf32 import EmulatedTF32

    work, inputs, windows = fidelity.smollm2_readme_inputs(args.workdir, args.formats, args.eval_tokens)
    rows = []
    for fmt, (ckpt, adapter, base, attached) in inputs.items():
        if args.seed:
            adapter = adapter.with_name(f"{adapter.name}-seed{args.seed}")
            if not (adapter / "adapter_config.json").is_file():
                raise SystemExit(f"no adapter {adapter}: train it first (bench/fidelity.py --seeds {args.seed})")
            attached = fidelity.evaluate(ckpt, windows, adapter)
        for stages in args.stages:
            prefixes = () if stages == "none" else tuple(p for p in stages.split(",") if p)
            for tokens in args.calib_tokens:
                tag = "none" if not prefixes else "-".join(p.strip("/").replace("/", "_") for p in prefixes)
                tag += (f"-tune{args.tune_steps}" if args.tune_steps else "") + (f"-seed{args.seed}" if args.seed else "")
                out = work / f"tf32-{fmt}-{tag}-{tokens}"
                mode = EmulatedTF32(prefixes)
                started = time.perf_counter()
                with mode:
                    report = merge_checkpoint(ckpt, adapter, out, MergeOptions(
                        method="calibrated", device="cpu", calib=args.calib, calib_tokens=tokens,
                        overwrite=True, progress=False, tune_steps=args.tune_steps))
                seconds = time.perf_counter() - started
                nll = fidelity.evaluate(out, windows)
                row = (fmt, stages, tokens, math.exp(nll), retention(base, attached, nll), report.codes_changed,
                       seconds)
                rows.append(row)
                rounded = ", ".join(f"{k} {v}" for k, v in sorted(mode.counts.items())) or "none"
                print(f"[tf32] {fmt} seed {args.seed} stages {stages} tokens {tokens}: ppl {row[3]:.3f}, retention {row[4]:.1%}, "
                      f"codes changed {row[5]:.2%}, merge {seconds:.0f} s; products rounded: {rounded}", flush=True)
    print("\n| format | TF32 in | calib tokens | ppl | retention | codes changed | merge s |")
    print("|---|---|---|---|---|---|---|")
    for fmt, stages, tokens, ppl, ret, changed, seconds in rows:
        print(f"| {fmt} | {stages} | {tokens} | {ppl:.2f} | {ret:.1%} | {changed:.2%} | {seconds:.0f} |")


if __name__ == "__main__":
    main()
