"""Requantizing one merged layer onto its source grid: round-to-nearest, or the calibrated solve.

`requantize_rtn` rounds W·Rᵀ to the nearest code. `requantize_calibrated` minimises the layer's output
error tr(E H Eᵀ) (E = Ŵ − W·Rᵀ) with the grid kept, chaining `requantize_compensated` (GPTQ's pass),
`refine_codes`, `refit_scales` and `refine_codes` again, each later stage kept only if it lowers the
error. Everything runs on the Hessian's device, weights held transposed ([in, out]). Why, and how the
stages are blocked and which precision each uses: docs/merge-methods.md ("How the solver runs").
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from oftsurgery.merge.solve.hessian import InputHessian
    from oftsurgery.quant.grid import QuantizedWeight

DAMP = 0.01  # Tikhonov damping of H: DAMP · mean(diag H), as in GPTQ
RETRY_DAMPS = (0.1, 1.0)  # larger dampings tried, in order, when H + DAMP·… is not positive definite
BLOCK = 128  # columns per lazy-batch block
ACCEPT = 1e-6  # a later stage must lower the output error by more than this relative amount


class SolverError(RuntimeError):
    """A solver stage could not run on this layer (its message is the reason, for the merge report)."""


# ------------------------------------------------------------------------------------------------
# the problem on the device
# ------------------------------------------------------------------------------------------------

def _as_hessian(hessian) -> "InputHessian":
    from oftsurgery.merge.solve.hessian import InputHessian

    return hessian if isinstance(hessian, InputHessian) else InputHessian.from_matrix(hessian)


class _Layer:
    """One linear's problem on the solver's device, transposed ([in, out]); grids stay as given."""

    def __init__(self, qw: "QuantizedWeight", target: "torch.Tensor", hessian: "InputHessian"):
        import torch

        self.qw = qw
        self.hessian = hessian
        dev = self.device = hessian.device
        self.dtype = hessian.dtype if hessian.dtype in (torch.float32, torch.float64) else torch.float32
        self.maxq = float(qw.maxq)
        self.g_idx = qw.g_idx.to(dev).long()
        self.num_groups = qw.num_groups
        self.target_t = target.to(dev, self.dtype).T.contiguous()
        self.zeros_t = qw.zeros.to(dev)[self.g_idx].to(self.dtype)
        self.source_scales = qw.scales.to(dev)
        self.source_codes_t = qw.codes.to(dev).T.contiguous().to(self.dtype)  # [in, out], rows contiguous
        self._target64 = None

    def scales_t(self, scales: "torch.Tensor", dtype=None) -> "torch.Tensor":
        return scales[self.g_idx].to(dtype or self.dtype)

    def error(self, codes_t: "torch.Tensor", scales: "torch.Tensor") -> "torch.Tensor":
        """tr(E H Eᵀ) of a candidate, float64 0-dim on the device.

        s·(q − z) is exact in float32 (an fp16 scale times an integer below 2⁸), so only the
        difference to the target needs float64."""
        import torch

        if self._target64 is None:
            self._target64 = self.target_t.to(torch.float64)
        weight = self.scales_t(scales, torch.float32) * (codes_t.float() - self.zeros_t.float())
        return self.hessian.error(weight.double().sub_(self._target64))

    def rtn_codes_t(self) -> "torch.Tensor":
        import torch

        s = self.scales_t(self.source_scales)
        return torch.clamp_(torch.round(self.target_t / s).add_(self.zeros_t), 0, self.maxq)

    def quantized(self, codes_t: "torch.Tensor", scales: "torch.Tensor") -> "QuantizedWeight":
        """The candidate as a host `QuantizedWeight` on the source's grid."""
        import torch

        # uint8 in the input-major layout the unpackers give and the packers read (codes.T contiguous):
        # a quarter of int32's memory and no transposed copy
        return replace(self.qw, codes=codes_t.to(torch.uint8).contiguous().to(self.qw.codes.device).T,
                       scales=scales.to(self.qw.scales.device).contiguous())


# ------------------------------------------------------------------------------------------------
# round to nearest
# ------------------------------------------------------------------------------------------------

