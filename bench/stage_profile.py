"""Where each solver stage spends its time on one linear: torch.profiler over the GPTQ pass, the code
polish, the scale refit and the second polish, with the top operators (by device time on a GPU, by
CPU time elsewhere) and how many kernels each stage launched.

    python bench/stage_profile.py --shape 8192x28672 --device cuda      # a 70B down_proj (OUTxIN)
    python bench/stage_profile.py --shape 576x1536 --tokens 2048        # small, on the CPU

The problem is bench/solver_stages.py's (a random weight on a 4-bit g128 sym grid, a random b=32
rotation, correlated, unevenly scaled inputs); each stage starts from the previous stage's result, as
in the merge's pipeline. A first unprofiled round warms the kernels (Triton compiles on first use).
Issue 21: a 70B layer's polish and refit add 4.8 s to the GPTQ pass's 2.3 s; this says which
operators to make cheaper.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from solver_stages import make_problem  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="8192x28672", help="OUTxIN of the linear")
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--top", type=int, default=12, help="operators listed per stage")
    args = parser.parse_args()

    import torch
    from torch.profiler import ProfilerActivity, profile

    from oftsurgery.merge.solve import requant
    from oftsurgery.merge.solve.hessian import InputHessian
    from oftsurgery.quant.grid import QuantizedWeight

    out_f, in_f = (int(v) for v in args.shape.lower().split("x"))
    device = torch.device(args.device)
    qw, target, rows = make_problem(out_f, in_f, args.tokens)
    qw = QuantizedWeight(qw.codes.to(device), qw.scales.to(device), qw.zeros.to(device), qw.g_idx.to(device),
                         qw.bits, qw.group_size)
    target = target.to(device)
    hessian = InputHessian(in_f, device)
    for x in rows:
        hessian.add(x.to(device))

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    stages = (("gptq", lambda cur: requant.requantize_compensated(qw, target, hessian)),
              ("refine_codes", lambda cur: requant.refine_codes(cur, target, hessian, sweeps=requant.REFINE_SWEEPS[0])),
              ("refit_scales", lambda cur: requant.refit_scales(cur, target, hessian)),
              ("refine_codes again", lambda cur: requant.refine_codes(cur, target, hessian, sweeps=requant.REFINE_SWEEPS[1])))
    current = None
    for _, stage in stages:  # warm-up round: kernels compiled and loaded, caches filled
        current = stage(current)
    sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sort_key = "device_time_total" if device.type == "cuda" else "cpu_time_total"
    print(f"{args.shape} (out x in), {args.tokens} tokens, {device}; torch {torch.__version__}")
    current = None
    for name, stage in stages:
        sync()
        start = time.perf_counter()
        with profile(activities=activities) as prof:
            current = stage(current)
            sync()
        wall = time.perf_counter() - start
        events = prof.key_averages()
        kernels = sum(e.count for e in events if getattr(e, "device_type", None) is not None
                      and str(e.device_type).endswith("CUDA"))
        print(f"\n## {name}: {wall:.3f} s under the profiler" + (f", {kernels} kernel launches" if kernels else ""))
        print(events.table(sort_by=sort_key, row_limit=args.top, max_name_column_width=60))


if __name__ == "__main__":
    main()
