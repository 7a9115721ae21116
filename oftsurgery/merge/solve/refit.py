"""The scale refit: for fixed codes, each output row's least-squares fp16 scales on the output objective.

Ŵ[o, i] = s[g(i), o]·(q[o, i] − z[g(i), o]) is linear in the scales, so each output row's best scales
solve a G×G system (G = number of groups), assembled from the Hessian's group blocks. Used by
`requant.py`'s pipeline on its `_Layer` problems; why and how: docs/merge-methods.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


class _Groups:
    """Sums over the inputs of each quantization group, for any g_idx (act-order, partial last group)."""

    def __init__(self, g_idx: "torch.Tensor", num_groups: int):
        import torch

        n = g_idx.numel()
        counts = torch.bincount(g_idx, minlength=num_groups).tolist()  # one host synchronisation
        size = counts[0] if counts else 0
        self.uniform = size > 0 and bool(torch.equal(g_idx, torch.arange(n, device=g_idx.device) // size))
        if self.uniform:  # contiguous groups of `size`, the last possibly partial: plain slices
            self.full = n // size
            self.size = size
            self.members = [slice(g * size, min((g + 1) * size, n)) for g in range(num_groups)]
        else:  # any layout: padded member lists, gathered
            order = torch.argsort(g_idx, stable=True)
            self.members = list(torch.split(order, counts))
            width = max(counts) if counts else 0
            self.index = torch.zeros(num_groups, width, dtype=torch.long, device=g_idx.device)
            self.mask = torch.zeros(num_groups, width, device=g_idx.device, dtype=torch.float64)
            for g, members in enumerate(self.members):
                self.index[g, : len(members)] = members
                self.mask[g, : len(members)] = 1.0

    def sum(self, values: "torch.Tensor") -> "torch.Tensor":
        """[in, out] → [G, out]: values summed over each group's inputs (deterministic on every device)."""
        import torch

        if self.uniform:
            return self.sum_from(values, 0)
        return torch.einsum("gko,gk->go", values[self.index], self.mask.to(values.dtype))

    def sum_from(self, values: "torch.Tensor", first: int) -> "torch.Tensor":
        """Uniform groups only: [in − group `first`'s start, out] → [G − first, out], the sums over
        groups first, first + 1, … (the rows of `values` start at group `first`'s first input)."""
        import torch

        full = max(self.full - first, 0)
        head = values[: full * self.size].reshape(full, self.size, values.shape[1]).sum(1)
        if self.full == len(self.members):
            return head
        return torch.cat([head, values[full * self.size:].sum(0, keepdim=True)])


def _refit_solution(layer: "_Layer", codes_t: "torch.Tensor", *, damp: float) -> tuple:
    """The least-squares scales [G, out] (float64) for fixed codes, and which rows solved (bool [out]).

    Ŵ[o, i] = s[g(i), o]·D[o, i] with D = q − z[g_idx] is linear in the scales, so each output row's
    best scales solve the G×G normal equations
        A[o, g, h] = Σ_{i∈g, j∈h} D[o, i] H̃[i, j] D[o, j],   b[o, g] = Σ_{i∈g} D[o, i] (T H̃)[o, i]
    with H̃ = H + λI. A is assembled group by group from (H̃ D)'s rows: memory O(out·in + in² + out·G²).
    A is symmetric: with contiguous groups each group's row is built from its own inputs on (half the
    products and memory traffic of the whole rows) and mirrored; other layouts build whole rows.
    """
    import torch

    f64 = torch.float64
    hessian = layer.hessian.matrix
    lam = layer.hessian.damping(damp)
    groups = _Groups(layer.g_idx, layer.num_groups)
    # float64 H (in² · 8 bytes: 6.6 GB at in = 28672) lives only for H·T; A's assembly converts H's
    # rows group by group (the same values, so the same sums)
    H = hessian.to(f64)
    target = layer.target_t.to(f64, copy=True)
    HT = H @ target
    del H
    HT.add_(target.mul_(lam))  # products and sums in place: at most three [in, out] float64 at once
    del target
    D = codes_t.to(f64, copy=True).sub_(layer.zeros.to(layer.dtype).to(f64)[layer.g_idx])  # [in, out]
    b = groups.sum(HT.mul_(D))  # [G, out]
    del HT
    out_f, G = D.shape[1], layer.num_groups
    A = torch.empty(out_f, G, G, dtype=f64, device=D.device)
    if groups.uniform:  # A is symmetric: group g's products with itself and the groups after it, mirrored
        for g, members in enumerate(groups.members):
            tail = slice(members.start, None)
            P = hessian[members, tail].to(f64).T @ D[members]  # (H̃ D_g) on the inputs from group g on
            P[: members.stop - members.start] += lam * D[members]
            A[:, g, g:] = groups.sum_from(P.mul_(D[tail]), g).T
        upper = torch.triu_indices(G, G, 1, device=A.device)
        A[:, upper[1], upper[0]] = A[:, upper[0], upper[1]]
    else:
        for g, members in enumerate(groups.members):
            P = hessian[members].to(f64).T @ D[members]  # (H̃ D_g) for D restricted to group g's inputs: [in, out]
            P[members] += lam * D[members]
            A[:, g, :] = groups.sum(P.mul_(D)).T
    del P, D
    ridge = 1e-9 * A.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-30)  # keeps empty groups solvable
    A.diagonal(dim1=-2, dim2=-1).add_(ridge.unsqueeze(-1))
    solved, info = torch.linalg.solve_ex(A, b.T.unsqueeze(-1))
    return solved.squeeze(-1).T, info == 0


def _refit(layer: "_Layer", codes_t: "torch.Tensor", scales: "torch.Tensor", *, damp: float) -> "torch.Tensor":
    """Refitted fp16 scales [G, out]; a scale that is not finite and positive keeps its old value."""
    import torch

    solved, ok = _refit_solution(layer, codes_t, damp=damp)
    new = solved.to(torch.float16)
    bad = ~torch.isfinite(new) | (new <= 0) | ~ok.unsqueeze(0)
    return torch.where(bad, scales, new)
