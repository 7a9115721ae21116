"""What the calibrated solver knows about a linear layer's inputs: H = Σ x xᵀ, and X itself while small.

One `InputHessian` serves every linear that reads the same input (q/k/v, gate/up), so H and what the
solver derives from it are built once per input. `CalibrationInputs` pairs the fitted rows'
statistics with those of the held-out rows (every `HOLDOUT_EVERY`-th row, `holdout_rows`), on which the
merge chooses between its candidates and measures what it reports (docs/merge-methods.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    import torch

HOLDOUT_EVERY = 8  # every 8th calibration row is held out of the solve (none with fewer than 8 rows)


def holdout_rows(num_rows: int) -> set[int]:
    """Indices of the calibration rows held out of the solve: rows 7, 15, 23, … (none below 8 rows)."""
    return {r for r in range(num_rows) if r % HOLDOUT_EVERY == HOLDOUT_EVERY - 1}


class InputHessian:
    """H = Σ x xᵀ over the inputs x of a linear, plus the inputs themselves while there are at most
    `in_features` of them: the output error ‖E Xᵀ‖² then costs out·in·n instead of out·in²."""

    def __init__(self, in_features: int, device: "torch.device | str", *, need_matrix: bool = True):
        import torch

        self.in_features = in_features
        self.device = torch.device(device)
        self.tokens = 0
        self._need_matrix = need_matrix
        self._matrix: torch.Tensor | None = None
        self._rows: list[torch.Tensor] | None = []
        self.cache: dict[tuple, object] = {}  # what the solver derives from H once per input (requant.py)

    @classmethod
    def from_matrix(cls, hessian: "torch.Tensor") -> "InputHessian":
        """Wrap a ready H [in, in] (its dtype and device are kept: the solver computes in them)."""
        stats = cls(hessian.shape[0], hessian.device)
        stats._matrix = hessian
        stats._rows = None
        stats.tokens = -1  # unknown
        return stats

    @classmethod
    def assembled(cls, in_features: int, device: "torch.device | str", *, tokens: int,
                  matrix: "torch.Tensor | None" = None, rows: "torch.Tensor | None" = None) -> "InputHessian":
        """Statistics summed elsewhere (shard by shard, on one or several ranks: calibration/statistics.py):
        H when given, X [tokens, in] when given (H is then made from X if not given)."""
        stats = cls(in_features, device, need_matrix=matrix is not None)
        stats._matrix = matrix
        stats._rows = [rows] if rows is not None else None
        stats.tokens = tokens
        return stats

    def add(self, x: "torch.Tensor") -> None:
        """Accumulate inputs x [..., in] (any float dtype) in float32 on this statistic's device."""
        import torch

        from oftsurgery.merge.solve import products

        exact = x.dtype in (torch.float16, torch.bfloat16)  # values TF32 holds exactly (products.py)
        x = x.reshape(-1, x.shape[-1]).to(self.device, torch.float32)
        if self._need_matrix:
            if self._matrix is None:
                self._matrix = torch.zeros(self.in_features, self.in_features, device=self.device)
            products.addmm_(self._matrix, x.T, x, exact=exact)
        self.tokens += x.shape[0]
        if self._rows is not None:
            self._rows.append(x)
            if self.tokens > self.in_features:  # H is now the cheaper form for the error too
                rows = torch.cat(self._rows)
                self._rows = None
                if not self._need_matrix:
                    self._matrix = rows.T @ rows
                    self._need_matrix = True

    @property
    def matrix(self) -> "torch.Tensor":
        """H [in, in] (float32 when accumulated here)."""
        import torch

        if self._matrix is None:
            rows = self.rows
            self._matrix = rows.T @ rows if rows is not None else torch.zeros(
                self.in_features, self.in_features, device=self.device)
        return self._matrix

    @property
    def rows(self) -> "torch.Tensor | None":
        """The inputs X [n, in] while n ≤ in, else None."""
        if self._rows is None:
            return None
        if len(self._rows) != 1:
            import torch

            self._rows = [torch.cat(self._rows)] if self._rows else [
                torch.zeros(0, self.in_features, device=self.device)]
        return self._rows[0]

    @property
    def dtype(self) -> "torch.dtype":
        return self.matrix.dtype

    @property
    def reached(self) -> bool:
        """False when the calibration never fed this input anything but zeros."""
        if self.tokens == 0:
            return False
        return bool(self.matrix.diagonal().abs().amax() > 0)

    def error(self, err_t: "torch.Tensor") -> "torch.Tensor":
        """‖E Xᵀ‖² = tr(E H Eᵀ) for E given transposed, [in, out], as a float64 0-dim device tensor.

        Float64, because the solver accepts a stage only when it lowers this by more than a relative
        1e-6, and a float32 sum over in×out terms is not that accurate.
        """
        import torch

        err_t = err_t.to(self.device, torch.float64)
        rows = self.rows
        # X or H in float64 for this call only: kept, H alone would be in² · 8 bytes for the whole group
        if rows is not None:
            return (rows.to(torch.float64) @ err_t).square().sum()
        return (self.matrix.to(torch.float64) @ err_t).mul_(err_t).sum()

    def error_split(self, err_t: "torch.Tensor") -> "torch.Tensor":
        """`error` for a float32 E (transposed, [in, out]) on a GPU. While X is kept, ‖X·E‖² with X·E by
        split TF32 products (float32's accuracy, products.py) and the squares summed in float64: a sum
        of squares, so its relative error stays a few 1e-8 with TF32's rounding emulated
        (tests/test_products.py), well inside the solver's 1e-6 acceptance margin, with no float64
        copies of X or E. From H it stays float64 (`error`): tr(E H Eᵀ) sums terms of both signs, and
        in float32 products it came within 2.6e-7 of the margin."""
        import torch

        from oftsurgery.merge.solve import products

        rows = self.rows
        if rows is None:
            return self.error(err_t)
        return products.mm(rows, err_t).square().sum(dtype=torch.float64)

    def matrix_as(self, dtype: "torch.dtype") -> "torch.Tensor":
        """H (undamped) in `dtype`, converted once and shared by the linears of this input."""
        if self.matrix.dtype == dtype:
            return self.matrix
        key = ("matrix", dtype)
        if key not in self.cache:
            self.cache[key] = self.matrix.to(dtype)
        return self.cache[key]

    def damping(self, damp: float) -> "torch.Tensor":
        """λ = damp · mean(diag H), as a 0-dim float64 device tensor (no host synchronisation)."""
        import torch

        return self.matrix.diagonal().to(torch.float64).mean() * damp


class CalibrationInputs(NamedTuple):
    """The statistics of one input: `fit` feeds the solver, `holdout` (None: too few rows) the report."""

    fit: InputHessian
    holdout: InputHessian | None = None

    @property
    def measured(self) -> InputHessian:
        """Where the report measures residuals: the held-out rows when there are any."""
        return self.holdout if self.holdout is not None and self.holdout.tokens > 0 else self.fit
