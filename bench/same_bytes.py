"""Does a change alter what the merge writes? This tree against a git revision, output by output.

Merges the tiny synthetic checkpoint (`oftsurgery.testing.synthetic`, 2 decoder layers, rotations of
strength 0.05 so that codes change) four ways on the CPU — calibrated and rtn, GPTQ and AWQ output —
once with this tree and once with `--compare REV` (or `--code DIR`, a directory holding an
`oftsurgery` package), each tree in its own process, and prints the SHA-256 of every output's
shards and the modes its report chose. Exits 1 if any output differs.

    python bench/same_bytes.py --compare f2003a0
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from rtn_speed import ROOT, export_revision

_CHILD = r"""
import hashlib, json, sys, tempfile
from pathlib import Path
from oftsurgery.merge import MergeOptions, merge_checkpoint
from oftsurgery.testing.synthetic import synthetic_checkpoint
built = synthetic_checkpoint("tiny", num_layers=2, rotation_strength=0.05, cache_dir=sys.argv[1])
runs = {"calibrated": dict(method="calibrated", calib_tokens=1024), "rtn": dict(method="rtn"),
        "calibrated, AWQ output": dict(method="calibrated", calib_tokens=1024, requant="awq"),
        "rtn, AWQ output": dict(method="rtn", requant="awq")}
found = {}
for name, options in runs.items():
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        merge_checkpoint(built.gptq, built.rotations, out, MergeOptions(progress=False, device="cpu", **options))
        digest = hashlib.sha256()
        for shard in sorted(out.glob("*.safetensors")):
            digest.update(shard.read_bytes())
        modes = sorted({layer["mode"] for layer in json.loads((out / "merge_report.json").read_text())["layers"]})
        found[name] = [digest.hexdigest()[:16], modes]
print(json.dumps(found))
"""


def merges(code_root: Path, workdir: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(code_root), GPTQMODEL_CPU_WORKERS=os.environ.get("GPTQMODEL_CPU_WORKERS", "2"))
    result = subprocess.run([sys.executable, "-c", _CHILD, str(workdir)], env=env, capture_output=True, text=True,
                            cwd=str(code_root))
    if result.returncode:
        raise SystemExit(f"the merges with {code_root} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compare", default=None, help="git revision to compare with")
    parser.add_argument("--code", type=Path, default=None, help="or a source tree holding an oftsurgery package")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "oftsurgery-same-bytes")
    args = parser.parse_args()
    if (args.compare is None) == (args.code is None):
        raise SystemExit("give one of --compare REV or --code DIR")
    args.workdir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        other = args.code.resolve() if args.code else export_revision(args.compare, Path(tmp))
        ours, theirs = merges(ROOT, args.workdir), merges(other, args.workdir)
    label = args.compare or str(args.code)
    print(f"| merge | this tree | {label} | same bytes |\n|---|---|---|---|")
    for name, (digest, modes) in ours.items():
        print(f"| {name} | {digest} ({', '.join(modes)}) | {theirs[name][0]} ({', '.join(theirs[name][1])}) | "
              f"{'yes' if digest == theirs[name][0] else 'NO'} |")
    sys.exit(0 if all(ours[n][0] == theirs[n][0] for n in ours) else 1)


if __name__ == "__main__":
    main()
