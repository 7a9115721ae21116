"""The calibrated solver, stage by stage: this tree's against an earlier commit's, on random real-shaped layers.

    OMP_NUM_THREADS=1 python bench/solver_stages.py --shapes 4096x4096 4096x11008 --tokens 2048
    python bench/solver_stages.py --device cuda --tokens 8192          # on a GPU

Shapes are OUTxIN (4096x11008 is a 7B down_proj). Per shape: a random weight on a 4-bit g128
symmetric grid (gptqmodel's min/max rule), a random OFT rotation (blocks of 32, exact Cayley), and
correlated, unevenly scaled inputs X of --tokens rows. Each implementation runs in its own
subprocess (its peak memory is its own) on identical data; the old one is the requant.py of
--old-ref (default: the commit before the blocked solver), loaded from git.

Stages run in the pipeline's order, each from the previous stage's result: Hessian accumulation
(old: float64; new: float32 through `InputHessian`), GPTQ pass (with its Cholesky factorisation),
code polish, scale refit, code polish; then one output-error evaluation. The relative output error
‖(Ŵ − T)X‖ / ‖T X‖ after each stage is computed by one common float64 evaluator for both. Stages
the old code cannot run here are skipped and say why: its scale refit needs G·out·in float64
memory, and its code polish on large layers is timed on the first --old-polish-columns columns of a
sweep and extrapolated (it costs the same for every column).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OLD_REF = "899d999"  # main before the blocked solver


def make_problem(out_f: int, in_f: int, tokens: int, seed: int = 0):
    import torch

    from oftsurgery.oft.rotation import cayley_exact, rotate_weight, skew_from_params
    from oftsurgery.quant.grid import quantize_weight

    g = torch.Generator().manual_seed(seed)
    qw = quantize_weight(torch.randn(out_f, in_f, generator=g) * 0.02, 4, 128, True)
    blocks = cayley_exact(skew_from_params(torch.randn(in_f // 32, 32 * 31 // 2, generator=g) * 0.02, 32))
    target = rotate_weight(qw.dequantize(), blocks).float()
    scale = torch.exp(torch.randn(in_f, generator=g) * 0.7)  # uneven channels, like real activations
    mix = torch.randn(64, in_f, generator=g) * 0.3  # a shared low-rank part: correlated channels
    rows = []
    for start in range(0, tokens, 256):
        n = min(256, tokens - start)
        rows.append((torch.randn(n, in_f, generator=g) + torch.randn(n, 64, generator=g) @ mix) * scale)
    return qw, target, rows


CHILD = r"""
import importlib.util, json, os, resource, sys, time
import torch
sys.path.insert(0, os.environ["BENCH_DIR"])
from solver_stages import make_problem
impl, out_f, in_f, tokens, device, old_path, polish_cols = sys.argv[1:8]
out_f, in_f, tokens, polish_cols = int(out_f), int(in_f), int(tokens), int(polish_cols)
dev = torch.device(device)
qw, target, rows = make_problem(out_f, in_f, tokens)
from oftsurgery.merge.solve import requant as new
from oftsurgery.merge.solve.hessian import InputHessian

def sync():
    if dev.type == "cuda":
        torch.cuda.synchronize()

def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

X = [r.to(dev) for r in rows]
H64 = sum(x.double().T @ x.double() for x in X)  # the common evaluator's H (not timed)
ref = float(new.output_error(torch.zeros_like(target), target, H64))
def rel(q):
    return (new.output_error(q.dequantize(), target, H64) / ref) ** 0.5

baseline = peak_mb()
if dev.type == "cuda":
    torch.cuda.reset_peak_memory_stats()
stages, notes = {}, {}

def timed(name, fn):
    sync(); t = time.perf_counter(); result = fn(); sync()
    stages[name] = time.perf_counter() - t
    return result

if impl == "new":
    def accumulate():
        stats = InputHessian(in_f, dev)
        for x in X:
            stats.add(x)
        stats.matrix
        return stats
    H = timed("hessian", accumulate)
    gptq = timed("gptq", lambda: new.requantize_compensated(qw, target, H))
else:
    spec = importlib.util.spec_from_file_location("old_requant", old_path)
    old = importlib.util.module_from_spec(spec); spec.loader.exec_module(old)
    H = timed("hessian", lambda: sum(x.double().T @ x.double() for x in X))
    gptq = timed("gptq", lambda: old.requantize_compensated(qw, target, H))

