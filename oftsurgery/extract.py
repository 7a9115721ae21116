"""`oftsurgery extract`: the materialized rotations of an OFT adapter, as one safetensors file.

The file (docs/rotations-format.md) is what `attach --from` and `merge` consume; it does not depend
on the PEFT release that trained the adapter, because the blocks are materialized with that
release's exact semantics.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class ExtractedModule:
    name: str
    blocks: int
    block_size: int
    strength: float  # ‖R − I‖_F of the stored blocks (a shared block counted once)
    orthogonality_error: float


@dataclass
class ExtractResult:
    out: Path
    metadata: dict
    modules: list[ExtractedModule] = field(default_factory=list)


def extract_rotations(adapter_dir: str | Path, out: str | Path, overwrite: bool = False) -> ExtractResult:
    """Write the adapter's materialized float32 blocks and metadata to `out` (atomically)."""
    from oftsurgery.io import atomic_output, check_output_path
    from oftsurgery.oft.adapter_io import load_rotations, save_rotations
    from oftsurgery.oft.rotation import orthogonality_error

    out_path = check_output_path(out, [adapter_dir], overwrite, is_file=True)
    rotations = load_rotations(adapter_dir)
    with atomic_output(out_path, overwrite=overwrite, is_file=True) as tmp:
        save_rotations(rotations, tmp)
    result = ExtractResult(out_path, rotations.metadata)
    for name in sorted(rotations.blocks):
        blocks = rotations.blocks[name]
        result.modules.append(ExtractedModule(name, blocks.shape[0], blocks.shape[-1], rotations.strength(name),
                                              orthogonality_error(blocks)))
    return result
