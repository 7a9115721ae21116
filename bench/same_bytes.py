"""Does a change alter what the merge writes? This tree against a git revision, output by output.

Merges the tiny synthetic checkpoint (`oftsurgery.testing.synthetic`, 2 decoder layers, rotations of
strength 0.05 so that codes change) five ways on the CPU — calibrated and rtn, GPTQ and AWQ output, and
calibrated with `--tune-steps 10` —
once with this tree and once with `--compare REV` (or `--code DIR`, a directory holding an
`oftsurgery` package), each tree in its own process, and prints the SHA-256 of every output's
shards, the modes its report chose and whether the report's lines (every figure but the seconds)
agree. Exits 1 if any output differs.

`--more` adds calibrated merges that reach further: the tests' tiny GPTQModel checkpoints of Llama
quantized with act-order (`desc_act`: scattered groups), Qwen3-MoE (experts, routing) and Gemma 3
(sliding and full attention), and a wider synthetic Llama (hidden 512, intermediate 1408, 2048
calibration tokens, so H is built from more tokens than inputs and the errors come from H). Their
inputs (checkpoints, rotations) are made once, by this tree, and both trees merge the same files.
`--device` merges on another device (both trees; the bytes are compared on that device).

    python bench/same_bytes.py --compare f2003a0
    python bench/same_bytes.py --compare f2003a0 --more
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
runs = {"calibrated": (built.gptq, built.rotations, dict(method="calibrated", calib_tokens=1024)),
        "rtn": (built.gptq, built.rotations, dict(method="rtn")),
        "calibrated, AWQ output": (built.gptq, built.rotations, dict(method="calibrated", calib_tokens=1024, requant="awq")),
        "rtn, AWQ output": (built.gptq, built.rotations, dict(method="rtn", requant="awq")),
        "calibrated, tuned 10 steps": (built.gptq, built.rotations, dict(method="calibrated", calib_tokens=1024,
                                                                         tune_steps=10))}
runs.update({name: tuple(run) for name, run in json.loads(sys.argv[2]).items()})
found = {}
for name, (checkpoint, rotations, options) in runs.items():
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        merge_checkpoint(checkpoint, rotations, out, MergeOptions(progress=False, device=sys.argv[3], **options))
        digest = hashlib.sha256()
        for shard in sorted(out.glob("*.safetensors")):
            digest.update(shard.read_bytes())
        layers = json.loads((out / "merge_report.json").read_text())["layers"]
        modes = sorted({layer["mode"] for layer in layers})
        # the report's lines in order, every figure but the seconds
        lines = json.dumps([{k: v for k, v in layer.items() if k != "seconds"} for layer in layers], sort_keys=True)
        found[name] = [digest.hexdigest()[:16], modes, hashlib.sha256(lines.encode()).hexdigest()[:16]]
print(json.dumps(found))
"""


def more_runs(workdir: Path) -> dict:
    """The `--more` merges: (checkpoint, rotations, options) by name, their inputs made by this tree."""
    from oftsurgery.testing import synthetic
    from oftsurgery.testing.models import tiny_gptq

    synthetic.PRESETS.setdefault("512", synthetic.LlamaShape(hidden_size=512, intermediate_size=1408, num_heads=8,
                                                              num_kv_heads=4, vocab_size=1024))
    wide = synthetic.synthetic_checkpoint("512", num_layers=2, rotation_strength=0.05, cache_dir=workdir)
    runs = {"512-wide Llama, 2048 tokens": (str(wide.gptq), str(wide.rotations),
                                            dict(method="calibrated", calib_tokens=2048, seq_len=256))}
    for name, checkpoint in (("Llama act-order", tiny_gptq("llama", desc_act=True)),
                             ("Qwen3-MoE", tiny_gptq("qwen3_moe")), ("Gemma 3", tiny_gptq("gemma3_text"))):
        rotations = workdir / f"rotations-{checkpoint.name}.safetensors"
        if not rotations.exists():
            synthetic.random_rotations(checkpoint, rotations, strength=0.05)
        runs[f"{name}, calibrated"] = (str(checkpoint), str(rotations),
                                       dict(method="calibrated", calib_tokens=1024, seq_len=64))
    return runs


def merges(code_root: Path, workdir: Path, extra: dict, device: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(code_root), GPTQMODEL_CPU_WORKERS=os.environ.get("GPTQMODEL_CPU_WORKERS", "2"))
    result = subprocess.run([sys.executable, "-c", _CHILD, str(workdir), json.dumps(extra), device], env=env,
                            capture_output=True, text=True, cwd=str(code_root))
    if result.returncode:
        raise SystemExit(f"the merges with {code_root} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compare", default=None, help="git revision to compare with")
    parser.add_argument("--code", type=Path, default=None, help="or a source tree holding an oftsurgery package")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "oftsurgery-same-bytes")
    parser.add_argument("--more", action="store_true", help="also act-order, MoE, Gemma 3 and a wider model")
    parser.add_argument("--device", default="cpu", help="--device of every merge (default cpu)")
    args = parser.parse_args()
    if (args.compare is None) == (args.code is None):
        raise SystemExit("give one of --compare REV or --code DIR")
    args.workdir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        other = args.code.resolve() if args.code else export_revision(args.compare, Path(tmp))
        extra = more_runs(args.workdir) if args.more else {}
        ours, theirs = merges(ROOT, args.workdir, extra, args.device), merges(other, args.workdir, extra, args.device)
    label = args.compare or str(args.code)
    print(f"| merge | this tree | {label} | same bytes | same report lines |\n|---|---|---|---|---|")
    for name, (digest, modes, lines) in ours.items():
        same_lines = "yes" if lines == theirs[name][2] else "no"
        print(f"| {name} | {digest} ({', '.join(modes)}) | {theirs[name][0]} ({', '.join(theirs[name][1])}) | "
              f"{'yes' if digest == theirs[name][0] else 'NO'} | {same_lines} |")
    sys.exit(0 if all(ours[n][0] == theirs[n][0] for n in ours) else 1)


if __name__ == "__main__":
    main()