def requantize_rtn(qw: "QuantizedWeight", target: "torch.Tensor") -> "QuantizedWeight":
    """Round the target weight [out, in] to the nearest code on the source grid (on target's device)."""
    from oftsurgery.quant.grid import quantize_to_codes

    dev = target.device
    codes = quantize_to_codes(target, qw.scales.to(dev), qw.zeros.to(dev), qw.g_idx.to(dev), qw.bits)
    return qw.with_codes(codes.to(qw.codes.device))


# ------------------------------------------------------------------------------------------------
# 1. GPTQ's pass on the source grid
# ------------------------------------------------------------------------------------------------

def _gptq_factor(hessian: "InputHessian", damp: float, act_order: bool, dtype) -> tuple:
    """(visiting order, upper Cholesky factor U of (H + λI)⁻¹ in that order), once per input.

    A failure is cached too, so q, k and v do not each retry a factorisation that cannot succeed.
    """
    import torch

    key = ("gptq", damp, act_order, dtype)
    if key not in hessian.cache:
        H = hessian.matrix.to(torch.float64, copy=True)
        diag = H.diagonal()
        diag.masked_fill_(diag == 0, 1.0)  # an input never active: any code is as good, keep H definite
        diag.add_(diag.mean() * damp)
        n = H.shape[0]
        perm = (torch.argsort(diag, descending=True, stable=True) if act_order
                else torch.arange(n, device=H.device))
        H = H[perm][:, perm]
        L, info = torch.linalg.cholesky_ex(H)
        del H
        if int(info) != 0:  # one host synchronisation per input, not per column
            hessian.cache[key] = SolverError(f"the Hessian is not positive definite at damp {damp:g}")
        else:
            U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if int(info) != 0 or not bool(torch.isfinite(U).all()):
                hessian.cache[key] = SolverError(f"the inverse Hessian is not positive definite at damp {damp:g}")
            else:
                hessian.cache[key] = (perm, U.to(dtype).contiguous())  # rows contiguous: the loop reads rows
    factor = hessian.cache[key]
    if isinstance(factor, SolverError):
        raise factor
    return factor


def _gptq_pass(layer: _Layer, perm: "torch.Tensor", U: "torch.Tensor", block_size: int) -> "torch.Tensor":
    """Codes [in, out] (in the layer's dtype) from GPTQ's lazy-batch pass in the order `perm`."""
    import torch

    from oftsurgery.merge.solve import kernels

    w = layer.target_t[perm]  # a copy, rows in visiting order; updated with the compensations
    s = layer.scales_t(layer.source_scales)[perm]
    z = layer.zeros_t[perm]
    codes = torch.empty_like(w)
    n, maxq = w.shape[0], layer.maxq
    fused = kernels.use_triton(w)
    for b0 in range(0, n, block_size):
        b1 = min(b0 + block_size, n)
        wb, sb, zb, qb, ub = w[b0:b1], s[b0:b1], z[b0:b1], codes[b0:b1], U[b0:b1, b0:b1]
        errb = torch.empty_like(wb)
        if fused:  # the same loop as one GPU kernel per block (kernels.py)
            kernels.gptq_block(wb, sb, zb, ub, qb, errb, maxq)
        for j in range(0 if fused else b1 - b0):
            q = torch.clamp_(torch.round(wb[j] / sb[j]).add_(zb[j]), 0, maxq)
            qb[j] = q
            e = errb[j]
            torch.sub(wb[j], sb[j] * (q - zb[j]), out=e)
            e.div_(ub[j, j])
            wb[j + 1:].addr_(ub[j, j + 1:], e, alpha=-1)  # later columns of the block absorb the error
        if b1 < n:
            w[b1:].addmm_(U[b0:b1, b1:].T, errb, alpha=-1)  # the rest of the matrix, once per block
    return codes[torch.argsort(perm)]


