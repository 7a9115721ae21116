"""`oftsurgery attach`: write a PEFT-loadable OFT adapter for a quantized checkpoint, without loading it.

Module paths and `in_features` come from the checkpoint's tensor names and shapes, so this works for
checkpoints of any size in seconds. The adapter holds identity rotations, or the rotations of
another adapter / rotations file (`from_path`), converted back into PEFT parameters: exactly for the
exact Cayley map (`Q = (I − R)(I + R)⁻¹`), by a least-squares fit for Cayley–Neumann (whose series
cannot represent an exactly orthogonal matrix; the residual is reported).
"""

from __future__ import annotations

import re
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from oftsurgery.errors import InvalidAdapterError, InvalidCheckpointError

DEFAULT_BLOCK_SIZE = 32  # PEFT's OFTConfig default
OUTPUT_LAYER_NAMES = ("lm_head",)


@dataclass
class AttachedModule:
    name: str
    in_features: int
    r: int
    block_size: int
    fit_residual: float = 0.0


@dataclass
class AttachResult:
    out: Path
    modules: list[AttachedModule] = field(default_factory=list)
    source: str | None = None
    options: dict = field(default_factory=dict)

    @property
    def max_fit_residual(self) -> float:
        return max((m.fit_residual for m in self.modules), default=0.0)


def quantized_linear_shapes(checkpoint: str | Path) -> dict[str, int]:
    """module path -> in_features of every quantized linear in the checkpoint (from headers only)."""
    from oftsurgery.io import CheckpointReader
    from oftsurgery.quant.config import load_quant_config
    from oftsurgery.quant.layout import quantized_linear_shapes as layer_shapes

    reader = CheckpointReader(checkpoint)
    qcfg = load_quant_config(checkpoint)
    header_shapes = {name: info.shape for name, info in reader.tensors.items()}
    shapes = {prefix: in_f for prefix, (in_f, _) in layer_shapes(header_shapes, qcfg).items()}
    if not shapes:
        raise InvalidCheckpointError(f"{checkpoint} has no quantized linear layers (no .qweight/.qzeros/.scales).")
    return shapes


def _select(names: list[str], patterns: list[str] | str | None) -> list[str]:
    if isinstance(patterns, str):
        return [n for n in names if re.fullmatch(patterns, n)]
    return [n for n in names if any(n == p or n.endswith("." + p) for p in patterns or [])]


def _config_target_modules(selected: list[str], all_names: list[str]) -> list[str]:
    """Short names (q_proj, …) when they select exactly these modules, else the full paths."""
    short = sorted({name.rsplit(".", 1)[-1] for name in selected})
    return short if sorted(_select(all_names, short)) == sorted(selected) else sorted(selected)


