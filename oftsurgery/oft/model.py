"""Attaching OFT wrappers to a loaded model, and saving/loading its adapter in PEFT's format.

Targets are chosen like PEFT's `target_modules` / `exclude_modules`: a string is a regex that must
match the whole module path; a list matches a path equal to an entry or ending in "." + entry;
"all-linear" means every quantized linear except the output layer. Only quantized linears can be
targeted (the dispatchers below decide, first match wins).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from oftsurgery.errors import InvalidAdapterError
from oftsurgery.oft.awq import dispatch_awq
from oftsurgery.oft.config import GENERATION_OFT_S, GENERATION_OUTPUT_SIDE, OFTOptions
from oftsurgery.oft.gptq import dispatch_gptq
from oftsurgery.oft.layer import OFTQuantLinear

DISPATCHERS = (dispatch_gptq, dispatch_awq)
OUTPUT_LAYER_NAMES = ("lm_head",)


def _matches(name: str, patterns: list[str] | str | set[str] | None) -> bool:
    if patterns is None:
        return False
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def is_quantized_linear(module: nn.Module) -> bool:
    from oftsurgery.oft.awq import _is_autoawq_gemm, is_gptqmodel_awq_layer
    from oftsurgery.oft.gptq import is_gptq_layer

    return is_gptq_layer(module) or is_gptqmodel_awq_layer(module) or _is_autoawq_gemm(module)


def find_target_modules(
    model: nn.Module,
    target_modules: list[str] | str | None,
    exclude_modules: list[str] | str | None = None,
) -> list[str]:
    """Module paths selected by the PEFT-style patterns (only quantized linears or our wrappers)."""
    selected = []
    for name, module in model.named_modules():
        if isinstance(module, OFTQuantLinear):
            base = module.base_layer
        elif any(isinstance(parent, OFTQuantLinear) for parent in _parents(model, name)):
            continue
        else:
            base = module
        if target_modules == "all-linear":
            chosen = is_quantized_linear(base) and name.split(".")[-1] not in OUTPUT_LAYER_NAMES
        else:
            chosen = _matches(name, target_modules)
        if not chosen or _matches(name, exclude_modules):
            continue
        if not (isinstance(module, OFTQuantLinear) or is_quantized_linear(base)):
            raise InvalidAdapterError(
                f"{name} ({type(module).__name__}) matches the target modules but is not a GPTQ/AWQ quantized linear."
            )
        selected.append(name)
    if not selected:
        raise InvalidAdapterError(f"No quantized linear layer matches the target modules {target_modules!r}.")
    return selected


def _parents(model: nn.Module, name: str):
    parts = name.split(".")
    for i in range(1, len(parts)):
        yield model.get_submodule(".".join(parts[:i]))


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


@dataclass
class AttachReport:
    """What `attach_oft` did."""

    adapter_name: str
    modules: list[str]
    block_sizes: dict[str, int] = field(default_factory=dict)
    trainable_params: int = 0
    all_params: int = 0

    def summary(self) -> str:
        pct = 100.0 * self.trainable_params / max(self.all_params, 1)
        return (
            f"trainable params: {self.trainable_params:,} || all params: {self.all_params:,} || "
            f"trainable%: {pct:.4f} ({len(self.modules)} modules)"
        )


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, all) parameter counts; packed quantized weights are buffers and not counted."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def attach_oft(
    model: nn.Module,
    options: OFTOptions,
    adapter_name: str = "default",
    *,
    modules: list[str] | None = None,
    block_sizes: dict[str, int] | None = None,
    dtype: torch.dtype = torch.float32,
    freeze_base: bool = True,
) -> AttachReport:
    """Wrap the targeted quantized linears (or add an adapter to existing wrappers).

    `block_sizes` forces a per-module block size (used when loading stored parameters, whose shape
    decides); otherwise it is resolved from `options` per layer as PEFT does. With `freeze_base`
    every non-OFT parameter is frozen and only this adapter's parameters train.
    """
    options.validate()
    names = modules or find_target_modules(model, options.target_modules, options.exclude_modules)
    kwargs = options.wrapper_kwargs()
    report = AttachReport(adapter_name, list(names))
    for name in names:
        module = model.get_submodule(name)
        layer_kwargs = dict(kwargs, dtype=dtype)
        if block_sizes and name in block_sizes:
            layer_kwargs.update(r=0, oft_block_size=block_sizes[name])
        if isinstance(module, OFTQuantLinear):
            module.update_layer(adapter_name, **layer_kwargs)
            module.set_adapter(module.active_adapters + [adapter_name])
            wrapper = module
        else:
            wrapper = None
            for dispatch in DISPATCHERS:
                wrapper = dispatch(module, adapter_name, **layer_kwargs)
                if wrapper is not None:
                    break
            if wrapper is None:
                raise InvalidAdapterError(f"{name} is not a GPTQ/AWQ quantized linear.")
            wrapper.train(module.training)
            _set_submodule(model, name, wrapper)
        report.block_sizes[name] = wrapper.oft_block_size[adapter_name]
    if freeze_base:
        for pname, param in model.named_parameters():
            param.requires_grad_(f".oft_R.{adapter_name}." in f".{pname}")
    report.trainable_params, report.all_params = count_parameters(model)
    return report


def oft_wrappers(model: nn.Module) -> dict[str, OFTQuantLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, OFTQuantLinear)}


def adapter_parameters(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """module path -> this adapter's `(r, n)` parameters (as PEFT saves them, without the name)."""
    return {
        name: wrapper.oft_R[adapter_name].weight.detach()
        for name, wrapper in oft_wrappers(model).items()
        if adapter_name in wrapper.oft_R
    }


