"""Format-independent quantized weights: integer codes on a per-group affine grid.

`QuantizedWeight` is what every checkpoint layout (GPTQ v1/v2, AWQ GEMM) unpacks into and packs from:
true zero points and codes in [out, in] orientation, W[o, i] = s[g, o] · (q[o, i] − z[g, o]) with
g = g_idx[i]; codes are uint8 or int32, stored input-major (see docs/formats.md, "Packed layouts").
`fit_grid` reproduces gptqmodel's min/max quantizer, so a requantized layer sits on the kind of grid
gptqmodel would have produced.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

# The smallest positive float16 (a subnormal). A group whose range underflows float16 gets this
# scale instead of 0: with scale 0 every code would dequantize to 0 and the codes could not be
# packed (gptqmodel's packer divides by the scale).
_MIN_FP16_SCALE = 2.0**-24


@dataclass
class QuantizedWeight:
    """Integer codes plus their per-group grid; see the module docstring for the formula."""

    codes: torch.Tensor  # uint8 or int32 [out, in], 0 .. 2**bits - 1 (often an input-major view)
    scales: torch.Tensor  # float16 [G, out]
    zeros: torch.Tensor  # int32 [G, out], true zero points
    g_idx: torch.Tensor  # int32 [in]
    bits: int
    group_size: int  # -1: one group over all inputs
    # whether input i belongs to group i // group_size (see `contiguous_groups`), found while validating
    contiguous: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        out_f, in_f = self.codes.shape
        if self.codes.dtype not in (torch.uint8, torch.int32):
            raise ValueError(f"codes must be uint8 or int32, got {self.codes.dtype}")
        if self.zeros.dtype != torch.int32 or self.g_idx.dtype != torch.int32:
            raise ValueError("zeros and g_idx must be int32")
        if self.scales.dtype != torch.float16:
            raise ValueError(f"scales must be float16, got {self.scales.dtype}")
        if self.scales.dim() != 2 or self.scales.shape[1] != out_f or self.zeros.shape != self.scales.shape:
            raise ValueError(
                f"scales {tuple(self.scales.shape)} / zeros {tuple(self.zeros.shape)} do not match "
                f"[G, {out_f}] for codes {tuple(self.codes.shape)}"
            )
        if self.g_idx.shape != (in_f,):
            raise ValueError(f"g_idx has shape {tuple(self.g_idx.shape)}, expected ({in_f},)")
        # the range and the layout of g_idx in one look (one wait when g_idx lives on a GPU)
        low, high, self.contiguous = _g_idx_facts(self.g_idx, self.group_size)
        if in_f and (low < 0 or high >= self.scales.shape[0]):
            raise ValueError(f"g_idx values must lie in [0, {self.scales.shape[0]})")

    def with_codes(self, codes: torch.Tensor) -> "QuantizedWeight":
        """The same grid holding other codes of the same shape (the grid is not validated again)."""
        if codes.shape != self.codes.shape or codes.dtype not in (torch.uint8, torch.int32):
            raise ValueError(f"codes must be uint8 or int32 of shape {tuple(self.codes.shape)}, "
                             f"got {codes.dtype} {tuple(codes.shape)}")
        new = copy.copy(self)
        new.codes = codes
        return new

    @property
    def out_features(self) -> int:
        return self.codes.shape[0]

    @property
    def in_features(self) -> int:
        return self.codes.shape[1]

    @property
    def num_groups(self) -> int:
        return self.scales.shape[0]

    @property
    def maxq(self) -> int:
        return (1 << self.bits) - 1

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense [out, in] weight. Computed exactly in float32 (every s*(q-z) is representable)
        and rounded once to `dtype`, which equals what float16 kernels compute. Laid out like `codes`."""
        return dequantize_rows(self.codes.T, self.scales, self.zeros, self.g_idx, self.group_size,
                               self.contiguous).to(dtype).T


def contiguous_groups(g_idx: torch.Tensor, group_size: int) -> bool:
    """Whether input i belongs to group i // group_size (what the fast dequantization assumes)."""
    return _g_idx_facts(g_idx, group_size)[2]


