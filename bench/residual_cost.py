"""Cost of the residual LoRA fit (`merge --residual-rank R`) for one decoder layer of a real shape.

Times `solve.residual.residual_lora` on the 7 linears of a 7B (4096/11008) or 70B (8192/28672)
decoder layer: random residuals, H from random activations with a few loud channels, one H per
input as the merge shares them (q/k/v, gate/up). Prints seconds per linear and per decoder layer.

    python bench/residual_cost.py --preset 7b --rank 16 [--device cuda]
"""

from __future__ import annotations

import argparse
import time

SHAPES = {"7b": (4096, 11008, 1024), "70b": (8192, 28672, 1024)}  # hidden, intermediate, kv width


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=sorted(SHAPES), default="7b")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    import torch

    from oftsurgery.merge.solve.residual import residual_lora

    hidden, inter, kv = SHAPES[args.preset]
    # (name, out, in, shares the H of)
    linears = [("q_proj", hidden, hidden), ("k_proj", kv, hidden), ("v_proj", kv, hidden), ("o_proj", hidden, hidden),
               ("gate_proj", inter, hidden), ("up_proj", inter, hidden), ("down_proj", hidden, inter)]
    g = torch.Generator(device=args.device).manual_seed(0)
    hessians: dict[int, torch.Tensor] = {}
    total = 0.0
    for name, out_f, in_f in linears:
        if in_f not in hessians:
            x = torch.randn(args.tokens, in_f, generator=g, device=args.device)
            x[:, : in_f // 64] *= 20
            hessians[in_f] = x.T @ x
            del x
        d = torch.randn(out_f, in_f, generator=g, device=args.device) * 1e-3
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        residual_lora(d, args.rank, hessians[in_f])
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        total += seconds
        print(f"{name:<10} [{out_f} x {in_f}] {seconds:6.2f} s", flush=True)
    print(f"decoder layer ({args.preset}, rank {args.rank}, {args.device}): {total:.2f} s")


if __name__ == "__main__":
    main()
