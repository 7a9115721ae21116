"""Triton kernels for the serial part of the solver's column blocks (GPU only; optional).

Each kernel does a whole block of (at most 128) columns in one launch, operation for operation the
torch loop of requant.py (tests/test_solver.py compares them in Triton's interpreter on the CPU).
`OFTSURGERY_SOLVER_KERNELS` picks the implementation: `auto` (default: these kernels for CUDA tensors
when Triton is installed, else the torch loop), `torch`, or `triton` (an error if Triton is missing).
Why launches matter here: docs/merge-methods.md ("How the solver runs").
"""

from __future__ import annotations

import functools
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

ROWS_PER_PROGRAM = 32  # output rows per program: a 128×32 float32 tile is 32 registers per thread


def use_triton(tensor: "torch.Tensor") -> bool:
    """Whether the block loops on `tensor` run as Triton kernels (see the module docstring)."""
    choice = os.environ.get("OFTSURGERY_SOLVER_KERNELS", "auto")
    if choice == "torch":
        return False
    if choice == "triton":
        _kernels()  # raises if Triton is missing
        return True
    if choice != "auto":
        raise ValueError(f"OFTSURGERY_SOLVER_KERNELS must be auto, torch or triton, not {choice!r}")
    return tensor.is_cuda and _triton_installed()


@functools.lru_cache(maxsize=1)
def _triton_installed() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _magic(dtype) -> float:
    """x + M − M rounds x to the nearest integer, ties to even (IEEE addition), for |x| < M / 3.

    Used instead of libdevice's rint, which Triton's CPU interpreter lacks, so that the tested code
    is the code that runs. Larger |x| keep their sign, which is all the clamp to [0, maxq] needs."""
    import torch

    return 1.5 * 2.0**52 if dtype == torch.float64 else 1.5 * 2.0**23


@functools.lru_cache(maxsize=1)
def _kernels():
    from oftsurgery.merge.solve import triton_blocks  # imports Triton

    return triton_blocks.gptq_block, triton_blocks.refine_block


def _launch(kernel, first: "torch.Tensor", args: tuple, square: "torch.Tensor", maxq: float) -> None:
    import torch
    import triton

    n_cols, n_rows = first.shape
    rows = [t for t in args if t.dim() == 2 and t is not square]
    if any(t.shape != first.shape or t.stride() != first.stride() or t.dtype != first.dtype for t in rows) \
            or first.stride(1) != 1 or square.dtype != first.dtype:
        raise ValueError("the block kernels need [cols, out] tiles with one layout and dtype, rows contiguous")
    grid = (triton.cdiv(n_rows, ROWS_PER_PROGRAM),)
    kernel[grid](*args, n_cols, n_rows, first.stride(0), square.stride(0), square.stride(1), maxq, MAGIC=_magic(first.dtype), F64=first.dtype == torch.float64,
                 COLS=triton.next_power_of_2(n_cols), ROWS=ROWS_PER_PROGRAM)


def gptq_block(w, s, z, u, codes, errs, maxq: float) -> None:
    """The GPTQ pass over one block: w, s, z [cols, out] (w is read), u [cols, cols] the block of
    the inverse factor; writes codes and the scaled errors [cols, out]. All contiguous rows."""
    _launch(_kernels()[0], w, (w, s, z, u, codes, errs), u, maxq)


def refine_block(g, codes, s, neg_curv, h, delta, maxq: float) -> None:
    """The code polish over one block: g the block's gradient rows (read), codes updated in place,
    s and neg_curv [cols, out], h [cols, cols] the block of H; writes delta, the changes of Ŵᵀ."""
    _launch(_kernels()[1], g, (g, codes, s, neg_curv, h, delta), h, maxq)
