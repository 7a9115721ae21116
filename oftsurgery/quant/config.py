"""Reading a checkpoint's quantization config, in every spelling we can reproduce exactly.

GPTQ configs come from `config.json["quantization_config"]` or `quantize_config.json`, written
either with the older keys (`quant_method`, `checkpoint_format`) or gptqmodel 7's (`method`,
`format`). AWQ configs must be the GEMM layout. Anything else is refused with one sentence naming
what was found: we never guess at a layout we cannot write back byte for byte.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from oftsurgery.errors import InvalidCheckpointError, UnsupportedFormatError
from oftsurgery.schema import check_fields, describe

GPTQ_BITS = (2, 3, 4, 8)
GPTQ_FORMATS = ("gptq", "gptq_v2")


@dataclass(frozen=True)
class QuantConfig:
    """What the codec needs to know about a checkpoint's quantization.

    `format` is "gptq" (v1: qzeros store z-1), "gptq_v2" (qzeros store z) or "gemm" (AWQ).
    `group_size` is -1 for one group spanning all input features.
    `raw` keeps the dict exactly as found, so writers can preserve keys they do not interpret.
    """

    method: str
    bits: int
    group_size: int
    sym: bool
    desc_act: bool
    format: str
    pack_dtype: str = "int32"
    lm_head: bool = False
    modules_to_not_convert: tuple[str, ...] = ()
    dynamic: dict[str, Any] | None = None
    raw: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    source: str = ""

    @property
    def is_gptq(self) -> bool:
        return self.method == "gptq"

    @property
    def is_awq(self) -> bool:
        return self.method == "awq"

    def describe(self) -> str:
        group = "per-channel" if self.group_size == -1 else f"g{self.group_size}"
        extra = " desc_act" if self.desc_act else ""
        return f"{self.method.upper()} {self.bits}-bit {group} {'sym' if self.sym else 'asym'}{extra} ({self.format})"


def _first(d: dict[str, Any], *keys: str, default: Any = None) -> Any:
    for key in keys:
        if key in d and d[key] is not None:
            return d[key]
    return default


# The kinds of the GPTQ/AWQ config keys we interpret (see oftsurgery.schema); a wrong kind is a
# broken file (InvalidCheckpointError), a right kind with a value we cannot reproduce is unsupported.
QUANT_CONFIG_SCHEMA = {
    "quant_method": "str?",
    "method": "str?",
    "bits": "int?",
    "w_bit": "int?",
    "group_size": "int?",
    "q_group_size": "int?",
    "sym": "bool?",
    "desc_act": "bool?",
    "checkpoint_format": "str?",
    "format": "str?",
    "pack_dtype": "str?",
    "lm_head": "bool?",
    "dynamic": "dict?",
    "zero_point": "bool?",
    "version": "str?",
    "modules_to_not_convert": "str_list?",
}


def parse_quant_config(raw: dict[str, Any], source: str = "") -> QuantConfig:
    """Validate one quantization-config dict and turn it into a `QuantConfig`."""
    if not isinstance(raw, dict):
        raise InvalidCheckpointError(f"The quantization config in {source or 'the checkpoint'} is not a JSON object.")
    where = source or "the quantization config"
    method = _first(raw, "quant_method", "method", default="")
    if not isinstance(method, str):
        raise InvalidCheckpointError(f"{where} has quant_method = {method!r}; it must be a string.")
    method = method.lower()
    if not method:
        raise UnsupportedFormatError(f"{where} names no quantization method (no quant_method/method key).")
    if method not in ("gptq", "awq"):
        raise UnsupportedFormatError(
            f"{where} uses quantization method {method!r}; oftsurgery supports only plain GPTQ and AWQ (GEMM)."
        )
    check_fields(raw, QUANT_CONFIG_SCHEMA, where, InvalidCheckpointError)
    bits = _first(raw, "bits", "w_bit")
    if bits is None:
        raise UnsupportedFormatError(f"{where} has no valid `bits` value (found {bits!r}).")
    group_size = _first(raw, "group_size", "q_group_size", default=-1)
    if group_size == 0 or group_size < -1:
        raise UnsupportedFormatError(f"{where} has an invalid group_size {group_size}.")

    if method == "gptq":
        return _parse_gptq(raw, where, bits, group_size)
    return _parse_awq(raw, where, bits, group_size)


def _parse_gptq(raw: dict[str, Any], where: str, bits: int, group_size: int) -> QuantConfig:
    rotation = raw.get("rotation")
    if rotation not in (None, "", False, "none", "None"):
        raise UnsupportedFormatError(
            f"{where} uses online rotation {rotation!r} (Hadamard-rotated GPTQ); its weights cannot be "
            "requantized without that rotation, so it is not supported."
        )
    if bits not in GPTQ_BITS:
        raise UnsupportedFormatError(f"{where} has GPTQ bits={bits}; supported bits are 2, 3, 4 and 8.")
    fmt = str(_first(raw, "checkpoint_format", "format", default="gptq")).lower()
    if fmt not in GPTQ_FORMATS:
        raise UnsupportedFormatError(
            f"{where} has GPTQ checkpoint format {fmt!r}; supported formats are 'gptq' and 'gptq_v2'."
        )
    pack_dtype = str(raw.get("pack_dtype", "int32")).replace("torch.", "")
    if pack_dtype != "int32":
        raise UnsupportedFormatError(f"{where} packs into {pack_dtype}; only int32 packing is supported.")
    return QuantConfig(
        method="gptq",
        bits=bits,
        group_size=group_size,
        sym=bool(raw.get("sym", True)),
        desc_act=bool(raw.get("desc_act", False)),
        format=fmt,
        pack_dtype=pack_dtype,
        lm_head=bool(raw.get("lm_head", False)),
        dynamic=raw.get("dynamic") or None,
        raw=dict(raw),
        source=where,
    )


def _parse_awq(raw: dict[str, Any], where: str, bits: int, group_size: int) -> QuantConfig:
    version = str(_first(raw, "version", "format", default="gemm")).lower()
    if version != "gemm":
        raise UnsupportedFormatError(
            f"{where} uses the AWQ {version!r} layout; only the GEMM layout is supported "
            "(GEMV, GEMV_FAST and Marlin pack weights differently)."
        )
    if bits != 4:
        raise UnsupportedFormatError(f"{where} has AWQ bits={bits}; AWQ GEMM checkpoints must be 4-bit.")
    if not bool(raw.get("zero_point", True)):
        raise UnsupportedFormatError(f"{where} is AWQ without zero points; only zero_point=true is supported.")
    if group_size == -1:
        raise UnsupportedFormatError(f"{where} is AWQ with group_size=-1; AWQ GEMM needs a positive group size.")
    return QuantConfig(
        method="awq",
        bits=4,
        group_size=group_size,
        sym=False,
        desc_act=False,
        format="gemm",
        modules_to_not_convert=tuple(raw.get("modules_to_not_convert") or ()),
        raw=dict(raw),
        source=where,
    )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidCheckpointError(f"{path} is not readable JSON ({exc}).") from None
    if not isinstance(data, dict):
        raise InvalidCheckpointError(f"{path} must hold a JSON object, not {describe(data)}.")
    return data


def load_quant_config(checkpoint_dir: str | Path) -> QuantConfig:
    """Find and parse the quantization config of a checkpoint directory.

    `config.json["quantization_config"]` wins; `quantize_config.json` is the fallback that older
    GPTQ tools write on its own.
    """
    root = Path(checkpoint_dir)
    config_path = root / "config.json"
    if config_path.is_file():
        config = _read_json(config_path)
        if "quantization_config" in config:
            return parse_quant_config(config["quantization_config"], f"{config_path}")
    qc_path = root / "quantize_config.json"
    if qc_path.is_file():
        return parse_quant_config(_read_json(qc_path), f"{qc_path}")
    if not config_path.is_file():
        raise InvalidCheckpointError(f"{root} has no config.json; it is not a Hugging Face checkpoint directory.")
    raise UnsupportedFormatError(
        f"{root} is not quantized (config.json has no quantization_config and there is no quantize_config.json)."
    )
