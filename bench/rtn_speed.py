"""`merge --method rtn` throughput: MB/s of checkpoint and peak RSS, this tree vs another git revision.

The checkpoint is `oftsurgery.testing.synthetic`'s Llama-7B-shaped GPTQ build (hidden 4096,
intermediate 11008, 4-bit g128 sym, `--layers` decoder layers, a small vocabulary so that the decoder
layers dominate the bytes) with its random b=32 rotations on all 7 linears, cached in --workdir.
Each merge runs in its own Python process (fresh peak RSS), once per revision, and the table reports

    MB/s = checkpoint bytes (all tensors) / merge wall time, CPU seconds (every thread of the merging
    process), the last decoder layer's time (after the first layer's one-time costs), peak RSS.

The default comparison is 899d999, the last revision before the rtn path was rewritten (issue 11).

`--steps` runs each merge a second time with a wall-clock timer around each step of the engine
(read, unpack, rotate and round, pack and re-check, write) and prints, per thread, how long each step
kept that thread busy, including waiting for the GPU inside it: the merge runs on three threads
(read-ahead, main, pack-and-write) and on a GPU the host side sets the pace. `--torch-profiler`
prints torch's operator tables for that run. `--code DIR` compares with a source tree that is not a
git revision here (a directory holding an `oftsurgery` package, e.g. on a machine without the
repository's history). `--syncs` (GPU) runs one more merge in torch's sync debug mode and counts,
per place in the code and per thread, how often the host stopped to wait for the GPU. Every row gives the SHA-256 of the merged shards, so a change that must not
change bytes is checked in the same run.

    python bench/rtn_speed.py --layers 2                              # this tree vs 899d999
    python bench/rtn_speed.py --layers 2 --compare none --device cuda # this tree only, on a GPU
    python bench/rtn_speed.py --layers 4 --compare none --device cuda --steps --code /tmp/before
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BEFORE = "899d999"  # main before issue 11's rtn/codec/IO rework


# one merge in a fresh process: prints {"seconds", "cpu_seconds", "layer_seconds", "max_rss_bytes", "busy"}
_CHILD = r"""
import collections, importlib, json, sys, threading, time
import torch  # imported before the clock starts: the merge is timed, not the interpreter's start-up
import oftsurgery.merge.engine as engine
from oftsurgery.merge import MergeOptions, merge_checkpoint
busy = collections.defaultdict(float)  # (thread, step) -> seconds that step kept the thread busy
def step_timer(owner, name, step):
    inner = getattr(owner, name)
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            busy[(threading.current_thread().name.split("_")[0], step)] += time.perf_counter() - start
    setattr(owner, name, wrapper)
STEPS = [("oftsurgery.merge.merger", "_layer_tensors", "read (file -> host)"),
         ("oftsurgery.merge.engine", "_layer_tensors", "read (file -> host)"),  # older trees
         ("oftsurgery.quant.codec", "unpack_layer", "unpack"),
         ("oftsurgery.merge.solve.rtn", "rtn_merge_layer", "rotate and round"),
         ("oftsurgery.merge.rtn", "rtn_merge_layer", "rotate and round"),  # older trees
         ("oftsurgery.quant.codec", "pack_layer", "pack and re-check"),
         ("oftsurgery.io.writer", "CheckpointWriter.add", "write"),
         ("oftsurgery.io.writer", "CheckpointWriter.add_file_range", "copy untouched tensors")]
if sys.argv[5] != "plain":
    for module, name, step in STEPS:
        try:
            owner = importlib.import_module(module)
            for part in name.split(".")[:-1]:
                owner = getattr(owner, part)
            step_timer(owner, name.split(".")[-1], step)
        except (ImportError, AttributeError):
            pass  # an older tree without this step
marks = []  # the end of each iteration of the engine's per-decoder-layer loop (its progress iterator)
original = engine._progress
def timed(iterable, *args, **kwargs):
    marks.append(time.perf_counter())
    for item in original(iterable, *args, **kwargs):
        yield item
        marks.append(time.perf_counter())
