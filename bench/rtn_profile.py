"""Where `merge --method rtn` spends its time: each thread's blocking time per step, per decoder layer.

The data-free merge runs on three threads (read-ahead, main, pack-and-write; see
oftsurgery/merge/pipeline.py and transfer.py). On a GPU the kernels take a small part of a layer's
time and the host side sets the pace, so this bench wraps the steps of the engine with wall-clock
timers and reports, per thread, how long each step kept that thread busy (including waiting for the
GPU inside it). With `--torch-profiler` it also prints torch's operator table for one merge.

Each merge runs in a fresh process, twice (the second is reported: the first pays one-time costs),
on the synthetic Llama-7B-shaped checkpoint of `oftsurgery.testing.synthetic` (vocabulary 1024).
`--code DIR` adds another source tree (a directory holding an `oftsurgery` package, e.g. a
`git archive REV oftsurgery | tar -x -C DIR` export) to run the same way; the output files' SHA-256
is printed for each, so a change that should not change bytes can be checked at the same time.

    python bench/rtn_profile.py --layers 4 --device cuda
    python bench/rtn_profile.py --layers 4 --device cuda --code /tmp/before
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

_CHILD = r"""
import collections, json, sys, threading, time
import torch
import oftsurgery.io.writer as writer
import oftsurgery.merge.engine as engine
import oftsurgery.merge.rtn as rtn
import oftsurgery.quant.codec as codec
from oftsurgery.merge import MergeOptions, merge_checkpoint

ckpt, rotations, out, device, timers, torch_profiler = sys.argv[1:7]
busy = collections.defaultdict(float)  # (thread, step) -> seconds

def timed(owner, name, step):
    inner = getattr(owner, name)
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            thread = threading.current_thread().name.split("_")[0]
            busy[(thread, step)] += time.perf_counter() - start
    setattr(owner, name, wrapper)

if timers == "1":
    timed(engine, "_layer_tensors", "read (file -> host)")
    timed(codec, "unpack_layer", "unpack")
    timed(rtn, "rtn_merge_layer", "rotate and round")
    timed(codec, "pack_layer", "pack and re-check")
    timed(writer.CheckpointWriter, "add", "write")
    timed(writer.CheckpointWriter, "add_file_range", "copy untouched tensors")

marks = []
progress = engine._progress
def loop(iterable, *args, **kwargs):
    marks.append(time.perf_counter())
    for item in progress(iterable, *args, **kwargs):
        yield item
        marks.append(time.perf_counter())
engine._progress = loop

def merge():
    merge_checkpoint(ckpt, rotations, out, MergeOptions(method="rtn", device=device, overwrite=True, progress=False))

import oftsurgery
print("code:", oftsurgery.__file__, file=sys.stderr)
merge()  # one-time costs (CUDA modules, first allocations) stay out of the figures
marks.clear()
busy.clear()
start = time.perf_counter()
if torch_profiler == "1":
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        merge()
    sort = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=25), file=sys.stderr)
    print(prof.key_averages().table(sort_by=sort, row_limit=15), file=sys.stderr)
else:
    merge()
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "layer_seconds": [b - a for a, b in zip(marks, marks[1:])],
                  "busy": [[thread, step, value] for (thread, step), value in sorted(busy.items())]}))
"""


def run(code_root: Path, checkpoint: Path, rotations: Path, out: Path, device: str, timers: bool,
        torch_profiler: bool) -> dict:
    env = dict(os.environ, PYTHONPATH=str(code_root))
    result = subprocess.run([sys.executable, "-c", _CHILD, str(checkpoint), str(rotations), str(out), device,
                             "1" if timers else "0", "1" if torch_profiler else "0"],
                            env=env, capture_output=True, text=True, cwd=str(code_root))
    if result.returncode:
        raise SystemExit(f"merge with {code_root} failed:\n{result.stderr[-3000:]}")
    used = [line for line in result.stderr.splitlines() if line.startswith("code: ")]
    if not used or not used[-1][6:].startswith(str(code_root)):
        raise SystemExit(f"the merge imported {used[-1][6:] if used else 'an unknown oftsurgery'}, not {code_root}")
    if torch_profiler:
        print("\n".join(line for line in result.stderr.splitlines() if not line.startswith("code: ")))
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    digest = hashlib.sha256()
    for path in sorted(out.glob("*.safetensors")):
        digest.update(path.read_bytes())
    figures["sha256"] = digest.hexdigest()
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4, help="7B-shaped decoder layers")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--code", type=Path, action="append", default=[],
                        help="another source tree to run the same way (repeatable)")
    parser.add_argument("--torch-profiler", action="store_true", help="also print torch's operator tables")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "oftsurgery-rtn-profile")
    args = parser.parse_args()

    sys.path.insert(0, str(ROOT))
    from oftsurgery.io import CheckpointReader
    from oftsurgery.testing.synthetic import decoder_layer_bytes, synthetic_checkpoint

    built = synthetic_checkpoint("7b", num_layers=args.layers, vocab_size=1024, cache_dir=args.workdir / "synthetic",
                                 log=lambda message: print(message, file=sys.stderr))
    size = CheckpointReader(built.gptq).total_size
    per_layer = decoder_layer_bytes(built.gptq) / args.layers
    print(f"checkpoint: {args.layers} x 7B decoder layer ({per_layer / 1e6:.1f} MB each), {size / 1e6:.0f} MB; "
          f"device {args.device}; second of two merges per process")
    for root in [ROOT, *args.code]:
        root = root.resolve()
        timed = run(root, built.gptq, built.rotations, args.workdir / "out", args.device, True, args.torch_profiler)
        plain = run(root, built.gptq, built.rotations, args.workdir / "out", args.device, False, False)
        each = plain["layer_seconds"]
        print(f"\n{root}: {plain['seconds']:.2f} s, {size / 1e6 / plain['seconds']:.0f} MB/s of checkpoint; each "
              f"decoder layer {', '.join(f'{x:.3f}' for x in each)} s (the last at {per_layer / 1e6 / each[-1]:.0f} MB/s); "
              f"output sha256 {plain['sha256'][:16]}")
        print("| thread | step | s per decoder layer (timed run) |\n|---|---|---|")
        for thread, step, value in timed["busy"]:
            print(f"| {thread} | {step} | {value / args.layers:.3f} |")


if __name__ == "__main__":
    main()
