"""The shared base of the OFT wrappers around quantized linear layers.

A wrapper owns the quantized layer (`base_layer`, also `quant_linear_module`) and one `OFTRotation` per
named adapter under `oft_R[<name>]`: state-dict keys read `<module>.oft_R.<name>.weight`, the same as
PEFT's (PEFT drops the adapter name when saving).
Forward: the input is rotated by each active adapter and the quantized layer runs once on the rotated
input; in eval mode the materialized blocks are cached until the parameters change (their version
counter, storage or dtype), where PEFT rebuilds them on every forward.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable

import torch
from torch import nn

from oftsurgery.oft import rotation as rot


class OFTRotation(nn.Module):
    """One adapter's parameters on one layer, and the recipe that turns them into rotation blocks."""

    def __init__(
        self,
        r: int,
        block_size: int,
        in_features: int,
        *,
        coft: bool = False,
        eps: float = 6e-5,
        block_share: bool = False,
        use_cayley_neumann: bool = False,
        num_cayley_neumann_terms: int = 5,
        module_dropout: float = 0.0,
        peft_version: str | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.r = r
        self.block_size = block_size
        self.in_features = in_features
        self.coft = coft
        self.eps = eps
        self.block_share = block_share
        self.use_cayley_neumann = use_cayley_neumann
        self.num_cayley_neumann_terms = num_cayley_neumann_terms
        self.module_dropout = module_dropout
        self.peft_version = peft_version
        stored = 1 if block_share else r
        self.weight = nn.Parameter(torch.zeros(stored, rot.params_per_block(block_size), dtype=dtype, device=device))
        self._cache: torch.Tensor | None = None
        self._cache_key: tuple | None = None

    def extra_repr(self) -> str:
        kind = f"cayley_neumann(k={self.num_cayley_neumann_terms})" if self.use_cayley_neumann else "cayley"
        extra = ", block_share" if self.block_share else ""
        extra += f", coft(eps={self.eps})" if self.coft else ""
        return f"r={self.r}, block_size={self.block_size}, {kind}{extra}"

    def reset(self, init_weights: bool = True) -> None:
        """Identity rotation (zeros), or small random generators (std 0.1, PEFT's test init)."""
        with torch.no_grad():
            if init_weights is True:
                self.weight.zero_()
            elif init_weights is False:
                self.weight.normal_(0.0, 0.1)
            else:
                raise ValueError(f"Unknown init_weights={init_weights!r}; use True (identity) or False (random).")

    def _materialize(self) -> torch.Tensor:
        if self.coft:
            # PEFT writes the projection back into the parameters on every use; so do we, so that
            # an adapter saved from either side holds the same numbers.
            with torch.no_grad():
                self.weight.copy_(rot.coft_project(self.weight, self.block_size, self.eps))
        return rot.rotation_blocks(
            self.weight,
            self.block_size,
            use_cayley_neumann=self.use_cayley_neumann,
            num_terms=self.num_cayley_neumann_terms,
            peft_version=self.peft_version,
        )

    def blocks(self, training: bool) -> torch.Tensor:
        """The rotation blocks, `(r, b, b)` or `(1, b, b)` when shared, in the parameters' dtype."""
        if training:
            self._cache = None
            blocks = self._materialize()
            if self.module_dropout > 0:
                blocks = rot.multiplicative_dropout(blocks, self.module_dropout)
            return blocks
        needs_graph = torch.is_grad_enabled() and self.weight.requires_grad
        if needs_graph:
            return self._materialize()
        if self.coft:
            # The projection may change the parameters; do it before reading the version. Projecting
            # already-projected parameters moves them by rounding only (‖Q‖ lands a few ulps above
            # the radius); PEFT rewrites them anyway, we keep them so the cache survives.
            with torch.no_grad():
                projected = rot.coft_project(self.weight, self.block_size, self.eps)
                rounding = 4 * torch.finfo(self.weight.dtype).eps
                if not torch.allclose(projected, self.weight, rtol=rounding, atol=0):
                    self.weight.copy_(projected)
        key = (
            self.weight._version,
            self.weight.data_ptr(),
            self.weight.dtype,
            self.weight.device,
            torch.is_inference_mode_enabled(),
            self.use_cayley_neumann,
            self.num_cayley_neumann_terms,
            self.peft_version,
        )
        if self._cache is None or self._cache_key != key:
            with torch.no_grad():
                self._cache = rot.rotation_blocks(
                    self.weight,
                    self.block_size,
                    use_cayley_neumann=self.use_cayley_neumann,
                    num_terms=self.num_cayley_neumann_terms,
                    peft_version=self.peft_version,
                )
            self._cache_key = key
        return self._cache

    def materialized(self) -> torch.Tensor:
        """All `in_features / b` blocks in float32 (a shared block expanded), detached."""
        with torch.no_grad():
            blocks = rot.rotation_blocks(
                self.weight.float(),
                self.block_size,
                use_cayley_neumann=self.use_cayley_neumann,
                num_terms=self.num_cayley_neumann_terms,
                peft_version=self.peft_version,
                coft=self.coft,
                eps=self.eps,
                block_share=self.block_share,
                num_blocks=self.in_features // self.block_size,
            )
        return blocks.contiguous()


def _in_out_features(layer: nn.Module) -> tuple[int, int]:
    for in_name, out_name in (("in_features", "out_features"), ("infeatures", "outfeatures")):
        if hasattr(layer, in_name) and hasattr(layer, out_name):
            return int(getattr(layer, in_name)), int(getattr(layer, out_name))
    raise TypeError(f"Cannot tell the in/out features of {type(layer).__name__}.")


def _device_of(layer: nn.Module) -> torch.device:
    for name in ("qweight", "scales"):
        tensor = getattr(layer, name, None)
        if isinstance(tensor, torch.Tensor):
            return tensor.device
    for tensor in layer.buffers():
        return tensor.device
    return torch.device("cpu")


class OFTQuantLinear(nn.Module):
    """OFT on a quantized linear layer: rotate the input per active adapter, run the base layer once.

    Subclasses (`GPTQOFTLinear`, `AwqOFTLinear`) only choose defaults and, where the quantized
    layer cannot run here, how the base output is computed (`base_forward`).
    """

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        r: int = 8,
        oft_block_size: int = 0,
        module_dropout: float = 0.0,
        coft: bool = False,
        eps: float = 6e-5,
        block_share: bool = False,
        use_cayley_neumann: bool = False,
        num_cayley_neumann_terms: int = 5,
        fan_in_fan_out: bool = False,
        init_weights: bool = True,
        **kwargs,
    ) -> None:
        super().__init__()
        # Wrapping a wrapper would rotate twice; unwrap to the quantized layer.
        while isinstance(base_layer, OFTQuantLinear):
            base_layer = base_layer.base_layer
        self.base_layer = base_layer
        self.in_features, self.out_features = _in_out_features(base_layer)
        # fan_in_fan_out only matters for dense Conv1D weights; quantized layers are [out, in].
        self.fan_in_fan_out = fan_in_fan_out
        self.oft_R = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.oft_block_size: dict[str, int] = {}
        self._active_adapters: list[str] = []
        self._disable_adapters = False
        self.update_layer(
            adapter_name,
            r=r,
            oft_block_size=oft_block_size,
            module_dropout=module_dropout,
            coft=coft,
            eps=eps,
            block_share=block_share,
            use_cayley_neumann=use_cayley_neumann,
            num_cayley_neumann_terms=num_cayley_neumann_terms,
            init_weights=init_weights,
            peft_version=kwargs.get("peft_version"),
            dtype=kwargs.get("dtype", torch.float32),
        )
        self._active_adapters = [adapter_name]

    # ---- the wrapped layer -------------------------------------------------------------------

    @property
    def quant_linear_module(self) -> nn.Module:
        """The wrapped quantized layer (same object as `base_layer`)."""
        return self.base_layer

    def get_base_layer(self) -> nn.Module:
        return self.base_layer

    # ---- adapters ----------------------------------------------------------------------------

    def update_layer(
        self,
        adapter_name: str,
        r: int = 0,
        oft_block_size: int = 0,
        module_dropout: float = 0.0,
        coft: bool = False,
        eps: float = 6e-5,
        block_share: bool = False,
        use_cayley_neumann: bool = False,
        num_cayley_neumann_terms: int = 5,
        init_weights: bool = True,
        peft_version: str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        """Add (or replace) the adapter `adapter_name` on this layer; it does not become active."""
        r_eff, block_size, adjusted = rot.resolve_block_layout(self.in_features, r, oft_block_size)
        if adjusted:
            asked = f"oft_block_size={oft_block_size}" if oft_block_size else f"r={r}"
            warnings.warn(
                f"{asked} does not divide in_features={self.in_features}; using block size {block_size} "
                f"(r={r_eff}), the nearest divisor, as PEFT does.",
                stacklevel=2,
            )
        module = OFTRotation(
            r_eff,
            block_size,
            self.in_features,
            coft=coft,
            eps=eps,
            block_share=block_share,
            use_cayley_neumann=use_cayley_neumann,
            num_cayley_neumann_terms=num_cayley_neumann_terms,
            module_dropout=module_dropout,
            peft_version=peft_version,
            dtype=dtype,
            device=_device_of(self.base_layer),
        )
        module.reset(init_weights)
        self.oft_R[adapter_name] = module
        self.r[adapter_name] = r_eff
        self.oft_block_size[adapter_name] = block_size

    add_adapter = update_layer

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.oft_R:
            raise KeyError(f"No adapter named {adapter_name!r} on this layer.")
        del self.oft_R[adapter_name]
        del self.r[adapter_name], self.oft_block_size[adapter_name]
        self._active_adapters = [name for name in self._active_adapters if name != adapter_name]

    @property
    def active_adapters(self) -> list[str]:
        return list(self._active_adapters)

    @property
    def active_adapter(self) -> str | list[str]:
        return self._active_adapters[0] if len(self._active_adapters) == 1 else self.active_adapters

    def set_adapter(self, adapter_names: str | Iterable[str]) -> None:
        """Make these adapters active (applied in this order); only they stay trainable."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        missing = [name for name in names if name not in self.oft_R]
        if missing:
            raise KeyError(f"No adapter named {missing[0]!r} on this layer (have {sorted(self.oft_R)}).")
        for name, module in self.oft_R.items():
            module.requires_grad_(name in names)
        self._active_adapters = names

    @property
    def disable_adapters(self) -> bool:
        return self._disable_adapters

    def enable_adapters(self, enabled: bool) -> None:
        """Switch all adapters on or off (off: the layer behaves as the bare quantized layer)."""
        self._disable_adapters = not enabled

    def rotation_blocks(self, adapter_name: str) -> torch.Tensor:
        """Materialized float32 blocks `(in/b, b, b)` of one adapter (eval semantics, no dropout)."""
        return self.oft_R[adapter_name].materialized()

    # ---- forward -----------------------------------------------------------------------------

    def base_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """The quantized layer's output for `x`. Overridden where that layer cannot run here."""
        return self.base_layer(x, *args, **kwargs)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self._disable_adapters or not self._active_adapters:
            return self.base_forward(x, *args, **kwargs)
        input_dtype = x.dtype
        convert = not torch.is_autocast_enabled(x.device.type)
        for name in self._active_adapters:
            module = self.oft_R[name]
            blocks = module.blocks(self.training)
            if convert:
                x = x.to(blocks.dtype)
            x = rot.apply_rotation_to_input(x, blocks)
        if convert:
            x = x.to(input_dtype)
        result = self.base_forward(x, *args, **kwargs)
        return result.to(input_dtype) if convert else result

    def __repr__(self) -> str:
        return "oft." + super().__repr__()
