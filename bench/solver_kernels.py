"""Time the solvers' column-serial loops: torch per-column ops vs the fused Triton kernel, on real shapes.

    python bench/solver_kernels.py --device cuda --shapes 7b

Prints, per linear shape (out × in), the seconds of one full GPTQ pass and one coordinate-descent sweep
over all columns (blocks of 128, the between-block GEMM updates included) for both paths, their ratio,
and the fraction of codes on which the two paths agree.
"""

from __future__ import annotations

import argparse
import time

import torch

from oftsurgery.merge import kernels

SHAPES = {
    "tiny": [(256, 512)],
    "7b": [(4096, 4096), (11008, 4096), (4096, 11008)],
    "70b": [(8192, 8192), (28672, 8192), (8192, 28672)],
}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def gptq_pass(weight, hinv, scales, zeros, maxq, block_fn):
    weight = weight.clone()
    codes = torch.empty_like(weight)
    n = weight.shape[1]
    for start in range(0, n, kernels.MAX_BLOCK):
        end = min(start + kernels.MAX_BLOCK, n)
        q, err = block_fn(weight[:, start:end].clone(), hinv[start:end, start:end], scales[:, start:end],
                          zeros[:, start:end], maxq)
        codes[:, start:end] = q
        weight[:, end:] -= err @ hinv[start:end, end:]
    return codes


def descent_sweep(codes, grad, h, scales, maxq, block_fn):
    codes, grad = codes.clone(), grad.clone()
    n = codes.shape[1]
    for start in range(0, n, kernels.MAX_BLOCK):
        end = min(start + kernels.MAX_BLOCK, n)
        new, delta = block_fn(grad[:, start:end].clone(), h[start:end, start:end], scales[:, start:end],
                              codes[:, start:end], maxq)
        codes[:, start:end] = new
        grad += delta @ h[start:end, :]
    return codes


def problem(out_f, in_f, tokens, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(tokens, in_f, generator=g).to(device)
    h = x.T @ x
    h += 0.01 * torch.diag(h).mean() * torch.eye(in_f, device=device)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h.double())), upper=True).float()
    scales = (torch.rand(out_f, in_f // 128 + 1, generator=g) * 0.002 + 0.001).to(device)
    scales = scales.repeat_interleave(128, dim=1)[:, :in_f].contiguous()
    zeros = torch.full((out_f, in_f), 8.0, device=device)
    weight = (torch.randn(out_f, in_f, generator=g) * 0.02).to(device)
    return weight, h, hinv, scales, zeros


def timed(fn, device, repeats=1):
    fn()  # warm-up (Triton compiles on first launch)
    _sync(device)
    t = time.perf_counter()
    for _ in range(repeats):
        out = fn()
    _sync(device)
    return (time.perf_counter() - t) / repeats, out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shapes", default="7b", choices=sorted(SHAPES))
    ap.add_argument("--tokens", type=int, default=8192)
    args = ap.parse_args()
    device = torch.device(args.device)
    maxq = 15.0
    print("| out x in | loop | torch s | fused s | torch/fused | codes agree |")
    print("|---|---|---|---|---|---|")
    for out_f, in_f in SHAPES[args.shapes]:
        weight, h, hinv, scales, zeros = problem(out_f, in_f, args.tokens, device)
        t_ref, c_ref = timed(lambda: gptq_pass(weight, hinv, scales, zeros, maxq, kernels.gptq_block_torch), device)
        t_new, c_new = timed(lambda: gptq_pass(weight, hinv, scales, zeros, maxq, kernels.gptq_block), device)
        agree = float((c_ref == c_new).float().mean())
        print(f"| {out_f} x {in_f} | GPTQ pass | {t_ref:.3f} | {t_new:.3f} | {t_ref / t_new:.1f}x | {agree:.5f} |")
        grad = (scales * (c_ref - zeros) - weight) @ h
        t_ref, d_ref = timed(lambda: descent_sweep(c_ref, grad, h, scales, maxq, kernels.descent_block_torch), device)
        t_new, d_new = timed(lambda: descent_sweep(c_ref, grad, h, scales, maxq, kernels.descent_block), device)
        agree = float((d_ref == d_new).float().mean())
        moved = float((d_ref != c_ref).float().mean())
        print(f"| {out_f} x {in_f} | descent sweep ({moved:.1%} moved) | {t_ref:.3f} | {t_new:.3f} | "
              f"{t_ref / t_new:.1f}x | {agree:.5f} |", flush=True)


if __name__ == "__main__":
    main()
