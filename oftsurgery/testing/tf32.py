"""TF32 matrix products emulated on the CPU: what a solver stage would lose in fidelity with TF32 on.

On an H100 a float32 matrix product runs several times faster with TF32 (`torch.backends.cuda.matmul.
allow_tf32`): its inputs keep float32's exponent but only 10 of its 23 mantissa bits, and the sums stay
float32. The merge runs with TF32 off (as GPTQModel does). Before turning it on for a stage, measure
what it costs: `EmulatedTF32(prefixes)` is a torch dispatch mode that rounds the float32 inputs of
every matrix product (mm, addmm, bmm, baddbmm, addbmm, in place or not) to TF32 — to nearest, ties away from zero, as
the GPU's conversion does — while the thread is in a merge phase (`PHASES.current()`, the names of
merge_report.json's `phase_seconds`) that starts with one of `prefixes`; elsewhere it changes nothing.
`counts` says how many products it rounded per phase. bench/tf32_fidelity.py uses it.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from oftsurgery.merge.report import PHASES

_aten = torch.ops.aten
# the products TF32 applies to, and which of their arguments are the multiplied matrices
# (matrix-vector and rank-1 products are not tensor-core work: TF32 leaves them, and float64, alone)
_OPERANDS = {
    **{op: (0, 1) for op in (_aten.mm.default, _aten.mm.out, _aten.bmm.default, _aten.bmm.out)},
    **{op: (1, 2) for op in (_aten.addmm.default, _aten.addmm.out, _aten.addmm_.default, _aten.baddbmm.default,
                             _aten.baddbmm.out, _aten.baddbmm_.default, _aten.addbmm.default, _aten.addbmm_.default)},
}
_DROPPED = 13  # float32 mantissa bits TF32 does not keep (23 - 10)


def round_to_tf32(x: torch.Tensor) -> torch.Tensor:
    """x (float32) rounded to the nearest TF32 value, ties away from zero; inf and nan pass through."""
    bits = x.contiguous().view(torch.int32)
    rounded = ((bits + (1 << (_DROPPED - 1))) & ~((1 << _DROPPED) - 1)).view(torch.float32)
    return torch.where(torch.isfinite(x), rounded, x)


class EmulatedTF32(TorchDispatchMode):
    """Rounds matrix-product inputs to TF32 inside the named merge phases (see the module docstring)."""

    def __init__(self, prefixes: tuple[str, ...]):
        super().__init__()
        self.prefixes = tuple(prefixes)
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        operands = _OPERANDS.get(func)
        if operands is not None and self.prefixes:
            phase = PHASES.current()
            if phase.startswith(self.prefixes) and all(args[i].dtype == torch.float32 for i in operands):
                args = list(args)
                for i in operands:
                    args[i] = round_to_tf32(args[i])
                self.counts[phase] += 1
        return func(*args, **kwargs)
