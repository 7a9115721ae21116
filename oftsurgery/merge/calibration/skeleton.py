"""Checkpoint tensor names ↔ the modules of a transformers model, on an empty (meta) skeleton.

Two skeletons from one config, neither holding weight memory: the checkpoint layout (transformers'
model converted by `defuser`, as gptqmodel quantizes it), whose `nn.Linear` names are the checkpoint's
quantized layers, and the stock layout (transformers' own classes), the reference the layer runner
must reproduce, whose fused parameters `stock_tensor` assembles from the split checkpoint tensors.
Details: docs/architecture.md ("The layer runner").
"""

from __future__ import annotations

import contextlib
import io
from typing import TYPE_CHECKING, Any, Callable, Iterable

from oftsurgery.errors import UnsupportedFormatError

if TYPE_CHECKING:
    import torch
    from torch import nn


def hf_config_from(config: dict[str, Any]):
    """A transformers config object from a checkpoint's config.json (quantization left out)."""
    from transformers import AutoConfig

    cfg = dict(config)
    cfg.pop("quantization_config", None)
    try:
        hf_config = AutoConfig.for_model(**cfg)
    except Exception as exc:
        raise UnsupportedFormatError(
            f"transformers does not know the model architecture {cfg.get('model_type')!r} ({exc})."
        ) from None
    return hf_config


def build_skeleton(config: dict[str, Any], *, checkpoint_layout: bool) -> "nn.Module":
    """The causal LM of `config` with every parameter on the meta device (no memory).

    The attention implementation is transformers' default for the class (sdpa where the model
    supports it, eager otherwise — Gemma 2, for instance), never forced.
    """
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    hf_config = hf_config_from(config)
    hf_config.use_cache = False
    try:
        with init_empty_weights(include_buffers=False), _meta_parameters_initialized():
            model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    except Exception as exc:
        raise UnsupportedFormatError(
            f"transformers cannot build a causal LM for model type {hf_config.model_type!r} "
            f"({type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else 'no message'})."
        ) from None
    if checkpoint_layout:
        import defuser

        # defuser logs (and prints module dumps) on stdout; our stdout may be --json output
        with contextlib.redirect_stdout(io.StringIO()):
            defuser.convert_model(model, cleanup_original=True)
    return model.eval()


@contextlib.contextmanager
def _meta_parameters_initialized():
    """Inside `init_empty_weights`: mark every parameter it puts on the meta device as initialised.

    transformers then skips their random initialisation (its init functions leave a tensor flagged
    `_is_hf_initialized` alone), which on meta tensors computes nothing but costs torch's Python
    meta kernels: about a second for a 7B skeleton. Buffers are not touched, so rotary tables and
    embedding scales are still initialised as before, and with real values."""
    import torch

    inner = torch.nn.Module.register_parameter

    def register_parameter(module, name, param):
        inner(module, name, param)
        registered = module._parameters.get(name)
        if registered is not None and registered.device.type == "meta":
            registered._is_hf_initialized = True

    torch.nn.Module.register_parameter = register_parameter
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = inner