engine._progress = timed
syncs = collections.Counter()  # "file:line function <- caller" -> host synchronisations with the GPU
if sys.argv[5] == "syncs" and torch.cuda.is_available():
    import traceback, warnings
    def record(message, category, filename, lineno, file=None, line=None):
        if "synchronizing" not in str(message):
            return
        frames = [f for f in traceback.extract_stack()[:-1] if "oftsurgery" in f.filename and "bench" not in f.filename]
        key = " <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(frames[-3:]))
        syncs[(threading.current_thread().name.split("_")[0], key or "(outside oftsurgery)")] += 1
    from pathlib import Path
    warnings.simplefilter("always")
    warnings.showwarning = record
    torch.cuda.set_sync_debug_mode("warn")
kwargs = dict(method="rtn", overwrite=True, progress=False)
if sys.argv[4] != "default":
    kwargs["device"] = sys.argv[4]
import oftsurgery
print("code:", oftsurgery.__file__, file=sys.stderr)
start, cpu = time.perf_counter(), time.process_time()
if sys.argv[5] == "torch-profiler":
    from torch.profiler import ProfilerActivity, profile
    gpu = torch.cuda.is_available()
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])) as prof:
        merge_checkpoint(sys.argv[1], sys.argv[2], sys.argv[3], MergeOptions(**kwargs))
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=25), file=sys.stderr)
    if gpu:
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15), file=sys.stderr)
else:
    merge_checkpoint(sys.argv[1], sys.argv[2], sys.argv[3], MergeOptions(**kwargs))
seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
# VmHWM, this process image's own peak: ru_maxrss would also count the parent's memory at fork time
# (Linux keeps the larger of the two across exec), e.g. a bench that has just built the checkpoint
peak = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"seconds": seconds, "cpu_seconds": cpu, "layer_seconds": [b - a for a, b in zip(marks, marks[1:])],
                  "max_rss_bytes": peak, "busy": [[t, s, v] for (t, s), v in sorted(busy.items())],
                  "syncs": [[t, k, n] for (t, k), n in syncs.most_common()]}))
