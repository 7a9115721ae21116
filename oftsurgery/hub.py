"""Publishing a checkpoint to the Hugging Face Hub (or a private deployment of it).

`push_checkpoint(folder, "namespace/name")` checks that the folder is a complete quantized
checkpoint (`validate_checkpoint_for_push`), writes a model card if it has none, creates the repo
if needed and uploads the folder in one commit with huggingface_hub's `HfApi.upload_folder`.
Nothing is uploaded when validation fails.

Two things about huggingface_hub that matter here:
- It reads `HF_HUB_DISABLE_XET` and `HF_ENDPOINT` once, when first imported. We upload through the
  plain LFS protocol (the path we test against `oftsurgery.testing.hub_server`, and the only one a
  plain-HTTP private deployment speaks), so `HF_HUB_DISABLE_XET=1` is set before the import and
  re-applied to `huggingface_hub.constants` in case another library (transformers) imported it
  first. Set `HF_HUB_DISABLE_XET=0` yourself to let huggingface_hub use Xet instead.
  The endpoint is always passed explicitly to `HfApi`, resolved at call time from the argument,
  else `HF_ENDPOINT`, else https://huggingface.co.
- Its errors are long multi-line texts. Every failure a user can meet (no token, token refused,
  repo missing or not accessible, network unreachable, server error mid-upload) is turned into a
  one-sentence `HubError` here, in one table (`_hub_error`). The token never appears in a message
  or a log line: it is only handed to `HfApi`, and any text we relay from a server is scrubbed.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, TypeVar

from oftsurgery.errors import HubError, InvalidCheckpointError, OftSurgeryError

logger = logging.getLogger(__name__)

DEFAULT_ENDPOINT = "https://huggingface.co"
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")
_T = TypeVar("_T")


@dataclass(frozen=True)
class CheckpointForPush:
    """What validation found: the checkpoint is complete and this is what will be published."""

    folder: Path
    quant_description: str
    quant_method: str
    files: tuple[str, ...]
    tensor_count: int
    needs_card: bool


@dataclass(frozen=True)
class PushResult:
    """Where the checkpoint went. `commit_url` is the commit that now holds it (when the Hub already
    had identical files no new commit is made, and it is the existing head commit)."""

    repo_id: str
    repo_url: str
    revision: str
    commit_url: str
    commit_oid: str | None
    pr_url: str | None
    card_written: Path | None
    files: tuple[str, ...]


def validate_checkpoint_for_push(folder: str | Path) -> CheckpointForPush:
    """Check that `folder` is a complete quantized checkpoint; raise one sentence if not.

    Complete means: config.json with a quantization config oftsurgery understands, every tensor
    the index lists present in its shard (`CheckpointReader` checks shards and headers), and
    quantized tensors actually present. A missing README.md is reported as `needs_card`, not as
    an error: `push_checkpoint` writes one. Nothing is written here.
    """
    from oftsurgery.io import CheckpointReader
    from oftsurgery.quant.config import load_quant_config

    root = Path(folder)
    if not root.is_dir():
        raise InvalidCheckpointError(f"Not pushing: {root} is not a directory.")
    try:
        quant = load_quant_config(root)
        reader = CheckpointReader(root)
    except OftSurgeryError as exc:
        raise type(exc)(f"Not pushing: {exc}") from None
    if not any(name.endswith(".qweight") for name in reader.tensors):
        raise InvalidCheckpointError(
            f"Not pushing: {root} declares {quant.describe()} but holds no quantized tensors (*.qweight)."
        )
    relative = (p.relative_to(root) for p in root.rglob("*") if p.is_file())
    files = tuple(sorted(r.as_posix() for r in relative if ".git" not in r.parts))
    return CheckpointForPush(
        folder=root,
        quant_description=quant.describe(),
        quant_method=quant.method,
        files=files,
        tensor_count=len(reader.tensors),
        needs_card=not (root / "README.md").is_file(),
    )


def push_checkpoint(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    create_pr: bool = False,
    token: str | None = None,
    endpoint: str | None = None,
) -> PushResult:
    """Publish a quantized checkpoint folder to `repo_id` ("namespace/name") on the Hub.

    private: create the repo as private (an existing repo keeps its visibility).
    revision: branch to commit to (created from main if missing); default main.
    commit_message: default "Upload <quantization> checkpoint with oftsurgery".
    create_pr: open a pull request against main instead of committing to it.
    token: Hub token; default HF_TOKEN or the token saved by `hf auth login`.
    endpoint: Hub URL, e.g. a private deployment; default HF_ENDPOINT or https://huggingface.co.

    Raises InvalidCheckpointError / UnsupportedFormatError before any network use when the folder
    is not a complete checkpoint, and HubError (one sentence) for anything the Hub or the network
    does. A second push of the same folder is harmless: unchanged files are not committed again.
    """
    if not isinstance(repo_id, str) or not _REPO_ID.match(repo_id) or ".." in repo_id or "--" in repo_id:
        raise HubError(f"The repo id {repo_id!r} is not of the form NAMESPACE/NAME (e.g. my-user/my-model).")
    if create_pr and revision not in (None, "main"):
        raise HubError("A pull request is always opened against main; drop the revision or the pull request option.")
    endpoint = _resolve_endpoint(endpoint)
    checkpoint = validate_checkpoint_for_push(folder)

    hf = _huggingface_hub()
    token = _resolve_token(token, hf)
    api = hf.HfApi(endpoint=endpoint, token=token, library_name="oftsurgery", library_version=_our_version())
    context = _Context(endpoint=endpoint, repo_id=repo_id, revision=revision or "main", token=token)

    repo_url = context.call("creating the repository", api.create_repo, repo_id, private=private, exist_ok=True)
    if revision and revision != "main" and not revision.startswith("refs/"):
        context.call("creating the branch", api.create_branch, repo_id, branch=revision, exist_ok=True)

    card = None
    if checkpoint.needs_card:
        from oftsurgery.card import ensure_model_card

        try:
            card = ensure_model_card(checkpoint.folder, repo_id=repo_id)
        except OSError as exc:
            raise HubError(
                f"Not pushing: {checkpoint.folder} has no README.md and one cannot be written there "
                f"({exc.strerror or exc}); add a model card yourself."
            ) from None

    logger.info("uploading %d files from %s to %s at %s", len(checkpoint.files), checkpoint.folder, repo_id, endpoint)
    info = context.call(
        "uploading the files",
        api.upload_folder,
        repo_id=repo_id,
        folder_path=str(checkpoint.folder),
        revision=revision,
        commit_message=commit_message or f"Upload {checkpoint.quant_description} checkpoint with oftsurgery",
        create_pr=create_pr or None,
    )
    return PushResult(
        repo_id=repo_id,
        repo_url=str(repo_url),
        revision=revision or "main",
        commit_url=info.commit_url,
        commit_oid=getattr(info, "oid", None),
        pr_url=getattr(info, "pr_url", None),
        card_written=card,
        files=tuple(sorted({*checkpoint.files, card.name})) if card else checkpoint.files,
    )


# -- huggingface_hub, imported lazily with the environment it reads at import --------------------
def _truthy(value: str) -> bool:
    return value.strip().upper() in {"1", "ON", "YES", "TRUE"}


def _huggingface_hub() -> ModuleType:
    os.environ.setdefault("HF_HUB_DISABLE_XET", "1")
    import huggingface_hub
    from huggingface_hub import constants

    # huggingface_hub froze the variable when first imported, possibly by transformers before us.
    constants.HF_HUB_DISABLE_XET = _truthy(os.environ["HF_HUB_DISABLE_XET"])
    return huggingface_hub


def _our_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("oftsurgery")
    except PackageNotFoundError:
        return "unknown"


def _resolve_endpoint(endpoint: str | None) -> str:
    value = (endpoint or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).strip().rstrip("/")
    if not re.match(r"^https?://[^/\s]+", value):
        raise HubError(f"The Hub endpoint {value!r} is not an http(s) URL.")
    return value


def _resolve_token(token: str | None, hf: ModuleType) -> str:
    if token:
        return token
    try:
        found = hf.get_token()
    except Exception:  # e.g. a failed OIDC exchange: say so without relaying details
        found = None
    if not found:
        raise HubError(
            "No Hugging Face token found: run `hf auth login`, set HF_TOKEN, or pass --token."
        )
    return found


# -- one table from huggingface_hub / network failures to one-sentence HubErrors ----------------
@dataclass(frozen=True)
class _Context:
    endpoint: str
    repo_id: str
    revision: str
    token: str

    def call(self, stage: str, fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
        try:
            return fn(*args, **kwargs)
        except OftSurgeryError:
            raise
        except Exception as exc:
            raise _hub_error(exc, stage, self) from exc

    def scrub(self, text: str) -> str:
        one_line = " ".join(str(text).split())
        if self.token:
            one_line = one_line.replace(self.token, "***")
        return one_line[:300]


def _causes(exc: BaseException) -> list[BaseException]:
    """The exception and what it was raised from (huggingface_hub wraps LFS failures in RuntimeError)."""
    chain, seen = [], set()
    while exc is not None and id(exc) not in seen and len(chain) < 10:
        chain.append(exc)
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return chain


def _is_network_error(exc: BaseException) -> bool:
    names = {(k.__module__.split(".")[0], k.__name__) for k in type(exc).__mro__}
    is_httpx_transport = any(m.startswith("httpx") and n == "TransportError" for m, n in names)
    return is_httpx_transport or isinstance(exc, (ConnectionError, TimeoutError))


def _server_message(response: Any, context: _Context) -> str:
    try:
        message = response.json().get("error") or ""
    except Exception:
        message = ""
    return context.scrub(message) if isinstance(message, str) else ""


def _hub_error(exc: Exception, stage: str, context: _Context) -> HubError:
    from huggingface_hub import errors as hf_errors

    where, repo = context.endpoint, context.repo_id
    for cause in _causes(exc):
        if _is_network_error(cause):
            kind = "timed out" if "Timeout" in type(cause).__name__ else "connection failed"
            return HubError(
                f"Cannot reach the Hub at {where} while {stage} ({kind}); check the network connection or --endpoint."
            )
        if isinstance(cause, hf_errors.RevisionNotFoundError):
            return HubError(f"The revision {context.revision!r} does not exist in {repo} at {where}.")
        if isinstance(cause, hf_errors.RepositoryNotFoundError):
            return HubError(
                f"The repository {repo} was not found at {where}, or the token has no access to it "
                f"(while {stage}); check the repo id and the token's permissions."
            )
        if isinstance(cause, hf_errors.HfHubHTTPError) and getattr(cause, "response", None) is not None:
            status = cause.response.status_code
            if status == 401:
                return HubError(
                    f"The Hub at {where} rejected the token (401 Unauthorized) while {stage}; "
                    "pass a valid --token or run `hf auth login`."
                )
            if status == 403:
                return HubError(
                    f"The token may not write to {repo} (403 Forbidden while {stage}); "
                    "use a token with write access to that namespace."
                )
            if status == 404:
                return HubError(
                    f"The repository {repo} was not found at {where}, or the token has no access to it "
                    f"(while {stage}); check the repo id and the token's permissions."
                )
            if status >= 500:
                return HubError(
                    f"The Hub at {where} failed with HTTP {status} while {stage}; the push did not complete, "
                    "run it again to resume (files already uploaded are not sent twice)."
                )
            detail = _server_message(cause.response, context)
            return HubError(
                f"The Hub at {where} refused the request with HTTP {status} while {stage}"
                + (f": {detail}" if detail else ".")
            )
        if isinstance(cause, ValueError) and "Invalid metadata in README.md" in str(cause):
            details = context.scrub(str(cause).replace("Invalid metadata in README.md.", ""))
            return HubError(f"The Hub rejected the metadata of README.md: {details or 'no details given'}.")
    first = context.scrub(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    return HubError(f"Pushing to {repo} at {where} failed while {stage}: {first}")
