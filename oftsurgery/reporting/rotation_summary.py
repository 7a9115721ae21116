"""How strongly an adapter rotates each module: ‖R − I‖_F per targeted linear, by layer and kind.

Used by `oftsurgery inspect ADAPTER_OR_ROTATIONS` (table, JSON, `--plot`) and by the demo's
heatmap. Reads a PEFT OFT adapter folder of any generation or an `extract` rotations file through
`load_rotations`, so the numbers are those of the rotations a merge would apply.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from oftsurgery.quant.layout import decoder_layer_index

# the order a decoder layer computes them in; other kinds follow alphabetically
KIND_ORDER = ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "gate_proj", "up_proj", "gate_up_proj", "down_proj")


def order_kinds(kinds) -> list[str]:
    unique = set(kinds)
    return [k for k in KIND_ORDER if k in unique] + sorted(unique - set(KIND_ORDER))


@dataclass
class ModuleRotation:
    name: str
    layer: int | None  # decoder layer index (None: outside the numbered layers, e.g. lm_head)
    kind: str  # last path component: q_proj, down_proj, …
    blocks: int  # stored blocks (1 when shared)
    block_size: int
    strength: float  # ‖R − I‖_F of the stored blocks (a shared block counted once)
    output_side: bool = False


@dataclass
class RotationSummary:
    path: str
    source: str  # "adapter" or "rotations"
    metadata: dict[str, Any]
    modules: list[ModuleRotation] = field(default_factory=list)

    @property
    def kinds(self) -> list[str]:
        """Module kinds in computation order (q, k, v, o, gate, up, down), then any others."""
        return order_kinds(m.kind for m in self.modules)

    @property
    def layers(self) -> list[int]:
        return sorted({m.layer for m in self.modules if m.layer is not None})

    def grid(self) -> list[list[float | None]]:
        """strength[kind][layer] over `kinds` × `layers` (None where the adapter has no module)."""
        index = {(m.kind, m.layer): m.strength for m in self.modules}
        return [[index.get((kind, layer)) for layer in self.layers] for kind in self.kinds]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def render(self, top: int | None = None) -> str:
        strengths = [m.strength for m in self.modules]
        sizes = sorted({m.block_size for m in self.modules})
        lines = [
            f"{self.source:<12} {self.path}",
            f"modules      {len(self.modules)} ({', '.join(self.kinds)})",
            f"block size   {', '.join(map(str, sizes))}",
            f"strength     ‖R − I‖_F per module: mean {sum(strengths) / len(strengths):.4f}, "
            f"max {max(strengths):.4f}, min {min(strengths):.4f}",
        ]
        identity = sum(1 for s in strengths if s == 0.0)
        if identity:
            lines.append(f"identity     {identity} module(s) are exactly the identity (untrained)")
        lines.append("")
        lines.append(f"{'module':<52} {'blocks':>6} {'b':>4} {'‖R − I‖_F':>10}")
        shown = sorted(self.modules, key=lambda m: -m.strength)[:top] if top else self.modules
        for m in shown:
            lines.append(f"{m.name:<52} {m.blocks:>6} {m.block_size:>4} {m.strength:>10.4f}")
        if top and len(self.modules) > top:
            lines.append(f"... {len(self.modules) - top} more (--all to list every module)")
        return "\n".join(lines)


def is_adapter_or_rotations(path: str | Path) -> bool:
    """True for a PEFT adapter folder (adapter_config.json) or a single safetensors file."""
    p = Path(path)
    return (p.is_dir() and (p / "adapter_config.json").is_file()) or (p.is_file() and p.suffix == ".safetensors")


def summarize_rotations(path: str | Path) -> RotationSummary:
    """Per-module rotation strength of an adapter folder or rotations file."""
    from oftsurgery.oft.adapter_io import load_rotations

    rotations = load_rotations(path)
    summary = RotationSummary(str(path), "adapter" if Path(path).is_dir() else "rotations", dict(rotations.metadata))
    for name in sorted(rotations.blocks, key=_module_sort_key):
        blocks = rotations.blocks[name]
        summary.modules.append(ModuleRotation(
            name=name, layer=decoder_layer_index(name), kind=name.rsplit(".", 1)[-1],
            blocks=int(blocks.shape[0]), block_size=int(blocks.shape[-1]), strength=rotations.strength(name),
            output_side=name in rotations.output_side,
        ))
    return summary


def _module_sort_key(name: str) -> tuple:
    # numeric order of layer indices (layers.10 after layers.9), then the path
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name))