def attach_adapter(
    checkpoint: str | Path,
    out: str | Path,
    *,
    target_modules: list[str] | str | None = None,
    exclude_modules: list[str] | str | None = None,
    block_size: int | None = None,
    r: int | None = None,
    coft: bool = False,
    eps: float = 6e-5,
    block_share: bool | None = None,
    use_cayley_neumann: bool = True,
    neumann_terms: int = 5,
    from_path: str | Path | None = None,
    overwrite: bool = False,
) -> AttachResult:
    """Write a PEFT OFT adapter folder for `checkpoint` into `out` (atomically)."""
    import torch

    from oftsurgery.io import atomic_output, check_output_path
    from oftsurgery.oft import rotation as rot
    from oftsurgery.oft.adapter_io import load_rotations, write_peft_adapter
    from oftsurgery.oft.config import OFTOptions

    if block_size and r:
        raise InvalidAdapterError("Give either a block size or r, not both.")
    for patterns in (target_modules, exclude_modules):
        if isinstance(patterns, str):
            try:
                re.compile(patterns)
            except re.error as exc:
                raise InvalidAdapterError(f"{patterns!r} is not a valid regular expression ({exc}).") from None
    inputs = [checkpoint] + ([from_path] if from_path else [])
    out_path = check_output_path(out, inputs, overwrite)
    shapes = quantized_linear_shapes(checkpoint)
    names = sorted(shapes)

    rotations = load_rotations(from_path) if from_path else None
    if rotations is not None:
        if rotations.output_side:
            raise InvalidAdapterError(
                f"{from_path} is a PEFT <= 0.13 adapter that rotates layer outputs; current PEFT cannot express it "
                "(merge it directly instead)."
            )
        if rotations.scales:
            warnings.warn(f"{from_path}: the per-output scales (oft_s) cannot be expressed in a current PEFT "
                          "adapter and are dropped.", stacklevel=2)
        unknown = sorted(set(rotations.blocks) - set(shapes))
        if unknown:
            raise InvalidAdapterError(f"{from_path} has rotations for {unknown[0]}, which {checkpoint} does not have.")
        shared = bool(rotations.metadata.get("block_share"))
        if block_share is not None and block_share != shared:
            raise InvalidAdapterError(f"--block-share={block_share} contradicts {from_path} (block_share={shared}).")
        block_share = shared

    if target_modules:
        selected = _select(names, target_modules)
    elif rotations is not None:
        selected = sorted(rotations.blocks)
    else:
        selected = [n for n in names if n.rsplit(".", 1)[-1] not in OUTPUT_LAYER_NAMES]
    if exclude_modules:
        excluded = set(_select(selected, exclude_modules))
        selected = [n for n in selected if n not in excluded]
    if not selected:
        raise InvalidAdapterError(f"No quantized linear layer of {checkpoint} matches the target modules {target_modules!r}.")
    if rotations is not None:
        missing = [n for n in selected if n not in rotations.blocks]
        if missing:
            raise InvalidAdapterError(f"{from_path} has no rotation for {missing[0]}.")

    if not block_size and not r:
        if rotations is not None:
            block_size = Counter(rotations.block_size(n) for n in selected).most_common(1)[0][0]
        else:
            block_size = DEFAULT_BLOCK_SIZE
    options = OFTOptions(
        r=r or 0, oft_block_size=0 if r else block_size, coft=coft, eps=eps, block_share=bool(block_share),
        use_cayley_neumann=use_cayley_neumann, num_cayley_neumann_terms=neumann_terms,
        target_modules=_config_target_modules(selected, names), exclude_modules=None,
        base_model_name_or_path=str(checkpoint), task_type=_task_type(checkpoint),
    ).validate()

    result = AttachResult(out_path, source=str(from_path) if from_path else None)
    params: dict[str, torch.Tensor] = {}
    for name in selected:
        in_features = shapes[name]
        layer_r, b, adjusted = rot.resolve_block_layout(in_features, options.r, options.oft_block_size)
        if adjusted:
            warnings.warn(f"{name}: in_features={in_features} is not divisible as asked; PEFT will use block "
                          f"size {b} (r={layer_r}) and so does this adapter.", stacklevel=2)
        stored = 1 if options.block_share else layer_r
        residual = 0.0
        if rotations is None:
            tensor = torch.zeros(stored, rot.params_per_block(b))
        else:
            blocks = rotations.blocks[name]
            if blocks.shape[-1] != b or blocks.shape[0] != stored:
                raise InvalidAdapterError(
                    f"{name}: the given rotation has {blocks.shape[0]} blocks of size {blocks.shape[-1]}, but PEFT "
                    f"resolves {stored} blocks of size {b} for in_features={in_features} with these options."
                )
            tensor, residual = rot.fit_params(blocks, use_cayley_neumann=use_cayley_neumann, num_terms=neumann_terms)
            if coft:
                projected = rot.coft_project(tensor, b, eps)
                if not torch.equal(projected, tensor):
                    warnings.warn(f"{name}: the rotation is stronger than --eps allows; COFT will shrink it.",
                                  stacklevel=2)
        params[name] = tensor
        result.modules.append(AttachedModule(name, in_features, layer_r, b, residual))
    with atomic_output(out_path, overwrite=overwrite) as tmp:
        write_peft_adapter(tmp, options, params)
    result.options = options.to_peft_dict()
    return result


def _task_type(checkpoint: str | Path) -> str | None:
    from oftsurgery.io import CheckpointReader

    architectures = CheckpointReader(checkpoint).config.get("architectures") or []
    return "CAUSAL_LM" if any(str(a).endswith("ForCausalLM") for a in architectures) else None
