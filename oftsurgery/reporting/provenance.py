"""Where a merged checkpoint came from: recorded by `merge`, checked by `verify` before it loads models.

The merge report records the source's quantization, a fingerprint of its quantized weights
(`checkpoint_fingerprint`) and each layer's rotation strength; `check_provenance` compares them (and
the layer shapes) with the base checkpoint and adapter `verify` is given, and refuses a mismatch with
one sentence. What the fingerprint covers: docs/architecture.md ("reporting/").
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from oftsurgery.errors import InvalidAdapterError, InvalidCheckpointError
from oftsurgery.io import MERGE_REPORT

if TYPE_CHECKING:
    from oftsurgery.io.reader import CheckpointReader
    from oftsurgery.oft.adapter_io import RotationSet
    from oftsurgery.quant.config import QuantConfig

FINGERPRINT_BYTES = 64 * 1024
STRENGTH_RTOL = 1e-3  # rotation strengths agree to this whatever torch build materialized the blocks
STRENGTH_ATOL = 1e-6


def checkpoint_fingerprint(reader: "CheckpointReader", quant: "QuantConfig") -> str:
    """A short hash that identifies a quantized checkpoint's weights (see the module docstring)."""
    import torch

    from oftsurgery.quant.layout import find_quantized_layers

    digest = hashlib.sha256(quant.describe().encode())
    for prefix in find_quantized_layers(reader.tensors):
        digest.update(prefix.encode())
        for suffix in ("qweight", "qzeros", "scales", "g_idx"):
            info = reader.tensors.get(f"{prefix}.{suffix}")
            if info is not None:
                digest.update(f"{suffix}:{info.dtype}:{info.shape}".encode())
        for suffix in ("scales", "qzeros"):
            tensor = reader.get(f"{prefix}.{suffix}").contiguous().reshape(-1)
            raw = tensor.view(torch.uint8) if tensor.element_size() > 1 else tensor.to(torch.uint8)
            digest.update(raw[:FINGERPRINT_BYTES].numpy().tobytes())
    return digest.hexdigest()[:32]


def read_merge_report(folder: str | Path) -> dict[str, Any] | None:
    """The merge report of a merged checkpoint, or None when it has none."""
    path = Path(folder) / MERGE_REPORT
    if not path.is_file():
        return None
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidCheckpointError(f"{path} is not readable JSON ({exc}).") from None
    from oftsurgery.schema import check_fields

    schema = {"source_format": "str?", "output_format": "str?", "checkpoint_fingerprint": "str?", "layers": "list?",
              "checkpoint": "str?", "adapter": "str?"}
    check_fields(report, schema, str(path), InvalidCheckpointError)
    for layer in report.get("layers") or []:
        check_fields(layer, {"name": "str", "rotation_strength": "number"}, f"A layer entry of {path}",
                     InvalidCheckpointError)
    return report


def check_shapes(merged: "CheckpointReader", merged_quant: "QuantConfig", base: "CheckpointReader",
                 base_quant: "QuantConfig") -> None:
    """MERGED must have BASE's quantized layers with BASE's shapes, and BASE's other tensors."""
    from oftsurgery.quant.layout import LAYER_SUFFIXES, quantized_linear_shapes

    def shapes(reader):
        return {name: info.shape for name, info in reader.tensors.items()}

    merged_layers = quantized_linear_shapes(shapes(merged), merged_quant)
    base_layers = quantized_linear_shapes(shapes(base), base_quant)
    for name in sorted(set(merged_layers) | set(base_layers)):
        if name not in merged_layers or name not in base_layers:
            has, lacks = (merged.path, base.path) if name in merged_layers else (base.path, merged.path)
            raise InvalidCheckpointError(
                f"{merged.path} was not merged from {base.path}: {has} has the quantized layer {name} and {lacks} "
                "does not."
            )
        if merged_layers[name] != base_layers[name]:
            (m_in, m_out), (b_in, b_out) = merged_layers[name], base_layers[name]
            raise InvalidCheckpointError(
                f"{merged.path} was not merged from {base.path}: its {name} is {m_in}x{m_out} (in x out), the "
                f"base's is {b_in}x{b_out}."
            )

    def plain(reader, layers):
        return {n: i.shape for n, i in reader.tensors.items()
                if not (n.rpartition(".")[0] in layers and n.rpartition(".")[2] in LAYER_SUFFIXES)}

    merged_plain, base_plain = plain(merged, merged_layers), plain(base, base_layers)
    for name in sorted(set(merged_plain) | set(base_plain)):
        if merged_plain.get(name) != base_plain.get(name):
            def shape_in(table):
                return "absent" if name not in table else "x".join(map(str, table[name])) or "scalar"

            raise InvalidCheckpointError(
                f"{merged.path} was not merged from {base.path}: its tensor {name} is {shape_in(merged_plain)}, the "
                f"base's is {shape_in(base_plain)}."
            )


