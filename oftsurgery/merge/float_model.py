"""A float copy of a quantized model, built one decoder layer at a time.

Calibrated requantization needs real activations at every targeted layer. Loading the whole model
in float would cost 4 bytes per weight; instead we build the architecture on the meta device (no
memory), materialise only the embeddings and rotary tables, capture what the first decoder layer
receives, and then materialise each decoder layer in turn from dequantized weights. Peak memory is
one decoder layer plus the calibration activations.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any, Callable

from oftsurgery.errors import UnsupportedFormatError

if TYPE_CHECKING:
    import torch
    from torch import nn


class _Captured(Exception):
    pass


class LayerwiseModel:
    """Run a decoder-only HF model layer by layer with weights supplied by the caller.

    `tensor(name)` returns any float/int tensor of the checkpoint by name (non-quantized tensors as
    stored); `linear_weight(prefix)` returns the float weight [out, in] of a quantized linear.
    """

    def __init__(self, config: dict[str, Any], tensor: Callable[[str], "torch.Tensor"], device: str = "cpu"):
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        cfg = dict(config)
        cfg.pop("quantization_config", None)
        try:
            hf_config = AutoConfig.for_model(**cfg)
        except Exception as exc:
            raise UnsupportedFormatError(f"Unknown model architecture {cfg.get('model_type')!r} ({exc}).") from None
        hf_config._attn_implementation = "sdpa"
        hf_config.use_cache = False
        self.config = hf_config
        self.device = torch.device(device)
        self._tensor = tensor
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
        base = getattr(model, "model", None)
        if base is None or not hasattr(base, "layers") or not hasattr(base, "embed_tokens"):
            raise UnsupportedFormatError(
                f"Calibrated merge supports decoder-only models with model.layers; {type(model).__name__} has another layout."
            )
        self.model = model
        self.base = base
        self.num_layers = len(base.layers)
        self._embed = torch.nn.Embedding.from_pretrained(
            tensor("model.embed_tokens.weight").to(torch.float32), freeze=True
        ).to(self.device)
        rotary = getattr(base, "rotary_emb", None)
        self._rotary = type(rotary)(config=hf_config).to(self.device) if rotary is not None else None

    def layer_prefix(self, index: int) -> str:
        return f"model.layers.{index}"

    def first_layer_inputs(self, input_ids: "torch.Tensor") -> tuple["torch.Tensor", dict[str, Any]]:
        """Hidden states entering decoder layer 0, and the keyword arguments every layer receives."""
        import torch

        captured: dict[str, Any] = {}

        class Catcher(torch.nn.Module):
            def forward(self, hidden_states, *args, **kwargs):
                captured["hidden"] = hidden_states
                captured["kwargs"] = kwargs
                raise _Captured

        base = self.base
        saved = (base.embed_tokens, base.layers, getattr(base, "rotary_emb", None))
        base.embed_tokens = self._embed
        base.layers = torch.nn.ModuleList([Catcher()])
        if self._rotary is not None:
            base.rotary_emb = self._rotary
        try:
            with torch.no_grad():
                base(input_ids=input_ids.to(self.device), use_cache=False)
        except _Captured:
            pass
        finally:
            base.embed_tokens, base.layers = saved[0], saved[1]
            if saved[2] is not None:
                base.rotary_emb = saved[2]
        if "hidden" not in captured:
            raise UnsupportedFormatError("Could not capture the first decoder layer's inputs for calibration.")
        kwargs = {k: v for k, v in captured["kwargs"].items() if k not in ("past_key_values", "use_cache")}
        return captured["hidden"], kwargs

    def build_layer(self, index: int, linear_weight: Callable[[str], "torch.Tensor"]) -> "nn.Module":
        """Materialise decoder layer `index` in float32: linears from `linear_weight`, the rest as stored."""
        import torch

        layer = copy.deepcopy(self.base.layers[index]).to_empty(device=self.device)
        prefix = self.layer_prefix(index)
        for name, module in layer.named_modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.data = linear_weight(f"{prefix}.{name}").to(self.device, torch.float32)
                if module.bias is not None:
                    module.bias.data = self._tensor(f"{prefix}.{name}.bias").to(self.device, torch.float32)
        for name, param in layer.named_parameters():
            owner = name.rsplit(".", 1)[0]
            if isinstance(layer.get_submodule(owner), torch.nn.Linear):
                continue
            param.data = self._tensor(f"{prefix}.{name}").to(self.device, torch.float32)
        for name, module in layer.named_modules():  # rotary tables etc. inside layers, if any
            if hasattr(module, "inv_freq") and hasattr(module, "config"):
                fresh = type(module)(config=self.config).to(self.device)
                module.load_state_dict(fresh.state_dict(), strict=False)
        layer.eval()
        return layer

    @staticmethod
    def linear_names(layer: "nn.Module") -> list[str]:
        import torch

        return [name for name, m in layer.named_modules() if isinstance(m, torch.nn.Linear)]