def requantize_compensated(
    qw: "QuantizedWeight",
    target: "torch.Tensor",
    hessian,
    *,
    damp: float = DAMP,
    block_size: int = BLOCK,
    act_order: bool = True,
) -> "QuantizedWeight":
    """GPTQ's error-compensating pass of `target` on the source grid (see module docstring).

    `hessian` is H [in, in] (a tensor or an `InputHessian`). With `act_order` the columns are visited
    in order of decreasing Hessian diagonal (the grid and g_idx are unchanged; only the visiting order
    differs). Raises `SolverError` when H + λI is not positive definite at this `damp`.
    """
    hess = _as_hessian(hessian)
    layer = _Layer(qw, target, hess)
    perm, U = _gptq_factor(hess, damp, act_order, layer.dtype)
    return layer.quantized(_gptq_pass(layer, perm, U, block_size), layer.source_scales)


def output_error(weight: "torch.Tensor", target: "torch.Tensor", hessian) -> float:
    """‖(weight − target) X‖² computed as tr(E H Eᵀ) with H = Σ x xᵀ (float64)."""
    import torch

    hess = _as_hessian(hessian)
    err_t = (weight.to(hess.device, torch.float64) - target.to(hess.device, torch.float64)).T
    return float(hess.error(err_t))


# ------------------------------------------------------------------------------------------------
# 2. coordinate descent on the codes
# ------------------------------------------------------------------------------------------------

def _refine(layer: _Layer, codes_t: "torch.Tensor", scales: "torch.Tensor", *, sweeps: int, damp: float,
            block_size: int) -> "torch.Tensor":
    """Blocked coordinate descent on the codes [in, out] for tr(E (H + λI) Eᵀ); returns new codes."""
    import torch

    from oftsurgery.merge.solve import kernels

    dt = layer.dtype
    H = layer.hessian.matrix_as(dt)
    lam = layer.hessian.damping(damp).to(dt)
    s = layer.scales_t(scales)
    codes = codes_t.to(dt, memory_format=torch.contiguous_format, copy=True)
    err = s * (codes - layer.zeros_t) - layer.target_t  # Eᵀ
    grad = (H @ err).add_(err * lam)  # ((H + λI) Eᵀ)[i, o]: half the objective's gradient in Ŵ[o, i]
    del err
    diag = H.diagonal() + lam
    # minimiser of the 1-D quadratic along one code: step = round(−grad / (s · diag)); an input with
    # zero curvature (H = 0, no damping) gets a denominator of −inf, i.e. no step
    neg_curv = torch.where(diag > 0, -diag, torch.full_like(diag, -torch.inf)).unsqueeze(1) * s
    n, maxq = codes.shape[0], layer.maxq
    fused = kernels.use_triton(codes)
    for _ in range(sweeps):
        moved = torch.zeros((), dtype=torch.long, device=codes.device)
        for b0 in range(0, n, block_size):
            b1 = min(b0 + block_size, n)
            gb = grad[b0:b1].clone()  # the block's gradient rows, kept current within the block
            cb, sb, nb, hb = codes[b0:b1], s[b0:b1], neg_curv[b0:b1], H[b0:b1, b0:b1]
            delta = torch.zeros_like(gb)  # changes of Ŵᵀ in this block
            if fused:  # the same loop as one GPU kernel per block (kernels.py)
                kernels.refine_block(gb, cb, sb, nb, hb, delta, maxq)
            for j in range(0 if fused else b1 - b0):
                new = torch.clamp_(cb[j] + torch.round(gb[j] / nb[j]), 0, maxq)
                d = delta[j]
                torch.mul(new - cb[j], sb[j], out=d)
                cb[j] = new
                gb[j + 1:].addr_(hb[j, j + 1:], d)  # later columns see this change (off-diagonal H)
            grad.addmm_(H[:, b0:b1], delta)  # everyone sees the block's changes, once per block
            grad[b0:b1].add_(delta * lam)
            moved += torch.count_nonzero(delta)
        if int(moved) == 0:  # converged: one host synchronisation per sweep
            break
    return codes