def save_oft_adapter(
    model: nn.Module,
    out_dir: str | Path,
    options: OFTOptions,
    adapter_name: str = "default",
    overwrite: bool = False,
) -> Path:
    """Save one adapter as a PEFT-loadable folder (atomically; refuses an existing folder)."""
    from oftsurgery.io import atomic_output, check_output_path
    from oftsurgery.oft.adapter_io import write_peft_adapter

    params = adapter_parameters(model, adapter_name)
    if not params:
        raise InvalidAdapterError(f"The model has no OFT adapter named {adapter_name!r}.")
    out = check_output_path(out_dir, overwrite=overwrite)
    with atomic_output(out, overwrite=overwrite) as tmp:
        write_peft_adapter(tmp, options, params)
    return out


def load_oft_adapter(model: nn.Module, adapter_dir: str | Path, adapter_name: str = "default",
                     *, dtype: torch.dtype = torch.float32, freeze_base: bool = True) -> AttachReport:
    """Attach an adapter saved by PEFT or by us; per-layer block sizes come from the stored shapes.

    PEFT 0.14-0.15 adapters are converted exactly (their Cayley map is the exact one, so the
    generator is kept); their `oft_s` scales cannot be applied by input-side wrappers and are
    dropped with a warning (merge honours them). PEFT ≤ 0.13 adapters rotate the layer output and
    are refused here (extract/merge read them).
    """
    from oftsurgery.oft import rotation as rot
    from oftsurgery.oft.adapter_io import read_peft_adapter

    adapter = read_peft_adapter(adapter_dir)
    options = adapter.options
    if adapter.generation == GENERATION_OUTPUT_SIDE:
        raise InvalidAdapterError(
            f"{adapter_dir} is a PEFT <= 0.13 OFT adapter, which rotates layer outputs; the wrappers rotate "
            "inputs. Use `oftsurgery extract`/`merge` for it."
        )
    if adapter.generation == GENERATION_OFT_S:
        import warnings

        if adapter.legacy_s:
            warnings.warn(
                f"{adapter_dir}: PEFT 0.14-0.15 per-output scales (oft_s) are not applied by the wrappers; "
                "only a merge honours them.",
                stacklevel=2,
            )
        params = {}
        for module, raw in adapter.legacy_r.items():
            raw = raw.to(torch.float32)
            skew = 0.5 * (raw - raw.transpose(-2, -1))
            params[module] = rot.params_from_skew(skew)
        options.use_cayley_neumann = False
        if options.coft:
            raise InvalidAdapterError(
                f"{adapter_dir}: COFT adapters of PEFT 0.14-0.15 used a different eps scaling; "
                "load them through extract/merge instead."
            )
    else:
        params = adapter.params
    missing = [m for m in params if not _has_module(model, m)]
    if missing:
        raise InvalidAdapterError(f"The adapter targets {missing[0]}, which this model does not have.")
    block_sizes = {m: rot.block_size_from_params(p.shape[1]) for m, p in params.items()}
    report = attach_oft(model, options, adapter_name, modules=sorted(params), block_sizes=block_sizes,
                        dtype=dtype, freeze_base=freeze_base)
    for module, tensor in params.items():
        target = model.get_submodule(module).oft_R[adapter_name].weight
        if target.shape != tensor.shape:
            raise InvalidAdapterError(
                f"{module}: stored OFT parameters {tuple(tensor.shape)} do not fit the layer ({tuple(target.shape)})."
            )
        with torch.no_grad():
            target.copy_(tensor.to(target.dtype))
    return report


def _has_module(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
        return True
    except AttributeError:
        return False
