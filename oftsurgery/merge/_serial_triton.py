"""The Triton kernel behind `oftsurgery.merge.kernels` (imported only where Triton is installed).

One program owns `ROWS` output rows of a block of at most `BLOCK` input columns, holds the block's
working values in registers and walks its columns in order. `DESCENT` picks the loop:

- GPTQ pass (False): X holds the working weights; column j is rounded onto the grid (S, Z), its
  error divided by V[j, j] is stored in R and subtracted, times V[j, later], from the later columns
  (V is the block of the upper Cholesky factor of H⁻¹).
- coordinate descent (True): X holds the gradient columns E·H; column j's codes C move by the rounded
  minimiser −x / (s·V[j, j]) (V is the block of H), the weight change is stored in R and added, times
  V[j, later], to the later gradient columns.
"""

import triton
import triton.language as tl


@triton.jit
def _round_half_even(x):
    f = tl.floor(x)
    d = x - f  # exact in floating point
    odd = (f - 2.0 * tl.floor(f * 0.5)) != 0.0
    return tl.where((d > 0.5) | ((d == 0.5) & odd), f + 1.0, f)


@triton.jit
def serial_block(X, V, S, Z, C, Q, R, n_rows, n_cols, stride_x, stride_v, maxq,
                 DESCENT: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    row_ok = rows < n_rows
    tile = rows[:, None] * stride_x + cols[None, :]
    tile_ok = row_ok[:, None] & (cols[None, :] < n_cols)
    x = tl.load(X + tile, mask=tile_ok, other=0.0)
    q_out = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
    r_out = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
    for j in range(0, n_cols):
        here = cols[None, :] == j
        xj = tl.sum(tl.where(here, x, 0.0), axis=1)
        sj = tl.load(S + rows * stride_x + j, mask=row_ok, other=1.0)
        vjj = tl.load(V + j * stride_v + j)
        vrow = tl.load(V + j * stride_v + cols, mask=(cols > j) & (cols < n_cols), other=0.0)
        if DESCENT:
            cj = tl.load(C + rows * stride_x + j, mask=row_ok, other=0.0)
            q = cj + _round_half_even(tl.math.div_rn(-xj, sj * vjj))
            q = tl.minimum(tl.maximum(q, 0.0), maxq)
            r = sj * (q - cj)
            x = x + r[:, None] * vrow[None, :]
        else:
            zj = tl.load(Z + rows * stride_x + j, mask=row_ok, other=0.0)
            q = _round_half_even(tl.math.div_rn(xj, sj)) + zj
            q = tl.minimum(tl.maximum(q, 0.0), maxq)
            r = tl.math.div_rn(xj - sj * (q - zj), vjj)
            x = x - r[:, None] * vrow[None, :]
        q_out = tl.where(here, q[:, None], q_out)
        r_out = tl.where(here, r[:, None], r_out)
    tl.store(Q + tile, q_out, mask=tile_ok)
    tl.store(R + tile, r_out, mask=tile_ok)
