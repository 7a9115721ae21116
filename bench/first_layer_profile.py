"""Where the first decoder layer's one-time cost goes: two rtn merges in one process, profiled.

The first `merge --method rtn` of a process pays one-time costs in its first decoder layer (on a GPU:
CUDA loads each kernel's module on first use, cuBLAS sets up); a second merge of the same checkpoint
in the same process pays none. This merges the synthetic 7B-shaped checkpoint (`--layers` decoder
layers, vocabulary 1024) twice and prints each merge's time and the functions that took the most
time on the main thread (cProfile, main thread only: on Python 3.12 two threads cannot both be
profiled), so the difference between the two tables is the one-time cost.

    python bench/first_layer_profile.py                   # on the GPU machine (device cuda)
    python bench/first_layer_profile.py --device cpu      # the same on a CPU
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--top", type=int, default=18, help="functions listed per merge")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "oftsurgery-first-layer")
    args = parser.parse_args()

    import torch

    from oftsurgery.merge import MergeOptions, merge_checkpoint
    from oftsurgery.testing.synthetic import synthetic_checkpoint

    if args.device.startswith("cuda"):
        torch.zeros(1, device=args.device)  # the CUDA context is not part of the merge's one-time cost
    built = synthetic_checkpoint("7b", num_layers=args.layers, vocab_size=1024, cache_dir=args.workdir)
    for run in (1, 2):
        profile = cProfile.Profile()
        with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
            start = time.perf_counter()
            profile.enable()
            merge_checkpoint(built.gptq, built.rotations, Path(tmp) / "out",
                             MergeOptions(method="rtn", device=args.device, progress=False))
            profile.disable()
            print(f"merge {run}: {time.perf_counter() - start:.2f} s")
        table = io.StringIO()
        pstats.Stats(profile, stream=table).sort_stats("tottime").print_stats(args.top)
        print(table.getvalue()[table.getvalue().index("ncalls"):])


if __name__ == "__main__":
    main()
