"""Requantizing one merged layer onto a quantization grid.

The trap (docs/merge-methods.md): the source weights sit exactly on their grid and a trained
rotation moves most of them by much less than half a step, so rounding W·Rᵀ back to the grid mostly
returns the old codes and silently erases the fine-tune. `requantize_rtn` is that plain rounding,
kept as the fast data-free mode. `requantize_compensated` minimises the layer's *output* error
‖(Ŵ − W·Rᵀ)X‖ on calibration inputs X instead: GPTQ-style, it quantizes one input column at a time
and pushes each column's rounding error onto the columns not yet quantized, weighted by the
inverse of the input Hessian H = Σ x xᵀ. The grid (scales, zeros, g_idx) is kept, so weights the
rotation did not move come back as the very same codes; an identity rotation is a no-op.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from oftsurgery.quant.grid import QuantizedWeight


def _with_codes(qw: "QuantizedWeight", codes: "torch.Tensor") -> "QuantizedWeight":
    from dataclasses import replace

    return replace(qw, codes=codes.to(qw.codes.dtype))


def requantize_rtn(qw: "QuantizedWeight", target: "torch.Tensor") -> "QuantizedWeight":
    """Round the target weight [out, in] to the nearest code on the source grid."""
    from oftsurgery.quant.grid import quantize_to_codes

    return _with_codes(qw, quantize_to_codes(target, qw.scales, qw.zeros, qw.g_idx, qw.bits))


def requantize_compensated(
    qw: "QuantizedWeight",
    target: "torch.Tensor",
    hessian: "torch.Tensor",
    *,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = True,
) -> "QuantizedWeight":
    """Error-compensating requantization of `target` on the source grid (see module docstring).

    `hessian` is Σ x xᵀ over calibration inputs of this layer, [in, in]. With `act_order` the columns
    are visited in order of decreasing Hessian diagonal (the grid and g_idx are unchanged; only the
    visiting order differs), which lets the most active inputs be quantized while the most
    compensation is still available.
    """
    import torch

    device = hessian.device  # runs where the Hessian lives (cuda with --device cuda)
    weight = target.to(device, torch.float32).clone()
    out_f, in_f = weight.shape
    g_idx = qw.g_idx.long().to(device)
    scales = qw.scales.to(device, torch.float32)[g_idx].T  # [out, in]
    zeros = qw.zeros.to(device, torch.float32)[g_idx].T
    maxq = float(2**qw.bits - 1)

    H = hessian.to(torch.float64).clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    H += torch.eye(in_f, dtype=H.dtype, device=device) * damp * torch.mean(torch.diag(H))
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(in_f, device=device)
    inv_perm = torch.argsort(perm)
    weight, scales, zeros = weight[:, perm], scales[:, perm], zeros[:, perm]
    H = H[perm][:, perm]
    try:
        L = torch.linalg.cholesky(H)
        Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True).to(torch.float32)
    except RuntimeError:  # not positive definite even after damping: fall back to plain rounding
        return requantize_rtn(qw, target)

    codes = torch.empty_like(weight)
    for start in range(0, in_f, block_size):
        end = min(start + block_size, in_f)
        w_blk = weight[:, start:end].clone()
        err_blk = torch.zeros_like(w_blk)
        hinv_blk = Hinv[start:end, start:end]
        for j in range(end - start):
            col = w_blk[:, j]
            s, z = scales[:, start + j], zeros[:, start + j]
            q = torch.clamp(torch.round(col / s) + z, 0, maxq)
            codes[:, start + j] = q
            err = (col - s * (q - z)) / hinv_blk[j, j]
            w_blk[:, j:] -= err.unsqueeze(1) * hinv_blk[j, j:].unsqueeze(0)
            err_blk[:, j] = err
        weight[:, end:] -= err_blk @ Hinv[start:end, end:]
    return _with_codes(qw, codes[:, inv_perm].round().to(torch.int32).cpu())


def output_error(weight: "torch.Tensor", target: "torch.Tensor", hessian: "torch.Tensor") -> float:
    """‖(weight − target) X‖² computed as tr(E H Eᵀ) with H = Σ x xᵀ."""
    import torch

    err = (weight.to(hessian.device) - target.to(hessian.device)).to(torch.float64)
    return float(torch.einsum("oi,ij,oj->", err, hessian.to(torch.float64), err))


def refine_codes(
    qw: "QuantizedWeight",
    target: "torch.Tensor",
    hessian: "torch.Tensor",
    *,
    sweeps: int = 2,
    damp: float = 0.01,
) -> "QuantizedWeight":
    """Coordinate descent on the integer codes, minimising ‖(Ŵ − target)X‖² exactly.

    The objective tr(E H Eᵀ) splits into independent rows, so one input column at a time we move
    every row's code to the integer that minimises the objective with all other codes fixed (a 1-D
    quadratic, solved by rounding its minimiser). Each step can only lower the objective, so this
    polishes whatever GPTQ's one greedy pass left; an exact fit (e.g. an identity rotation) is
    left untouched.
    """
    import torch

    device = hessian.device
    g_idx = qw.g_idx.long().to(device)
    scales = qw.scales.to(device, torch.float32)[g_idx].T  # [out, in]
    zeros = qw.zeros.to(device, torch.float32)[g_idx].T
    codes = qw.codes.to(device, torch.float32).clone()
    maxq = float(2**qw.bits - 1)
    H = hessian.to(device, torch.float32).clone()
    H += torch.eye(H.shape[0], device=device) * damp * torch.mean(torch.diag(H))
    err = scales * (codes - zeros) - target.to(device, torch.float32)  # E = Ŵ − target, [out, in]
    grad = err @ H  # (E H)[o, i]: half the gradient of the objective w.r.t. Ŵ[o, i]
    diag = torch.diag(H)
    for _ in range(sweeps):
        changed = 0
        for i in range(codes.shape[1]):
            s = scales[:, i]
            if diag[i] <= 0:
                continue
            # objective along column i: a·t² + 2·t·grad_i with t the change of Ŵ[:, i], a = H_ii
            step = torch.round(-grad[:, i] / (s * diag[i]))
            new = torch.clamp(codes[:, i] + step, 0, maxq)
            step = new - codes[:, i]
            moved = step != 0
            if not bool(moved.any()):
                continue
            changed += int(moved.sum())
            delta = s * step
            codes[:, i] = new
            err[:, i] += delta
            grad += delta.unsqueeze(1) * H[i].unsqueeze(0)
        if changed == 0:
            break
    return _with_codes(qw, codes.round().to(torch.int32).cpu())


def refit_scales(qw: "QuantizedWeight", target: "torch.Tensor", hessian: "torch.Tensor",
                 *, damp: float = 0.01) -> "QuantizedWeight":
    """Least-squares refit of the fp16 scales with codes and zeros fixed, on the output objective.

    Ŵ[o, i] = s[g(i), o]·(q[o, i] − z[g(i), o]) is linear in the scales, so for each output row the
    best scales solve a small G×G system (G = number of groups). The scales are continuous degrees
    of freedom the grid offers for free: using them costs nothing in size or format.
    """
    import torch
    from dataclasses import replace

    device = hessian.device
    g_idx = qw.g_idx.long().to(device)
    num_groups = qw.scales.shape[0]
    H = hessian.to(device, torch.float64).clone()
    H += torch.eye(H.shape[0], device=device, dtype=H.dtype) * damp * torch.mean(torch.diag(H))
    D = (qw.codes.to(device, torch.float64) - qw.zeros.to(device, torch.float64)[g_idx].T)  # [out, in]
    t = target.to(device, torch.float64)
    masks = [(g_idx == g) for g in range(num_groups)]
    P = [(D * m) @ H for m in masks]  # [out, in] each
    A = torch.stack([torch.stack([(P[g] * (D * masks[h])).sum(-1) for h in range(num_groups)], -1)
                     for g in range(num_groups)], -2)  # [out, G, G]
    b = torch.stack([(P[g] * t).sum(-1) for g in range(num_groups)], -1)  # [out, G]
    ridge = 1e-9 * A.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-30)
    A = A + torch.diag_embed(ridge.unsqueeze(-1).expand(-1, num_groups))
    try:
        solved = torch.linalg.solve(A, b.unsqueeze(-1)).squeeze(-1)  # [out, G]
    except RuntimeError:
        return qw
    scales = solved.T.to(torch.float16)
    bad = ~torch.isfinite(scales) | (scales <= 0)
    scales = torch.where(bad, qw.scales.to(device), scales).cpu()
    return replace(qw, scales=scales.contiguous())


def requantize_calibrated(qw: "QuantizedWeight", target: "torch.Tensor", hessian: "torch.Tensor") -> "QuantizedWeight":
    """The default method's per-layer step: GPTQ pass, code polish, scale refit, code polish.

    Every stage after the first is accepted only if it lowers the output error, so the result is
    never worse than GPTQ's pass, and an exact fit (identity rotation) comes back unchanged.
    """
    best = requantize_compensated(qw, target, hessian)
    best_err = output_error(best.dequantize(), target, hessian)
    for stage in (lambda q: refine_codes(q, target, hessian),
                  lambda q: refit_scales(q, target, hessian),
                  lambda q: refine_codes(q, target, hessian)):
        if best_err == 0.0:
            break
        candidate = stage(best)
        err = output_error(candidate.dequantize(), target, hessian)
        if err < best_err * (1 - 1e-6):
            best, best_err = candidate, err
    return best
