"""Where the CLI's output goes: results on stdout, nothing else there; third parties quiet unless -v.

While a command runs (`session`), stdout (Python's `sys.stdout` and, in a real process, file
descriptor 1) belongs to oftsurgery's results alone (`echo`); what libraries print goes nowhere, or to
stderr with `-v`. Third-party loggers are raised to ERROR (INFO / DEBUG with `-v` / `-vv`); oftsurgery's
own warnings are one `Warning: ...` line. docs/errors.md ("Output").
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

import click

THIRD_PARTY_LOGGERS = (
    "gptqmodel", "logbar", "tokenicer", "defuser", "device_smi", "transformers", "huggingface_hub", "datasets",
    "peft", "accelerate", "optimum", "torch", "torchao", "triton", "httpx", "httpx2", "httpcore", "httpcore2", "urllib3",
    "filelock", "fsspec", "matplotlib", "PIL",
)
# read by those libraries when they are imported (only where the user has not set them)
_QUIET_ENV = {
    "GPTQMODEL_DISABLE_GIL_WARNING": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "HF_HUB_VERBOSITY": "error",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "TORCH_LOGS": "-all",  # torch sets its loggers' levels from this when imported
}
# libraries that install their own stderr handler when imported: adding ours would print twice
_OWN_HANDLERS = {"logbar", "torch", "transformers"}
_VERBOSE_ENV = {"TRANSFORMERS_VERBOSITY": "info", "HF_HUB_VERBOSITY": "info"}
_PACKAGE_DIR = str(Path(__file__).resolve().parent.parent)  # oftsurgery/ (this module is oftsurgery/reporting/console.py)

_results: TextIO | None = None  # the real stdout while a session runs


def echo(message: object = "", nl: bool = True) -> None:
    """Write a result (what a command prints for the user or a program) to stdout."""
    click.echo(message, file=_results if _results is not None else sys.stdout, nl=nl)


def third_party_output() -> contextlib.AbstractContextManager:
    """Around a call into a library that prints to stdout (gptqmodel): inside a CLI session its
    stdout is already routed (nowhere, or stderr with -v); for a Python caller it goes to stderr."""
    return contextlib.nullcontext() if _results is not None else contextlib.redirect_stdout(sys.stderr)


@contextlib.contextmanager
def third_party_logging(verbosity: int) -> Iterator[None]:
    """Third-party logging while a command runs: ERROR by default, INFO with -v, DEBUG with -vv, on
    stderr; oftsurgery's own notes at WARNING (INFO with -v). The levels of loggers that existed
    before, our handlers and the environment variables are restored afterwards, so later in-process
    use and exit-time logging (torch's) see the process as it was."""
    env = _VERBOSE_ENV if verbosity else _QUIET_ENV
    saved_env = {key: os.environ.get(key) for key in env}
    for key, value in env.items():
        os.environ.setdefault(key, value)
    level = logging.ERROR if verbosity == 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    handler = _stderr_handler()
    loggers = {name: level for name in THIRD_PARTY_LOGGERS}
    loggers["oftsurgery"] = logging.INFO if verbosity else logging.WARNING  # Hub retries, removed temporaries
    # only loggers that existed before: a library imported meanwhile (torch) has set up its own, and
    # putting back the level of our placeholder would undo that (torch then logs INFO at exit)
    existing = logging.root.manager.loggerDict
    saved_levels = {name: existing[name].level for name in loggers
                    if isinstance(existing.get(name), logging.Logger)}
    added = []
    for name, wanted in loggers.items():
        log = logging.getLogger(name)
        log.setLevel(wanted)
        if name not in _OWN_HANDLERS and not log.handlers:  # else Python's lastResort prints WARNINGs
            log.addHandler(handler)
            added.append(log)
    try:
        yield
    finally:
        for name, previous in saved_levels.items():
            logging.getLogger(name).setLevel(previous)
        for log in added:
            log.removeHandler(handler)
        for key, previous in saved_env.items():
            if previous is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = previous


class _Formatter(logging.Formatter):
    """`Note: ...` for oftsurgery's own messages, `LEVEL name: ...` for the others'."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.name == "oftsurgery" or record.name.startswith("oftsurgery."):
            return f"Note: {message}"
        return f"{record.levelname} {record.name}: {message}"


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time (pytest and CliRunner swap it)."""

    _oftsurgery = True

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(_Formatter())

    @property  # type: ignore[override]
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns it
        pass


_HANDLER: _StderrHandler | None = None


class _Discard(io.TextIOBase):
    """A text stream that drops what it is given; never closed, since libraries that write from
    background threads (logbar) may still hold it after the command ends."""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        return len(text)


_DISCARD = _Discard()


def _stderr_handler() -> _StderrHandler:
    global _HANDLER
    if _HANDLER is None:
        _HANDLER = _StderrHandler()
    return _HANDLER


def _show_warning(verbosity: int):
    def show(message, category, filename, lineno, file=None, line=None):  # noqa: ARG001
        ours = str(filename).startswith(_PACKAGE_DIR)
        if ours or verbosity:
            text = " ".join(str(message).split())
            prefix = "Warning" if ours else f"Warning ({category.__name__})"
            click.echo(f"{prefix}: {text}", err=True)

    return show


@contextlib.contextmanager
def _stdout_for_results_only(verbosity: int) -> Iterator[None]:
    global _results
    real = sys.stdout
    try:
        fd = real.fileno()
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        fd = None
    saved_fd = None
    results = real
    sink_path = None if verbosity else os.devnull
    if fd == 1:  # a real process: reroute the descriptor too, for writes that bypass sys.stdout
        real.flush()
        saved_fd = os.dup(1)
        results = open(saved_fd, "w", encoding=getattr(real, "encoding", None) or "utf-8",  # noqa: SIM115
                       errors="replace", closefd=False, buffering=1)
        if sink_path is None:
            sys.stderr.flush()
            os.dup2(2, 1)
        else:
            null = os.open(sink_path, os.O_WRONLY)
            os.dup2(null, 1)
            os.close(null)
    elsewhere = sys.stderr if verbosity else _DISCARD
    previous_results = _results
    _results = results
    sys.stdout = elsewhere
    try:
        yield
    finally:
        sys.stdout = real
        _results = previous_results
        if saved_fd is not None:
            results.flush()
            os.dup2(saved_fd, 1)
            results.close()
            os.close(saved_fd)


@contextlib.contextmanager
def session(verbosity: int = 0) -> Iterator[None]:
    """Run one CLI command: results only on stdout, third parties quiet unless `verbosity` > 0."""
    with third_party_logging(verbosity), warnings.catch_warnings(), _stdout_for_results_only(verbosity):
        warnings.showwarning = _show_warning(verbosity)
        if not verbosity:
            warnings.simplefilter("default")  # ours once per place; others dropped by show()
        yield
