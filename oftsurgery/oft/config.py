"""OFT adapter options, mirroring the keys of PEFT's `adapter_config.json` for OFT.

`OFTOptions.from_peft_dict` reads a config of any PEFT generation and records which one it was
(`generation`); `to_peft_dict` writes a config current PEFT loads. Keys we do not interpret are
kept in `extra` and written back unchanged.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from oftsurgery.errors import InvalidAdapterError

# The Neumann-series semantics we implement and write (see rotation.NEUMANN_SERIES_CHANGED_IN).
CURRENT_SEMANTICS_VERSION = "0.18.0"
# Stand-in version for configs written by PEFT 0.16-0.17 (they carry no peft_version key).
LEGACY_NEUMANN_VERSION = "0.17.0"

GENERATION_CURRENT = "peft>=0.18"
GENERATION_NEUMANN_V1 = "peft-0.16-0.17"
GENERATION_OFT_S = "peft-0.14-0.15"
GENERATION_OUTPUT_SIDE = "peft<=0.13"

# The kinds of the adapter_config.json keys we interpret (see oftsurgery.schema).
PEFT_CONFIG_SCHEMA = {
    "peft_type": "str?",
    "r": "int",
    "oft_block_size": "int",
    "module_dropout": "number",
    "coft": "bool",
    "eps": "number",
    "block_share": "bool",
    "use_cayley_neumann": "bool",
    "num_cayley_neumann_terms": "int",
    "target_modules": "str|str_list?",
    "exclude_modules": "str|str_list?",
    "init_weights": "bool",
    "fan_in_fan_out": "bool",
    "bias": "str",
    "modules_to_save": "str_list?",
    "layers_to_transform": "int|int_list?",
    "layers_pattern": "str|str_list?",
    "base_model_name_or_path": "str?",
    "revision": "str?",
    "task_type": "str?",
    "inference_mode": "bool",
    "peft_version": "str?",
}


@dataclass
class OFTOptions:
    """The OFT options of one adapter (PEFT's `OFTConfig` keys, PEFT's defaults)."""

    r: int = 0
    oft_block_size: int = 32
    module_dropout: float = 0.0
    coft: bool = False
    eps: float = 6e-5
    block_share: bool = False
    use_cayley_neumann: bool = True
    num_cayley_neumann_terms: int = 5
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    init_weights: bool = True
    fan_in_fan_out: bool = False
    bias: str = "none"
    modules_to_save: list[str] | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    base_model_name_or_path: str | None = None
    revision: str | None = None
    task_type: str | None = None
    inference_mode: bool = True
    peft_version: str | None = None
    generation: str = GENERATION_CURRENT
    extra: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> OFTOptions:
        if (self.r != 0) == (self.oft_block_size != 0):
            raise InvalidAdapterError(
                f"Exactly one of r ({self.r}) and oft_block_size ({self.oft_block_size}) must be non-zero."
            )
        if self.r < 0 or self.oft_block_size < 0 or self.num_cayley_neumann_terms < 1:
            raise InvalidAdapterError("r, oft_block_size must be >= 0 and num_cayley_neumann_terms >= 1.")
        if not 0.0 <= self.module_dropout < 1.0:
            raise InvalidAdapterError(f"module_dropout must lie in [0, 1), got {self.module_dropout}.")
        return self

    @property
    def semantics_version(self) -> str | None:
        """The version whose Neumann series the parameters were trained with (None: current)."""
        if self.generation == GENERATION_NEUMANN_V1:
            return self.peft_version or LEGACY_NEUMANN_VERSION
        return self.peft_version

    def wrapper_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `GPTQOFTLinear` / `AwqOFTLinear` / `OFTQuantLinear.update_layer`."""
        return {
            "r": self.r,
            "oft_block_size": self.oft_block_size,
            "module_dropout": self.module_dropout,
            "coft": self.coft,
            "eps": self.eps,
            "block_share": self.block_share,
            "use_cayley_neumann": self.use_cayley_neumann,
            "num_cayley_neumann_terms": self.num_cayley_neumann_terms,
            "init_weights": self.init_weights,
            "peft_version": self.semantics_version,
        }

    def to_peft_dict(self) -> dict[str, Any]:
        """The adapter_config.json content (current PEFT generation)."""
        out = dict(self.extra)
        for f in dataclasses.fields(self):
            if f.name in ("generation", "extra"):
                continue
            value = getattr(self, f.name)
            if isinstance(value, (set, tuple)):
                value = sorted(value)
            out[f.name] = value
        out["peft_type"] = "OFT"
        # peft_version tells readers which Neumann series the parameters use; never claim a
        # release older than the series we implement (a legacy adapter keeps its legacy version).
        out["peft_version"] = self.semantics_version or _current_semantics_version()
        return out

    @classmethod
    def from_peft_dict(cls, data: dict[str, Any], where: str = "The adapter config") -> OFTOptions:
        """Read an adapter_config.json dict of any PEFT generation (`where` names it in errors)."""
        from oftsurgery.schema import check_fields

        check_fields(data, PEFT_CONFIG_SCHEMA, where, InvalidAdapterError)
        peft_type = str(data.get("peft_type", "")).upper()
        if peft_type != "OFT":
            raise InvalidAdapterError(f"This is not an OFT adapter (peft_type={data.get('peft_type')!r}).")
        known = {f.name for f in dataclasses.fields(cls)} - {"generation", "extra"}
        values = {k: v for k, v in data.items() if k in known}
        extra = {k: v for k, v in data.items() if k not in known and k != "peft_type"}
        if "peft_version" in data:
            generation = GENERATION_CURRENT
        elif "use_cayley_neumann" in data:
            generation = GENERATION_NEUMANN_V1
        elif "oft_block_size" in data:
            generation = GENERATION_OFT_S
        else:
            generation = GENERATION_OUTPUT_SIDE
        if generation in (GENERATION_OFT_S, GENERATION_OUTPUT_SIDE):
            # These releases had only the exact Cayley map (no Neumann option).
            values.setdefault("use_cayley_neumann", False)
        if generation == GENERATION_OUTPUT_SIDE:
            values.setdefault("oft_block_size", 0)
        options = cls(**values, generation=generation, extra=extra)
        return options.validate() if generation != GENERATION_OUTPUT_SIDE else options


def _current_semantics_version() -> str:
    """The installed PEFT's version when it has the current series, else the first such release."""
    from oftsurgery.oft.rotation import uses_legacy_neumann_series

    try:
        import importlib.metadata

        installed = importlib.metadata.version("peft")
    except Exception:  # noqa: BLE001 - PEFT is optional
        return CURRENT_SEMANTICS_VERSION
    return CURRENT_SEMANTICS_VERSION if uses_legacy_neumann_series(installed) else installed
