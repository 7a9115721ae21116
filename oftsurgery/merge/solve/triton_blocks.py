"""The Triton kernels behind kernels.py (imported only when they are used: this module imports Triton)."""

import triton
import triton.language as tl

@triton.jit
def div(a, b, F64: tl.constexpr):
    # IEEE division, as torch computes it: Triton's float32 `/` is an approximate division
    if F64:
        return a / b
    else:
        return tl.math.div_rn(a, b)

@triton.jit
def gptq_block(w_ptr, s_ptr, z_ptr, u_ptr, q_ptr, e_ptr, n_cols, n_rows, stride, u_stride, u_col, maxq,
               MAGIC: tl.constexpr, F64: tl.constexpr, COLS: tl.constexpr, ROWS: tl.constexpr):
    # tile of the block: columns c (GPTQ's visiting order) × output rows o, all [COLS, ROWS]
    o = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    c = tl.arange(0, COLS)
    inside = (c[:, None] < n_cols) & (o[None, :] < n_rows)
    w = tl.load(w_ptr + c[:, None] * stride + o[None, :], mask=inside, other=0.0)
    for j in range(0, n_cols):
        wj = tl.sum(tl.where(c[:, None] == j, w, 0.0), axis=0)  # column j as compensated so far
        row = o < n_rows
        sj = tl.load(s_ptr + j * stride + o, mask=row, other=1.0)
        zj = tl.load(z_ptr + j * stride + o, mask=row, other=0.0)
        q = tl.minimum(tl.maximum(((div(wj, sj, F64) + MAGIC) - MAGIC) + zj, 0.0), maxq)
        ujj = tl.load(u_ptr + j * u_stride + j * u_col)
        e = div(wj - sj * (q - zj), ujj, F64)
        tl.store(q_ptr + j * stride + o, q, mask=row)
        tl.store(e_ptr + j * stride + o, e, mask=row)
        later = (c > j) & (c < n_cols)
        uj = tl.load(u_ptr + j * u_stride + c * u_col, mask=later, other=0.0)
        w = w - uj[:, None] * e[None, :]  # later columns of the block absorb the error

@triton.jit
def refine_block(g_ptr, c_ptr, s_ptr, n_ptr, h_ptr, d_ptr, n_cols, n_rows, stride, h_stride, h_col, maxq,
                 MAGIC: tl.constexpr, F64: tl.constexpr, COLS: tl.constexpr, ROWS: tl.constexpr):
    o = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    c = tl.arange(0, COLS)
    inside = (c[:, None] < n_cols) & (o[None, :] < n_rows)
    g = tl.load(g_ptr + c[:, None] * stride + o[None, :], mask=inside, other=0.0)
    for j in range(0, n_cols):
        gj = tl.sum(tl.where(c[:, None] == j, g, 0.0), axis=0)  # the gradient, current in the block
        row = o < n_rows
        cj = tl.load(c_ptr + j * stride + o, mask=row, other=0.0)
        sj = tl.load(s_ptr + j * stride + o, mask=row, other=0.0)
        nj = tl.load(n_ptr + j * stride + o, mask=row, other=-1.0)
        new = tl.minimum(tl.maximum(cj + ((div(gj, nj, F64) + MAGIC) - MAGIC), 0.0), maxq)
        d = (new - cj) * sj
        tl.store(c_ptr + j * stride + o, new, mask=row)
        tl.store(d_ptr + j * stride + o, d, mask=row)
        later = (c > j) & (c < n_cols)
        hj = tl.load(h_ptr + j * h_stride + c * h_col, mask=later, other=0.0)
        g = g + hj[:, None] * d[None, :]  # later columns see this change
