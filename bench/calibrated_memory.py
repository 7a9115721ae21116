"""Peak host memory of a calibrated merge of one real-shaped decoder layer on the CPU.

    OMP_NUM_THREADS=1 python bench/calibrated_memory.py --preset 7b --only down_proj --calib-tokens 2048

Builds (or reuses) the synthetic GPTQ checkpoint of `oftsurgery.testing.synthetic` with one decoder layer,
rotates the selected linears (default: all 7; `--only down_proj` is the largest solve, in = 11008 at 7B),
merges with `--method calibrated` on the CPU in this process and prints the wall time, the peak RSS
(`ru_maxrss` of this process) and the seconds per linear from the merge report, as JSON.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="7b", choices=["tiny", "7b", "70b"])
    ap.add_argument("--vocab", type=int, default=1024, help="embedding rows (small: the decoder layer is measured)")
    ap.add_argument("--only", default=None, help="rotate only the linears whose name ends with this")
    ap.add_argument("--calib-tokens", type=int, default=2048)
    ap.add_argument("--workdir", default=None, help="synthetic checkpoint cache (default ~/.cache/oftsurgery/synthetic)")
    args = ap.parse_args()

    from oftsurgery.merge import MergeOptions, merge_checkpoint
    from oftsurgery.testing.synthetic import random_rotations, synthetic_checkpoint

    ck = synthetic_checkpoint(args.preset, num_layers=1, vocab_size=args.vocab, cache_dir=args.workdir)
    with tempfile.TemporaryDirectory(prefix="oftsurgery-calibrated-memory-") as tmp:
        rotations = Path(tmp) / "rotations.safetensors"
        select = (lambda prefix: prefix.endswith(args.only)) if args.only else None
        random_rotations(ck.gptq, rotations, strength=0.002, select=select)
        start = time.perf_counter()
        report = merge_checkpoint(ck.gptq, rotations, Path(tmp) / "merged",
                                  MergeOptions(method="calibrated", device="cpu", calib_tokens=args.calib_tokens,
                                               progress=False))
        seconds = time.perf_counter() - start
    print(json.dumps({
        "preset": args.preset, "only": args.only, "calib_tokens": report.calib_tokens,
        "seconds": round(seconds, 1),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, 2),
        "seconds_per_linear": {layer.name: round(layer.seconds, 1) for layer in report.layers},
        "modes": sorted({layer.mode for layer in report.layers}),
    }, indent=2))


if __name__ == "__main__":
    main()
