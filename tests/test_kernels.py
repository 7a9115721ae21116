"""The fused solver loops (Triton, run here through Triton's CPU interpreter) against their torch form,
and the torch form against a from-the-definition float64 reference."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from oftsurgery.merge import kernels


def _problem(out_f: int, n: int, seed: int, bits: int = 4):
    g = torch.Generator().manual_seed(seed)
    maxq = float(2**bits - 1)
    x = torch.randn(n, 4 * n, generator=g, dtype=torch.float64)
    h = x @ x.T / x.shape[1] + 0.01 * torch.eye(n, dtype=torch.float64)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    scales = torch.rand(out_f, n, generator=g) * 0.1 + 0.01
    zeros = torch.randint(0, int(maxq) + 1, (out_f, n), generator=g).float()
    weight = (torch.rand(out_f, n, generator=g) * maxq - zeros) * scales * 1.1
    codes = torch.randint(0, int(maxq) + 1, (out_f, n), generator=g).float()
    grad = torch.randn(out_f, n, generator=g) * 0.05
    return maxq, weight, h.float(), hinv.float(), scales, zeros, codes, grad


def check_triton_against_torch() -> None:
    """Run in a child process with TRITON_INTERPRET=1 (Triton reads it when first imported)."""
    for out_f, n in [(16, 128), (37, 128), (5, 40)]:
        maxq, weight, h, hinv, scales, zeros, codes, grad = _problem(out_f, n, seed=n + out_f)
        assert kernels._use_triton(weight), "the interpreted Triton path was not taken"
        q_ref, e_ref = kernels.gptq_block_torch(weight.clone(), hinv, scales, zeros, maxq)
        q, e = kernels.gptq_block(weight.clone(), hinv, scales, zeros, maxq)
        assert (q != q_ref).float().mean() < 0.01, "GPTQ codes differ"  # an FMA may flip a boundary
        rows = (q == q_ref).all(1)
        assert torch.allclose(e[rows], e_ref[rows], rtol=1e-4, atol=1e-5), "GPTQ errors differ"
        c_ref, d_ref = kernels.descent_block_torch(grad.clone(), h, scales, codes, maxq)
        c, d = kernels.descent_block(grad.clone(), h, scales, codes, maxq)
        assert (c_ref != codes).any(), "the sweep moved no code: the comparison would be vacuous"
        assert (c != c_ref).float().mean() < 0.01, "descent codes differ"
        rows = (c == c_ref).all(1)
        assert torch.allclose(d[rows], d_ref[rows], rtol=1e-4, atol=1e-6), "descent deltas differ"


def test_triton_kernel_equals_torch_loops():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "OFTSURGERY_TRITON": "1"}
    code = "import tests.test_kernels as t; t.check_triton_against_torch()"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr[-3000:]


def test_gptq_block_torch_is_the_column_by_column_definition():
    maxq, weight, _, hinv, scales, zeros, _, _ = _problem(8, 24, seed=1)
    q, _ = kernels.gptq_block_torch(weight.clone(), hinv, scales, zeros, maxq)
    w = weight.double().clone()
    hv = hinv.double()
    for j in range(w.shape[1]):  # quantize column j, spread its error over the later columns
        qj = torch.clamp(torch.round(w[:, j] / scales[:, j].double()) + zeros[:, j].double(), 0, maxq)
        assert torch.equal(qj.float(), q[:, j]), j
        err = (w[:, j] - scales[:, j].double() * (qj - zeros[:, j].double())) / hv[j, j]
        w[:, j + 1 :] -= torch.outer(err, hv[j, j + 1 :])


def test_descent_block_torch_never_increases_the_objective():
    maxq, _, h, _, scales, _, codes, _ = _problem(12, 32, seed=2)
    g = torch.Generator().manual_seed(5)
    target = torch.randn(12, 32, generator=g) * 0.05
    zeros = torch.full_like(codes, 8.0)

    def objective(c):
        e = (scales * (c - zeros) - target).double()
        return float(torch.einsum("oi,ij,oj->", e, h.double(), e))

    grad = (scales * (codes - zeros) - target) @ h
    new, delta = kernels.descent_block_torch(grad.clone(), h, scales, codes, maxq)
    assert objective(new) < objective(codes)
    assert torch.allclose(delta, scales * (new - codes))
