"""The OFT rotation math, in one place.

Everything that turns stored OFT parameters into rotation blocks (`rotation_blocks`: exact Cayley or
PEFT's Cayley–Neumann series of each release, COFT, block sharing), or applies blocks to an input or
a weight (`apply_rotation_to_input`, `rotate_weight`), lives here, so wrappers, adapter files,
extraction and merging cannot drift apart. The semantics, including the dtypes, are PEFT's:
docs/rotations-format.md ("From parameters to blocks").
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from torch import Tensor

# PEFT changed the Cayley-Neumann series in this release (last term coefficient 2 -> 1) and started
# writing `peft_version` into adapter_config.json in the same release.
NEUMANN_SERIES_CHANGED_IN = (0, 18, 0)


# --------------------------------------------------------------------------------------------------
# Shapes and block-size resolution
# --------------------------------------------------------------------------------------------------


def params_per_block(block_size: int) -> int:
    """Number of free parameters of one `b×b` skew-symmetric block: `b(b-1)/2`."""
    return block_size * (block_size - 1) // 2


def block_size_from_params(n: int) -> int:
    """Invert `n = b(b-1)/2`: the block size of a stored parameter row of length `n`.

    Raises ValueError when `n` is not a triangular number (the row cannot be an OFT block).
    """
    n = int(n)
    if n < 0:
        raise ValueError(f"{n} is not a valid OFT parameter count.")
    b = (1 + math.isqrt(1 + 8 * n)) // 2
    if params_per_block(b) != n:
        raise ValueError(f"{n} parameters per block is not b(b-1)/2 for any block size b.")
    return b


def nearest_divisor(in_features: int, value: int) -> int:
    """PEFT's `adjust_oft_parameters`: the divisor of `in_features` nearest to `value` (ties go down).

    PEFT applies this silently (with a warning) when `r` or `oft_block_size` does not divide a
    layer's `in_features`, so the same rule must be used to predict the stored shapes.
    """
    if value >= in_features:
        return in_features
    higher = value
    while higher <= in_features and in_features % higher != 0:
        higher += 1
    lower = value
    while lower > 1 and in_features % lower != 0:
        lower -= 1
    return lower if (value - lower) <= (higher - value) else higher


def resolve_block_layout(in_features: int, r: int, oft_block_size: int) -> tuple[int, int, bool]:
    """Resolve `(r, block_size, adjusted)` for one layer exactly as PEFT does.

    Exactly one of `r`, `oft_block_size` must be non-zero. `adjusted` says the requested value did
    not divide `in_features` and the nearest divisor was taken instead.
    """
    if (r != 0) == (oft_block_size != 0):
        raise ValueError(f"Exactly one of r ({r}) and oft_block_size ({oft_block_size}) must be non-zero.")
    if r < 0 or oft_block_size < 0:
        raise ValueError(f"r ({r}) and oft_block_size ({oft_block_size}) must not be negative.")
    if oft_block_size:
        adjusted = in_features % oft_block_size != 0 or oft_block_size > in_features
        b = nearest_divisor(in_features, oft_block_size) if adjusted else oft_block_size
        return in_features // b, b, adjusted
    adjusted = in_features % r != 0 or r > in_features
    r_eff = nearest_divisor(in_features, r) if adjusted else r
    return r_eff, in_features // r_eff, adjusted


def parse_version(version: str | None) -> tuple[int, ...] | None:
    """`"0.17.1"`, `"0.18.0.dev0"`, `"0.21.2@abc123"` -> `(0, 17, 1)` etc.; None stays None."""
    if version is None:
        return None
    match = re.match(r"\s*(\d+)(?:\.(\d+))?(?:\.(\d+))?", str(version).partition("@")[0])
    if not match:
        raise ValueError(f"Cannot parse the PEFT version {version!r}.")
    return tuple(int(part or 0) for part in match.groups())


def uses_legacy_neumann_series(peft_version: str | None) -> bool:
    """True when an adapter written by `peft_version` used PEFT 0.16-0.17's Neumann series.

    `None` means "current semantics" here; a caller reading an adapter_config.json *without* a
    `peft_version` key (written before 0.18) must pass an old version explicitly (see adapter_io).
    """
    parsed = parse_version(peft_version)
    return parsed is not None and parsed < NEUMANN_SERIES_CHANGED_IN


# --------------------------------------------------------------------------------------------------
# Parameters <-> skew-symmetric generators
# --------------------------------------------------------------------------------------------------


def skew_from_params(params: Tensor, block_size: int) -> Tensor:
    """`(r, n)` parameters -> `(r, b, b)` skew-symmetric `Q = S - Sᵀ` (S: strict upper triangle)."""
    import torch

    if params.dim() != 2 or params.shape[1] != params_per_block(block_size):
        raise ValueError(
            f"OFT parameters of shape {tuple(params.shape)} do not fit block size {block_size} "
            f"(expected (r, {params_per_block(block_size)}))."
        )
    rows, cols = torch.triu_indices(block_size, block_size, 1, device=params.device)
    upper = params.new_zeros(params.shape[0], block_size, block_size)
    upper[:, rows, cols] = params
    return upper - upper.transpose(-2, -1)


def params_from_skew(skew: Tensor) -> Tensor:
    """`(r, b, b)` skew-symmetric -> `(r, n)` parameters (its strict upper triangle)."""
    import torch

    b = skew.shape[-1]
    rows, cols = torch.triu_indices(b, b, 1, device=skew.device)
    return skew[:, rows, cols]


# --------------------------------------------------------------------------------------------------
# Cayley maps
# --------------------------------------------------------------------------------------------------


def cayley_exact(skew: Tensor) -> Tensor:
    """`R = (I - Q)(I + Q)⁻¹` per block, solved in at least float32, returned in `skew`'s dtype.

    PEFT builds its identity in the default float dtype, so half-precision generators are promoted
    to float32 for the solve; the same happens here.
    """
    import torch

    work_dtype = torch.promote_types(skew.dtype, torch.float32)
    q = skew.to(work_dtype)
    eye = torch.eye(q.shape[-1], device=q.device, dtype=work_dtype).expand_as(q)
    return torch.linalg.solve(eye + q, eye - q, left=False).to(skew.dtype)


def cayley_neumann(skew: Tensor, num_terms: int = 5, legacy_series: bool = False) -> Tensor:
    """Truncated Neumann approximation of `(I + Q)(I - Q)⁻¹`, in `skew`'s dtype.

    With `k = num_terms`: `I + 2Q + 2Q² + … + 2Q^(k-2) + Q^(k-1)` (PEFT ≥ 0.18; for k = 3 PEFT's loop
    still adds `2Q² + Q³`, and k = 2 gives `I + 2Q`), or `I + 2Q + … + 2Q^(k-1)` with
    `legacy_series=True` (PEFT 0.16-0.17).
    """
    import torch

    eye = torch.eye(skew.shape[-1], device=skew.device, dtype=skew.dtype)
    result = eye.expand_as(skew).clone()
    if num_terms <= 1:
        return result
    result = result + 2.0 * skew
    if num_terms == 2:
        return result
    power = skew @ skew
    result = result + 2.0 * power
    if legacy_series:
        for _ in range(3, num_terms):
            power = power @ skew
            result = result + 2.0 * power
        return result
    for _ in range(3, num_terms - 1):
        power = power @ skew
        result = result + 2.0 * power
    return result + power @ skew


def legacy_cayley(raw: Tensor) -> Tensor:
    """PEFT ≤ 0.15's map of a full `(r, b, b)` `oft_r`: `S = (A - Aᵀ)/2`, `R = (I - S)(I + S)⁻¹`."""
    return cayley_exact(0.5 * (raw - raw.transpose(-2, -1)))


