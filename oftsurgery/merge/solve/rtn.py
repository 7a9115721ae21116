"""The data-free merge of one layer (`--method rtn`): W′ = W·Rᵀ rounded to nearest on the source grid.

Input-major ([in, out]) on the layer's device, in chunks of whole rotation blocks and quantization
groups; the report's residuals are weight-space norms (no data: H = I). Should float rounding ever
leave Ŵ further from W·Rᵀ than the source codes, the source codes are kept (mode "kept"). The steps
and what they cost: docs/performance.md ("The data-free merge").
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING

from oftsurgery.merge.report import LayerReport

if TYPE_CHECKING:
    import torch

    from oftsurgery.merge.plan import LayerPlan
    from oftsurgery.quant.grid import QuantizedWeight

# float32 elements per chunk: 4 MB on the CPU (stays in cache; measured best of 2^18..2^22); on a GPU bigger chunks mean fewer launches
CPU_CHUNK_ELEMENTS = 1 << 20
GPU_CHUNK_ELEMENTS = 1 << 27


def _chunk_rows(in_features: int, out_features: int, align: int, device) -> int:
    target = GPU_CHUNK_ELEMENTS if device.type == "cuda" else CPU_CHUNK_ELEMENTS
    rows = max(align, (target // max(out_features, 1)) // align * align)
    return min(rows, in_features)


def rotation_tensors(plan: "LayerPlan", pin_memory: bool = False) -> dict[str, "torch.Tensor"]:
    """What the rounding reads of the layer's rotation, float32 on the host: "blocks" when they act
    on the input features (the usual case; absent for an output-side rotation) and OFT's "scale"
    when the adapter has one. `pin_memory` for a fast copy to a GPU (see `transfer.upload`)."""
    import torch

    rotations = plan.rotations
    found = {}
    if plan.prefix not in getattr(rotations, "output_side", set()):
        found["blocks"] = rotations.blocks[plan.prefix]
    scale = getattr(rotations, "scales", {}).get(plan.prefix)
    if scale is not None:
        found["scale"] = scale
    found = {k: v.to(torch.float32).contiguous() for k, v in found.items()}
    return {k: v.pin_memory() for k, v in found.items()} if pin_memory else found


def rtn_merge_layer(plan: "LayerPlan", qw: "QuantizedWeight",
                    rotation: "dict[str, torch.Tensor] | None" = None) -> tuple["QuantizedWeight", LayerReport]:
    """Fold the layer's rotation into `qw` and round on its grid; return the new codes and its report.
    `rotation`: `rotation_tensors(plan)`, already on `qw`'s device (read ahead), or None to take it here."""
    import torch

    start = time.perf_counter()
    codes_t = qw.codes.T.contiguous()  # [in, out]; a no-op for codes from the unpackers
    device = codes_t.device
    in_f, out_f = codes_t.shape
    scales = qw.scales.to(device, torch.float32)
    zeros = qw.zeros.to(device, torch.float32)
    g_idx = qw.g_idx.to(device)
    group_rows = qw.group_size if qw.group_size > 0 else in_f
    grouped = qw.contiguous and in_f % group_rows == 0  # whole groups: broadcast the grid over each group's rows

    rotation = {k: v.to(device) for k, v in (rotation_tensors(plan) if rotation is None else rotation).items()}
    blocks, oft_scale = rotation.get("blocks"), rotation.get("scale")
    if blocks is not None:
        b = blocks.shape[-1]
        align = math.lcm(b, group_rows) if grouped else b
        rows = _chunk_rows(in_f, out_f, align, device) if in_f % align == 0 else in_f
    else:  # output-side rotation (PEFT <= 0.13): the rotation mixes all rows, so one chunk
        rows = in_f
    if oft_scale is not None:
        oft_scale = oft_scale.reshape(1, out_f)

    new_codes_t = torch.empty_like(codes_t, dtype=torch.uint8)
    acc = torch.zeros(4, dtype=torch.float64, device=device)  # kept error, rtn error, ‖target‖², codes changed
    maxq = float(qw.maxq)
    # two float32 work buffers reused by every chunk (no allocation, no page faults per chunk)
    weight_buf = torch.empty(rows * out_f, dtype=torch.float32, device=device)
    target_buf = torch.empty_like(weight_buf)
    for r0 in range(0, in_f, rows):
        r1 = min(r0 + rows, in_f)
        if grouped and (r1 - r0) % group_rows == 0:
            g0, g1 = r0 // group_rows, r1 // group_rows
            s, z = scales[g0:g1].unsqueeze(1), zeros[g0:g1].unsqueeze(1)
            shape = (g1 - g0, group_rows, out_f)
        else:  # act-order groups or a partial last group: gather each row's grid
            rows_g = g_idx[r0:r1].long()
            s, z = scales.index_select(0, rows_g).unsqueeze(1), zeros.index_select(0, rows_g).unsqueeze(1)
            shape = (r1 - r0, 1, out_f)
        weight = weight_buf[: (r1 - r0) * out_f].view(r1 - r0, out_f)
        weight.copy_(codes_t[r0:r1])  # (a mixed uint8 - float32 subtraction measured slower than copy + sub)
        w3 = weight.view(shape)
        w3.sub_(z).mul_(s)  # W_t = s·(q − z), exact in float32
        if blocks is not None:
            target = target_buf[: (r1 - r0) * out_f].view(-1, b, out_f)
            if blocks.shape[0] == 1:  # one block shared by every chunk of the input
                torch.matmul(blocks[0], weight.view(-1, b, out_f), out=target)
            else:  # rows of (W·Rᵀ)ᵀ = R_j · W_t[block j], all blocks in one batched matmul
                torch.bmm(blocks[r0 // b : r1 // b], weight.view(-1, b, out_f), out=target)
            target = target.view(r1 - r0, out_f)
            if oft_scale is not None:
                target.mul_(oft_scale)
        else:
            target = plan.rotations.merged_weight(plan.prefix, weight.T).T.contiguous()  # applies oft_s too
        t3 = target.view(shape)
        weight.sub_(target)
        acc[0] += torch.linalg.vector_norm(weight).double() ** 2
        acc[2] += torch.linalg.vector_norm(target).double() ** 2
        torch.div(t3, s, out=w3)  # the same float32 operations as grid.quantize_to_codes
        weight.round_()
        w3.add_(z)
        weight.clamp_(0, maxq)
        new_codes_t[r0:r1] = weight
        acc[3] += torch.count_nonzero(new_codes_t[r0:r1] != codes_t[r0:r1])
        w3.sub_(z)
        torch.addcmul(t3, w3, s, value=-1, out=w3)  # T − s·(q′ − z): the rounding error, negated
        acc[1] += torch.linalg.vector_norm(weight).double() ** 2
    kept_err, rtn_err, ref, changed = acc.tolist()  # the one synchronisation

    fallback = None
    if rtn_err > kept_err * (1 + 1e-9):
        chosen, mode, err, changed = qw, "kept", kept_err, 0.0
        fallback = "kept: round-to-nearest came out further from W·Rᵀ than the source codes, so the adapter is left out here"
    else:
        chosen = qw.with_codes(new_codes_t.T)
        mode, err = "rtn", rtn_err
    report = LayerReport(
        name=plan.prefix,
        mode=mode,
        codes_changed=changed / max(1, in_f * out_f),
        scales_changed=0.0,
        residual_before=math.sqrt(kept_err / ref) if ref > 0 else 0.0,
        residual_after=math.sqrt(err / ref) if ref > 0 else 0.0,
        rotation_strength=plan.rotations.strength(plan.prefix, plan.in_features),
        seconds=time.perf_counter() - start,
        fallback=fallback,
        stages=[mode],
    )
    return chosen, report