def check_provenance(merged: "CheckpointReader", merged_quant: "QuantConfig", base: "CheckpointReader",
                     base_quant: "QuantConfig", rotations: "RotationSet") -> None:
    """Refuse a MERGED that was not made from BASE and ROTATIONS (see the module docstring)."""
    check_shapes(merged, merged_quant, base, base_quant)
    report = read_merge_report(merged.path)
    if report is None:
        warnings.warn(f"{merged.path} has no {MERGE_REPORT}: only its shapes could be checked against {base.path}, "
                      "not that it was merged from this base and adapter.", stacklevel=2)
        return
    where = merged.path / MERGE_REPORT
    recorded = report.get("source_format")
    if recorded is not None and recorded != base_quant.describe():
        raise InvalidCheckpointError(
            f"{merged.path} was merged from a {recorded} checkpoint ({where}), but --base {base.path} is "
            f"{base_quant.describe()}; pass the checkpoint it was merged from."
        )
    output = report.get("output_format")
    if output is not None and output != merged_quant.describe():
        raise InvalidCheckpointError(
            f"{where} describes a {output} output but {merged.path} is {merged_quant.describe()}; the report does not "
            "belong to this checkpoint."
        )
    fingerprint = report.get("checkpoint_fingerprint")
    if fingerprint is not None and fingerprint != checkpoint_fingerprint(base, base_quant):
        raise InvalidCheckpointError(
            f"{merged.path} was merged from another checkpoint than {base.path} (its {MERGE_REPORT} records "
            f"{report.get('checkpoint')!r}, whose weights differ); pass the checkpoint it was merged from."
        )
    layers = report.get("layers")
    if layers is None:
        return
    recorded_strength = {layer["name"]: float(layer["rotation_strength"]) for layer in layers}
    given = set(rotations.blocks)
    if set(recorded_strength) != given:
        extra = sorted(given - set(recorded_strength))
        missing = sorted(set(recorded_strength) - given)
        detail = (f"the adapter also targets {extra[0]}" if extra else f"the adapter does not target {missing[0]}")
        raise InvalidAdapterError(
            f"{merged.path} was merged with another adapter than the one given: {detail}, unlike the merge "
            f"recorded in {where}."
        )
    from oftsurgery.quant.layout import quantized_linear_shapes

    in_features = {name: shape[0] for name, shape in quantized_linear_shapes(
        {n: i.shape for n, i in base.tensors.items()}, base_quant).items()}
    for name in sorted(given):
        ours = rotations.strength(name, in_features.get(name))
        theirs = recorded_strength[name]
        if not math.isclose(ours, theirs, rel_tol=STRENGTH_RTOL, abs_tol=STRENGTH_ATOL):
            raise InvalidAdapterError(
                f"{merged.path} was merged with another adapter than the one given: the rotation of {name} has "
                f"strength {theirs:.6g} in {where} and {ours:.6g} in the adapter."
            )
