"""`oftsurgery merge`."""

from __future__ import annotations

import shlex
import sys

import click

from oftsurgery.cli.options import SIZE, hub_limits
from oftsurgery.reporting.console import echo


@click.command("merge")
@click.argument("checkpoint", type=click.Path(path_type=str))
@click.argument("adapter", metavar="ADAPTER_OR_ROTATIONS", type=click.Path(path_type=str))
@click.option("--out", "-o", required=True, type=click.Path(path_type=str), help="Output checkpoint directory.")
@click.option("--requant", type=click.Choice(["gptq", "awq"]), default=None,
              help="Output format. Default: the source checkpoint's method.")
@click.option("--method", type=click.Choice(["calibrated", "rtn"]), default="calibrated", show_default=True,
              help="calibrated: minimise each layer's output error on real activations (keeps the fine-tune); "
                   "rtn: round to nearest on the source grid (fast, data-free, loses most of a fine-tune).")
@click.option("--calib", default=None, metavar="FILE|NAME",
              help="Calibration text: a .txt or .jsonl file, a Hub dataset name (online only), or "
                   "builtin:english / builtin:code. Default: builtin:english (ships with Python).")
@click.option("--calib-tokens", type=click.IntRange(min=16), default=8192, show_default=True,
              help="Number of calibration tokens.")
@click.option("--seq-len", type=click.IntRange(min=8), default=256, show_default=True,
              help="Calibration sequence length.")
@click.option("--device", default="auto", show_default=True,
              help="Where to compute: auto (the GPU when torch can use one, else the CPU), cpu, cuda or cuda:N "
                   "(under torchrun: each rank's own GPU).")
@click.option("--forward-dtype", type=click.Choice(["auto", "float32", "float16", "bfloat16"]), default="auto",
              show_default=True, metavar="DTYPE",
              help="What the calibration forward computes in: auto, float32, float16 or bfloat16 (its statistics "
                   "are summed in float32 either way). auto: float32 on the CPU; on a GPU the checkpoint's own "
                   "dtype (bfloat16 if its config says so, else float16).")
@click.option("--max-shard-size", type=SIZE, default="5GB", show_default=True,
              help="Largest output shard, e.g. 2GB or 500MB.")
@click.option("--push-to-hub", "push_to_hub", default=None, metavar="NAMESPACE/NAME",
              help="After a successful merge, publish the output to this Hub repository.")
@click.option("--private", is_flag=True, help="With --push-to-hub: create the repository as private.")
@click.option("--token", default=None, help="With --push-to-hub: Hub token (default: HF_TOKEN / stored login).")
@click.option("--endpoint", default=None, help="With --push-to-hub: Hub endpoint URL (private Hub deployments).")
@hub_limits
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@click.option("--allow-pickle", is_flag=True,
              help="Read a CHECKPOINT that has only pickle weights (pytorch_model.bin) with torch's weights-only "
                   "loader. Unpickling can run code: use it only for checkpoints whose source you trust. "
                   "The output is always safetensors.")
@click.option("--strict", is_flag=True,
              help="Fail (nothing written) if any layer falls back: a Cholesky failure, a solver stage that "
                   "failed, source codes kept because nothing beat them, or a module calibration never reached.")
@click.option("--tune-steps", type=click.IntRange(min=0), default=None, metavar="N",
              help="After each decoder layer's solve, tune its fp16 scales (each within ±10%, codes and grid kept) "
                   "for N steps against the decoder layer's output on the calibration rows; kept only where the "
                   "held-out rows improve. 0: off. Calibrated method, one process. Default: 20 on a GPU, "
                   "off on a CPU (where it about doubles the merge's time) and under torchrun.")
