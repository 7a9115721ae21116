"""The factor GPTQ's pass reads: the upper Cholesky factor U of H⁻¹ (H damped, in the visiting order).

With J the reversal of the visiting order, J H J = L Lᵀ gives H = V Vᵀ for the upper triangular
V = J L J, so H⁻¹ = (V⁻¹)ᵀ V⁻¹ and U = V⁻¹ = J L⁻¹ J: one Cholesky factorisation and one triangular
inverse, and H⁻¹ is never formed. Factorising H, inverting it and factorising the inverse, as GPTQ
implementations do, costs about three times the arithmetic (on CUDA torch's `cholesky_inverse`
solves against an identity: n³ multiply-adds, where the triangular inverse by blocks here takes
n³/4 and the Cholesky n³/6). Float64 throughout; in×in float64 is 6.6 GB at in = 28672, so never
more than two such matrices live at once (docs/performance.md, "Peak memory").
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

TRIANGLE_BASE = 1024  # lower_inverse: blocks up to this size are inverted by one triangular solve
TRIANGLE_CHUNK = 1 << 23  # lower_inverse: elements of each temporary of its off-diagonal products


def inverse_factor(matrix: "torch.Tensor", damp: float, act_order: bool, dtype) -> "tuple | str":
    """(visiting order, U [n, n] in `dtype`, rows contiguous) for H = `matrix` damped by `damp` ·
    mean(diag H); or why there is none ("Hessian is not positive definite", "inverse Hessian is not
    finite"). With `act_order` the inputs are visited by decreasing diagonal of H, else in order."""
    import torch

    H = matrix.to(torch.float64, copy=True)
    diag = H.diagonal()
    diag.masked_fill_(diag == 0, 1.0)  # an input never active: any code is as good, keep H definite
    diag.add_(diag.mean() * damp)
    n = H.shape[0]
    order = torch.argsort(diag, descending=True, stable=True) if act_order else torch.arange(n, device=H.device)
    del diag
    reverse = order.flip(0)
    H = H[reverse.unsqueeze(1), reverse]  # the reversed, permuted copy (the first one is freed)
    L, info = torch.linalg.cholesky_ex(H)
    del H
    if int(info) != 0:  # one host synchronisation per input, not per column
        return "Hessian is not positive definite"
    inverse = lower_inverse(L)
    del L
    U = inverse.to(dtype).flip((0, 1))  # U[i, j] = L⁻¹[n-1-i, n-1-j]
    del inverse
    # every entry finite iff its min and max are (NaN propagates): isfinite(U) would hold 11 bytes per entry
    if not bool(torch.isfinite(torch.stack(torch.aminmax(U))).all()):
        return "inverse Hessian is not finite"
    return order, U


def lower_inverse(L: "torch.Tensor") -> "torch.Tensor":
    """L⁻¹ for a lower triangular L with a non-zero diagonal, by blocks: [[A, 0], [B, C]]⁻¹ =
    [[A⁻¹, 0], [−C⁻¹ B A⁻¹, C⁻¹]], the halves recursively and the corner as matrix products a
    chunk of rows at a time (about n³/4 multiply-adds, where a triangular solve against the identity
    takes n³/2). Memory: the result, two temporaries of TRIANGLE_CHUNK elements and one block of
    TRIANGLE_BASE² (the solve of a diagonal block)."""
    import torch

    out = torch.eye(L.shape[0], dtype=L.dtype, device=L.device)  # the diagonal blocks start as identities
    _invert_lower(L, out)
    return out


def _invert_lower(L: "torch.Tensor", out: "torch.Tensor") -> None:
    import torch

    n = L.shape[0]
    if n <= TRIANGLE_BASE:  # out holds an identity block here
        out.copy_(torch.linalg.solve_triangular(L, out, upper=False))
        return
    k = n // 2
    _invert_lower(L[:k, :k], out[:k, :k])
    _invert_lower(L[k:, k:], out[k:, k:])
    first, second, corner = out[:k, :k], out[k:, k:], L[k:, :k]
    step = max(1, TRIANGLE_CHUNK // k)
    for r0 in range(0, n - k, step):
        r1 = min(r0 + step, n - k)
        rows = second[r0:r1, :r1] @ corner[:r1]  # C⁻¹ is lower triangular: its rows end at r1
        out[k + r0:k + r1, :k] = torch.mm(rows, first).neg_()
