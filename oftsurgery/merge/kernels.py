"""The column-serial inner loops of the requantization solvers, fused on CUDA.

Both solvers that requantize a layer on its source grid walk the input columns of a block in order,
and every output row is independent of the others:

- the GPTQ pass (`gptq_block`) rounds column j, then pushes its rounding error onto the block's later
  columns through the inverse Hessian's Cholesky factor;
- the coordinate-descent polish (`descent_block`) moves column j's codes to the integer minimiser of the
  output error given the others, then updates the block's later gradient columns through the Hessian.

Written as torch operations these loops launch ~8 tiny kernels per column, which on a GPU is launch-bound
(a 7B decoder layer has 35,584 input columns across its seven linears). On CUDA one Triton program
instead takes a tile of output rows, keeps the block in registers and walks its columns: one launch per
block of up to 128 columns. Elsewhere (and when Triton is missing or `OFTSURGERY_TRITON=0`) the same
loop runs in torch; `tests/test_kernels.py` checks the two against each other through Triton's
interpreter.

Rounding is half-to-even in both paths, and the Triton path divides with IEEE rounding (`div_rn`), so
they agree except where fused multiply-adds change the last bit of an update.
"""

from __future__ import annotations

import os
from functools import lru_cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

MAX_BLOCK = 128  # columns per fused block: the Triton path keeps a [rows, 128] tile in registers
_ROWS = 16  # output rows per Triton program


# ------------------------------------------------------------------------------------------------
# torch: the reference, and the path on CPUs
# ------------------------------------------------------------------------------------------------

def gptq_block_torch(weight: "torch.Tensor", hinv: "torch.Tensor", scales: "torch.Tensor",
                     zeros: "torch.Tensor", maxq: float) -> tuple["torch.Tensor", "torch.Tensor"]:
    """GPTQ's in-block loop. `weight` [out, B] (modified in place), `hinv` [B, B] the block of the upper
    Cholesky factor of H⁻¹, `scales`/`zeros` [out, B]. Returns (codes, err) [out, B], err already divided
    by the factor's diagonal, ready for the caller's `err @ hinv[block, later]` update."""
    import torch

    codes = torch.empty_like(weight)
    err = torch.empty_like(weight)
    for j in range(weight.shape[1]):
        col = weight[:, j]
        q = torch.clamp(torch.round(col / scales[:, j]) + zeros[:, j], 0, maxq)
        codes[:, j] = q
        e = (col - scales[:, j] * (q - zeros[:, j])) / hinv[j, j]
        weight[:, j + 1 :] -= e.unsqueeze(1) * hinv[j, j + 1 :].unsqueeze(0)
        err[:, j] = e
    return codes, err


def descent_block_torch(grad: "torch.Tensor", hessian: "torch.Tensor", scales: "torch.Tensor",
                        codes: "torch.Tensor", maxq: float) -> tuple["torch.Tensor", "torch.Tensor"]:
    """One coordinate-descent sweep over a block. `grad` [out, B] holds (E·H) for the block's columns
    (modified in place), `hessian` [B, B] the block of H, `codes` [out, B] the current codes. Column j's
    codes move to round(−grad/(s·H_jj)) steps away, clamped to the grid. Returns (new codes, delta) with
    delta = s·(new − old), the change of the dequantized weight, for the caller's `delta @ H[block, :]`."""
    import torch

    new_codes = codes.clone()
    delta = torch.zeros_like(grad)
    for j in range(grad.shape[1]):
        s = scales[:, j]
        q = torch.clamp(codes[:, j] + torch.round(-grad[:, j] / (s * hessian[j, j])), 0, maxq)
        d = s * (q - codes[:, j])
        new_codes[:, j] = q
        delta[:, j] = d
        grad[:, j + 1 :] += d.unsqueeze(1) * hessian[j, j + 1 :].unsqueeze(0)
    return new_codes, delta


# ------------------------------------------------------------------------------------------------
# Triton
# ------------------------------------------------------------------------------------------------

@lru_cache(maxsize=1)
def _triton_kernel():
    """The Triton kernel (compiled on first launch), or None where Triton is not importable."""
    try:
        from oftsurgery.merge._serial_triton import serial_block
    except ImportError:
        return None
    return serial_block


def _use_triton(tensor: "torch.Tensor") -> bool:
    flag = os.environ.get("OFTSURGERY_TRITON", "1")
    if flag == "0":
        return False
    interpreting = os.environ.get("TRITON_INTERPRET") == "1"  # tests run the kernel on CPU tensors
    return (tensor.is_cuda or interpreting) and _triton_kernel() is not None


def _launch(descent: bool, x, v, s, z, c, maxq):
    import torch

    out_f, n = x.shape
    if n > MAX_BLOCK:
        raise ValueError(f"a fused block holds at most {MAX_BLOCK} columns, got {n}")
    x, s = x.contiguous(), s.contiguous()
    z = x if z is None else z.contiguous()  # unused operand in descent mode
    c = x if c is None else c.contiguous()  # unused operand in GPTQ mode
    v = v.contiguous()
    q, r = torch.empty_like(x), torch.empty_like(x)
    kernel = _triton_kernel()
    grid = (-(-out_f // _ROWS),)
    kernel[grid](x, v, s, z, c, q, r, out_f, n, x.stride(0), v.stride(0), float(maxq),
                 DESCENT=descent, ROWS=_ROWS, BLOCK=MAX_BLOCK)
    return q, r


def gptq_block(weight, hinv, scales, zeros, maxq):
    """`gptq_block_torch`, fused into one Triton launch on CUDA (`weight` is not modified there)."""
    if _use_triton(weight):
        return _launch(False, weight, hinv, scales, zeros, None, maxq)
    return gptq_block_torch(weight, hinv, scales, zeros, maxq)


def descent_block(grad, hessian, scales, codes, maxq):
    """`descent_block_torch`, fused into one Triton launch on CUDA (`grad` is not modified there)."""
    if _use_triton(grad):
        return _launch(True, grad, hessian, scales, None, codes, maxq)
    return descent_block_torch(grad, hessian, scales, codes, maxq)
