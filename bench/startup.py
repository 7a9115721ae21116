"""The fixed cost of `oftsurgery merge`: the whole command's wall time on a tiny checkpoint, where
start-up, imports, set-up and exit are nearly all of it, this tree against other source trees.

Each round runs, for every tree in turn (so a busy machine slows them alike), in a fresh process:

    python -c "import torch"                                            (the floor: torch's own import)
    python -m oftsurgery merge TINY ROTATIONS --out OUT -q --method rtn
    python -m oftsurgery merge TINY ROTATIONS --out OUT -q --calib-tokens 512 --seq-len 128   (calibrated)

TINY is `oftsurgery.testing.synthetic`'s "tiny" preset (2 decoder layers of hidden 256), built once
in --workdir. The table gives the median wall time over the rounds, the merge's own clock
(`merge_report.json` "seconds", from after the device is resolved to before the configs and card are
written) and the rest: interpreter, imports, device, report, card, exit. Each output's shards are
hashed, so the trees are checked to write the same bytes.

    python bench/startup.py                          # this tree only
    git archive BEFORE oftsurgery | tar -x -C /tmp/before
    python bench/startup.py --code /tmp/before --rounds 5
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(tree: Path, args: list[str], env: dict) -> float:
    env = dict(env, PYTHONPATH=os.pathsep.join([str(tree)] + [p for p in [env.get("PYTHONPATH")] if p]))
    start = time.perf_counter()
    done = subprocess.run([sys.executable, *args], cwd=tree, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed in {tree} (exit {done.returncode}):\n{done.stderr[-2000:]}")
    return wall


def _digest(out: Path) -> str:
    h = hashlib.sha256()
    for shard in sorted(out.glob("*.safetensors")):
        h.update(shard.read_bytes())
    return h.hexdigest()[:16]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--code", action="append", default=[], type=Path,
                        help="another source tree (a directory holding an oftsurgery package); repeatable")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--methods", default="rtn,calibrated")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "oftsurgery-startup")
    args = parser.parse_args()

    sys.path.insert(0, str(ROOT))
    from oftsurgery.testing.synthetic import synthetic_checkpoint

    built = synthetic_checkpoint("tiny", num_layers=2, cache_dir=args.workdir / "synthetic")
    trees = [ROOT, *[p.resolve() for p in args.code]]
    methods = [m for m in args.methods.split(",") if m]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    walls: dict[tuple[str, str], list[float]] = {}
    clocks: dict[tuple[str, str], list[float]] = {}
    digests: dict[tuple[str, str], str] = {}
    for _ in range(args.rounds):
        for tree in trees:
            walls.setdefault((str(tree), "import torch"), []).append(_run(tree, ["-c", "import torch"], env))
            for method in methods:
                out = args.workdir / "out" / f"{tree.name}-{method}"
                shutil.rmtree(out, ignore_errors=True)
                extra = ["--calib-tokens", "512", "--seq-len", "128"] if method == "calibrated" else []
                wall = _run(tree, ["-m", "oftsurgery", "merge", str(built.gptq), str(built.rotations), "--out",
                                   str(out), "-q", "--method", method, "--device", args.device, *extra], env)
                walls.setdefault((str(tree), method), []).append(wall)
                report = json.loads((out / "merge_report.json").read_text(encoding="utf-8"))
                clocks.setdefault((str(tree), method), []).append(report["seconds"])
                digests[(str(tree), method)] = _digest(out)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"{args.rounds} round(s), {os.cpu_count()} CPU(s), load average {load:.1f}; medians in seconds")
    print("| tree | run | wall s | merge's clock s | the rest s | output |")
    print("|---|---|---|---|---|---|")
    for tree in trees:
        for run in ["import torch", *methods]:
            wall = statistics.median(walls[(str(tree), run)])
            clock = statistics.median(clocks[(str(tree), run)]) if run in methods else None
            rest = f"{wall - clock:.2f}" if clock is not None else "-"
            print(f"| {tree.name} | {run} | {wall:.2f} | {'-' if clock is None else f'{clock:.2f}'} | {rest} | "
                  f"{digests.get((str(tree), run), '-')} |")


if __name__ == "__main__":
    main()
