"""The residual LoRA of one linear: what the requantized grid could not hold, at rank R.

D = T − Ŵ (the fine-tuned weight W·Rᵀ minus the merged one) is approximated by B·A (B [out, R],
A [R, in]) minimising the output error ‖(D − B·A) X‖_F over calibration inputs X, H = Σ x xᵀ.
With H + λI = L Lᵀ the minimiser is the rank-R truncation of D·L mapped back through L⁻¹; without
data (H = I) it is the truncated SVD of D. Deterministic: a seeded randomized range finder.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

DAMP = 0.01  # λ = DAMP · mean(diag H), as the solver damps H
POWER_ITERATIONS = 4
OVERSAMPLE = 16
SEED = 0


def top_singular(m: "torch.Tensor", rank: int, right: "torch.Tensor | None" = None,
                 ) -> tuple["torch.Tensor", "torch.Tensor", "torch.Tensor"]:
    """(U [out, r], S [r], Vh [r, in]) of the best rank-`rank` approximation of M = m·right (right
    None: M = m), in float64.

    Exact SVD when the oversampled sketch would cover the smaller side; otherwise a randomized range
    finder with power iterations (seeded, so the same matrix gives the same factors on a device),
    which never forms M: only thin products with m and `right` (out·in·(R+16) work, not out·in²).
    """
    import torch

    m = m.to(torch.float64)
    small = min(m.shape)
    rank = min(rank, small)
    width = rank + OVERSAMPLE
    if width >= small:
        u, s, vh = torch.linalg.svd(m if right is None else m @ right, full_matrices=False)
        return u[:, :rank], s[:rank], vh[:rank]

    def times(x):  # M·x
        return m @ (x if right is None else right @ x)

    def transposed_times(y):  # Mᵀ·y
        return m.T @ y if right is None else right.T @ (m.T @ y)

    generator = torch.Generator(device=m.device).manual_seed(SEED)
    sketch = torch.randn(m.shape[1], width, generator=generator, device=m.device, dtype=m.dtype)
    basis = torch.linalg.qr(times(sketch)).Q
    for _ in range(POWER_ITERATIONS):
        basis = torch.linalg.qr(times(torch.linalg.qr(transposed_times(basis)).Q)).Q
    projected = basis.T @ m if right is None else (basis.T @ m) @ right
    u, s, vh = torch.linalg.svd(projected, full_matrices=False)
    return (basis @ u)[:, :rank], s[:rank], vh[:rank]


def damped_factor(hessian: "torch.Tensor", damp: float = DAMP) -> "torch.Tensor":
    """L with L·Lᵀ = H + λI, λ = damp · mean(diag H) (float64; once per input, shared by its linears)."""
    import torch

    h = hessian.to(torch.float64, copy=True)
    diag = h.diagonal()
    diag.masked_fill_(diag == 0, 1.0)  # an input never active keeps H definite
    diag.add_(diag.mean() * damp)
    return torch.linalg.cholesky(h)


def residual_lora(residual: "torch.Tensor", rank: int, hessian: "torch.Tensor | None" = None,
                  *, damp: float = DAMP, lower: "torch.Tensor | None" = None) -> tuple["torch.Tensor", "torch.Tensor"]:
    """(A [rank, in], B [out, rank]) in float32 with B·A ≈ `residual` [out, in] in activation space.

    `hessian`: H [in, in] of the layer's calibration inputs, or None for weight space (H = I);
    `lower`: its `damped_factor` when the caller has it already. The singular values are split
    evenly between A and B, so neither factor overflows fp16 first.
    """
    import torch

    d = residual.to(torch.float64)
    if hessian is None and lower is None:
        u, s, vh = top_singular(d, rank)
        a = vh
    else:
        lower = damped_factor(hessian.to(d.device), damp) if lower is None else lower.to(d.device)
        u, s, vh = top_singular(d, rank, lower)
        # A = Vhᵣ·L⁻¹, i.e. Aᵀ solves Lᵀ·Aᵀ = Vhᵣᵀ
        a = torch.linalg.solve_triangular(lower.T, vh.T, upper=True).T
    root = s.sqrt()
    return (root.unsqueeze(1) * a).to(torch.float32).contiguous(), (u * root).to(torch.float32).contiguous()
