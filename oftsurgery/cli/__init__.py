"""The `oftsurgery` command line (`run`, the process's entry point; `main`, the command line without the
quick exit; `cli`, its click group).

`app.py` holds the group and the error handling, `commands/` one module per command (imported only
when that command runs or `--help` lists it), `options.py` the shared option types, and `docs.py`
renders docs/cli.md from `--help`.
"""

from oftsurgery.cli.app import cli, main, run

__all__ = ["cli", "main", "run"]
