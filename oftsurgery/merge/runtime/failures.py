"""One failure, one message, on every rank: the failure handling of a distributed merge.

The failing rank posts its message to the process group's key-value store before it exits; a rank
waiting in a collective polls that store (and sees the failed peer's closed connection), and a rank
busy computing is stopped by torchrun's SIGTERM. Whoever posts first reports; the others end quietly
(`PeerFailedError`) with the same exit code, after rank 0 has removed its temporary output.
`RankFailures` is mixed into `ranks.DistributedRanks`, whose collectives raise `CollectiveError`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from oftsurgery.errors import InterruptedError_, MergeError, OftSurgeryError, PeerFailedError

_group_state = {"ours": False, "failed": False}


class RankFailures:
    """The failure handling of `DistributedRanks` (uses its `rank`, `world_size`, `_key_prefix` and
    `_temporary`)."""

    def track_temporary(self, path: Path) -> None:
        self._temporary = Path(path)

    def _store(self):
        import torch.distributed as dist
        from torch.distributed import distributed_c10d

        return dist.PrefixStore(self._key_prefix, distributed_c10d._get_default_store())

    def _posted(self) -> dict[str, Any] | None:
        """The failure a rank posted for this merge, or None. An unreachable store (its host, rank 0
        outside torchrun, is gone) counts as a failed peer that already reported."""
        try:
            store = self._store()
            if not store.check(["error"]):
                return None
            return json.loads(store.get("error").decode())
        except Exception:  # noqa: BLE001
            return {"rank": -1, "message": "another rank ended the merge", "exit_code": 1}

    def _post(self, failure: dict[str, Any]) -> bool:
        """Post this rank's failure unless one is there already; True if this rank's was first."""
        payload = json.dumps(failure)
        try:
            won = self._store().compare_set("error", "", payload)
        except Exception:  # noqa: BLE001  (no store: say it here rather than nowhere)
            return True
        return bytes(won).decode() == payload

    def _stop_signals(self) -> None:
        """This rank is ending: torchrun's SIGTERM (sent once a peer exits) must not interrupt the
        cleanup, nor add a second message after the first."""
        for signum in (signal.SIGTERM, signal.SIGINT):
            try:
                signal.signal(signum, signal.SIG_IGN)
            except ValueError:  # not the main thread
                pass

    def _remove_temporary(self) -> None:
        """atomic_output removes it too, but a signal may have cut that short."""
        if self._temporary is not None:
            shutil.rmtree(self._temporary, ignore_errors=True)

    @contextmanager
    def guard(self, out: str | Path) -> Iterator[None]:
        """Around one merge on every rank: turn any failure into one report across the ranks.

        The first rank to post its failure raises it (prefixed with its rank unless it is rank 0);
        every other rank raises `PeerFailedError`, which the CLI does not print. Signals stay
        ignored afterwards under torchrun (the worker is ending); elsewhere they are restored.
        """
        saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        except BaseException as exc:
            _group_state["failed"] = True
            self._stop_signals()
            self._remove_temporary()
            error = self._settle(exc, _shown_path(out))
            if "TORCHELASTIC_RUN_ID" not in os.environ:
                for signum, handler in saved.items():
                    try:
                        signal.signal(signum, handler)
                    except (ValueError, TypeError):
                        pass
            if error is exc:
                raise
            raise error from exc

    def _settle(self, exc: BaseException, out: Path) -> BaseException:
        lost = _caused_by(exc, CollectiveError)
        if lost is not None:
            exc = lost
        peer = self._posted()
        if peer is None and isinstance(exc, CollectiveError):
            # a failing rank posts before its connections close; give the store a moment anyway
            deadline = time.monotonic() + 3.0
            while peer is None and time.monotonic() < deadline:
                time.sleep(0.05)
                peer = self._posted()
        if peer is not None and peer["rank"] != self.rank:
            return PeerFailedError(peer["rank"], peer["message"], peer["exit_code"])
        if isinstance(exc, PeerFailedError):
            return exc
        if isinstance(exc, CollectiveError):
            error: BaseException = MergeError(
                f"Rank {self.rank} of {self.world_size} lost contact with another rank ({exc}), which ended without "
                f"a message (killed or crashed? see torchrun's report); nothing was written to {out}.")
            message, code = str(error), MergeError.exit_code
        elif isinstance(exc, (KeyboardInterrupt, InterruptedError_)):
            error = InterruptedError_(f"Interrupted; nothing was written to {out}.")
            message, code = str(error), InterruptedError_.exit_code
        elif isinstance(exc, OftSurgeryError):
            error = exc
            if self.rank != 0:
                error = type(exc).__new__(type(exc))
                error.__dict__.update(exc.__dict__)
                error.args = (f"Rank {self.rank} of {self.world_size}: {exc}",)
            message, code = str(error), getattr(error, "exit_code", 1)
        else:  # a bug: the CLI shows it as "Unexpected ...", the other ranks say nothing
            error = exc
            detail = " ".join(str(exc).split()) or "no message"
            message, code = f"Rank {self.rank}: unexpected {type(exc).__name__}: {detail}", 1
        if self.rank != 0 and not isinstance(exc, CollectiveError):
            # the same bad input fails every rank at once: give rank 0, whose message has no rank
            # prefix, a moment to say it first
            time.sleep(0.5)
        if self._post({"rank": self.rank, "message": message, "exit_code": code}):
            return error
        peer = self._posted() or {"rank": -1, "message": "another rank ended the merge", "exit_code": 1}
        return PeerFailedError(peer["rank"], peer["message"], peer["exit_code"])


class CollectiveError(RuntimeError):
    """A collective failed in transport: a peer closed its connections or died."""


def _caused_by(exc: BaseException, kind: type) -> BaseException | None:
    """`exc` or the first exception of that kind in its chain of causes (the engine wraps errors)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, kind):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def _shown_path(out: str | Path) -> Path:
    try:
        return Path(out).expanduser().resolve()
    except (OSError, RuntimeError):
        return Path(out).expanduser().absolute()
