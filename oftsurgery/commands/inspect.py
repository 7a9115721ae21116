"""`oftsurgery inspect`."""

from __future__ import annotations

import json

import click


@click.command("inspect")
@click.argument("path", type=click.Path(path_type=str))
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable JSON object instead of a table.")
@click.option("--layers", is_flag=True, help="With --json, include every quantized layer.")
def command(path: str, as_json: bool, layers: bool) -> None:
    """Describe a GPTQ/AWQ checkpoint: method, bits, group size, layers by kind, size.

    Only headers and configs are read, so it is fast on any size.

    \b
    Examples:
      oftsurgery inspect ./SmolLM2-135M-GPTQ-4bit
      oftsurgery inspect ./SmolLM2-135M-GPTQ-4bit --json
    """
    from oftsurgery.inspect import render_summary, summarize_checkpoint

    summary = summarize_checkpoint(path)
    if as_json:
        click.echo(json.dumps(summary.to_dict(with_layers=layers), indent=2))
    else:
        click.echo(render_summary(summary))
