"""Requantizing one merged layer onto its source grid: round-to-nearest, or the calibrated solve.

`requantize_rtn` rounds W·Rᵀ to the nearest code. `requantize_calibrated` minimises the layer's output
error tr(E H Eᵀ) (E = Ŵ − W·Rᵀ) with the grid kept, chaining `requantize_compensated` (GPTQ's pass),
`refine_codes`, `refit_scales` and `refine_codes` again, each later stage kept only if it lowers the
error. Everything runs on the Hessian's device, weights held transposed ([in, out]); the float32 matrix
products go through `products.py` (TF32 tensor cores on a GPU, at float32's accuracy). Why, and how the
stages are blocked and which precision each uses: docs/merge-methods.md ("How the solver runs").
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from oftsurgery.merge.report import PHASES
from oftsurgery.merge.solve.refit import _refit, _refit_solution  # noqa: F401 (the stage, and for the tests)

if TYPE_CHECKING:
    import torch

    from oftsurgery.merge.solve.hessian import InputHessian
    from oftsurgery.quant.grid import QuantizedWeight

DAMP = 0.01  # Tikhonov damping of H: DAMP · mean(diag H), as in GPTQ
RETRY_DAMPS = (0.1, 1.0)  # larger dampings tried, in order, when H + DAMP·… is not positive definite
BLOCK = 128  # columns per lazy-batch block
ACCEPT = 1e-6  # a later stage must lower the output error by more than this relative amount
REFINE_SWEEPS = (2, 1)  # sweeps of the code polish before and after the scale refit (docs/merge-methods.md)


class SolverError(RuntimeError):
    """A solver stage could not run on this layer (its message is the reason, for the merge report)."""


# ------------------------------------------------------------------------------------------------
# the problem on the device
# ------------------------------------------------------------------------------------------------

def _as_hessian(hessian) -> "InputHessian":
    from oftsurgery.merge.solve.hessian import InputHessian

    return hessian if isinstance(hessian, InputHessian) else InputHessian.from_matrix(hessian)


class _Layer:
    """The linears that read one input, as one problem on the solver's device: weights transposed
    ([in, out]), the linears' output rows side by side (`parts`: each one's columns); grids as given.

    Every stage treats output rows independently given H, so each part comes out as its linear
    solved alone (bit for bit on the CPU; tests/test_solver.py), with fewer, wider kernels."""

    def __init__(self, qw: "QuantizedWeight", target: "torch.Tensor", hessian: "InputHessian"):
        self._build([qw], [target], hessian)

    @classmethod
    def joint(cls, qws: "list[QuantizedWeight]", targets: "list[torch.Tensor]", hessian: "InputHessian") -> "_Layer":
        """Linears on one grid layout (`_same_layout`) solved as one problem."""
        layer = cls.__new__(cls)
        layer._build(list(qws), list(targets), hessian)
        return layer

    def _build(self, qws: "list[QuantizedWeight]", targets: "list[torch.Tensor]", hessian: "InputHessian") -> None:
        import torch

        def side_by_side(columns: "list[torch.Tensor]") -> "torch.Tensor":  # [in, out_k] each -> [in, Σ out_k]
            return columns[0].contiguous() if len(columns) == 1 else torch.cat(columns, dim=1)

        qw = self.qw = qws[0]
        self.qws, self.hessian = qws, hessian
        dev = self.device = hessian.device
        self.dtype = hessian.dtype if hessian.dtype in (torch.float32, torch.float64) else torch.float32
        self.maxq, self.num_groups = float(qw.maxq), qw.num_groups
        self.g_idx = qw.g_idx.to(dev).long()
        ends = [sum(q.out_features for q in qws[: k + 1]) for k in range(len(qws))]
        self.parts = [slice(end - q.out_features, end) for q, end in zip(qws, ends)]
        self.target_t = side_by_side([t.to(dev, self.dtype).T for t in targets])
        self.zeros = side_by_side([q.zeros.to(dev) for q in qws])  # [G, out]; zeros_t expands it when asked
        self.source_scales = side_by_side([q.scales.to(dev) for q in qws])

    # [in, out] expansions of the grid, made when a stage needs them and not kept (each is out·in·4 bytes)
    @property
    def zeros_t(self) -> "torch.Tensor":
        return self.zeros[self.g_idx].to(self.dtype)

    @property
    def source_codes_t(self) -> "torch.Tensor":
        import torch

        codes = [q.codes.to(self.device).T for q in self.qws]  # [in, out], rows contiguous
        return (codes[0].contiguous() if len(codes) == 1 else torch.cat(codes, dim=1)).to(self.dtype)

    def part(self, k: int) -> "_Layer":
        """Part `k` as a problem of its own (the same values, its own tensors)."""
        sl = self.parts[k]
        return _Layer(self.qws[k], self.target_t[:, sl].T, self.hessian)

    def scales_t(self, scales: "torch.Tensor", dtype=None) -> "torch.Tensor":
        return scales[self.g_idx].to(dtype or self.dtype)

    def errors(self, codes_t: "torch.Tensor", scales: "torch.Tensor", parts: "list[int] | None" = None) -> list:
        """tr(E H Eᵀ) of a candidate for each part (default: all), float64 0-dim on the device.

        s·(q − z) is exact in float32 (an fp16 scale times an integer below 2⁸), so only the
        difference to the target needs float64. Where the products run in TF32 (a GPU,
        `products.mode`) and X is kept, E stays float32 (rounded once, 2⁻²⁴ relative) and ‖X·E‖² comes
        from split TF32 products (`InputHessian.error_split`). Each part's E is its own contiguous [in, out_k] tensor, as when
        its linear is solved alone."""
        import torch

        from oftsurgery.merge.solve import products

        # from X only: from H the difference stays exact in float64, as everywhere else
        split = self.dtype == torch.float32 and products.mode(self.target_t) == "tf32" and self.hessian.rows is not None
        found = []
        for k in range(len(self.parts)) if parts is None else parts:
            sl = self.parts[k]
            zeros = self.zeros[:, sl][self.g_idx].float()
            weight = self.scales_t(scales[:, sl], torch.float32) * (codes_t[:, sl].float() - zeros)
            del zeros
            if split:
                found.append(self.hessian.error_split(weight.sub_(self.target_t[:, sl]).contiguous()))
                continue
            err = weight.double().sub_(self.target_t[:, sl].to(torch.float64))
            found.append(self.hessian.error(err.contiguous()))
        return found

    def rtn_codes_t(self) -> "torch.Tensor":
        import torch

        s = self.scales_t(self.source_scales)
        return torch.clamp_(torch.round(self.target_t / s).add_(self.zeros_t), 0, self.maxq)

    def quantized(self, codes_t: "torch.Tensor", scales: "torch.Tensor") -> "list[QuantizedWeight]":
        """Each part's candidate as a `QuantizedWeight` on its source's grid and device."""
        import torch

        # uint8 in the input-major layout the unpackers give and the packers read (codes.T contiguous):
        # a quarter of int32's memory and no transposed copy
        return [replace(q, codes=codes_t[:, sl].to(torch.uint8).contiguous().to(q.codes.device).T,
                        scales=scales[:, sl].to(q.scales.device).contiguous()) for q, sl in zip(self.qws, self.parts)]


def _same_layout(qws: "list[QuantizedWeight]") -> "list[list[int]]":
    """The linears (indices) that can be solved as one problem: equal bits, groups and g_idx."""
    import torch

    together: list[list[int]] = []
    for i, qw in enumerate(qws):
        for members in together:
            first = qws[members[0]]
            if (qw.bits, qw.num_groups) == (first.bits, first.num_groups) and torch.equal(qw.g_idx, first.g_idx):
                members.append(i)
                break
        else:
            together.append([i])
    return together


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
    """(visiting order, upper Cholesky factor U of (H + λI)⁻¹ in that order), once per input
    (`factor.inverse_factor`). A failure is cached too, so q, k and v do not each retry a
    factorisation that cannot succeed."""
    from oftsurgery.merge.solve.factor import inverse_factor

    key = ("gptq", damp, act_order, dtype)
    if key not in hessian.cache:
        found = inverse_factor(hessian.matrix, damp, act_order, dtype)
        hessian.cache[key] = SolverError(f"the {found} at damp {damp:g}") if isinstance(found, str) else found
    factor = hessian.cache[key]
    if isinstance(factor, SolverError):
        raise factor
    return factor


def _gptq_pass(layer: _Layer, perm: "torch.Tensor", U: "torch.Tensor", block_size: int) -> "torch.Tensor":
    """Codes [in, out] (in the layer's dtype) from GPTQ's lazy-batch pass in the order `perm`."""
    import torch

    from oftsurgery.merge.solve import kernels, products

    w = layer.target_t[perm]  # a copy, rows in visiting order; updated with the compensations
    groups = layer.g_idx[perm]  # each visited column's group: its scales and zeros, a block at a time
    codes = torch.empty_like(w)
    n, maxq = w.shape[0], layer.maxq
    fused = kernels.use_triton(w)
    for b0 in range(0, n, block_size):
        b1 = min(b0 + block_size, n)
        sb = layer.source_scales[groups[b0:b1]].to(layer.dtype)
        zb = layer.zeros[groups[b0:b1]].to(layer.dtype)
        wb, qb, ub = w[b0:b1], codes[b0:b1], U[b0:b1, b0:b1]
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
        if b1 < n:  # the rest of the matrix, once per block
            products.addmm_(w[b1:], U[b0:b1, b1:].T, errb, alpha=-1)
    return codes[torch.argsort(perm)]


def requantize_compensated(qw: "QuantizedWeight", target: "torch.Tensor", hessian, *, damp: float = DAMP,
                           block_size: int = BLOCK, act_order: bool = True) -> "QuantizedWeight":
    """GPTQ's error-compensating pass of `target` on the source grid (see module docstring).

    `hessian` is H [in, in] (a tensor or an `InputHessian`). With `act_order` the columns are visited
    in order of decreasing Hessian diagonal (the grid and g_idx are unchanged; only the visiting order
    differs). Raises `SolverError` when H + λI is not positive definite at this `damp`.
    """
    hess = _as_hessian(hessian)
    layer = _Layer(qw, target, hess)
    perm, U = _gptq_factor(hess, damp, act_order, layer.dtype)
    return layer.quantized(_gptq_pass(layer, perm, U, block_size), layer.source_scales)[0]


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

    from oftsurgery.merge.solve import kernels, products

    dt = layer.dtype
    H = layer.hessian.matrix_as(dt)
    lam = layer.hessian.damping(damp).to(dt)
    s = layer.scales_t(scales)
    codes = codes_t.to(dt, memory_format=torch.contiguous_format, copy=True)
    err = s * (codes - layer.zeros_t) - layer.target_t  # Eᵀ
    del s  # [in, out]: the loop takes each block's rows of s and of the curvature as it goes
    grad = products.mm(H, err).add_(err * lam)  # ((H + λI) Eᵀ)[i, o]: half the objective's gradient in Ŵ[o, i]
    del err
    diag = H.diagonal() + lam
    # minimiser of the 1-D quadratic along one code: step = round(−grad / (s · diag)); an input with
    # zero curvature (H = 0, no damping) gets a denominator of −inf, i.e. no step
    neg_diag = torch.where(diag > 0, -diag, torch.full_like(diag, -torch.inf)).unsqueeze(1)
    n, maxq = codes.shape[0], layer.maxq
    fused = kernels.use_triton(codes)
    for sweep in range(sweeps):
        last = sweep == sweeps - 1  # then the rows already visited need no more updates
        moved = torch.zeros((), dtype=torch.long, device=codes.device)
        for b0 in range(0, n, block_size):
            b1 = min(b0 + block_size, n)
            gb = grad[b0:b1].clone()  # the block's gradient rows, kept current within the block
            sb = scales[layer.g_idx[b0:b1]].to(dt)
            cb, nb, hb = codes[b0:b1], neg_diag[b0:b1] * sb, H[b0:b1, b0:b1]
            delta = torch.zeros_like(gb)  # changes of Ŵᵀ in this block
            if fused:  # the same loop as one GPU kernel per block (kernels.py)
                kernels.refine_block(gb, cb, sb, nb, hb, delta, maxq)
            for j in range(0 if fused else b1 - b0):
                new = torch.clamp_(cb[j] + torch.round(gb[j] / nb[j]), 0, maxq)
                d = delta[j]
                torch.mul(new - cb[j], sb[j], out=d)
                cb[j] = new
                gb[j + 1:].addr_(hb[j, j + 1:], d)  # later columns see this change (off-diagonal H)
            rows = slice(b1 if last else 0, n)  # every row (the later ones in the last sweep) sees the
            products.addmm_(grad[rows], H[rows, b0:b1], delta)  # block's changes, once per block
            if not last:
                grad[b0:b1].add_(delta * lam)
            moved += torch.count_nonzero(delta)
        if int(moved) == 0:  # converged: one host synchronisation per sweep
            break
    return codes


def refine_codes(qw: "QuantizedWeight", target: "torch.Tensor", hessian, *, sweeps: int = 2, damp: float = DAMP,
                 block_size: int = BLOCK) -> "QuantizedWeight":
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
    return layer.quantized(codes, layer.source_scales)[0]


# ------------------------------------------------------------------------------------------------
# 3. least-squares refit of the scales (solve/refit.py)
# ------------------------------------------------------------------------------------------------

def refit_scales(qw: "QuantizedWeight", target: "torch.Tensor", hessian, *, damp: float = DAMP) -> "QuantizedWeight":
    """Least-squares refit of the fp16 scales with codes and zeros fixed, on the output objective.

    Ŵ[o, i] = s[g(i), o]·(q[o, i] − z[g(i), o]) is linear in the scales, so for each output row the
    best scales solve a small G×G system (G = number of groups). The scales are continuous degrees
    of freedom the grid offers for free: using them costs nothing in size or format.
    """
    hess = _as_hessian(hessian)
    layer = _Layer(qw, target, hess)
    return layer.quantized(layer.source_codes_t, _refit(layer, layer.source_codes_t, layer.source_scales, damp=damp))[0]


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
    seconds: float = 0.0  # its share of a joint solve's time, by output rows (0: solved alone, timed by the caller)


def _failure(exc: BaseException) -> str:
    """One line; no "; ", which separates a layer's fallbacks in the report."""
    text = str(exc).strip().splitlines()
    return (f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__).replace("; ", ", ")


class _Apart(Exception):
    """A joint solve hit an error of its own (e.g. out of memory): solve each linear alone instead."""


def requantize_calibrated(qw: "QuantizedWeight", target: "torch.Tensor", hessian, *, damp: float = DAMP,
                          block_size: int = BLOCK, act_order: bool = True) -> CalibratedResult:
    """The default method's per-layer step: GPTQ pass, code polish, scale refit, code polish.

    Every stage after the first is accepted only if it lowers the output error, so the result is
    never worse than GPTQ's pass, and an exact fit (identity rotation) comes back unchanged. Nothing
    falls back silently: a Hessian that needs more damping, a GPTQ pass that cannot run (the codes
    then start from round-to-nearest) and a stage that fails (it is skipped) are listed in
    `fallbacks` (each "<kind>: <reason>", with no "; " inside).
    """
    return requantize_calibrated_group([qw], [target], hessian, damp=damp, block_size=block_size,
                                       act_order=act_order)[0]


def requantize_calibrated_group(qws: "list[QuantizedWeight]", targets: "list[torch.Tensor]", hessian, *,
                                damp: float = DAMP, block_size: int = BLOCK, act_order: bool = True,
                                ) -> list[CalibratedResult]:
    """`requantize_calibrated` of linears that read one input (q/k/v, gate/up), as one problem.

    Linears on one grid layout are solved together: their output rows side by side, each stage run
    once for all of them, and each stage accepted or not per linear on its own error, so every
    result is the one solving it alone gives. Should the joint problem fail where one linear alone
    might not (out of memory), they are solved one by one.
    """
    hess = _as_hessian(hessian)
    results: list[CalibratedResult | None] = [None] * len(qws)
    for members in _same_layout(qws):
        layer = _Layer.joint([qws[i] for i in members], [targets[i] for i in members], hess)
        try:
            solved = _solve(layer, damp, block_size, act_order)
        except _Apart:
            solved = [_solve(layer.part(k), damp, block_size, act_order)[0] for k in range(len(members))]
        del layer
        for i, result in zip(members, solved):
            results[i] = result
    return results


def _solve(layer: _Layer, damp: float, block_size: int, act_order: bool) -> list[CalibratedResult]:
    import torch

    from oftsurgery.merge.solve import kernels

    hess, joint = layer.hessian, len(layer.parts) > 1
    shared: list[str] = []  # what happened to the GPTQ pass: the same for every part
    codes = used_damp = None
    for attempt in (damp, *[d for d in RETRY_DAMPS if d > damp]):
        try:
            with PHASES.phase("solve/gptq"):  # the factor (once per input: InputHessian caches it) and the pass
                perm, U = _gptq_factor(hess, attempt, act_order, layer.dtype)
                if attempt != damp:
                    shared.append(f"cholesky: the Hessian is not positive definite at damp {damp:g}, "
                                  f"so the GPTQ pass used damp {attempt:g}")
                codes = _gptq_pass(layer, perm, U, block_size)
            used_damp = attempt
        except SolverError as exc:
            last = exc
            continue
        except RuntimeError as exc:  # e.g. out of memory
            if joint:
                raise _Apart from exc
            shared.append(f"gptq failed ({_failure(exc)}), so the codes start from round-to-nearest")
        break
    else:
        shared.append(f"cholesky: {last} (and at damp {', '.join(f'{d:g}' for d in RETRY_DAMPS if d > damp)}), "
                      "so the codes start from round-to-nearest")
    if used_damp is not None:  # the factor (in² · 4 bytes) is not needed by the later stages: free it now
        hess.cache.pop(("gptq", used_damp, act_order, layer.dtype), None)
        perm = U = None
    parts = range(len(layer.parts))
    stages = [["gptq"] if codes is not None else ["rtn"] for _ in parts]
    fallbacks = [list(shared) for _ in parts]
    if codes is None:
        codes = layer.rtn_codes_t()
    scales = layer.source_scales
    with PHASES.phase("solve/errors"):
        best = layer.errors(codes, scales)

    polish = lambda n: lambda c, s: (_refine(layer, c, s, sweeps=n, damp=damp, block_size=block_size), s)  # noqa: E731
    refit = lambda c, s: (c, _refit(layer, c, s, damp=damp))  # noqa: E731
    chain = (("refine_codes", polish(REFINE_SWEEPS[0])), ("refit_scales", refit), ("refine_codes", polish(REFINE_SWEEPS[1])))
    for step, (name, stage) in enumerate(chain):
        # a part exact already (identity rotation) is done: nothing can improve it
        active = [k for k in parts if float(best[k]) != 0.0]
        if not active:
            break
        try:
            with PHASES.phase(f"solve/{name}{' again' if step == 2 else ''}"):  # the stage and its error
                cand_codes, cand_scales = stage(codes, scales)
                errors = layer.errors(cand_codes, cand_scales, active)
        except RuntimeError as exc:  # includes torch's LinAlgError and out-of-memory
            if joint:
                raise _Apart from exc
            fallbacks[0].append(f"{name} failed ({_failure(exc)}), stage skipped")
            continue
        better = []
        for k, err in zip(active, errors):
            if not bool(torch.isfinite(err)):
                fallbacks[k].append(f"{name} failed (non-finite output error), stage skipped")
            elif err < best[k] * (1 - ACCEPT):
                better.append(k)
                best[k] = err
                stages[k].append(name)
        if len(better) == len(layer.parts):
            codes, scales = cand_codes, cand_scales
        elif better:  # the accepted parts' columns only
            codes, scales = codes.clone(), scales.clone()
            for k in better:
                codes[:, layer.parts[k]] = cand_codes[:, layer.parts[k]]
                scales[:, layer.parts[k]] = cand_scales[:, layer.parts[k]]
        cand_codes = cand_scales = None  # a rejected candidate is not kept through the next stage
    kernel = "triton" if kernels.use_triton(layer.target_t) else "torch"
    return [CalibratedResult(weight, float(best[k]), stages[k], fallbacks[k], used_damp, kernel)
            for k, weight in zip(parts, layer.quantized(codes, scales))]
