"""What a merge will do, decided and validated before any work starts.

`plan_merge` matches every rotation to a quantized layer of the checkpoint, checks shapes and
values, and decides the output quantization config (same method, or GPTQ↔AWQ). Any mismatch is an
error here, before a single byte is written.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from oftsurgery.errors import InvalidAdapterError, UnsupportedFormatError
from oftsurgery.quant.layout import quantized_linear_shapes
from oftsurgery.quant.config import QuantConfig, parse_quant_config

if TYPE_CHECKING:
    import torch

    from oftsurgery.io.reader import CheckpointReader

@dataclass
class LayerPlan:
    prefix: str
    in_features: int
    out_features: int
    rotations: Any = None  # the RotationSet holding this layer's rotation; None = untouched

    @property
    def targeted(self) -> bool:
        return self.rotations is not None

    @property
    def blocks(self) -> "torch.Tensor":
        return self.rotations.blocks[self.prefix]

    def target_weight(self, weight: "torch.Tensor") -> "torch.Tensor":
        """The dense weight [out, in] the adapted layer computes with (W·Rᵀ, and oft_s if any)."""
        return self.rotations.merged_weight(self.prefix, weight) if self.targeted else weight


@dataclass
class MergePlan:
    source: QuantConfig
    target: QuantConfig
    layers: dict[str, LayerPlan]
    identity_modules: list[str] = field(default_factory=list)

    @property
    def targeted(self) -> list[LayerPlan]:
        return [p for p in self.layers.values() if p.targeted]

    @property
    def converts_format(self) -> bool:
        return self.source.method != self.target.method


def _is_identity(blocks: "torch.Tensor") -> bool:
    import torch

    eye = torch.eye(blocks.shape[-1], dtype=blocks.dtype).expand_as(blocks)
    return bool(torch.equal(blocks, eye))


def target_quant_config(source: QuantConfig, requant: str | None, layers: dict[str, LayerPlan],
                        awq_zero_has_zero: bool = False, awq_zeros_symmetric: bool = False) -> QuantConfig:
    """The output's quantization config for `--requant` (None: the source's method).

    AWQ → GPTQ is asymmetric GPTQ (v2 when a zero point is 0, which v1's stored z−1 cannot hold),
    except when every AWQ zero point is the midpoint 8: then it is symmetric v1 GPTQ, exactly the
    same weights, and the variant vLLM's Marlin kernel serves.
    """
    method = (requant or source.method).lower()
    if method == source.method:
        return source
    if method == "awq":
        problems = []
        if source.bits != 4:
            problems.append(f"AWQ GEMM is 4-bit only and the source is {source.bits}-bit")
        if source.group_size == -1:
            problems.append("AWQ needs a positive group size and the source uses one group per column (-1)")
        if source.desc_act:
            problems.append("the source uses desc_act (act-order groups), which AWQ's contiguous groups cannot hold")
        bad = [p.prefix for p in layers.values() if p.out_features % 8 or (source.group_size > 0 and p.in_features % source.group_size)]
        if bad:
            problems.append(f"{bad[0]} has a shape AWQ GEMM cannot pack (out % 8 or in % group_size is not 0)")
        if problems:
            raise UnsupportedFormatError(f"--requant awq cannot represent this checkpoint: {problems[0]}.")
        raw = {"quant_method": "awq", "bits": 4, "group_size": source.group_size, "zero_point": True,
               "version": "gemm", "modules_to_not_convert": None}
        return parse_quant_config(raw, "output config")
    if method == "gptq":
        raw = {"quant_method": "gptq", "bits": 4, "group_size": source.group_size, "desc_act": False,
               "sym": bool(awq_zeros_symmetric),
               "checkpoint_format": "gptq_v2" if awq_zero_has_zero else "gptq", "pack_dtype": "int32",
               "lm_head": False, "true_sequential": True}
        return parse_quant_config(raw, "output config")
    raise UnsupportedFormatError(f"--requant must be 'gptq' or 'awq', not {requant!r}.")


# Projections transformers fuses but GPTQ checkpoints may store split (gptqmodel splits Phi-3's
# gate_up_proj through defuser), in the order the fused weight stacks them.
SPLIT_PROJECTIONS = {"gate_up_proj": ("gate_proj", "up_proj"), "qkv_proj": ("q_proj", "k_proj", "v_proj")}


def split_fused_targets(rotations, layers: dict[str, "LayerPlan"]):
    """Rotations for a fused module (an adapter trained on the float model's `mlp.gate_up_proj`) moved
    onto the split layers the checkpoint stores (`mlp.gate_proj`, `mlp.up_proj`).

    Exact: an input-side rotation acts on the input all split parts share, so W_fused·Rᵀ stacks
    W_part·Rᵀ; an oft_s output scale is cut where the parts' outputs meet. Output-side rotations are
    cut too when no block straddles two parts, and refused otherwise.
    """
    from oftsurgery.oft.adapter_io import RotationSet

    moves = {}
    for module in rotations.blocks:
        if module in layers:
            continue
        parent, _, leaf = module.rpartition(".")
        parts = [f"{parent}.{p}" for p in SPLIT_PROJECTIONS.get(leaf, ())]
        if parts and all(p in layers for p in parts):
            moves[module] = parts
    if not moves:
        return rotations
    blocks, scales, output_side = dict(rotations.blocks), dict(rotations.scales), set(rotations.output_side)
    for module, parts in moves.items():
        fused, scale = blocks.pop(module), scales.pop(module, None)
        sizes = [layers[p].out_features for p in parts]
        if scale is not None and scale.shape[0] != sum(sizes):
            raise InvalidAdapterError(f"oft_s for {module} has {scale.shape[0]} values; its split layers {parts} "
                                      f"have {sum(sizes)} outputs together.")
        start = 0
        for part, size in zip(parts, sizes):
            if module in output_side:
                b = fused.shape[-1]
                if start % b or size % b:
                    raise InvalidAdapterError(
                        f"The output-side rotation of {module} has blocks of {b} that straddle its split layers "
                        f"{', '.join(parts)} in this checkpoint; it cannot be merged into them."
                    )
                blocks[part] = fused if fused.shape[0] == 1 else fused[start // b : (start + size) // b]
                output_side.add(part)
            else:
                blocks[part] = fused
            if scale is not None:
                scales[part] = scale[start : start + size]
            start += size
        output_side.discard(module)
    return RotationSet(blocks, dict(rotations.metadata), scales, output_side)


def plan_merge(reader: "CheckpointReader", source: QuantConfig, rotations, requant: str | None = None) -> MergePlan:
    """Match rotations to layers and validate everything a merge needs."""
    import torch

    shapes = {name: info.shape for name, info in reader.tensors.items()}
    layers: dict[str, LayerPlan] = {}
    for prefix, (in_f, out_f) in quantized_linear_shapes(shapes, source).items():
        layers[prefix] = LayerPlan(prefix, in_f, out_f, None)
    if not layers:
        raise InvalidAdapterError(f"{reader.path} holds no quantized linear layers to merge into.")
    rotations = split_fused_targets(rotations, layers)

    missing = [m for m in rotations.blocks if m not in layers]
    if missing:
        raise InvalidAdapterError(
            f"The adapter targets {len(missing)} module(s) this checkpoint does not have as quantized layers "
            f"(first: {missing[0]!r}); was it trained on another model?"
        )
    identity = []
    scales: dict[str, Any] = getattr(rotations, "scales", None) or {}
    output_side = getattr(rotations, "output_side", set())
    for module, blocks in rotations.blocks.items():
        plan = layers[module]
        if blocks.dim() != 3 or blocks.shape[1] != blocks.shape[2]:
            raise InvalidAdapterError(f"Rotation for {module} has shape {tuple(blocks.shape)}; expected [r, b, b].")
        r, b = blocks.shape[0], blocks.shape[1]
        side, features = ("output", plan.out_features) if module in output_side else ("input", plan.in_features)
        fits = (features % b == 0) if r == 1 else (r * b == features or (side == "output" and r * b >= features))
        if not fits:
            raise InvalidAdapterError(
                f"Rotation for {module} has {r} block(s) of size {b}, which does not fit the layer's "
                f"{features} {side} features; was the adapter made for another model?"
            )
        if not torch.isfinite(blocks).all():
            raise InvalidAdapterError(f"Rotation for {module} contains NaN or Inf values.")
        scale = scales.get(module)
        if scale is not None and scale.numel() != plan.out_features:
            raise InvalidAdapterError(f"oft_s for {module} has {scale.numel()} values; the layer has {plan.out_features} outputs.")
        if _is_identity(blocks) and (scale is None or bool((scale == 1).all())):
            identity.append(module)  # still merged: the pipeline must reproduce it exactly
        plan.rotations = rotations

    zero_has_zero, zeros_symmetric = False, False
    if source.is_awq and (requant or "awq").lower() == "gptq":
        from oftsurgery.quant.awq import unpack_awq

        zeros_symmetric = True
        for prefix in layers:
            qw = unpack_awq({k: reader.get(f"{prefix}.{k}") for k in ("qweight", "qzeros", "scales")}, source.group_size)
            zeros_symmetric = zeros_symmetric and bool((qw.zeros == 2 ** (source.bits - 1)).all())
            if bool((qw.zeros == 0).any()):
                zero_has_zero = True
                break
    target = target_quant_config(source, requant, layers, zero_has_zero, zeros_symmetric and not zero_has_zero)
    return MergePlan(source=source, target=target, layers=layers, identity_modules=identity)
