"""`oftsurgery push`."""

from __future__ import annotations

import click

from oftsurgery.cli.options import hub_limits
from oftsurgery.reporting.console import echo


@click.command("push")
@click.argument("folder", type=click.Path(path_type=str))
@click.option("--repo-id", required=True, metavar="NAMESPACE/NAME", help="Hub repository to publish to (created if missing).")
@click.option("--private", is_flag=True, help="Create the repository as private (an existing one keeps its visibility).")
@click.option("--revision", default=None, metavar="BRANCH", help="Branch to commit to, created from main if missing [default: main].")
@click.option("--commit-message", default=None, help="Commit message [default: Upload <quantization> checkpoint with oftsurgery].")
@click.option("--create-pr", is_flag=True, help="Open a pull request against main instead of committing to it.")
@click.option("--token", default=None, metavar="TOKEN",
              help="Hub token with write access [default: HF_TOKEN, or the token saved by `hf auth login`].")
@click.option("--endpoint", default=None, metavar="URL",
              help="Hub URL, for private Hub deployments [default: HF_ENDPOINT, or https://huggingface.co].")
@hub_limits
def command(folder: str, repo_id: str, private: bool, revision: str | None, commit_message: str | None,
            create_pr: bool, token: str | None, endpoint: str | None, timeout: float, retries: int,
            retry_wait: float) -> None:
    """Publish a quantized checkpoint FOLDER (e.g. a merge's output) to the Hugging Face Hub.

    The folder is checked first: config.json with a GPTQ/AWQ quantization config, every tensor
    of the index present. Nothing is uploaded if it is incomplete. A model card (README.md) is
    written into the folder if it has none, with the merge's figures and command when the merge
    report is there. Pushing the same folder again commits nothing new.

    Every request waits at most --timeout seconds to connect and for an answer; network
    errors, timeouts and 408/429/5xx answers are retried --retries times, waiting
    --retry-wait seconds before the first retry and twice as long before each next one.

    Prefer HF_TOKEN or `hf auth login` to --token: a token on the command line can be seen by
    other users of the machine.

    \b
    Examples:
      oftsurgery push ./SmolLM2-135M-oft-merged --repo-id my-user/SmolLM2-135M-oft-GPTQ
      oftsurgery push ./merged --repo-id my-org/model --private --create-pr
      oftsurgery push ./merged --repo-id team/model --endpoint https://hub.example.internal
    """
    from oftsurgery.push import push_checkpoint

    result = push_checkpoint(
        folder, repo_id, private=private, revision=revision, commit_message=commit_message,
        create_pr=create_pr, token=token, endpoint=endpoint, timeout=timeout, retries=retries, retry_wait=retry_wait,
    )
    if result.card_written is not None:
        click.echo(f"wrote model card: {result.card_written}", err=True)
    click.echo(f"pushed {len(result.files)} files to {result.repo_id} ({result.revision})", err=True)
    if result.pr_url:
        click.echo(f"pull request: {result.pr_url}", err=True)
    echo(result.commit_url)