def refine_codes(
    qw: "QuantizedWeight",
    target: "torch.Tensor",
    hessian,
    *,
    sweeps: int = 2,
    damp: float = DAMP,
    block_size: int = BLOCK,
) -> "QuantizedWeight":
    """Coordinate descent on the integer codes, minimising tr(E (H + λI) Eᵀ) exactly.

    The objective splits into independent output rows, so one input column at a time every row's
    code moves to the integer that minimises the objective with all other codes fixed (a 1-D convex
    quadratic, solved by rounding its minimiser and clamping to the grid). No step can raise the
    objective, so this polishes whatever GPTQ's greedy pass left; an exact fit (an identity rotation)
    is left untouched. Blocked: within a block of columns the serial updates touch only the block's
    gradient rows; the full gradient is updated once per block (`Δ_blk @ H[blk, :]`).
    """
    hess = _as_hessian(hessian)
    layer = _Layer(qw, target, hess)
    codes = _refine(layer, layer.source_codes_t, layer.source_scales, sweeps=sweeps, damp=damp,
                    block_size=block_size)
    return layer.quantized(codes, layer.source_scales)


# ------------------------------------------------------------------------------------------------
# 3. least-squares refit of the scales
# ------------------------------------------------------------------------------------------------

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
            head = values[: self.full * self.size].reshape(self.full, self.size, -1).sum(1)
            if self.full == len(self.members):
                return head
            return torch.cat([head, values[self.full * self.size:].sum(0, keepdim=True)])
        return torch.einsum("gko,gk->go", values[self.index], self.mask.to(values.dtype))


def _refit_solution(layer: _Layer, codes_t: "torch.Tensor", *, damp: float) -> tuple:
    """The least-squares scales [G, out] (float64) for fixed codes, and which rows solved (bool [out]).

    Ŵ[o, i] = s[g(i), o]·D[o, i] with D = q − z[g_idx] is linear in the scales, so each output row's
    best scales solve the G×G normal equations
        A[o, g, h] = Σ_{i∈g, j∈h} D[o, i] H̃[i, j] D[o, j],   b[o, g] = Σ_{i∈g} D[o, i] (T H̃)[o, i]
    with H̃ = H + λI. A is assembled group by group from (H̃ D)'s rows: memory O(out·in + in² + out·G²).
    """
    import torch

    f64 = torch.float64
    H = layer.hessian.matrix_as(f64)
    lam = layer.hessian.damping(damp)
    D = codes_t.to(f64) - layer.zeros_t.to(f64)  # [in, out]
    groups = _Groups(layer.g_idx, layer.num_groups)
    target = layer.target_t.to(f64)
    b = groups.sum((H @ target).add_(target * lam).mul_(D))  # [G, out]
    del target
    out_f, G = D.shape[1], layer.num_groups
    A = torch.empty(out_f, G, G, dtype=f64, device=D.device)
    for g, members in enumerate(groups.members):
        P = H[members].T @ D[members]  # (H̃ D_g) for D restricted to group g's inputs: [in, out]
        P[members] += lam * D[members]
        A[:, g, :] = groups.sum(P.mul_(D)).T
    del P, D
    ridge = 1e-9 * A.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-30)  # keeps empty groups solvable
    A.diagonal(dim1=-2, dim2=-1).add_(ridge.unsqueeze(-1))
    solved, info = torch.linalg.solve_ex(A, b.T.unsqueeze(-1))
    return solved.squeeze(-1).T, info == 0


def _refit(layer: _Layer, codes_t: "torch.Tensor", scales: "torch.Tensor", *, damp: float) -> "torch.Tensor":
    """Refitted fp16 scales [G, out]; a scale that is not finite and positive keeps its old value."""
    import torch

    solved, ok = _refit_solution(layer, codes_t, damp=damp)
    new = solved.to(torch.float16)
    bad = ~torch.isfinite(new) | (new <= 0) | ~ok.unsqueeze(0)
    return torch.where(bad, scales, new)


def refit_scales(qw: "QuantizedWeight", target: "torch.Tensor", hessian, *, damp: float = DAMP) -> "QuantizedWeight":
    """Least-squares refit of the fp16 scales with codes and zeros fixed, on the output objective.

    Ŵ[o, i] = s[g(i), o]·(q[o, i] − z[g(i), o]) is linear in the scales, so for each output row the
    best scales solve a small G×G system (G = number of groups). The scales are continuous degrees
    of freedom the grid offers for free: using them costs nothing in size or format.
    """
    hess = _as_hessian(hessian)
    layer = _Layer(qw, target, hess)
    return layer.quantized(layer.source_codes_t, _refit(layer, layer.source_codes_t, layer.source_scales, damp=damp))