def decoder_layers(model: "nn.Module") -> tuple["nn.Module", "nn.ModuleList", str]:
    """(the decoder base model, its list of decoder layers, that list's module path)."""
    import torch

    base = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
    count = getattr(model.config, "num_hidden_layers", None)
    layers = getattr(base, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        candidates = [m for m in (base.children() if base is not None else []) if isinstance(m, torch.nn.ModuleList)
                      and (count is None or len(m) == count)]
        layers = candidates[0] if len(candidates) == 1 else None
    if layers is None:
        raise UnsupportedFormatError(
            f"{type(model).__name__} has no list of decoder layers the layer runner can walk "
            "(a decoder-only model with model.layers is needed); use --method rtn."
        )
    path = next(name for name, module in model.named_modules() if module is layers)
    return base, layers, path


def set_tensor(root: "nn.Module", name: str, value: "torch.Tensor") -> None:
    """Replace the parameter or buffer `name` (dotted, relative to root) by `value` in place."""
    import torch

    owner_name, _, leaf = name.rpartition(".")
    owner = root.get_submodule(owner_name) if owner_name else root
    if leaf in owner._parameters:
        owner._parameters[leaf] = torch.nn.Parameter(value, requires_grad=False)
    else:
        owner._buffers[leaf] = value


def release(module: "nn.Module") -> None:
    """Put every parameter of `module` back on the meta device (frees its memory)."""
    import torch

    for sub in module.modules():
        for leaf, param in list(sub._parameters.items()):
            if param is not None and param.device.type != "meta":
                sub._parameters[leaf] = torch.nn.Parameter(torch.empty_like(param, device="meta"), requires_grad=False)


class CheckpointTensors:
    """Float tensors of a checkpoint by name: quantized linears dequantized, the rest as stored."""

    def __init__(self, names: Iterable[str], tensor: Callable[[str], "torch.Tensor"],
                 linear_weight: Callable[[str], "torch.Tensor"]):
        self.names = set(names)
        self._tensor = tensor
        self._linear_weight = linear_weight

    def is_quantized(self, module: str) -> bool:
        return f"{module}.qweight" in self.names

    def has(self, name: str) -> bool:
        return name in self.names or (name.endswith(".weight") and self.is_quantized(name[: -len(".weight")]))

    def get(self, name: str, device: "torch.device | str | None" = None) -> "torch.Tensor":
        """Tensor `name`; `X.weight` of a quantized linear X is its dequantized float weight [out, in].

        With `device`, a stored tensor goes there as stored and becomes float32 there (the same values:
        half precision widens exactly), so a GPU receives half the bytes of a float32 copy."""
        import torch

        if name.endswith(".weight") and self.is_quantized(name[: -len(".weight")]):
            value = self._linear_weight(name[: -len(".weight")]).to(torch.float32)
            return value if device is None else value.to(device)
        value = self._tensor(name)
        if device is not None:
            value = value.to(device)
        return value.to(torch.float32) if value.is_floating_point() else value


def _expert_count(module: "nn.Module", param: "torch.Tensor") -> int:
    return int(getattr(module, "num_experts", param.shape[0]))


def stock_tensor(layer: "nn.Module", prefix: str, name: str, tensors: CheckpointTensors) -> "torch.Tensor":
    """The value of parameter `name` of a stock transformers layer, from checkpoint tensors.

    Stored under its own name when the checkpoint has it; otherwise assembled from the split
    tensors gptqmodel writes: `X.gate_up_proj.weight` = [X.gate_proj; X.up_proj] (gate first, as
    Phi-3's MLP chunks it), fused experts `X.experts.gate_up_proj` [E, 2I, H] = per expert
    [gate_e; up_e], `X.experts.down_proj` [E, H, I] = down_e (transposed for classes that store
    experts as [E, in, out]).
    """
    import torch

    def join(*parts: str) -> str:
        return ".".join(p for p in parts if p)

    full = join(prefix, name)
    if tensors.has(full):
        return tensors.get(full)
    owner_name, _, leaf = name.rpartition(".")
    owner = layer.get_submodule(owner_name) if owner_name else layer
    if leaf == "weight" and owner_name.endswith("gate_up_proj"):
        parent = join(prefix, owner_name[: -len("gate_up_proj")])
        if tensors.has(f"{parent}gate_proj.weight") and tensors.has(f"{parent}up_proj.weight"):
            return torch.cat([tensors.get(f"{parent}gate_proj.weight"), tensors.get(f"{parent}up_proj.weight")])
    param = owner._parameters.get(leaf)
    if param is not None and param.dim() == 3:
        base = join(prefix, owner_name)
        projection = leaf[: -len("_bias")] if leaf.endswith("_bias") else leaf
        kind = "bias" if leaf.endswith("_bias") else "weight"
        experts = range(_expert_count(owner, param))
        if projection == "gate_up_proj":
            names = [(f"{base}.{e}.gate_proj.{kind}", f"{base}.{e}.up_proj.{kind}") for e in experts]
        else:
            names = [(f"{base}.{e}.{projection}.{kind}",) for e in experts]
        if all(tensors.has(n) for group in names for n in group):
            stacked = torch.stack([torch.cat([tensors.get(n) for n in group]) for group in names])
            if kind == "weight" and getattr(owner, "is_transposed", False):
                stacked = stacked.transpose(1, 2)
            return stacked.contiguous()
    raise UnsupportedFormatError(
        f"The checkpoint has no tensor for {full}, and it cannot be assembled from split tensors "
        f"(layout of {type(layer).__name__} not recognised)."
    )