def legacy_coft_project(raw: Tensor, eps: float) -> Tensor:
    """PEFT ≤ 0.15's COFT projection of a full `(r, b, b)` `oft_r` (radius eps/√r on ‖A‖_F).

    The `eps` passed here is the layer's effective one: PEFT ≤ 0.15 scaled the configured eps by
    `ceil(out_features / r)²` when it created the layer.
    """
    import torch

    radius = eps * 1 / torch.sqrt(torch.tensor(raw.shape[0]))
    norms = torch.norm(raw, dim=(1, 2), keepdim=True)
    return torch.where(norms <= radius, raw, radius * (raw / norms))


def cayley_inverse(rotation: Tensor) -> Tensor:
    """The skew `Q` with `cayley_exact(Q) == rotation`: `Q = (I - R)(I + R)⁻¹` (float64 inside).

    Exact for orthogonal `R` without eigenvalue -1 (the Cayley map cannot reach those).
    """
    import torch

    r = rotation.to(torch.float64)
    eye = torch.eye(r.shape[-1], dtype=torch.float64, device=r.device).expand_as(r)
    q = torch.linalg.solve(eye + r, eye - r, left=False)
    return (0.5 * (q - q.transpose(-2, -1))).to(rotation.dtype)


def fit_params(
    blocks: Tensor,
    *,
    use_cayley_neumann: bool,
    num_terms: int = 5,
    peft_version: str | None = None,
    steps: int = 200,
) -> tuple[Tensor, float]:
    """Parameters `(r, n)` whose blocks reproduce `blocks` `(r, b, b)`; also the max abs residual.

    Exact Cayley: closed form (`cayley_inverse`), exact up to rounding for orthogonal blocks.
    Cayley-Neumann: a truncated series cannot produce an exactly orthogonal matrix, so there is no
    closed form; start from the exact generator of the transpose (the series approximates
    `R(-Q)`) and minimise ‖N(Q) − R‖_F with L-BFGS in float64. The residual says how close it got
    (≈ the series' own truncation error for rotations that came from exact Cayley; ≈ 0 for blocks
    that came from the same series).
    """
    import torch

    target = blocks.to(torch.float64)
    b = target.shape[-1]
    if not use_cayley_neumann:
        params = params_from_skew(cayley_inverse(target))
    else:
        params = params_from_skew(-cayley_inverse(target)).clone().requires_grad_(True)
        optimizer = torch.optim.LBFGS([params], lr=1, max_iter=steps, tolerance_grad=1e-15,
                                      tolerance_change=1e-18, history_size=20, line_search_fn="strong_wolfe")

        def closure():
            optimizer.zero_grad()
            approx = rotation_blocks(params, b, use_cayley_neumann=True, num_terms=num_terms,
                                     peft_version=peft_version)
            loss = (approx - target).pow(2).sum()
            loss.backward()
            return loss

        with torch.enable_grad():
            optimizer.step(closure)
        params = params.detach()
    rebuilt = rotation_blocks(params, b, use_cayley_neumann=use_cayley_neumann, num_terms=num_terms,
                              peft_version=peft_version)
    residual = float((rebuilt - target).abs().max()) if target.numel() else 0.0
    return params.to(torch.float32), residual