@click.option("--residual-rank", type=click.IntRange(min=0), default=0, show_default=True, metavar="R",
              help="Also write OUT/residual-lora: a rank-R PEFT LoRA adapter holding what the requantized layers "
                   "could not (fitted on the calibration activations); load it with PeftModel.from_pretrained or "
                   "serve it with vLLM --enable-lora. 0: none.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
def command(checkpoint, adapter, out, requant, method, calib, calib_tokens, seq_len, device, forward_dtype,
            max_shard_size,
            push_to_hub, private, token, endpoint, timeout, retries, retry_wait, overwrite, allow_pickle,
            strict, tune_steps, residual_rank, quiet) -> None:
    """Fold an OFT adapter into a GPTQ/AWQ checkpoint and write a quantized checkpoint.

    ADAPTER_OR_ROTATIONS is a PEFT OFT adapter directory (any PEFT generation) or a
    rotations file written by `oftsurgery extract`. The output loads unchanged in
    transformers, gptqmodel and vLLM, and carries a model card and merge_report.json.

    \b
    Examples:
      oftsurgery merge ./SmolLM2-GPTQ ./my-oft-adapter --out ./SmolLM2-GPTQ-merged
      oftsurgery merge ./SmolLM2-GPTQ rotations.safetensors --out ./merged-awq --requant awq
      oftsurgery merge ./SmolLM2-GPTQ ./my-oft-adapter --out ./merged --method rtn
      oftsurgery merge ./SmolLM2-GPTQ ./my-oft-adapter --out ./merged --residual-rank 16

    Across processes or GPUs, with the same bytes as one process (docs/distributed.md):

    \b
      torchrun --standalone --nproc-per-node 8 -m oftsurgery merge ./GPTQ ./adapter -o ./merged --device cuda
    """
    from oftsurgery.merge import MergeOptions, merge_checkpoint

    _refuse_unused_options(click.get_current_context(), method, push_to_hub)
    hub_options = {"token": token, "endpoint": endpoint, "timeout": timeout, "retries": retries,
                   "retry_wait": retry_wait}
    if push_to_hub:  # a bad push target is refused now, not after a long merge
        from oftsurgery.push import check_push_target

        check_push_target(push_to_hub, **hub_options)
    options = MergeOptions(
        requant=requant, method=method, calib=calib, calib_tokens=calib_tokens, seq_len=seq_len, device=device,
        overwrite=overwrite, max_shard_size=max_shard_size, progress=not quiet, allow_pickle=allow_pickle,
        strict=strict, residual_rank=residual_rank, forward_dtype=forward_dtype, tune_steps=tune_steps,
        command="oftsurgery " + " ".join(shlex.quote(a) for a in _redacted(sys.argv[1:])),
    )
    report = merge_checkpoint(checkpoint, adapter, out, options)
    from oftsurgery.merge.runtime.ranks import primary_process

    if not primary_process():  # under torchrun: rank 0 wrote the output, and reports (and pushes) it
        return
    echo(report.summary())
    echo(f"wrote {report.output}")
    if push_to_hub:
        from oftsurgery.push import push_checkpoint

        result = push_checkpoint(report.output, push_to_hub, private=private, **hub_options)
        echo(f"pushed: {result.commit_url}")


_CALIBRATION_OPTIONS = {"calib": "--calib", "calib_tokens": "--calib-tokens", "seq_len": "--seq-len",
                        "forward_dtype": "--forward-dtype", "tune_steps": "--tune-steps"}
_PUSH_OPTIONS = {"private": "--private", "token": "--token", "endpoint": "--endpoint", "timeout": "--timeout",
                 "retries": "--retries", "retry_wait": "--retry-wait"}


def _refuse_unused_options(ctx: click.Context, method: str, push_to_hub: str | None) -> None:
    """An option the run would silently ignore is a mistake on the command line: say so before any work."""
    from click.core import ParameterSource

    def given(name: str) -> bool:
        return ctx.get_parameter_source(name) == ParameterSource.COMMANDLINE

    if method == "rtn":
        for name, flag in _CALIBRATION_OPTIONS.items():
            if given(name):
                raise click.UsageError(f"{flag} is used only by --method calibrated; --method rtn reads no "
                                       "calibration text, so drop it.")
    if not push_to_hub:
        for name, flag in _PUSH_OPTIONS.items():
            if given(name):
                raise click.UsageError(f"{flag} is used only with --push-to-hub; add it or drop {flag}.")


def _redacted(args: list[str]) -> list[str]:
    """The command line as recorded in the model card, without the token."""
    out, hide = [], False
    for arg in args:
        if hide:
            out.append("***")
            hide = False
        elif arg == "--token":
            out.append(arg)
            hide = True
        elif arg.startswith("--token="):
            out.append("--token=***")
        else:
            out.append(arg)
    return out
