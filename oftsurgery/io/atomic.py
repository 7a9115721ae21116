"""Write a directory (or one file) so that it appears complete or not at all, and never clobbers.

`atomic_output` works in a hidden temporary sibling (`.NAME.tmp-HOST-PID-XXXX`) and renames it onto the
destination when done: without `overwrite` by a rename that fails if anything appeared there, with it
by an atomic swap with the old output, re-checked right before (`ownership.check_replaceable`). On any
failure the temporary folder goes, and those of dead runs are removed by the next run.
`check_output_path` validates an output before any work starts. The guarantees: docs/errors.md.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import re
import shutil
import signal
import socket
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from oftsurgery.errors import DiskFullError, InterruptedError_, OutputPathError
from oftsurgery.io.ownership import check_replaceable, is_within
from oftsurgery.io.rename import RenameUnsupported, exchange, rename_no_replace

logger = logging.getLogger(__name__)


def resolve_output(out: str | Path) -> Path:
    """`out` made absolute with symbolic links resolved; a link loop is an OutputPathError."""
    try:
        return Path(out).expanduser().resolve()
    except (RuntimeError, OSError) as exc:  # "Symlink loop" (RuntimeError before Python 3.13, ELOOP after)
        raise OutputPathError(f"Cannot write to {out}: it is a symbolic link loop ({_reason(exc)}).") from None


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return " ".join(str(exc).split()) or type(exc).__name__


def check_output_path(out: str | Path, inputs: Sequence[str | Path] = (), overwrite: bool = False,
                      is_file: bool = False) -> Path:
    """Validate an output path before any work starts; return it resolved.

    Refuses: an existing output without `overwrite`, and with it anything oftsurgery did not write
    (see `ownership.check_replaceable`); an output that is an input, lies inside one, or contains
    one; a parent that is not a directory or cannot be written; a symbolic link loop.
    """
    out_path = resolve_output(out)
    for item in inputs:
        try:
            in_path = Path(item).expanduser().resolve()
        except (RuntimeError, OSError):
            continue  # a broken input is reported by whoever reads it
        if out_path == in_path or is_within(out_path, in_path):
            raise OutputPathError(f"The output {out_path} is or lies inside the input {in_path}; choose another path.")
        if is_within(in_path, out_path):
            raise OutputPathError(f"The output {out_path} contains the input {in_path}; choose another path.")
    if os.path.lexists(out_path):
        if not overwrite:
            raise OutputPathError(f"{out_path} already exists; pass --overwrite to replace it.")
        check_replaceable(out_path, is_file)
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


# -- temporary folders: named after their owner, so those of dead runs can be recognised ----------

def _host_tag() -> str:
    """8 hex digits naming this machine: a pid means something only on the host that owns it."""
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def _owner_prefix(out_path: Path, kind: str) -> str:
    return f".{out_path.name}.{kind}-{_host_tag()}-{os.getpid()}-"


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return True
    return True


def remove_stale_temporaries(out_path: Path) -> list[Path]:
    """Remove `.NAME.tmp-*` / `.NAME.old-*` siblings left by dead runs on this host; return them."""
    pattern = re.compile(re.escape(f".{out_path.name}.") + r"(?:tmp|old)-(?P<host>[0-9a-f]{8})-(?P<pid>\d+)-")
    host = _host_tag()
    removed = []
    try:
        siblings = list(out_path.parent.iterdir())
    except OSError:
        return removed
    for path in siblings:
        match = pattern.match(path.name)
        if match is None or match["host"] != host or _pid_alive(int(match["pid"])):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            try:
                path.unlink()
            except OSError:
                pass
        if not os.path.lexists(path):
            logger.info("removed %s, left by a run that no longer exists (pid %s)", path, match["pid"])
            removed.append(path)
    return removed


def _make_parents(folder: Path) -> list[Path]:
    """Create `folder` and its missing parents; return the ones created, outermost first."""
    missing = []
    probe = folder
    while not probe.exists():
        missing.append(probe)
        probe = probe.parent
    created = []
    for path in reversed(missing):
        try:
            path.mkdir()
        except FileExistsError:
            continue
        created.append(path)
    return created


def _remove_created(created: list[Path]) -> None:
    for path in reversed(created):
        try:
            path.rmdir()  # only if still empty: never anything someone else put there
        except OSError:
            break


def _umask() -> int:
    try:  # without changing it (os.umask can only be read by setting it, which races with threads)
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(root: Path) -> None:
    """Give every file under `root` mode 0666 & ~umask and every folder 0777 & ~umask, as a plain
    `open()` / `mkdir` would; writers that create private files (safetensors: 0600) do not."""
    mask = _umask()
    file_mode, dir_mode = 0o666 & ~mask, 0o777 & ~mask
    if root.is_file():
        os.chmod(root, file_mode)
        return
    for folder, dirs, files in os.walk(root):
        os.chmod(folder, dir_mode)
        for name in files:
            path = os.path.join(folder, name)
            if not os.path.islink(path):
                os.chmod(path, file_mode)


def _appeared(out_path: Path) -> OutputPathError:
    return OutputPathError(
        f"{out_path} appeared while this run was writing it (another run?); it was left as it is and nothing "
        "was written, pass --overwrite to replace it."
    )


def _publish(target: Path, out_path: Path, overwrite: bool, is_file: bool, tmp_dir: Path) -> None:
    """Move the finished `target` onto `out_path`, never replacing what oftsurgery may not replace."""
    if os.path.lexists(out_path):
        if not overwrite:
            raise _appeared(out_path)
        check_replaceable(out_path, is_file)  # it may have changed since the run started
        try:
            exchange(target, out_path)  # the old output now sits in the temporary folder, removed last
            return
        except FileNotFoundError:
            pass  # it vanished meanwhile: a plain no-replace rename below
        except RenameUnsupported:
            trash = Path(tempfile.mkdtemp(prefix=_owner_prefix(out_path, "old"), dir=out_path.parent))
            os.rename(out_path, trash / "old")
            try:
                rename_no_replace(target, out_path)
            except BaseException:
                rename_no_replace(trash / "old", out_path)
                shutil.rmtree(trash, ignore_errors=True)
                raise
            shutil.rmtree(trash, ignore_errors=True)
            return
    try:
        rename_no_replace(target, out_path)
    except FileExistsError:
        raise _appeared(out_path) from None


@contextmanager
def atomic_output(out: str | Path, overwrite: bool = False, is_file: bool = False) -> Iterator[Path]:
    """Yield a temporary path to fill; move it onto `out` only when the block finishes.

    With `is_file=True` the yielded path is a file path inside a temporary directory, else a
    directory. The caller should have run `check_output_path` first; this re-checks existence (and,
    with `overwrite`, that the existing output is one oftsurgery may replace). The temporary
    directory is removed whatever happens, and so are parent folders created here if the block
    fails. Failures while writing become one-sentence errors: a full disk (`DiskFullError`), a path
    that cannot be written (`OutputPathError`), Ctrl-C or SIGTERM (`InterruptedError_`).
    """
    out_path = resolve_output(out)
    if os.path.lexists(out_path):
        if not overwrite:
            raise OutputPathError(f"{out_path} already exists; pass --overwrite to replace it.")
        check_replaceable(out_path, is_file)
    created: list[Path] = []
    try:
        created = _make_parents(out_path.parent)
        remove_stale_temporaries(out_path)
        tmp_dir = Path(tempfile.mkdtemp(prefix=_owner_prefix(out_path, "tmp"), dir=out_path.parent))
    except OSError as exc:
        _remove_created(created)
        if exc.errno in _DISK_FULL:
            raise DiskFullError(f"The disk is full: cannot create {out_path}; nothing was written.") from None
        raise OutputPathError(f"Cannot write to {out_path.parent} ({exc.strerror or exc}).") from None
    target = tmp_dir / out_path.name if is_file else tmp_dir
    done = False
    try:
        with _SignalsAsExceptions():
            yield target
            apply_umask(target)
            _publish(target, out_path, overwrite, is_file, tmp_dir)
            done = True
    except KeyboardInterrupt:
        raise InterruptedError_(f"Interrupted; nothing was written to {out_path}.") from None
    except OutputPathError:
        raise
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
        if error is not None and error.errno in _NOT_WRITABLE and is_within(Path(error.filename or tmp_dir), tmp_dir):
            raise OutputPathError(f"Cannot write {out_path} ({error.strerror}); nothing was written.") from exc
        raise
    finally:
        # after a swap this holds the old output: removed only now that the new one is in place
        shutil.rmtree(tmp_dir, ignore_errors=True)
        if not done:
            _remove_created(created)