errors = {"gptq": rel(gptq)}
current = gptq
mod = new if impl == "new" else old
for name, fn in (("refine", mod.refine_codes), ("refit", mod.refit_scales), ("refine2", mod.refine_codes)):
    if impl == "old" and fn is old.refit_scales:
        need = qw.num_groups * out_f * in_f * 8 * 2
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") if dev.type == "cpu" else torch.cuda.mem_get_info()[0]
        if need > 0.6 * avail:
            notes[name] = f"skipped: needs ~{need / 2**30:.0f} GiB ({qw.num_groups} [out, in] float64 matrices), {avail / 2**30:.0f} GiB free"
            continue
    if impl == "old" and fn is old.refine_codes and polish_cols and in_f > polish_cols:
        # every column of a sweep costs the same (a full-width gradient update): cap the module's
        # `range` to time the setup alone and the setup plus `polish_cols` columns, and extrapolate
        import builtins
        spent = []
        for cap in (0, polish_cols):
            old.range = lambda *a, cap=cap: builtins.range(*a)[:cap]
            sync(); t = time.perf_counter(); fn(current, target, H); sync()
            spent.append(time.perf_counter() - t)
        del old.range
        per_col = (spent[1] - spent[0]) / (2 * polish_cols)
        stages[name] = spent[0] + per_col * 2 * in_f
        notes[name] = (f"extrapolated: setup {spent[0]:.1f} s + {per_col * 1e3:.1f} ms per column, "
                       f"2 sweeps of {in_f} columns (timed on {polish_cols})")
        continue
    cand = timed(name, lambda: fn(current, target, H))
    errors[name] = rel(cand)
    if new.output_error(cand.dequantize(), target, H64) < new.output_error(current.dequantize(), target, H64):
        current = cand
err_fn = (lambda: new.output_error(current.dequantize(), target, H)) if impl == "new" else \
         (lambda: old.output_error(current.dequantize(), target, H))
timed("error", err_fn)
gpu_peak = torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda" else None
print(json.dumps({"stages": stages, "errors": errors, "notes": notes, "final": rel(current),
                  "baseline_rss_mb": baseline, "peak_rss_mb": peak_mb(), "peak_gpu_mb": gpu_peak}))
"""


def run(impl: str, out_f: int, in_f: int, args, old_path: str) -> dict:
    env = dict(os.environ, BENCH_DIR=str(Path(__file__).parent), PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", CHILD, impl, str(out_f), str(in_f), str(args.tokens), args.device,
                           old_path, str(args.old_polish_columns)], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"{impl} failed on {out_f}x{in_f}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["4096x4096", "4096x11008"], help="OUTxIN per layer")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--old-ref", default=OLD_REF, help="git revision whose requant.py is 'old'")
    parser.add_argument("--old-polish-columns", type=int, default=256,
                        help="time the old code polish on this many columns and extrapolate (0: run it fully)")
    parser.add_argument("--only", choices=["old", "new"], default=None)
    args = parser.parse_args()
    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{args.old_ref}:oftsurgery/merge/requant.py"],
                            capture_output=True, text=True, check=True).stdout
    with tempfile.NamedTemporaryFile("w", suffix="_requant.py", delete=False) as handle:
        handle.write(source)
    impls = [args.only] if args.only else ["old", "new"]
    for shape in args.shapes:
        out_f, in_f = (int(v) for v in shape.lower().split("x"))
        results = {impl: run(impl, out_f, in_f, args, handle.name) for impl in impls}
        print(f"\n## {out_f}x{in_f} (out x in), {args.tokens} tokens, {args.device}, old = {args.old_ref}")
        print(f"| stage | " + " | ".join(f"{i} s" for i in impls) + " | " + " | ".join(f"{i} rel. error" for i in impls) + " |")
        print("|---" * (1 + 2 * len(impls)) + "|")
        for stage in ("hessian", "gptq", "refine", "refit", "refine2", "error"):
            secs = [f"{results[i]['stages'][stage]:.2f}" if stage in results[i]["stages"] else "—" for i in impls]
            errs = [f"{results[i]['errors'][stage]:.5f}" if stage in results[i]["errors"] else "—" for i in impls]
            print(f"| {stage} | " + " | ".join(secs) + " | " + " | ".join(errs) + " |")
        print(f"| final (accepted stages) | | " + " | ".join(f"{results[i]['final']:.5f}" for i in impls) + " |")
        for i in impls:
            r = results[i]
            gpu = f", peak GPU {r['peak_gpu_mb']:.0f} MiB" if r["peak_gpu_mb"] is not None else ""
            print(f"- {i}: peak RSS {r['peak_rss_mb']:.0f} MiB (after building the data: {r['baseline_rss_mb']:.0f} MiB){gpu}")
            for stage, note in r["notes"].items():
                print(f"  - {stage}: {note}")
    os.unlink(handle.name)


if __name__ == "__main__":
    main()
