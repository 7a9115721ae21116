"""`oftsurgery extract`."""

from __future__ import annotations

import click

from oftsurgery.reporting.console import echo


@click.command("extract")
@click.argument("adapter_dir", type=click.Path(exists=True, file_okay=False, path_type=str))
@click.option("--out", required=True, type=click.Path(path_type=str), help="Rotations file to write (.safetensors).")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
def command(adapter_dir: str, out: str, overwrite: bool) -> None:
    """Write the materialized rotation blocks of an OFT adapter (any PEFT version) to one file.

    Each module gets its float32 blocks [r, b, b] plus metadata (source, base model,
    parameterization, PEFT version, block sizes); see docs/rotations-format.md. Prints each
    module's rotation strength ||R - I||.

    \b
    Examples:
      oftsurgery extract ./oft-adapter --out rotations.safetensors
    """
    from oftsurgery.extract import extract_rotations

    result = extract_rotations(adapter_dir, out, overwrite=overwrite)
    meta = result.metadata
    echo(f"{adapter_dir}: {meta.get('parameterization')} rotations ({meta.get('source_generation')}), "
               f"{len(result.modules)} modules")
    for module in result.modules:
        echo(f"  {module.name:<50} {module.blocks}x{module.block_size}x{module.block_size}  "
                   f"||R-I|| = {module.strength:.4g}")
    echo(f"Wrote {result.out}")
