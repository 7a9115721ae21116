"""Layer tuning variants on a small model: held-out output error of each decoder layer, solve vs tuned.

Compares `merge --tune-steps` with scales only (the merge's choice) against code moves of ±1 at a few
step sizes, on a tiny random Llama quantized by GPTQModel (the test fixture's shape) with random
exact-Cayley rotations. Prints, per variant, each decoder layer's held-out error before → after.

    python bench/tuning_variants.py [--steps 100] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--workdir", default=os.path.expanduser("~/.cache/oftsurgery/bench-tuning"))
    args = parser.parse_args()

    from merge_helpers import random_rotations
    from oftsurgery.merge import MergeOptions, layer_tuning, merge_checkpoint
    from oftsurgery.testing.models import build_tiny_llama, is_complete, mark_complete, quantize_gptq

    work = Path(args.workdir)
    fp, q = work / "fp", work / "gptq"
    if not is_complete(q):
        build_tiny_llama(fp)
        quantize_gptq(fp, q, bits=4, group_size=32, sym=True)
        mark_complete(q)
    rot = random_rotations(q, work / "rotations.safetensors", strength=0.05)
    real = layer_tuning.tune_layer
    for label, code_lr in [("scales only (the merge)", 0.0), ("scales + codes, step 1/N", 1.0),
                           ("scales + codes, step 2/N", 2.0)]:
        layer_tuning.tune_layer = lambda *a, code_lr=code_lr, **k: real(*a, code_lr=code_lr, **k)
        report = merge_checkpoint(q, rot, work / "out", MergeOptions(tune_steps=args.steps, calib_tokens=1024,
                                                                     seq_len=64, progress=False, overwrite=True))
        cells = ", ".join(f"layer {t['layer']}: {t['heldout_before']:.5f} -> {t['heldout_after']:.5f}"
                          f"{'' if t['accepted'] else ' (not taken)'}" for t in report.layer_tuning)
        print(f"{label:<28} {cells}", flush=True)
    layer_tuning.tune_layer = real


if __name__ == "__main__":
    main()