def _g_idx_facts(g_idx: torch.Tensor, group_size: int) -> tuple[int, int, bool]:
    """min(g_idx), max(g_idx) and whether the groups are contiguous, computed where g_idx lives and
    brought to the host together."""
    n = g_idx.numel()
    if n == 0:
        return 0, -1, group_size == -1 or group_size > 0
    low, high = torch.aminmax(g_idx)
    if group_size == -1:
        reordered = g_idx.any()
    elif group_size > 0:
        reordered = (g_idx != torch.arange(n, device=g_idx.device, dtype=torch.int32) // group_size).any()
    else:
        reordered = torch.ones((), dtype=torch.bool, device=g_idx.device)
    low, high, reordered = torch.stack([low.long(), high.long(), reordered.long()]).tolist()
    return low, high, not reordered


def range_checks(qw: QuantizedWeight) -> list[tuple[torch.Tensor, BaseException]]:
    """Codes and zero points must fit `bits` (flags for `all_hold`). uint8 codes are left to the
    re-check after packing (cheaper than a pass over them): a code wider than `bits` never unpacks to
    itself, since its high bits land in the neighbouring field or fall off the word."""
    checks = [("zero points", qw.zeros)] + ([] if qw.codes.dtype == torch.uint8 else [("codes", qw.codes)])
    return [(within(values, qw.maxq), ValueError(f"{name} outside [0, {qw.maxq}]")) for name, values in checks]


def all_hold(checks: Sequence[tuple[torch.Tensor, BaseException]]) -> None:
    """Raise the error of the first check whose 0-dim boolean tensor is False. The flags are brought
    to the host together: on a GPU, one wait for all the checks of a layer instead of one each."""
    if not checks:
        return
    flags = torch.stack([flag.reshape(()).to(checks[0][0].device, torch.bool) for flag, _ in checks]).tolist()
    for ok, (_, error) in zip(flags, checks):
        if not ok:
            raise error


def same(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """A 0-dim flag (not brought to the host): `a` and `b` have the same shape and values (`b` is
    compared on `a`'s device, in `a`'s dtype)."""
    if a.shape != b.shape:
        return torch.zeros((), dtype=torch.bool, device=a.device)
    b = b.to(a.device, a.dtype)
    if not a.is_cuda:  # no wait to save on a CPU, and torch.equal compares without a boolean copy
        return torch.tensor(torch.equal(a, b))
    return (a == b).all()


def within(values: torch.Tensor, maxq: int) -> torch.Tensor:
    """A 0-dim flag (not brought to the host): every value lies in [0, maxq]."""
    if not values.numel():
        return torch.ones((), dtype=torch.bool, device=values.device)
    low, high = torch.aminmax(values)
    return (low >= 0) & (high <= maxq)


def dequantize_rows(codes_t: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor,
                    group_size: int, contiguous: bool | None = None) -> torch.Tensor:
    """Float32 W_t[i, o] = s[g(i), o] * (q_t[i, o] - z[g(i), o]) for input-major codes [in, out].

    With contiguous groups the grid is broadcast over each group's rows (no [in, out] copies of
    the scales and zero points); otherwise (act-order g_idx) it is gathered row by row.
    """
    in_f, out_f = codes_t.shape
    if contiguous is None:
        contiguous = contiguous_groups(g_idx, group_size)
    s = scales.to(codes_t.device, torch.float32)
    z = zeros.to(codes_t.device, torch.float32)
    rows = group_size if group_size > 0 else in_f
    if contiguous and in_f % max(rows, 1) == 0 and in_f:
        weight = codes_t.reshape(-1, rows, out_f).to(torch.float32)
        weight.sub_(z.unsqueeze(1)).mul_(s.unsqueeze(1))
        return weight.view(in_f, out_f)
    g = g_idx.to(codes_t.device).long()
    weight = codes_t.to(torch.float32)
    weight.sub_(z.index_select(0, g)).mul_(s.index_select(0, g))
    return weight


def default_g_idx(in_features: int, group_size: int) -> torch.Tensor:
    """Contiguous groups: input i belongs to group i // group_size (all 0 for group_size -1)."""
    if group_size == -1:
        return torch.zeros(in_features, dtype=torch.int32)
    if group_size <= 0:
        raise ValueError(f"group_size must be positive or -1, got {group_size}")
    return (torch.arange(in_features, dtype=torch.int32) // group_size).to(torch.int32)


def num_groups_for(in_features: int, group_size: int) -> int:
    """G = ceil(in / group_size); 1 for group_size -1 (the last group may be partial)."""
    return 1 if group_size == -1 else -(-in_features // group_size)


def fit_grid(
    weight: torch.Tensor,
    bits: int,
    group_size: int,
    sym: bool,
    g_idx: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group scales (float16 [G, out]) and zero points (int32 [G, out]) for `weight` [out, in].

    gptqmodel's rule: the range of each group always includes 0 (xmin <= 0 <= xmax); symmetric
    grids widen it to [-absmax, absmax] when xmin < 0 and use z = (maxq + 1) / 2; asymmetric grids
    use scale = (xmax - xmin) / maxq and z = round(-xmin / scale); an all-zero group gets [-1, 1].
    As in gptqmodel, z is computed from the float32 scale before that scale is stored as float16.
    """
    out_f, in_f = weight.shape
    maxq = (1 << bits) - 1
    g_idx = (default_g_idx(in_f, group_size) if g_idx is None else g_idx).to(weight.device, torch.int32)
    n_groups = max(num_groups_for(in_f, group_size), int(g_idx.max()) + 1 if in_f else 1)
    w_t = weight.detach().float().T  # [in, out]
    index = g_idx.long().unsqueeze(1).expand(-1, out_f)
    # Reducing into zeros with include_self folds the "range includes 0" rule into the reduction.
    xmin = torch.zeros(n_groups, out_f, device=w_t.device).scatter_reduce(0, index, w_t, "amin", include_self=True)
    xmax = torch.zeros(n_groups, out_f, device=w_t.device).scatter_reduce(0, index, w_t, "amax", include_self=True)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)
    empty = (xmin == 0) & (xmax == 0)
    xmin = torch.where(empty, torch.full_like(xmin, -1.0), xmin)
    xmax = torch.where(empty, torch.full_like(xmax, 1.0), xmax)
    scale = (xmax - xmin) / maxq
    if sym:
        zero = torch.full_like(scale, (maxq + 1) // 2)
    else:
        zero = torch.round(-xmin / scale)
    scales = scale.to(torch.float16)
    if not torch.isfinite(scales).all():
        raise ValueError("weight range overflows float16 scales")
    scales = torch.where(scales == 0, torch.full_like(scales, _MIN_FP16_SCALE), scales)
    return scales, zero.clamp(0, maxq).to(torch.int32)


def quantize_to_codes(
    weight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
) -> torch.Tensor:
    """Codes int32 [out, in] = clamp(round(W / s) + z, 0, maxq), with s the stored (float16) scales."""
    g = g_idx.long()
    s = scales.float()[g].T
    z = zeros.to(torch.int32)[g].T
    codes = torch.round(weight.detach().float() / s) + z
    return codes.clamp_(0, (1 << bits) - 1).to(torch.int32)


def quantize_weight(
    weight: torch.Tensor,
    bits: int,
    group_size: int,
    sym: bool,
    g_idx: torch.Tensor | None = None,
) -> QuantizedWeight:
    """Fit a gptqmodel-style grid to `weight` [out, in] and round it onto that grid (RTN)."""
    g_idx = (default_g_idx(weight.shape[1], group_size) if g_idx is None else g_idx).to(weight.device, torch.int32)
    g_idx = g_idx.contiguous()
    scales, zeros = fit_grid(weight, bits, group_size, sym, g_idx)
    codes = quantize_to_codes(weight, scales, zeros, g_idx, bits)
    return QuantizedWeight(codes=codes, scales=scales, zeros=zeros, g_idx=g_idx, bits=bits, group_size=group_size)


# ---- Feeding the packers -------------------------------------------------------------------


def float_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> torch.nn.Linear:
    """A float `nn.Linear` holding `weight` (and `bias`), the input gptqmodel's and autoawq's packers take."""
    out_f, in_f = weight.shape
    linear = torch.nn.utils.skip_init(torch.nn.Linear, in_f, out_f, bias=bias is not None)
    linear.weight.data = weight
    if bias is not None:
        linear.bias.data = bias.detach().float().reshape(out_f)
    return linear


def exact_float_weight(qw: QuantizedWeight) -> torch.Tensor:
    """The float32 [out, in] weight from which gptqmodel's and autoawq's packers recover `qw.codes`.

    s*(q - z) is exact in float32; the packers compute round((W + z*s) / s) in float32 and get q.
    Where a scale is 0 gptqmodel's CPU extension divides by 1e-6 instead, so there W = q * 1e-6.
    """
    g = qw.g_idx.long()
    s = qw.scales.float()[g].T
    z = qw.zeros[g].T
    weight = (qw.codes.to(torch.int32) - z).float() * s
    return torch.where(s == 0, qw.codes.float() * 1e-6, weight)
