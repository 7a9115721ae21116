"""`oftsurgery inspect`."""

from __future__ import annotations

import json

import click

from oftsurgery.reporting.console import echo


@click.command("inspect")
@click.argument("path", metavar="CHECKPOINT|ADAPTER_OR_ROTATIONS", type=click.Path(path_type=str))
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable JSON object instead of a table.")
@click.option("--layers", is_flag=True, help="With --json, include every quantized layer.")
@click.option("--plot", "plot", type=click.Path(dir_okay=False, path_type=str), metavar="FILE.png",
              help="For an adapter or rotations file: draw rotation strength per layer and module kind "
                   "(a heatmap) into FILE.png.")
@click.option("--tp", "tensor_parallel", type=click.IntRange(min=1), default=1, show_default=True,
              help="For a checkpoint: check the serving kernels' shape rules per shard at this tensor-parallel size.")
@click.option("--all", "show_all", is_flag=True, help="For an adapter or rotations file: list every module, "
              "not only the 20 strongest.")
def command(path: str, as_json: bool, layers: bool, plot: str | None, tensor_parallel: int, show_all: bool) -> None:
    """Describe a GPTQ/AWQ checkpoint, or an OFT adapter / rotations file.

    For a checkpoint: method, bits, group size, layers by kind, size, and the kernel family
    vLLM and transformers will serve it with, and why (Marlin or a slower kernel). Only
    headers and configs are read, so it is fast on any size.

    For a PEFT OFT adapter folder (any PEFT version) or a rotations file written by
    `oftsurgery extract`: the rotation strength ‖R − I‖_F of every module, strongest
    first; --plot draws it as a heatmap of module kinds × decoder layers.

    \b
    Examples:
      oftsurgery inspect ./SmolLM2-135M-GPTQ-4bit
      oftsurgery inspect ./SmolLM2-135M-GPTQ-4bit --json
      oftsurgery inspect ./Llama-3-70B-GPTQ --tp 4
      oftsurgery inspect ./my-oft-adapter
      oftsurgery inspect rotations.safetensors --plot rotations.png
    """
    from oftsurgery.reporting.rotation_summary import is_adapter_or_rotations

    if is_adapter_or_rotations(path):
        _inspect_rotations(path, as_json, plot, show_all)
        return
    if plot:
        raise click.UsageError("--plot draws the rotations of an adapter folder or rotations file, not a checkpoint.")
    from oftsurgery.inspect import render_summary, summarize_checkpoint

    summary = summarize_checkpoint(path, tensor_parallel=tensor_parallel)
    if as_json:
        echo(json.dumps(summary.to_dict(with_layers=layers), indent=2))
    else:
        echo(render_summary(summary))


def _inspect_rotations(path: str, as_json: bool, plot: str | None, show_all: bool) -> None:
    from oftsurgery.reporting.rotation_summary import summarize_rotations

    summary = summarize_rotations(path)
    if as_json:
        echo(json.dumps(summary.to_dict(), indent=2))
    else:
        echo(summary.render(top=None if show_all else 20))
    if plot:
        from oftsurgery.reporting.plots import plot_rotation_strength

        out = plot_rotation_strength(summary, plot)
        click.echo(f"wrote {out}", err=as_json)
