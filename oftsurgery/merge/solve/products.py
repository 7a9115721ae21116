"""Float32 matrix products on a GPU's tensor cores, kept as accurate as float32's own.

A GPU like the H100 multiplies float32 matrices several times faster in TF32 (on its tensor cores)
than in float32, but TF32 reads only 10 of each input's 23 mantissa bits, and that costs the merge
fidelity (docs/performance.md: −0.7 points of retention with every solver product in TF32). Two
facts give the speed without the loss; every product the calibrated merge runs in float32 on a GPU
goes through one of them:

- **exact** (`exact=True`): the inputs hold no more bits than TF32 keeps. Calibration activations
  computed in float16 or bfloat16 do (10 and 7 mantissa bits, exponents within float32's), so
  H = Σ xxᵀ over them is one TF32 product of the very same values, summed in float32 as before.
- **split** (the rest): x = hi + lo, hi being x with its low 13 mantissa bits cleared (a TF32 value)
  and lo the remainder (exact in float32, at most 2⁻¹⁰·|x|), and a·b = a_hi·b_hi + a_lo·b_hi +
  a_hi·b_lo + a_lo·b_lo with the last term (≤ 2⁻²⁰ relative) dropped: three TF32 products whose
  error per term, ~2⁻²⁰, is below what float32 summation over the thousands of terms of a layer's
  products adds anyway (tests/test_products.py measures both against float64). Where the inner
  dimension is small (the solver's 128-column block updates, which are limited by reading and
  writing the [in, out] result) the three are one product over the inner dimension stacked three
  times, so the result is read and written once.

`OFTSURGERY_SOLVER_PRODUCTS` chooses: `auto` (default: as above on CUDA tensors, plain float32
elsewhere, so CPU merges are unchanged), `float32` (plain float32 products everywhere: the GPU's
old numerics), or `split` (the GPU's way on any device; on a CPU the products are float32, so this
only shows the algebra, and with `oftsurgery.testing.tf32` the GPU's rounding). torch's TF32 switch
is process-wide: it is on only for the duration of each product here, on the calling thread's
watch; the merge's other threads run no float32 products.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

_LOW_BITS = 0x1FFF  # float32 mantissa bits TF32 does not keep (23 − 10)
STACK_BELOW = 1024  # inner dimensions below this run the three split products as one stacked product
CHUNK_ELEMENTS = 1 << 25  # rows of `a` split at a time in `mm` (two float32 copies of 128 MB at most)


def mode(tensor: "torch.Tensor") -> str:
    """How float32 products on `tensor` run here: "tf32" (exact or split) or "plain" (as torch does)."""
    choice = os.environ.get("OFTSURGERY_SOLVER_PRODUCTS", "auto")
    if choice not in ("auto", "float32", "split"):
        raise ValueError(f"OFTSURGERY_SOLVER_PRODUCTS must be auto, float32 or split, not {choice!r}")
    import torch

    if tensor.dtype != torch.float32 or choice == "float32":
        return "plain"
    return "tf32" if choice == "split" or tensor.is_cuda else "plain"


@contextmanager
def _tf32():
    import torch

    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    matmul.fp32_precision = "tf32"
    try:
        yield
    finally:
        matmul.fp32_precision = before


def split(x: "torch.Tensor") -> "tuple[torch.Tensor, torch.Tensor]":
    """(hi, lo) with hi + lo == x exactly: hi holds x's TF32 bits (its low 13 mantissa bits cleared)."""
    import torch

    hi = (x.contiguous().view(torch.int32) & ~_LOW_BITS).view(torch.float32)
    return hi, x - hi


def _stacked(a: "torch.Tensor", b: "torch.Tensor") -> "tuple[torch.Tensor, torch.Tensor]":
    """[a_hi | a_lo | a_hi] and [b_hi; b_hi; b_lo]: one product over them is the three split ones."""
    import torch

    k = a.shape[1]
    a3 = torch.empty(a.shape[0], 3 * k, dtype=a.dtype, device=a.device)
    a3[:, :k], a3[:, k:2 * k] = split(a)
    a3[:, 2 * k:] = a3[:, :k]
    b3 = torch.empty(3 * k, b.shape[1], dtype=b.dtype, device=b.device)
    b3[:k], b3[2 * k:] = split(b)
    b3[k:2 * k] = b3[:k]
    return a3, b3


def addmm_(out: "torch.Tensor", a: "torch.Tensor", b: "torch.Tensor", *, alpha: float = 1.0,
           exact: bool = False) -> "torch.Tensor":
    """out += alpha · a @ b, in place (float32), by TF32 products where `mode` says so.

    `exact`: the caller vouches that a and b hold TF32 values (e.g. converted from float16/bfloat16),
    so one TF32 product gives float32's result."""
    if mode(out) == "plain":
        return out.addmm_(a, b, alpha=alpha)
    if exact:
        with _tf32():
            return out.addmm_(a, b, alpha=alpha)
    if a.shape[1] < STACK_BELOW:
        a3, b3 = _stacked(a, b)
        with _tf32():
            return out.addmm_(a3, b3, alpha=alpha)
    return _three_products(out, a, b, alpha=alpha)


def mm(a: "torch.Tensor", b: "torch.Tensor") -> "torch.Tensor":
    """a @ b (float32), by TF32 products where `mode` says so; `a` is split a block of rows at a time,
    so its two copies stay within 2 · CHUNK_ELEMENTS floats."""
    import torch

    if mode(a) == "plain":
        return a @ b
    return _three_products(torch.zeros(a.shape[0], b.shape[1], dtype=a.dtype, device=a.device), a, b, alpha=1.0)


def _three_products(out: "torch.Tensor", a: "torch.Tensor", b: "torch.Tensor", *, alpha: float) -> "torch.Tensor":
    """out += alpha · (a_hi·b_hi + a_lo·b_hi + a_hi·b_lo), `a` split a block of rows at a time (its two
    copies within 2 · CHUNK_ELEMENTS floats)."""
    b_hi, b_lo = split(b)
    step = max(1, CHUNK_ELEMENTS // max(1, a.shape[1]))
    with _tf32():
        for r0 in range(0, a.shape[0], step):
            a_hi, a_lo = split(a[r0:r0 + step])
            rows = out[r0:r0 + step]
            rows.addmm_(a_hi, b_hi, alpha=alpha)
            rows.addmm_(a_lo, b_hi, alpha=alpha)
            rows.addmm_(a_hi, b_lo, alpha=alpha)
    return out
