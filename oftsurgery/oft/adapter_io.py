"""OFT adapters on disk: PEFT's adapter folders (every generation) and oftsurgery's rotations file.

Whatever its origin, a loaded adapter (`load_rotations`) becomes a `RotationSet`: materialized float32
blocks per module path plus what a merge needs to reproduce it exactly (PEFT 0.14–0.15's per-output
scales, PEFT ≤ 0.13's output-side modules), and `RotationSet.merged_weight` applies each kind.
`read_peft_adapter` / `write_peft_adapter` and `save_rotations` / `read_rotations_file` are the two
formats. Generations: docs/formats.md ("OFT adapters"); the rotations file: docs/rotations-format.md.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from oftsurgery.errors import InvalidAdapterError, UnsupportedFormatError
from oftsurgery.io import ownership
from oftsurgery.oft import config as cfg
from oftsurgery.oft.config import OFTOptions
from oftsurgery.schema import check_fields

if TYPE_CHECKING:
    from torch import Tensor

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PICKLE_WEIGHTS = "adapter_model.bin"
KEY_PREFIX = "base_model.model."

ROTATIONS_FORMAT = ownership.ROTATIONS_FORMAT
ROTATIONS_FORMAT_VERSION = "1"
ROTATION_SUFFIX = ".rotation"
SCALE_SUFFIX = ".scale"

# The kinds of the metadata keys a rotations file may carry (see oftsurgery.schema).
ROTATIONS_METADATA_SCHEMA = {
    "source": "str?",
    "source_generation": "str?",
    "base_model": "str?",
    "parameterization": "str?",
    "num_cayley_neumann_terms": "int?",
    "peft_version": "str?",
    "coft": "bool?",
    "eps": "number?",
    "block_share": "bool?",
    "block_sizes": "dict?",
    "target_modules": "str_list?",
    "output_side": "str_list?",
}

# A rotations file of exact Cayley blocks must be orthogonal to this; Neumann blocks are only
# approximately orthogonal and are checked loosely.
ORTHOGONALITY_TOL_EXACT = 1e-3
ORTHOGONALITY_TOL_ANY = 0.25


# --------------------------------------------------------------------------------------------------
# PEFT adapter folders
# --------------------------------------------------------------------------------------------------


@dataclass
class PeftOftAdapter:
    """The raw contents of a PEFT OFT adapter folder, by module path."""

    path: Path
    options: OFTOptions
    params: dict[str, Tensor] = field(default_factory=dict)  # current: oft_R.weight (r, n)
    legacy_r: dict[str, Tensor] = field(default_factory=dict)  # ≤ 0.15: oft_r (r, b, b)
    legacy_s: dict[str, Tensor] = field(default_factory=dict)  # 0.14-0.15: oft_s (out, 1)

    @property
    def generation(self) -> str:
        return self.options.generation

    @property
    def modules(self) -> list[str]:
        return sorted(set(self.params) | set(self.legacy_r))


def _split_key(key: str) -> tuple[str, str]:
    """`base_model.model.<path>.oft_R.weight` -> (`<path>`, `oft_R`); also oft_r / oft_s keys."""
    name = key[len(KEY_PREFIX):] if key.startswith(KEY_PREFIX) else key
    parts = name.split(".")
    for kind in ("oft_R", "oft_r", "oft_s"):
        if kind in parts:
            idx = len(parts) - 1 - parts[::-1].index(kind)
            return ".".join(parts[:idx]), kind
    raise InvalidAdapterError(f"The adapter tensor {key!r} is not an OFT parameter.")


def read_peft_adapter(path: str | Path) -> PeftOftAdapter:
    """Read an OFT adapter folder written by any PEFT release (safetensors weights only)."""
    from safetensors.torch import load_file

    folder = Path(path)
    config_path = folder / ADAPTER_CONFIG
    if not config_path.is_file():
        raise InvalidAdapterError(f"{folder} is not a PEFT adapter folder (no {ADAPTER_CONFIG}).")
    try:
        data = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InvalidAdapterError(f"{config_path} cannot be read as JSON ({exc}).") from None
    options = OFTOptions.from_peft_dict(data, str(config_path))
    weights = folder / ADAPTER_WEIGHTS
    if not weights.is_file():
        if (folder / PICKLE_WEIGHTS).is_file():
            raise UnsupportedFormatError(
                f"{folder} stores its weights as a pickle ({PICKLE_WEIGHTS}); oftsurgery reads only safetensors. "
                "Re-save it with safe_serialization=True."
            )
        raise InvalidAdapterError(f"{folder} has no {ADAPTER_WEIGHTS}.")
    try:
        tensors = load_file(str(weights))
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types for corrupt files
        raise InvalidAdapterError(f"{weights} is not a readable safetensors file ({exc}).") from None
    adapter = PeftOftAdapter(folder, options)
    for key, tensor in tensors.items():
        module, kind = _split_key(key)
        _check_finite(tensor, f"{key} in {weights}")
        {"oft_R": adapter.params, "oft_r": adapter.legacy_r, "oft_s": adapter.legacy_s}[kind][module] = tensor
    if adapter.params and adapter.legacy_r:
        raise InvalidAdapterError(f"{weights} mixes current (oft_R) and old (oft_r) OFT tensors.")
    if not adapter.modules:
        raise InvalidAdapterError(f"{weights} holds no OFT parameters.")
    if adapter.legacy_r:
        # the tensors decide when the config is ambiguous
        options.generation = cfg.GENERATION_OFT_S if adapter.legacy_s else cfg.GENERATION_OUTPUT_SIDE
        options.use_cayley_neumann = False
    elif options.generation in (cfg.GENERATION_OFT_S, cfg.GENERATION_OUTPUT_SIDE):
        raise InvalidAdapterError(f"{config_path} looks like PEFT <= 0.15 but the weights are oft_R tensors.")
    for module, tensor in adapter.params.items():
        if tensor.dim() != 2:
            raise InvalidAdapterError(f"oft_R.weight of {module} has shape {tuple(tensor.shape)}, expected (r, n).")
        try:
            from oftsurgery.oft.rotation import block_size_from_params

            block_size_from_params(tensor.shape[1])
        except ValueError as exc:
            raise InvalidAdapterError(f"oft_R.weight of {module}: {exc}") from None
    return adapter


def write_peft_adapter(out_dir: str | Path, options: OFTOptions, params: dict[str, Tensor]) -> None:
    """Write `adapter_config.json` + `adapter_model.safetensors` (current PEFT format) into `out_dir`.

    `params` maps module paths to `(r, n)` tensors. The caller owns atomicity (see atomic_output).
    """
    import torch
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {f"{KEY_PREFIX}{module}.oft_R.weight": t.detach().to("cpu").contiguous() for module, t in params.items()}
    for name, tensor in tensors.items():
        if not torch.isfinite(tensor).all():
            raise InvalidAdapterError(f"Refusing to save {name}: it holds NaN or Inf.")
    # the marker lets `--overwrite` recognise this folder as one oftsurgery wrote (PEFT ignores it)
    metadata = {"format": "pt", ownership.FORMAT_KEY: ownership.ADAPTER_FORMAT}
    save_file(tensors, str(out / ADAPTER_WEIGHTS), metadata=metadata)
    (out / ADAPTER_CONFIG).write_text(json.dumps(options.to_peft_dict(), indent=2, sort_keys=True) + "\n")


# --------------------------------------------------------------------------------------------------
# RotationSet
# --------------------------------------------------------------------------------------------------


@dataclass
class RotationSet:
    """Materialized rotations of one adapter, ready to merge or to re-attach.

    `blocks[module]` is float32 `[r, b, b]`; with block_share (metadata["block_share"]) it is the one
    shared block `[1, b, b]`, applied to every chunk of the input. `scales[module]` (PEFT 0.14-0.15)
    is `[out, 1]`. Modules in `output_side` (PEFT ≤ 0.13) rotate the output, not the input.
    Use `merged_weight` rather than re-deriving these rules.
    """

    blocks: dict[str, Tensor]
    metadata: dict[str, Any] = field(default_factory=dict)
    scales: dict[str, Tensor] = field(default_factory=dict)
    output_side: set[str] = field(default_factory=set)

    def block_size(self, module: str) -> int:
        return int(self.blocks[module].shape[-1])

    def strength(self, module: str, in_features: int | None = None) -> float:
        """‖R − I‖_F of the module's full block-diagonal rotation."""
        from oftsurgery.oft.rotation import rotation_strength

        blocks = self.blocks[module]
        value = rotation_strength(blocks)
        if blocks.shape[0] == 1 and in_features:
            value *= math.sqrt(in_features // blocks.shape[-1])
        return value

    def merged_weight(self, module: str, weight: Tensor) -> Tensor:
        """The dense weight `[out, in]` that reproduces the adapted layer (float32 or wider)."""
        import torch

        from oftsurgery.oft.rotation import block_diagonal, rotate_weight

        blocks = self.blocks[module]
        if module in self.output_side:
            out_features = weight.shape[0]
            count = blocks.shape[0]
            if count == 1:
                count = math.ceil(out_features / blocks.shape[-1])
            dense = block_diagonal(blocks.expand(count, -1, -1))[:out_features, :out_features]
            dtype = torch.promote_types(weight.dtype, torch.float32)
            merged = dense.to(weight.device, dtype).T @ weight.to(dtype)
        else:
            merged = rotate_weight(weight, blocks)
        if module in self.scales:
            merged = merged * self.scales[module].to(merged.device, merged.dtype)
        return merged


def _check_finite(tensor: Tensor, what: str) -> None:
    """Adapter weights, rotation blocks and scales are finite floating-point numbers."""
    import torch

    if not tensor.is_floating_point():
        raise InvalidAdapterError(f"{what} holds {str(tensor.dtype).removeprefix('torch.')} values; "
                                  "adapter weights, rotation blocks and scales must be floating point.")
    if not torch.isfinite(tensor).all():
        raise InvalidAdapterError(f"{what} holds NaN or Inf values.")


def rotations_from_adapter(adapter: PeftOftAdapter) -> RotationSet:
    """Materialize every module's blocks exactly as the adapter's PEFT release did (in float32)."""
    import torch

    from oftsurgery.oft import rotation as rot

    options = adapter.options
    blocks: dict[str, Tensor] = {}
    block_sizes: dict[str, int] = {}
    output_side: set[str] = set()
    if adapter.params:
        for module, params in adapter.params.items():
            b = rot.block_size_from_params(params.shape[1])
            blocks[module] = rot.rotation_blocks(
                params.to(torch.float32), b, use_cayley_neumann=options.use_cayley_neumann,
                num_terms=options.num_cayley_neumann_terms, peft_version=options.semantics_version,
                coft=options.coft, eps=options.eps, block_share=options.block_share,
            ).contiguous()
            block_sizes[module] = b
        parameterization = "cayley_neumann" if options.use_cayley_neumann else "cayley"
    else:
        for module, raw in adapter.legacy_r.items():
            raw = raw.to(torch.float32)
            if raw.dim() != 3 or raw.shape[1] != raw.shape[2]:
                raise InvalidAdapterError(f"oft_r of {module} has shape {tuple(raw.shape)}, expected (r, b, b).")
            b = raw.shape[-1]
            if options.coft:
                # ≤ 0.15 scaled eps by ceil(out/r)² with the layer's (adjusted) r
                if adapter.generation == cfg.GENERATION_OUTPUT_SIDE:
                    ceil_out_over_r = b
                else:
                    out_features = adapter.legacy_s[module].shape[0] if module in adapter.legacy_s else None
                    layer_r = raw.shape[0] if not options.block_share else (options.r or 1)
                    if out_features is None:
                        raise InvalidAdapterError(f"{module} has oft_r but no oft_s; cannot resolve its COFT eps.")
                    ceil_out_over_r = math.ceil(out_features / layer_r)
                raw = rot.legacy_coft_project(raw, options.eps * ceil_out_over_r * ceil_out_over_r)
            rotation = rot.legacy_cayley(raw)
            if options.block_share and adapter.generation == cfg.GENERATION_OUTPUT_SIDE and options.r:
                rotation = rotation.expand(options.r, -1, -1)
            blocks[module] = rotation.contiguous()
            block_sizes[module] = b
            if adapter.generation == cfg.GENERATION_OUTPUT_SIDE:
                output_side.add(module)
        parameterization = "legacy_cayley"
    scales = {m: s.to(torch.float32).reshape(-1, 1) for m, s in adapter.legacy_s.items()}
    if scales and any(not torch.equal(s, torch.ones_like(s)) for s in scales.values()):
        warnings.warn(
            f"{adapter.path} is a PEFT 0.14-0.15 adapter with per-output scales (oft_s); they can only be "
            "honoured when merging into the weights (W' = s * W R^T), not by input-rotating wrappers.",
            stacklevel=2,
        )
    metadata = {
        "source": str(adapter.path),
        "source_generation": adapter.generation,
        "base_model": options.base_model_name_or_path,
        "parameterization": parameterization,
        "num_cayley_neumann_terms": options.num_cayley_neumann_terms if options.use_cayley_neumann else None,
        "peft_version": options.semantics_version,
        "coft": options.coft,
        "eps": options.eps,
        "block_share": options.block_share and adapter.generation != cfg.GENERATION_OUTPUT_SIDE,
        "block_sizes": block_sizes,
        "target_modules": sorted(blocks),
    }
    return RotationSet(blocks, metadata, scales, output_side)


# --------------------------------------------------------------------------------------------------
# The rotations file
# --------------------------------------------------------------------------------------------------


def save_rotations(rotations: RotationSet, path: str | Path) -> None:
    """Write a rotations file (float32 blocks + metadata) to `path` (caller owns atomicity)."""
    import torch
    from safetensors.torch import save_file

    tensors: dict[str, Tensor] = {}
    for module, blocks in rotations.blocks.items():
        _check_finite(blocks, f"rotation of {module}")
        tensors[module + ROTATION_SUFFIX] = blocks.detach().to("cpu", torch.float32).contiguous()
    for module, scale in rotations.scales.items():
        tensors[module + SCALE_SUFFIX] = scale.detach().to("cpu", torch.float32).contiguous()
    metadata = {"format": "pt", ownership.FORMAT_KEY: ROTATIONS_FORMAT, "oftsurgery_format_version": ROTATIONS_FORMAT_VERSION}
    meta = dict(rotations.metadata)
    meta["output_side"] = sorted(rotations.output_side)
    metadata["oftsurgery_metadata"] = json.dumps(meta, sort_keys=True, default=str)
    save_file(tensors, str(path), metadata=metadata)


def read_rotations_file(path: str | Path) -> RotationSet:
    """Read and validate a rotations file written by `save_rotations`."""
    from safetensors import safe_open

    from oftsurgery.oft.rotation import orthogonality_error

    file = Path(path)
    try:
        with safe_open(str(file), framework="pt") as handle:
            header = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except Exception as exc:  # noqa: BLE001
        raise InvalidAdapterError(f"{file} is not a readable safetensors file ({exc}).") from None
    if header.get("oftsurgery_format") != ROTATIONS_FORMAT:
        raise InvalidAdapterError(f"{file} is not an oftsurgery rotations file (no '{ROTATIONS_FORMAT}' metadata).")
    if header.get("oftsurgery_format_version") != ROTATIONS_FORMAT_VERSION:
        raise UnsupportedFormatError(
            f"{file} is rotations format version {header.get('oftsurgery_format_version')}; "
            f"this oftsurgery reads version {ROTATIONS_FORMAT_VERSION}."
        )
    try:
        metadata = json.loads(header.get("oftsurgery_metadata", "{}"))
    except json.JSONDecodeError:
        raise InvalidAdapterError(f"{file} has unreadable metadata.") from None
    check_fields(metadata, ROTATIONS_METADATA_SCHEMA, f"The metadata of {file}", InvalidAdapterError)
    output_side = set(metadata.pop("output_side", None) or [])
    blocks, scales = {}, {}
    for name, tensor in tensors.items():
        _check_finite(tensor, f"{name} in {file}")
        if name.endswith(ROTATION_SUFFIX):
            module = name[: -len(ROTATION_SUFFIX)]
            if tensor.dim() != 3 or tensor.shape[1] != tensor.shape[2]:
                raise InvalidAdapterError(f"{name} in {file} has shape {tuple(tensor.shape)}, expected [r, b, b].")
            tol = ORTHOGONALITY_TOL_EXACT if metadata.get("parameterization") != "cayley_neumann" else ORTHOGONALITY_TOL_ANY
            error = orthogonality_error(tensor)
            if error > tol:
                raise InvalidAdapterError(
                    f"{name} in {file} is not a rotation (max |RᵀR − I| = {error:.3g} > {tol:g})."
                )
            blocks[module] = tensor
        elif name.endswith(SCALE_SUFFIX):
            scales[name[: -len(SCALE_SUFFIX)]] = tensor
        else:
            raise InvalidAdapterError(f"{file} holds an unexpected tensor {name!r}.")
    if not blocks:
        raise InvalidAdapterError(f"{file} holds no rotations.")
    strays = sorted(output_side - set(blocks)) + sorted(set(scales) - set(blocks))
    if strays:
        raise InvalidAdapterError(f"The metadata or scales of {file} name {strays[0]}, which has no rotation in the file.")
    return RotationSet(blocks, metadata, scales, output_side)


def load_rotations(path: str | Path) -> RotationSet:
    """A PEFT adapter folder (any generation) or a rotations file, as a `RotationSet`."""
    source = Path(path)
    if source.is_dir():
        return rotations_from_adapter(read_peft_adapter(source))
    if source.is_file():
        return read_rotations_file(source)
    raise InvalidAdapterError(f"{source} does not exist.")
