"""The GPTQ factor chol(H⁻¹), two ways in one process: Cholesky, inverse, Cholesky (what GPTQ
implementations and this solver before 3300252 do) against one Cholesky of the reversed H and a
blocked triangular inverse (`oftsurgery/merge/solve/factor.py`). Seconds (medians, after a warm-up
of each), peak device memory above the input, and how far the two factors are apart.

    python bench/factor_speed.py --device cuda --sizes 8192 28672     # a 70B layer's two input widths
    python bench/factor_speed.py --sizes 2048 4096                    # the CPU

H is a random positive definite matrix like a layer's second moments (correlated, uneven channels),
damped by 1% of its mean diagonal as the solver damps it; no act-order permutation.
"""

from __future__ import annotations

import argparse
import statistics
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    import torch

    from oftsurgery.merge.solve.factor import inverse_factor

    device = torch.device(args.device)
    cuda = device.type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def classic(H: "torch.Tensor") -> "torch.Tensor":
        A = H.to(torch.float64, copy=True)
        A.diagonal().add_(A.diagonal().mean() * 0.01)
        L = torch.linalg.cholesky(A)
        del A
        inverse = torch.cholesky_inverse(L, out=L)
        return torch.linalg.cholesky(inverse, upper=True).float()

    def blocked(H: "torch.Tensor") -> "torch.Tensor":
        return inverse_factor(H, 0.01, False, torch.float32)[1]

    if cuda:
        print(f"device: {torch.cuda.get_device_name(device)}, torch {torch.__version__}")
    print("| n | Cholesky, inverse, Cholesky s | Cholesky + blocked inverse s | ratio | peak GB (classic / blocked) "
          "| max |ΔU| / max |U| |\n|---|---|---|---|---|---|")
    for n in args.sizes:
        g = torch.Generator(device=device).manual_seed(n)
        x = torch.randn(n + n // 4, n, generator=g, device=device)
        x = x @ (torch.eye(n, device=device) + 0.05 * torch.randn(n, n, generator=g, device=device))
        x = x * torch.exp(0.7 * torch.randn(n, generator=g, device=device))  # uneven channels
        H = x.T @ x
        del x
        seconds: dict[str, list[float]] = {"classic": [], "blocked": []}
        peaks: dict[str, float] = {}
        found = {}
        for round_ in range(args.rounds + 1):
            for name, fn in (("classic", classic), ("blocked", blocked)):
                if cuda:
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                    base = torch.cuda.memory_allocated()
                sync()
                started = time.perf_counter()
                U = fn(H)
                sync()
                if round_:
                    seconds[name].append(time.perf_counter() - started)
                if cuda:
                    peaks[name] = (torch.cuda.max_memory_allocated() - base) / 1e9
                found[name] = U
                del U
        a, b = (statistics.median(seconds[k]) for k in ("classic", "blocked"))
        gap = float((found["classic"] - found["blocked"]).abs().max() / found["classic"].abs().max())
        peak = f"{peaks['classic']:.1f} / {peaks['blocked']:.1f}" if cuda else "-"
        print(f"| {n} | {a:.3f} | {b:.3f} | {b / a:.2f} | {peak} | {gap:.1e} |", flush=True)
        del H, found


if __name__ == "__main__":
    main()
