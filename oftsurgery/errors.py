"""The one error hierarchy of oftsurgery.

Every failure a user can cause or meet is an `OftSurgeryError` subclass carrying one clear sentence.
The CLI maps each class to its own exit code (see `exit_code`), prints the sentence on one line and
shows a traceback only when OFTSURGERY_DEBUG=1. Library users catch `OftSurgeryError`.
"""

from __future__ import annotations


class OftSurgeryError(Exception):
    """Base class. The message is one sentence saying what is wrong (and, where useful, what to do)."""

    exit_code = 1


class InvalidCheckpointError(OftSurgeryError):
    """A checkpoint directory is missing files, has a broken index or corrupt/truncated safetensors."""

    exit_code = 3


class UnsupportedFormatError(OftSurgeryError):
    """A checkpoint or adapter uses a format oftsurgery cannot reproduce exactly (refused, not guessed)."""

    exit_code = 4


class InvalidAdapterError(OftSurgeryError):
    """An adapter or rotations file is broken or does not fit the checkpoint it is used with."""

    exit_code = 5


class OutputPathError(OftSurgeryError):
    """The output path exists (without --overwrite), lies inside an input, or cannot be written."""

    exit_code = 6


class DiskFullError(OftSurgeryError):
    """The disk filled up while writing; nothing was left behind."""

    exit_code = 7


class MergeError(OftSurgeryError):
    """The merge itself failed (numerical trouble, a layer that cannot be requantized)."""

    exit_code = 8


class HubError(OftSurgeryError):
    """Publishing to the Hugging Face Hub failed (authentication, access, network, server)."""

    exit_code = 9


class MissingDependencyError(OftSurgeryError):
    """An optional dependency needed for this request is not installed."""

    exit_code = 10


class CalibrationError(OftSurgeryError):
    """Calibration or evaluation text cannot be read, is too short, or the named dataset cannot be loaded."""

    exit_code = 11


class InterruptedError_(OftSurgeryError):
    """The work was interrupted (Ctrl-C / SIGTERM); temporary files were removed."""

    exit_code = 130


class PeerFailedError(OftSurgeryError):
    """Another rank of a distributed merge failed and has reported it; this rank ends without a
    message of its own (the CLI prints nothing for it) and with the failed rank's exit code."""

    quiet = True

    def __init__(self, rank: int, message: str, exit_code: int = 1):
        super().__init__(f"Rank {rank} failed: {message}")
        self.peer_rank = rank
        self.exit_code = exit_code


def exit_code(error: BaseException) -> int:
    """The process exit code for an error (1 for anything that is not ours)."""
    return getattr(error, "exit_code", 1) if isinstance(error, OftSurgeryError) else 1