"""


def run_merge(code_root: Path, checkpoint: Path, rotations: Path, out: Path, device: str, mode: str = "plain") -> dict:
    """One merge in a fresh process; `mode`: "plain", "steps" (step timers), "torch-profiler" (both) or
    "syncs" (where the host waits for the GPU)."""
    env = dict(os.environ, PYTHONPATH=str(code_root), GPTQMODEL_CPU_WORKERS=os.environ.get("GPTQMODEL_CPU_WORKERS", "2"))
    # run from the code root: `python -c` puts the working directory first on sys.path
    result = subprocess.run([sys.executable, "-c", _CHILD, str(checkpoint), str(rotations), str(out), device, mode],
                            env=env, capture_output=True, text=True, cwd=str(code_root))
    if result.returncode:
        raise SystemExit(f"merge with {code_root} failed:\n{result.stderr[-3000:]}")
    used = [line for line in result.stderr.splitlines() if line.startswith("code: ")]
    if not used or not used[-1][6:].startswith(str(code_root)):
        raise SystemExit(f"the merge imported {used[-1][6:] if used else 'an unknown oftsurgery'}, not {code_root}")
    if mode == "torch-profiler":
        print("\n".join(line for line in result.stderr.splitlines() if not line.startswith("code: ")))
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    digest = hashlib.sha256()
    for path in sorted(out.glob("*.safetensors")):
        with open(path, "rb") as shard:
            for block in iter(lambda: shard.read(1 << 24), b""):
                digest.update(block)
    figures["sha256"] = digest.hexdigest()
    return figures


def export_revision(revision: str, into: Path) -> Path:
    """The `oftsurgery` package as it is at `revision` (git archive), importable from the returned root."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", revision, "oftsurgery"], check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=1, help="7B-shaped decoder layers in the checkpoint")
    parser.add_argument("--vocab", type=int, default=1024, help="vocabulary (embedding and lm_head rows)")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "oftsurgery-rtn-speed")
    parser.add_argument("--compare", default=BEFORE, help=f"git revision to compare with (default {BEFORE}), or 'none'")
    parser.add_argument("--device", default="default", help="--device for this tree's merge (default: its default)")
    parser.add_argument("--code", type=Path, action="append", default=[],
                        help="another source tree (a directory holding an oftsurgery package) to run the same way")
    parser.add_argument("--steps", action="store_true", help="also time each step of the engine per thread")
    parser.add_argument("--torch-profiler", action="store_true", help="with --steps: print torch's operator tables")
    parser.add_argument("--syncs", action="store_true",
                        help="on a GPU: one more merge counting where the host waits for the GPU (torch's sync debug mode)")
    args = parser.parse_args()

    from oftsurgery.testing.synthetic import synthetic_checkpoint

    built = synthetic_checkpoint("7b", num_layers=args.layers, vocab_size=args.vocab, cache_dir=args.workdir / "synthetic",
                                 log=lambda message: print(message, file=sys.stderr))
    checkpoint, rotations = built.gptq, built.rotations
    from oftsurgery.io import CheckpointReader

    reader = CheckpointReader(checkpoint)
    size = reader.total_size
    layer_bytes = sum(i.nbytes for n, i in reader.tensors.items() if n.startswith("model.layers.0."))
    load = os.getloadavg()[0]

    rows, steps, syncs = [], [], []
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        trees = [("this tree", ROOT, args.device)]
        if args.compare != "none":
            trees.append((args.compare, export_revision(args.compare, Path(tmp)), "default"))
        trees += [(str(code), code.resolve(), args.device) for code in args.code]
        for name, root, device in trees:
            out = args.workdir / "out"
            rows.append((name, run_merge(root, checkpoint, rotations, out, device)))
            if args.steps:
                mode = "torch-profiler" if args.torch_profiler else "steps"
                steps.append((name, run_merge(root, checkpoint, rotations, out, device, mode)))
            if args.syncs:
                syncs.append((name, run_merge(root, checkpoint, rotations, out, device, "syncs")))

    print(f"checkpoint: {args.layers} decoder layer(s) 4096/11008 GPTQ 4-bit g128 sym, vocab {args.vocab} "
          f"(oftsurgery.testing.synthetic), "
          f"{size / 1e6:.0f} MB; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    print(f"load average before: {load:.1f} (cores: {os.cpu_count()}); CPU seconds: all threads of the merging "
          f"process; each decoder layer: one iteration of the engine's loop ({layer_bytes / 1e6:.0f} MB per layer; the "
          "first also pays one-time costs)")
    print("| code | seconds | MB/s of checkpoint | CPU seconds | each decoder layer s | last layer's MB/s | peak RSS (GB) "
          "| output sha256 |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in rows:
        each = r["layer_seconds"] or [float("nan")]
        print(f"| {name} | {r['seconds']:.1f} | {size / 1e6 / r['seconds']:.1f} | {r['cpu_seconds']:.1f} | "
              f"{', '.join(f'{x:.2f}' for x in each)} | {layer_bytes / 1e6 / each[-1]:.1f} | {r['max_rss_bytes'] / 1e9:.2f} "
              f"| {r['sha256'][:16]} |")
    for name, r in steps:
        print(f"\n{name}, a second merge with step timers ({r['seconds']:.1f} s): seconds per decoder layer that each "
              "step kept each thread busy\n| thread | step | s per decoder layer |\n|---|---|---|")
        for thread, step, value in r["busy"]:
            print(f"| {thread} | {step} | {value / args.layers:.3f} |")
    for name, r in syncs:
        print(f"\n{name}, a merge in torch's sync debug mode: host synchronisations per decoder layer, by place "
              f"({sum(n for _, _, n in r['syncs']) / args.layers:.1f} in all)\n| thread | where (innermost first) | per decoder layer |\n|---|---|---|")
        for thread, where, n in r["syncs"]:
            print(f"| {thread} | {where} | {n / args.layers:.1f} |")


if __name__ == "__main__":
    main()
