"""Eval-mode forward time: oftsurgery's OFT wrapper vs PEFT's OFT layer vs the bare quantized layer.

All three run in one process on the same gptqmodel GPTQ layer (TorchLinear, 4-bit, g128, packed by
gptqmodel from a random weight), same input, same OFT parameters, under torch.no_grad(). PEFT
rebuilds the rotation blocks on every forward; our wrapper caches them in eval mode.

    python bench/wrapper_forward.py                       # CPU, default shapes
    python bench/wrapper_forward.py --device cuda --tokens 1 16 2048
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")


def build_layer(in_features: int, out_features: int, device: str, dtype):
    import torch

    from oftsurgery.quant.gptq import gptq_module
    from oftsurgery.quant.grid import quantize_weight

    torch.manual_seed(0)
    weight = torch.randn(out_features, in_features) * 0.05
    layer = gptq_module(quantize_weight(weight, bits=4, group_size=128, sym=True), bias=None)
    layer.optimized = True  # eager dequantization (no torch.compile warm-up in a short bench)
    layer.post_init()
    return layer.to(device).eval()


def interleaved_medians(fns, sync, repeats: int) -> list[float]:
    """Median seconds per call of each function, measured round-robin so drift hits all alike."""
    for fn in fns:
        for _ in range(3):
            fn()
    sync()
    samples = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            fn()
            sync()
            samples[i].append(time.perf_counter() - start)
    return [statistics.median(s) for s in samples]


def main() -> None:
    import torch
    from peft import OFTConfig
    from peft.tuners.oft.layer import Linear as PeftOFTLinear

    from oftsurgery.oft import GPTQOFTLinear

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float16" if torch.cuda.is_available() else "float32")
    parser.add_argument("--shapes", nargs="+", default=["576x576", "576x1536", "1536x576"],
                        help="in x out of the layer")
    parser.add_argument("--tokens", nargs="+", type=int, default=[1, 16, 256])
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--exact", action="store_true", help="exact Cayley instead of Cayley-Neumann")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    device = args.device
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    neumann = not args.exact

    print(f"device={device} dtype={args.dtype} block_size={args.block_size} "
          f"{'cayley_neumann(5)' if neumann else 'exact cayley'} torch={torch.__version__} "
          f"threads={torch.get_num_threads()}")
    header = f"{'layer (in x out)':>17} {'tokens':>6} {'bare ms':>9} {'PEFT ms':>9} {'ours ms':>9} " \
             f"{'PEFT/bare':>9} {'ours/bare':>9} {'PEFT/ours':>9}"
    print(header)
    print("-" * len(header))
    for shape in args.shapes:
        in_f, out_f = (int(v) for v in shape.split("x"))
        base = build_layer(in_f, out_f, device, dtype)
        options = dict(coft=False, eps=6e-5, block_share=False, use_cayley_neumann=neumann,
                       num_cayley_neumann_terms=5, init_weights=False, module_dropout=0.0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ours = GPTQOFTLinear(base, "default", r=0, oft_block_size=args.block_size, **options).eval()
            theirs = PeftOFTLinear(base, "default", r=0, config=OFTConfig(
                r=0, oft_block_size=args.block_size, target_modules=["x"], **options)).eval()
        theirs.oft_R["default"].to(torch.float32)
        with torch.no_grad():
            theirs.oft_R["default"].weight.copy_(ours.oft_R["default"].weight)
        for tokens in args.tokens:
            x = torch.randn(1, tokens, in_f, device=device, dtype=dtype)
            with torch.no_grad():
                assert torch.equal(ours(x), theirs(x))
                bare, peft_t, ours_t = interleaved_medians(
                    [lambda: base(x), lambda: theirs(x), lambda: ours(x)], sync, args.repeats)
            print(f"{shape:>17} {tokens:>6} {bare * 1e3:>9.3f} {peft_t * 1e3:>9.3f} {ours_t * 1e3:>9.3f} "
                  f"{peft_t / bare:>9.2f} {ours_t / bare:>9.2f} {peft_t / ours_t:>9.2f}")


if __name__ == "__main__":
    main()
