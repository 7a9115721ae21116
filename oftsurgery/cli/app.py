"""The `oftsurgery` command line: a thin layer over the library.

Each command lives in `oftsurgery/cli/commands/<name>.py` and is imported only when it runs (or when
`--help` lists it), so `oftsurgery --help` never imports torch or gptqmodel. Library errors
(`OftSurgeryError`) become one line on stderr and the error's exit code; anything else (a bug) becomes
one line and exit code 1; a traceback is shown only when OFTSURGERY_DEBUG=1. Exit codes: docs/errors.md.
"""

from __future__ import annotations

import atexit
import importlib
import os
import signal
import sys
import threading

import click

from oftsurgery.errors import OftSurgeryError, exit_code


def default_cuda_allocator(environ=os.environ) -> None:
    """Have torch's CUDA caching allocator grow expandable segments unless the user configured it.

    Set before torch is imported (importing this module does it; the commands import torch later).
    The calibrated merge frees and allocates tensors of many sizes (in×in Hessians and factors,
    out×in work matrices); with fixed segments the cached blocks they leave behind are often too
    small for the next request, and the reserve nvidia-smi shows grows far past what is allocated
    (docs/performance.md, "Peak memory"). torch ≥ 2.9 reads PYTORCH_ALLOC_CONF first and falls back
    to PYTORCH_CUDA_ALLOC_CONF, which older versions read; a user's setting of either is kept."""
    if "PYTORCH_ALLOC_CONF" not in environ:
        environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")


default_cuda_allocator()

# command name -> module under oftsurgery.cli.commands that defines a click command called `command`
COMMANDS = {
    "inspect": "inspect",
    "attach": "attach",
    "extract": "extract",
    "merge": "merge",
    "verify": "verify",
    "push": "push",
    "demo": "demo",
}


