"""`inspect`: describe a quantized checkpoint without loading its weights.

Everything here comes from `config.json`, the quantization config and the safetensors headers, so
it answers in well under a second even for large checkpoints.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from oftsurgery.errors import InvalidCheckpointError
from oftsurgery.io.reader import CheckpointReader
from oftsurgery.quant.config import load_quant_config
from oftsurgery.quant.layout import quantized_linear_shapes


@dataclass
class QuantLayerInfo:
    name: str
    kind: str
    in_features: int
    out_features: int
    has_bias: bool


@dataclass
class CheckpointSummary:
    path: str
    model_type: str | None
    method: str
    bits: int
    group_size: int
    sym: bool
    desc_act: bool
    format: str
    num_quantized_layers: int
    layers_by_kind: dict[str, int]
    shapes_by_kind: dict[str, list[list[int]]]
    total_size_bytes: int
    num_tensors: int
    files: list[str]
    layers: list[QuantLayerInfo] = field(default_factory=list)
    serving: dict[str, Any] = field(default_factory=dict)  # engine -> KernelChoice (see oftsurgery.reporting.serving)
    tensor_parallel: int = 1

    def to_dict(self, with_layers: bool = False) -> dict[str, Any]:
        data = asdict(self)
        if not with_layers:
            data.pop("layers")
        data["serving"] = {engine: choice.to_dict() for engine, choice in self.serving.items()}
        return data


def summarize_checkpoint(path: str | Path, tensor_parallel: int = 1) -> CheckpointSummary:
    """Read a checkpoint's metadata and describe its quantization, quantized layers and the kernels
    vLLM and transformers will serve it with (shapes checked per shard at `tensor_parallel`)."""
    from oftsurgery.reporting.serving import serving_contract

    reader = CheckpointReader(path)
    qcfg = load_quant_config(path)
    shapes = {name: info.shape for name, info in reader.tensors.items()}
    layer_shapes = quantized_linear_shapes(shapes, qcfg)
    if not layer_shapes:
        raise InvalidCheckpointError(
            f"{path} declares {qcfg.method.upper()} quantization but holds no packed layers (no .qweight/.qzeros/.scales)."
        )
    layers = []
    for prefix, (in_f, out_f) in layer_shapes.items():
        layers.append(QuantLayerInfo(prefix, prefix.rsplit(".", 1)[-1], in_f, out_f, f"{prefix}.bias" in shapes))
    kinds = Counter(layer.kind for layer in layers)
    kind_shapes: dict[str, set[tuple[int, int]]] = defaultdict(set)
    for layer in layers:
        kind_shapes[layer.kind].add((layer.out_features, layer.in_features))
    return CheckpointSummary(
        path=str(Path(path)),
        model_type=reader.config.get("model_type"),
        method=qcfg.method,
        bits=qcfg.bits,
        group_size=qcfg.group_size,
        sym=qcfg.sym,
        desc_act=qcfg.desc_act,
        format=qcfg.format,
        num_quantized_layers=len(layers),
        layers_by_kind=dict(sorted(kinds.items())),
        shapes_by_kind={k: [list(s) for s in sorted(v)] for k, v in sorted(kind_shapes.items())},
        total_size_bytes=reader.total_size,
        num_tensors=len(reader.tensors),
        files=reader.files,
        layers=layers,
        serving=serving_contract(qcfg, layer_shapes, tensor_parallel),
        tensor_parallel=tensor_parallel,
    )


def format_size(nbytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if nbytes < 1024 or unit == "GB":
            return f"{nbytes:.1f} {unit}" if unit != "B" else f"{int(nbytes)} B"
        nbytes /= 1024
    return f"{nbytes:.1f} GB"


def render_summary(summary: CheckpointSummary) -> str:
    group = "per-channel (-1)" if summary.group_size == -1 else str(summary.group_size)
    lines = [
        f"checkpoint   {summary.path}",
        f"model type   {summary.model_type or 'unknown'}",
        f"method       {summary.method.upper()} ({summary.format})",
        f"bits         {summary.bits}",
        f"group size   {group}",
        f"symmetric    {'yes' if summary.sym else 'no'}",
        f"desc_act     {'yes' if summary.desc_act else 'no'}",
        f"size         {format_size(summary.total_size_bytes)} in {len(summary.files)} file(s), {summary.num_tensors} tensors",
        f"quantized linear layers: {summary.num_quantized_layers}",
    ]
    width = max(len(k) for k in summary.layers_by_kind)
    for kind, count in summary.layers_by_kind.items():
        shapes = ", ".join(f"{o}x{i}" for o, i in summary.shapes_by_kind[kind])
        lines.append(f"  {kind:<{width}}  {count:>4}  [out x in] {shapes}")
    if summary.serving:
        tp = f" at tensor parallel {summary.tensor_parallel}" if summary.tensor_parallel > 1 else ""
        lines.append(f"serving{tp}:")
        for engine, choice in summary.serving.items():
            lines.append(f"  {'vLLM' if engine == 'vllm' else engine:<12} {choice.describe()}")
    return "\n".join(lines)
