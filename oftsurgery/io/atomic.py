"""Write a directory so that it appears complete or not at all.

Work happens in a hidden temporary sibling of the destination (same filesystem, so the final
`rename` is atomic); on any exception or interruption the temporary directory is removed and the
destination is left as it was.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import signal
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from oftsurgery.errors import DiskFullError, InterruptedError_, OutputPathError


def _is_within(child: Path, parent: Path) -> bool:
    try:
        child.relative_to(parent)
        return True
    except ValueError:
        return False


def check_output_path(out: str | Path, inputs: Sequence[str | Path] = (), overwrite: bool = False) -> Path:
    """Validate an output path before any work starts; return it resolved.

    Refuses: an existing output without `overwrite`; an output that is an input, lies inside one, or
    contains one; a parent that is not a directory or cannot be written.
    """
    out_path = Path(out).expanduser().resolve()
    for item in inputs:
        in_path = Path(item).expanduser().resolve()
        if out_path == in_path or _is_within(out_path, in_path):
            raise OutputPathError(f"The output {out_path} is or lies inside the input {in_path}; choose another path.")
        if _is_within(in_path, out_path):
            raise OutputPathError(f"The output {out_path} contains the input {in_path}; choose another path.")
    if out_path.exists() and not overwrite:
        raise OutputPathError(f"{out_path} already exists; pass --overwrite to replace it.")
    probe = out_path.parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise OutputPathError(f"Cannot write {out_path}: {probe} is not a directory.")
    if not _writable(probe):
        raise OutputPathError(f"Cannot write to {probe} (permission denied or read-only file system).")
    return out_path


def _writable(directory: Path) -> bool:
    """Whether files can be created in `directory`: tried for real, because `os.access` says yes to
    root on a read-only mount and ignores ACLs."""
    if not os.access(directory, os.W_OK | os.X_OK):
        return False
    try:
        fd, probe = tempfile.mkstemp(prefix=".oftsurgery-probe-", dir=directory)
    except OSError:
        return False
    os.close(fd)
    os.unlink(probe)
    return True


def _os_error(exc: BaseException) -> OSError | None:
    """The OSError behind an exception: itself, or the "(os error N)" that safetensors reports as text."""
    if isinstance(exc, OSError):
        return exc
    text = str(exc)
    writing = type(exc).__name__ == "SafetensorError" and "serializ" in text
    match = _SAFETENSORS_OS_ERROR.search(text) if writing else None
    if match is None:
        return None
    code = int(match.group(1))
    return OSError(code, os.strerror(code))


_SAFETENSORS_OS_ERROR = re.compile(r"\(os error (\d+)\)")
_DISK_FULL = {errno.ENOSPC, errno.EDQUOT}
_NOT_WRITABLE = {errno.EACCES, errno.EPERM, errno.EROFS}


class _SignalsAsExceptions:
    """Turn SIGTERM into KeyboardInterrupt while the output is being written, so cleanup runs."""

    def __enter__(self) -> None:
        self._old = None
        try:
            self._old = signal.signal(signal.SIGTERM, self._raise)
        except ValueError:  # not in the main thread: leave signals alone
            self._old = None

    @staticmethod
    def _raise(signum, frame):  # noqa: ARG004
        raise KeyboardInterrupt

    def __exit__(self, *exc) -> None:
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


@contextmanager
def atomic_output(out: str | Path, overwrite: bool = False, is_file: bool = False) -> Iterator[Path]:
    """Yield a temporary path to fill; rename it onto `out` only when the block finishes.

    With `is_file=True` the yielded path is a file path inside a temporary directory, else a
    directory. The caller should have run `check_output_path` first; this re-checks existence.
    The temporary directory (`.NAME.tmp-*` next to `out`) is removed whatever happens. Failures
    while writing become one-sentence errors: a full disk (`DiskFullError`), a path that cannot be
    written (`OutputPathError`), Ctrl-C or SIGTERM (`InterruptedError_`).
    """
    out_path = Path(out).expanduser().resolve()
    if out_path.exists() and not overwrite:
        raise OutputPathError(f"{out_path} already exists; pass --overwrite to replace it.")
    try:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out_path.name}.tmp-", dir=out_path.parent))
    except OSError as exc:
        if exc.errno in _DISK_FULL:
            raise DiskFullError(f"The disk is full: cannot create {out_path}; nothing was written.") from None
        raise OutputPathError(f"Cannot write to {out_path.parent} ({exc.strerror or exc}).") from None
    # mkdtemp makes the directory private (0700); the output should get the usual permissions
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_dir, 0o777 & ~umask)
    target = tmp_dir / out_path.name if is_file else tmp_dir
    try:
        with _SignalsAsExceptions():
            yield target
            if out_path.exists():  # overwrite: move the old one aside, then swap
                trash = Path(tempfile.mkdtemp(prefix=f".{out_path.name}.old-", dir=out_path.parent))
                os.replace(out_path, trash / "old")
                os.replace(target, out_path)
                shutil.rmtree(trash, ignore_errors=True)
            else:
                os.replace(target, out_path)
    except KeyboardInterrupt:
        raise InterruptedError_(f"Interrupted; nothing was written to {out_path}.") from None
    except Exception as exc:
        error = _os_error(exc)
        if error is not None and error.errno in _DISK_FULL:
            raise DiskFullError(
                f"The disk is full ({error.strerror}) while writing {out_path}; nothing was written, "
                "free some space and run again."
            ) from exc
        if error is not None and error.errno == errno.EFBIG:
            raise OutputPathError(
                f"The file system of {out_path} cannot hold a file this large ({error.strerror}); nothing was "
                "written, pass a smaller --max-shard-size or write elsewhere."
            ) from exc
        if error is not None and error.errno in _NOT_WRITABLE and _is_within(Path(error.filename or tmp_dir), tmp_dir):
            raise OutputPathError(f"Cannot write {out_path} ({error.strerror}); nothing was written.") from exc
        raise
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