class LazyGroup(click.Group):
    """A group whose subcommands are imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return [name for name in COMMANDS if self._module_exists(name)]

    @staticmethod
    def _module_exists(name: str) -> bool:
        return importlib.util.find_spec(f"oftsurgery.cli.commands.{COMMANDS[name]}") is not None

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS or not self._module_exists(name):
            return None
        return _in_console_session(importlib.import_module(f"oftsurgery.cli.commands.{COMMANDS[name]}").command)

    def invoke(self, ctx: click.Context):
        # Library errors become click errors here, so `main()` and click.testing.CliRunner both show
        # the one-line message and exit with the error's own code.
        try:
            return super().invoke(ctx)
        except OftSurgeryError as exc:
            if debug_enabled():
                raise
            raise LibraryError(exc) from exc
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except Exception as exc:  # not a user error we foresaw: still one line, the traceback on request
            if debug_enabled():
                raise
            raise UnexpectedError(exc) from exc


VERBOSITY = "oftsurgery.verbosity"  # ctx.meta key: how many -v were given (group and command)


def _count_verbosity(ctx: click.Context, param: click.Parameter, value: int) -> None:  # noqa: ARG001
    ctx.meta[VERBOSITY] = ctx.meta.get(VERBOSITY, 0) + (value or 0)


def _verbose_option() -> click.Option:
    return click.Option(["-v", "--verbose"], count=True, expose_value=False, callback=_count_verbosity,
                        help="Show third-party logging and warnings on stderr (-vv: debug).")


def _in_console_session(command: click.Command) -> click.Command:
    """Give a command the -v option and run its body in `console.session`: stdout only for results."""
    if getattr(command, "_oftsurgery_session", False):
        return command
    from oftsurgery.reporting import console

    body = command.callback

    def run(*args, **kwargs):
        with console.session(click.get_current_context().meta.get(VERBOSITY, 0)):
            return body(*args, **kwargs)

    command.callback = run
    command.params.append(_verbose_option())
    command._oftsurgery_session = True  # type: ignore[attr-defined]
    return command


class LibraryError(click.ClickException):
    """An `OftSurgeryError` shown the click way: `Error: <one line>` on stderr, its exit code."""

    def __init__(self, error: OftSurgeryError):
        super().__init__(_one_line(str(error)))
        self.exit_code = exit_code(error)
        # another rank of a distributed merge failed and printed the one message: say nothing more
        self.quiet = getattr(error, "quiet", False)

    def show(self, file=None) -> None:
        if not self.quiet:
            super().show(file)


class UnexpectedError(click.ClickException):
    """An exception oftsurgery did not foresee (a bug): one line naming it, exit code 1."""

    exit_code = 1

    def __init__(self, error: Exception):
        detail = _one_line(str(error)) or "no message"
        super().__init__(
            f"Unexpected {type(error).__name__}: {detail[:300]} (set OFTSURGERY_DEBUG=1 for the traceback "
            "and report it as a bug)."
        )


def debug_enabled() -> bool:
    return os.environ.get("OFTSURGERY_DEBUG", "") not in ("", "0", "false", "no")


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="oftsurgery")
@click.option("-v", "--verbose", count=True, expose_value=False, callback=_count_verbosity,
              help="Show third-party logging and warnings on stderr (-vv: debug); also accepted after the command.")
def cli() -> None:
    """Attach, extract and merge OFT adapters on GPTQ/AWQ quantized checkpoints.

    Fine-tune a 4-bit model with OFT, then fold the rotations back into the quantized
    weights without losing the fine-tune, verify it, and publish it.
    """


def _terminate(signum, frame):  # noqa: ARG001
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> None:
    """Console entry point: run the CLI, turning library errors into one line and an exit code.

    SIGTERM is handled like Ctrl-C, so `kill` also runs the cleanup that removes temporary files.
    """
    signal.signal(signal.SIGTERM, _terminate)
    try:
        cli.main(args=argv, prog_name="oftsurgery", standalone_mode=False)
    except click.exceptions.Abort:  # click's form of KeyboardInterrupt outside our own handling
        _say_interrupted()
        _exit_interrupted()
    except click.ClickException as exc:
        exc.show()
        if exc.exit_code == INTERRUPTED:
            _exit_interrupted()
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except OftSurgeryError as exc:
        if debug_enabled():
            raise
        if not getattr(exc, "quiet", False):
            click.echo(f"Error: {_one_line(str(exc))}", err=True)
        sys.exit(exit_code(exc))
    except KeyboardInterrupt:
        _say_interrupted()
        _exit_interrupted()


def run() -> None:
    """The process's entry point (the `oftsurgery` script, `python -m oftsurgery`): `main`, then exit.

    Once the command is done, the process ends without finalising the interpreter: after torch (and,
    for some commands, transformers) was imported, Python's own shutdown spends about half a second
    collecting and tearing down their modules' objects, for nothing. What a normal exit does that
    matters is done first (threads finished, `atexit` callbacks run, stdout and stderr flushed), with
    the same exit code. Where that cannot be guaranteed (a thread still running, a profiler or tracer
    attached, an exit code that is not a number), the normal exit is taken.
    """
    try:
        main()
    except SystemExit as done:
        _exit_quickly(done.code)
        raise
    _exit_quickly(0)


def _exit_quickly(code: object) -> None:
    """End the process now with `code`, as a normal exit would end it; return where that is not safe."""
    if code is None:
        code = 0
    if not isinstance(code, int) or isinstance(code, bool) or not 0 <= code <= 255:
        return
    if sys.gettrace() is not None or sys.getprofile() is not None:
        return  # coverage, a debugger or a profiler reports at the normal exit
    main_thread = threading.main_thread()
    if any(t is not main_thread and not t.daemon and t.is_alive() for t in threading.enumerate()):
        return  # a normal exit waits for it
    run_exitfuncs = getattr(atexit, "_run_exitfuncs", None)
    if run_exitfuncs is None:
        return
    run_exitfuncs()  # what libraries (and an initialised process group) asked to run at exit
    try:
        for stream in (sys.stdout, sys.stderr):
            if stream is not None:
                stream.flush()
    except (OSError, ValueError):
        return  # a closed pipe: the normal exit reports it as Python does
    os._exit(code)


def _say_interrupted() -> None:
    # Ctrl-C on torchrun reaches every worker: only rank 0 says so (inside a merge, the ranks
    # agree among themselves who reports; this is for interruptions outside one)
    if os.environ.get("RANK", "0") == "0":
        click.echo("Error: Interrupted.", err=True)


INTERRUPTED = 130


def _exit_interrupted() -> None:
    """Exit with 130 after an interruption, once our cleanup has run.

    Not `sys.exit`: when the interrupt landed while CPython was running code through its C API (some
    imports do), CPython remembers it as unhandled and, at exit, kills the process with SIGINT
    instead of returning our code. Worker threads still busy are abandoned on purpose.
    """
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(INTERRUPTED)


def _one_line(message: str) -> str:
    return " ".join(message.split())
