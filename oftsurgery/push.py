"""Publishing a checkpoint to the Hugging Face Hub (or a private deployment of it): `push_checkpoint`.

It checks that the folder is a complete quantized checkpoint (`validate_checkpoint_for_push`), writes
a model card if it has none, creates the repo if needed and uploads the folder in one commit through
the plain LFS protocol (Xet disabled unless asked for). Every request has a timeout, each stage is
retried on transient failures, and every failure becomes a one-sentence `HubError` that never holds
the token. Why and how: docs/push.md.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, TypeVar

from oftsurgery.errors import HubError, InvalidCheckpointError, OftSurgeryError

logger = logging.getLogger(__name__)

DEFAULT_ENDPOINT = "https://huggingface.co"
DEFAULT_TIMEOUT = 60.0  # seconds to connect, and to wait for each answer or write
DEFAULT_RETRIES = 3  # further attempts of a stage after a transient failure
DEFAULT_RETRY_WAIT = 1.0  # seconds before the first retry; doubled each time, at most MAX_RETRY_WAIT
MAX_RETRY_WAIT = 30.0
_TRANSIENT_STATUS = {408, 429, 500, 502, 503, 504}
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
    timeout: float = DEFAULT_TIMEOUT,
    retries: int = DEFAULT_RETRIES,
    retry_wait: float = DEFAULT_RETRY_WAIT,
) -> PushResult:
    """Publish a quantized checkpoint folder to `repo_id` ("namespace/name") on the Hub.

    private: create the repo as private (an existing repo keeps its visibility).
    revision: branch to commit to (created from main if missing); default main.
    commit_message: default "Upload <quantization> checkpoint with oftsurgery".
    create_pr: open a pull request against main instead of committing to it.
    token: Hub token; default HF_TOKEN or the token saved by `hf auth login`.
    endpoint: Hub URL, e.g. a private deployment; default HF_ENDPOINT or https://huggingface.co.
    timeout: seconds to wait to connect and for each answer (default 60).
    retries, retry_wait: how often a stage is tried again after a network error, a timeout or a
    408/429/5xx answer (default 3), and the wait before the first retry (1 s, then doubled).

    Raises InvalidCheckpointError / UnsupportedFormatError before any network use when the folder
    is not a complete checkpoint, and HubError (one sentence) for anything the Hub or the network
    does. A second push of the same folder is harmless: unchanged files are not committed again.
    """
    target = check_push_target(repo_id, endpoint=endpoint, revision=revision, create_pr=create_pr, token=token,
                               timeout=timeout, retries=retries, retry_wait=retry_wait)
    checkpoint = validate_checkpoint_for_push(folder)
    with _bounded_http(target.hf, timeout):
        return _push(checkpoint, target, private=private, revision=revision, commit_message=commit_message,
                     create_pr=create_pr)


@dataclass(frozen=True)
class PushTarget:
    """A push target checked without touching the network: where, as whom, with which limits."""

    repo_id: str
    endpoint: str
    token: str
    timeout: float
    retries: int
    retry_wait: float
    hf: ModuleType


def check_push_target(repo_id: str, *, endpoint: str | None = None, revision: str | None = None,
                      create_pr: bool = False, token: str | None = None, timeout: float = DEFAULT_TIMEOUT,
                      retries: int = DEFAULT_RETRIES, retry_wait: float = DEFAULT_RETRY_WAIT) -> PushTarget:
    """Check everything about a push that can be checked offline (repo id, endpoint, token found,
    limits), so that `merge --push-to-hub` can refuse a bad target before the merge starts."""
    if not isinstance(repo_id, str) or not _REPO_ID.match(repo_id) or ".." in repo_id or "--" in repo_id:
        raise HubError(f"The repo id {repo_id!r} is not of the form NAMESPACE/NAME (e.g. my-user/my-model).")
    if create_pr and revision not in (None, "main"):
        raise HubError("A pull request is always opened against main; drop the revision or the pull request option.")
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not math.isfinite(timeout) or timeout <= 0:
        raise HubError(f"The Hub timeout must be a positive number of seconds, not {timeout!r}.")
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise HubError(f"The number of Hub retries must be a whole number >= 0, not {retries!r}.")
    if isinstance(retry_wait, bool) or not isinstance(retry_wait, (int, float)) or not math.isfinite(retry_wait) \
            or retry_wait < 0:
        raise HubError(f"The wait between Hub retries must be a number of seconds >= 0, not {retry_wait!r}.")
    endpoint = _resolve_endpoint(endpoint)
    hf = _huggingface_hub()
    return PushTarget(repo_id=repo_id, endpoint=endpoint, token=_resolve_token(token, hf), timeout=float(timeout),
                      retries=retries, retry_wait=float(retry_wait), hf=hf)


def _push(checkpoint: CheckpointForPush, target: PushTarget, *, private: bool, revision: str | None,
          commit_message: str | None, create_pr: bool) -> PushResult:
    hf, repo_id, endpoint, token = target.hf, target.repo_id, target.endpoint, target.token
    api = hf.HfApi(endpoint=endpoint, token=token, library_name="oftsurgery", library_version=_our_version())
    context = _Context(endpoint=endpoint, repo_id=repo_id, revision=revision or "main", token=token,
                       timeout=target.timeout, retries=target.retries, retry_wait=target.retry_wait)

    repo_url = context.call("creating the repository", api.create_repo, repo_id, private=private, exist_ok=True)
    if revision and revision != "main" and not revision.startswith("refs/"):
        context.call("creating the branch", api.create_branch, repo_id, branch=revision, exist_ok=True)

    card = None
    if checkpoint.needs_card:
        from oftsurgery.reporting.card import ensure_model_card

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


@contextlib.contextmanager
def _bounded_http(hf: ModuleType, timeout: float) -> Iterator[None]:
    """Give huggingface_hub's shared HTTP client a connect/read/write timeout while we push.

    huggingface_hub builds its client with `timeout=None` (wait forever). We wrap whatever client
    factory is installed (the user's may set proxies or certificates) and restore it afterwards.
    """
    from huggingface_hub.utils import _http

    previous = getattr(_http, "_GLOBAL_CLIENT_FACTORY", None) or _http.default_client_factory

    def bounded_client():
        client = previous()
        client.timeout = timeout  # httpx: one number sets connect, read, write and pool timeouts
        return client

    hf.set_client_factory(bounded_client)
    try:
        yield
    finally:
        hf.set_client_factory(previous)


# -- one table from huggingface_hub / network failures to one-sentence HubErrors ----------------
@dataclass(frozen=True)
class _Context:
    endpoint: str
    repo_id: str
    revision: str
    token: str
    timeout: float = DEFAULT_TIMEOUT
    retries: int = DEFAULT_RETRIES
    retry_wait: float = DEFAULT_RETRY_WAIT

    def call(self, stage: str, fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
        """Run one stage of the push, retrying transient failures; then one HubError sentence."""
        attempt = 0
        while True:
            attempt += 1
            try:
                return fn(*args, **kwargs)
            except OftSurgeryError:
                raise
            except Exception as exc:
                if attempt > self.retries or not _is_transient(exc):
                    raise _hub_error(exc, stage, self, attempt) from exc
                wait = min(self.retry_wait * 2 ** (attempt - 1), MAX_RETRY_WAIT)
                logger.warning("the Hub failed while %s (%s); retry %d of %d in %.3g s", stage,
                               self.scrub(type(exc).__name__), attempt, self.retries, wait)
                time.sleep(wait)

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


def _is_transient(exc: BaseException) -> bool:
    """Worth another try: the network failed or timed out, or the server said "busy/broken" (408, 429, 5xx)."""
    for cause in _causes(exc):
        if _is_network_error(cause):
            return True
        response = getattr(cause, "response", None)
        status = getattr(response, "status_code", None)
        if isinstance(status, int) and status in _TRANSIENT_STATUS:
            return True
    return False


def _attempts(attempts: int) -> str:
    return f"{attempts} attempts" if attempts > 1 else "1 attempt"


def _server_message(response: Any, context: _Context) -> str:
    try:
        message = response.json().get("error") or ""
    except Exception:
        message = ""
    return context.scrub(message) if isinstance(message, str) else ""


def _hub_error(exc: Exception, stage: str, context: _Context, attempts: int = 1) -> HubError:
    from huggingface_hub import errors as hf_errors

    where, repo = context.endpoint, context.repo_id
    tries = _attempts(attempts)
    for cause in _causes(exc):
        if _is_network_error(cause):
            if "Timeout" in type(cause).__name__:
                return HubError(
                    f"The Hub at {where} did not answer while {stage} (no answer within {context.timeout:g} s, "
                    f"{tries}); check the network connection or --endpoint, or raise --timeout / --retries."
                )
            return HubError(
                f"Cannot reach the Hub at {where} while {stage} (connection failed, {tries}); check the network "
                "connection or --endpoint."
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
            if status >= 500 or status in _TRANSIENT_STATUS:
                return HubError(
                    f"The Hub at {where} failed with HTTP {status} while {stage} ({tries}); the push did not "
                    "complete, run it again to resume (files already uploaded are not sent twice)."
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
