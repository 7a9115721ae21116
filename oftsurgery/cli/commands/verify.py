"""`oftsurgery verify`."""

from __future__ import annotations

import json

import click

from oftsurgery.reporting.console import echo


@click.command("verify")
@click.argument("merged", type=click.Path(path_type=str))
@click.option("--base", required=True, type=click.Path(path_type=str), help="The quantized checkpoint merged into.")
@click.option("--adapter", required=True, type=click.Path(path_type=str),
              help="The adapter folder or rotations file that was merged.")
@click.option("--text", default=None, metavar="FILE|builtin:KIND",
              help="Held-out evaluation text: a UTF-8 file, or builtin:english / builtin:code "
                   "(held-out splits, disjoint from calibration). Default: builtin:english.")
@click.option("--tokens", type=click.IntRange(min=16), default=4096, show_default=True, help="Evaluation tokens.")
@click.option("--seq-len", type=click.IntRange(min=8), default=256, show_default=True, help="Evaluation window length.")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda.")
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
def command(merged, base, adapter, text, tokens, seq_len, device, as_json) -> None:
    """Compare a merged checkpoint with the base + adapter it came from.

    Prints the perplexity of the quantized base, the attached model and the merged
    checkpoint on held-out text, the retention (share of the fine-tune the merge kept:
    (L_base - L_merged) / (L_base - L_attached)) and the largest logit difference
    between the merged and the attached model.

    \b
    Examples:
      oftsurgery verify ./merged --base ./SmolLM2-GPTQ --adapter ./my-oft-adapter
      oftsurgery verify ./merged --base ./SmolLM2-GPTQ --adapter rot.safetensors --text notes.txt --json
    """
    from oftsurgery.verify import verify_merge

    figures = verify_merge(merged, base, adapter, text=text, num_tokens=tokens, seq_len=seq_len, device=device)
    echo(json.dumps(figures.to_dict(), indent=2) if as_json else figures.render())
