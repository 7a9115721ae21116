"""Does `torchrun … -m oftsurgery merge` write the same bytes as one process? Checked on this machine.

Runs the calibrated merge twice on the same inputs and device — `python -m oftsurgery merge` and
`torchrun --standalone --nproc-per-node N -m oftsurgery merge` — with one CPU thread per process
(torchrun's default for its workers), then compares every tensor of the two outputs byte for byte
and prints the times and which rank solved how many layers.

    python bench/distributed_check.py --nproc 2                        # CPU processes, gloo
    python bench/distributed_check.py --nproc 1 --device cuda          # one GPU, NCCL with one rank
    python bench/distributed_check.py --nproc 8 --device cuda          # 8 GPUs of one machine
    python bench/distributed_check.py --checkpoint CKPT --adapter ADAPTER --nproc 4 --device cuda

Without --checkpoint it builds a tiny random Llama, packs it as AWQ 4-bit (min/max grids, gptqmodel's
packer) and makes random rotations for every linear, under --workdir. Exit status 1 if any tensor
differs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # this checkout's oftsurgery, here and (PYTHONPATH) in the merges


def _inputs(workdir: Path) -> tuple[Path, Path]:
    import torch

    from oftsurgery.io import CheckpointReader
    from oftsurgery.testing.models import build_tiny_llama, make_awq_checkpoint
    from oftsurgery.oft.adapter_io import RotationSet, save_rotations
    from oftsurgery.oft.rotation import cayley_exact, skew_from_params
    from oftsurgery.quant.codec import find_quantized_layers

    ckpt = workdir / "tiny-awq"
    if not (ckpt / "config.json").exists():
        make_awq_checkpoint(build_tiny_llama(workdir / "tiny-fp"), ckpt, group_size=32)
    rotations = workdir / "rotations.safetensors"
    if not rotations.exists():
        reader = CheckpointReader(ckpt)
        g = torch.Generator().manual_seed(0)
        blocks = {}
        for prefix in find_quantized_layers(reader.tensors):
            r = reader.tensors[f"{prefix}.qweight"].shape[0] // 32  # AWQ qweight: [in, out / 8]
            blocks[prefix] = cayley_exact(skew_from_params(torch.randn(r, 32 * 31 // 2, generator=g) * 0.05, 32))
        save_rotations(RotationSet(blocks, {"parameterization": "cayley"}), rotations)
    return ckpt, rotations


def _run(command: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"failed ({result.returncode}): {' '.join(command)}\n{result.stderr[-4000:]}")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nproc", type=int, default=2, help="ranks (processes) for torchrun")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (each rank its own GPU)")
    parser.add_argument("--checkpoint", type=Path, help="a GPTQ/AWQ checkpoint (default: a tiny one built here)")
    parser.add_argument("--adapter", type=Path, help="its adapter or rotations file (with --checkpoint)")
    parser.add_argument("--calib-tokens", type=int, default=2048)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per process (both runs)")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "oftsurgery-distributed-check")
    args = parser.parse_args()
    if (args.checkpoint is None) != (args.adapter is None):
        parser.error("--checkpoint and --adapter go together")

    args.workdir.mkdir(parents=True, exist_ok=True)
    ckpt, adapter = (args.checkpoint, args.adapter) if args.checkpoint else _inputs(args.workdir)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    merge = ["-m", "oftsurgery", "merge", str(ckpt), str(adapter), "--device", args.device, "--calib-tokens",
             str(args.calib_tokens), "--seq-len", str(args.seq_len), "--calib", "builtin:code", "--overwrite", "-q"]
    single_dir, dist_dir = args.workdir / "single", args.workdir / f"torchrun-{args.nproc}"
    single_s = _run([sys.executable, *merge, "--out", str(single_dir)], env)
    dist_s = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
                   *merge, "--out", str(dist_dir)], env)

    from oftsurgery.io import CheckpointReader

    single, dist = CheckpointReader(single_dir), CheckpointReader(dist_dir)
    differing = sorted(n for n in single.tensors if n not in dist.tensors or not _same(single.get(n), dist.get(n)))
    differing += sorted(set(dist.tensors) - set(single.tensors))
    report = json.loads((dist_dir / "merge_report.json").read_text())
    per_rank = Counter(layer["rank"] for layer in report["layers"])
    print(f"device {args.device}, {args.nproc} rank(s), {report['calib_tokens']} calibration tokens, "
          f"{len(report['layers'])} layers")
    print(f"single process: {single_s:.1f} s; torchrun: {dist_s:.1f} s (both including start-up)")
    print("layers solved per rank: " + ", ".join(f"rank {r}: {n}" for r, n in sorted(per_rank.items())))
    print(f"world_size in merge_report.json: {report['world_size']}")
    if differing:
        print(f"DIFFERENT: {len(differing)} of {len(single.tensors)} tensors, first {differing[:5]}")
        sys.exit(1)
    print(f"identical: all {len(single.tensors)} tensors have the same bytes")


def _same(a, b) -> bool:
    import torch

    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


if __name__ == "__main__":
    main()