# ------------------------------------------------------------------------------------------------
# the pipeline
# ------------------------------------------------------------------------------------------------

@dataclass
class CalibratedResult:
    """What `requantize_calibrated` produced, and what did not go as planned."""

    weight: "QuantizedWeight"
    error: float  # tr(E H Eᵀ) of `weight` on the fitted rows
    stages: list[str] = field(default_factory=list)  # the stages whose result was accepted
    fallbacks: list[str] = field(default_factory=list)  # "<kind>: <reason>", for the merge report
    damp: float | None = None  # the damping the GPTQ pass ran with (None: it did not run)
    kernel: str = "torch"  # what ran the column loops: "triton" or "torch"


def _failure(exc: BaseException) -> str:
    """One line; no "; ", which separates a layer's fallbacks in the report."""
    text = str(exc).strip().splitlines()
    return (f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__).replace("; ", ", ")


def requantize_calibrated(qw: "QuantizedWeight", target: "torch.Tensor", hessian, *, damp: float = DAMP,
                          block_size: int = BLOCK, act_order: bool = True) -> CalibratedResult:
    """The default method's per-layer step: GPTQ pass, code polish, scale refit, code polish.

    Every stage after the first is accepted only if it lowers the output error, so the result is
    never worse than GPTQ's pass, and an exact fit (identity rotation) comes back unchanged. Nothing
    falls back silently: a Hessian that needs more damping, a GPTQ pass that cannot run (the codes
    then start from round-to-nearest) and a stage that fails (it is skipped) are listed in
    `fallbacks` (each "<kind>: <reason>", with no "; " inside).
    """
    import torch

    hess = _as_hessian(hessian)
    layer = _Layer(qw, target, hess)
    fallbacks: list[str] = []
    stages = ["gptq"]
    codes = used_damp = None
    for attempt in (damp, *[d for d in RETRY_DAMPS if d > damp]):
        try:
            perm, U = _gptq_factor(hess, attempt, act_order, layer.dtype)
            if attempt != damp:
                fallbacks.append(f"cholesky: the Hessian is not positive definite at damp {damp:g}, "
                                 f"so the GPTQ pass used damp {attempt:g}")
            codes = _gptq_pass(layer, perm, U, block_size)
            used_damp = attempt
        except SolverError as exc:
            last = exc
            continue
        except RuntimeError as exc:  # e.g. out of memory
            fallbacks.append(f"gptq failed ({_failure(exc)}), so the codes start from round-to-nearest")
        break
    else:
        fallbacks.append(f"cholesky: {last} (and at damp {', '.join(f'{d:g}' for d in RETRY_DAMPS if d > damp)}), "
                         "so the codes start from round-to-nearest")
    if codes is None:
        codes, stages = layer.rtn_codes_t(), ["rtn"]
    scales = layer.source_scales
    best_err = layer.error(codes, scales)

    polish = lambda c, s: (_refine(layer, c, s, sweeps=2, damp=damp, block_size=block_size), s)  # noqa: E731
    refit = lambda c, s: (c, _refit(layer, c, s, damp=damp))  # noqa: E731
    for name, stage in (("refine_codes", polish), ("refit_scales", refit), ("refine_codes", polish)):
        if float(best_err) == 0.0:  # exact already (identity rotation): nothing can improve it
            break
        try:
            cand_codes, cand_scales = stage(codes, scales)
            err = layer.error(cand_codes, cand_scales)
        except RuntimeError as exc:  # includes torch's LinAlgError and out-of-memory
            fallbacks.append(f"{name} failed ({_failure(exc)}), stage skipped")
            continue
        if not bool(torch.isfinite(err)):
            fallbacks.append(f"{name} failed (non-finite output error), stage skipped")
            continue
        if err < best_err * (1 - ACCEPT):
            codes, scales, best_err = cand_codes, cand_scales, err
            stages.append(name)
    from oftsurgery.merge.solve import kernels

    return CalibratedResult(layer.quantized(codes, scales), float(best_err), stages, fallbacks, used_damp,
                            "triton" if kernels.use_triton(layer.target_t) else "torch")
