"""`oftsurgery attach`."""

from __future__ import annotations

import click

from oftsurgery.cli.options import REGEX, FiniteFloat
from oftsurgery.reporting.console import echo


def _split(value: str | None) -> list[str] | None:
    if not value:
        return None
    return [item.strip() for item in value.split(",") if item.strip()]


@click.command("attach")
@click.argument("checkpoint", type=click.Path(exists=True, file_okay=False, path_type=str))
@click.option("--out", required=True, type=click.Path(path_type=str), help="Adapter folder to write.")
@click.option("--target-modules", help="Comma-separated module names or path suffixes (q_proj,v_proj,...); "
              "default: every quantized linear except lm_head, or the modules of --from.")
@click.option("--target-regex", type=REGEX, help="A regex that must match whole module paths (instead of --target-modules).")
@click.option("--exclude-modules", help="Comma-separated module names or path suffixes to leave out.")
@click.option("--block-size", type=click.IntRange(min=1), help="OFT block size b (default 32, or that of --from).")
@click.option("--r", "r", type=click.IntRange(min=1), help="Number of blocks per layer (instead of --block-size).")
@click.option("--coft", is_flag=True, help="Constrained OFT: limit each block's rotation (see --eps).")
@click.option("--eps", type=FiniteFloat(0, minimum_open=True), default=6e-5, show_default=True, help="COFT radius.")
@click.option("--block-share/--no-block-share", default=None, help="One block shared by all chunks of a layer.")
@click.option("--cayley-neumann/--no-cayley-neumann", default=True, show_default=True,
              help="Cayley-Neumann series (PEFT's default) or the exact Cayley map.")
@click.option("--neumann-terms", type=click.IntRange(min=1), default=5, show_default=True,
              help="Terms of the Cayley-Neumann series.")
@click.option("--from", "from_path", type=click.Path(exists=True, path_type=str),
              help="Start from these rotations: a PEFT OFT adapter folder (any version) or a file written by "
                   "`oftsurgery extract`, e.g. trained on another quantization of the same base model.")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
def command(checkpoint, out, target_modules, target_regex, exclude_modules, block_size, r, coft, eps, block_share,
            cayley_neumann, neumann_terms, from_path, overwrite) -> None:
    """Write a PEFT-loadable OFT adapter for a GPTQ/AWQ CHECKPOINT.

    The adapter holds identity rotations (the model is unchanged until trained), or the rotations
    given with --from. Only tensor headers are read; the model is not loaded.

    \b
    Examples:
      oftsurgery attach ./llama-gptq --out ./oft-adapter
      oftsurgery attach ./llama-gptq --out ./oft-adapter --target-modules q_proj,v_proj --block-size 64
      oftsurgery attach ./llama-awq --out ./oft-awq --from rotations.safetensors --no-cayley-neumann
    """
    from oftsurgery.attach import attach_adapter

    if block_size and r:
        raise click.UsageError("Give either --block-size or --r, not both.")
    if target_modules and target_regex:
        raise click.UsageError("Give either --target-modules or --target-regex, not both.")
    result = attach_adapter(
        checkpoint, out, target_modules=target_regex or _split(target_modules),
        exclude_modules=_split(exclude_modules), block_size=block_size, r=r, coft=coft, eps=eps,
        block_share=block_share, use_cayley_neumann=cayley_neumann, neumann_terms=neumann_terms,
        from_path=from_path, overwrite=overwrite,
    )
    kind = "given" if from_path else "identity"
    echo(f"Attached OFT ({kind} rotations) to {len(result.modules)} modules of {checkpoint}:")
    for module in result.modules:
        fit = f"  fit residual {module.fit_residual:.2e}" if from_path else ""
        echo(f"  {module.name:<50} in={module.in_features:<6} r={module.r:<4} b={module.block_size}{fit}")
    echo(f"Wrote {result.out}")