# --------------------------------------------------------------------------------------------------
# COFT projection, dropout, materialization
# --------------------------------------------------------------------------------------------------


def coft_project(params: Tensor, block_size: int, eps: float) -> Tensor:
    """Project each block's generator onto ‖Q‖_F ≤ eps/√(stored blocks); return new parameters.

    This is PEFT's `_project_batch` (it compares Q against a zero matrix, not the identity).
    """
    import torch

    skew = skew_from_params(params, block_size)
    # The radius is a float32 0-dim tensor, as in PEFT, so half-precision parameters round it the
    # same way (a Python float would be applied at double precision).
    radius = eps * 1 / torch.sqrt(torch.tensor(skew.shape[0]))
    norms = torch.norm(skew, dim=(1, 2), keepdim=True)
    projected = torch.where(norms <= radius, skew, radius * (skew / norms))
    return params_from_skew(projected)


def multiplicative_dropout(blocks: Tensor, p: float, generator: torch.Generator | None = None) -> Tensor:
    """Replace `int(p · r)` randomly chosen blocks by the identity (training-time module dropout).

    A single shared block (`block_share`) is left alone, as in PEFT.
    """
    import torch

    count = blocks.shape[0]
    dropped = int(p * count)
    if count == 1 or dropped == 0:
        return blocks
    order = torch.randperm(count, generator=generator, device="cpu").to(blocks.device)
    mask = torch.zeros(count, device=blocks.device, dtype=blocks.dtype)
    mask[order[:dropped]] = 1
    mask = mask.view(count, 1, 1)
    eye = torch.eye(blocks.shape[-1], device=blocks.device, dtype=blocks.dtype)
    return (1 - mask) * blocks + mask * eye


