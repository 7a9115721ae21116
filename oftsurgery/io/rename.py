"""Renames that never clobber: "move unless something is there" and "swap these two atomically".

`os.replace` silently replaces a file or an empty directory that appeared at the destination, and a
check before it leaves a window in which a second run (or a user) can create one. The kernel offers
both operations without a window: Linux `renameat2(RENAME_NOREPLACE / RENAME_EXCHANGE)` (glibc ≥
2.28) and macOS `renamex_np(RENAME_EXCL / RENAME_SWAP)`. Where neither is available (another OS, or
a file system that refuses the flags, e.g. some network mounts) the fallbacks below keep the window
as small as a check right before the rename.
"""

from __future__ import annotations

import ctypes
import errno
import os
import sys
from pathlib import Path

_AT_FDCWD = -100
_LINUX_NOREPLACE, _LINUX_EXCHANGE = 1, 2
_MACOS_SWAP, _MACOS_EXCL = 0x2, 0x4
_UNSUPPORTED = {errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP}


class RenameUnsupported(Exception):
    """The platform or file system cannot do this rename atomically."""


def _kernel_rename(src: Path, dst: Path, exchange: bool) -> None:
    libc = _libc()
    if libc is None:
        raise RenameUnsupported
    if sys.platform.startswith("linux"):
        fn = getattr(libc, "renameat2", None)
        if fn is None:
            raise RenameUnsupported
        fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        result = fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst),
                    _LINUX_EXCHANGE if exchange else _LINUX_NOREPLACE)
    else:
        fn = getattr(libc, "renamex_np", None)
        if fn is None:
            raise RenameUnsupported
        fn.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_uint]
        result = fn(os.fsencode(src), os.fsencode(dst), _MACOS_SWAP if exchange else _MACOS_EXCL)
    if result != 0:
        code = ctypes.get_errno()
        if code in _UNSUPPORTED:
            raise RenameUnsupported
        raise OSError(code, os.strerror(code), str(dst))


_LIBC: ctypes.CDLL | None | bool = False


def _libc() -> ctypes.CDLL | None:
    global _LIBC
    if _LIBC is False:
        try:
            _LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith(("linux", "darwin")) else None
        except OSError:
            _LIBC = None
    return _LIBC  # type: ignore[return-value]


def rename_no_replace(src: Path, dst: Path) -> None:
    """Move `src` to `dst`; raise FileExistsError if anything (file, folder, link) is at `dst`."""
    try:
        _kernel_rename(src, dst, exchange=False)
        return
    except RenameUnsupported:
        pass
    if src.is_file() and not src.is_symlink():
        try:  # a hard link fails if dst exists: atomic without renameat2
            os.link(src, dst)
        except FileExistsError:
            raise
        except OSError:
            pass
        else:
            os.unlink(src)
            return
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
    os.rename(src, dst)


def exchange(a: Path, b: Path) -> None:
    """Swap what `a` and `b` name, atomically (both must exist); raises RenameUnsupported where the
    kernel cannot, FileNotFoundError if one of them is gone."""
    _kernel_rename(a, b, exchange=True)