def rotation_blocks(
    params: Tensor,
    block_size: int,
    *,
    use_cayley_neumann: bool,
    num_terms: int = 5,
    peft_version: str | None = None,
    coft: bool = False,
    eps: float = 6e-5,
    block_share: bool = False,
    num_blocks: int | None = None,
) -> Tensor:
    """Materialize the rotation blocks `(r_total, b, b)` of stored parameters `(r, n)`, as PEFT does.

    `peft_version` selects the Neumann series (None = current). With `coft` the parameters are
    projected first (a pure function here: callers that must write the projection back, as PEFT's
    forward does, use `coft_project` themselves). With `block_share` the single stored block is
    repeated `num_blocks` times (`in_features / b`); pass `num_blocks=None` to keep the one block.
    """
    if coft:
        params = coft_project(params, block_size, eps)
    skew = skew_from_params(params, block_size)
    if use_cayley_neumann:
        blocks = cayley_neumann(skew, num_terms, legacy_series=uses_legacy_neumann_series(peft_version))
    else:
        blocks = cayley_exact(skew)
    if block_share and num_blocks is not None:
        if blocks.shape[0] != 1:
            raise ValueError(f"block_share expects one stored block, got {blocks.shape[0]}.")
        blocks = blocks.expand(num_blocks, -1, -1)
    return blocks


# --------------------------------------------------------------------------------------------------
# Applying blocks
# --------------------------------------------------------------------------------------------------


def apply_rotation_to_input(x: Tensor, blocks: Tensor) -> Tensor:
    """Rotate the last dim of `x` block by block: chunk `j` (of size b) becomes `x_j @ blocks[j]`.

    A single block (block_share, not expanded) is applied to every chunk. Computed in `x`'s dtype.
    """
    import torch

    count, b, _ = blocks.shape
    in_features = x.shape[-1]
    if in_features % b != 0 or (count != 1 and count * b != in_features):
        raise ValueError(f"{count} rotation blocks of size {b} do not fit an input of {in_features} features.")
    chunks = x.reshape(*x.shape[:-1], in_features // b, b)
    if count == 1:
        rotated = torch.matmul(chunks, blocks[0])
    else:
        rotated = torch.einsum("...rk,rkc->...rc", chunks, blocks)
    return rotated.reshape(x.shape)


def block_diagonal(blocks: Tensor, in_features: int | None = None) -> Tensor:
    """The dense `in×in` block-diagonal matrix of `blocks` (a shared block is repeated)."""
    import torch

    count, b, _ = blocks.shape
    if count == 1 and in_features is not None and in_features != b:
        blocks = blocks.expand(in_features // b, b, b)
    return torch.block_diag(*blocks.unbind(0))


def rotate_weight(weight: Tensor, blocks: Tensor) -> Tensor:
    """`W · Rᵀ` for `W` of shape `[out, in]` and block-diagonal `R`, without forming `R`.

    `x @ rotate_weight(W, blocks).T == apply_rotation_to_input(x, blocks) @ W.T`. Computed in the
    promoted dtype of the two operands.
    """
    import torch

    out_features, in_features = weight.shape
    count, b, _ = blocks.shape
    if in_features % b != 0 or (count != 1 and count * b != in_features):
        raise ValueError(f"{count} rotation blocks of size {b} do not fit a weight with {in_features} inputs.")
    dtype = torch.promote_types(weight.dtype, blocks.dtype)
    w = weight.to(dtype).reshape(out_features, in_features // b, b)
    r = blocks.to(weight.device, dtype)  # the rotation follows the weight (a merge may run on a GPU)
    if count == 1:
        rotated = torch.matmul(w, r[0].transpose(0, 1))
    else:
        # (W Rᵀ)[o, j-th chunk] = W[o, chunk j] @ R_jᵀ
        rotated = torch.einsum("ojk,jck->ojc", w, r)
    return rotated.reshape(out_features, in_features)


def rotation_strength(blocks: Tensor) -> float:
    """‖R - I‖_F of the block-diagonal rotation (how far the adapter moves the layer)."""
    import torch

    # R − I in the blocks' own dtype is exact for entries near 1 (Sterbenz) and 0; the sum is float64
    eye = torch.eye(blocks.shape[-1], dtype=blocks.dtype, device=blocks.device)
    return float(torch.linalg.vector_norm(blocks - eye, dtype=torch.float64))


def orthogonality_error(blocks: Tensor) -> float:
    """max |RᵀR - I| over all blocks (0 for exact rotations)."""
    import torch

    r = blocks.to(torch.float64)
    eye = torch.eye(r.shape[-1], dtype=torch.float64, device=r.device)
    return float((r.transpose(-2, -1) @ r - eye).abs().max()) if r.numel() else 0.0
