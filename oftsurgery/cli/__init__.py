"""The `oftsurgery` command line (`main`, the console entry point, and `cli`, its click group).

`app.py` holds the group and the error handling, `commands/` one module per command (imported only
when that command runs or `--help` lists it), `options.py` the shared option types, and `docs.py`
renders docs/cli.md from `--help`.
"""

from oftsurgery.cli.app import cli, main

__all__ = ["cli", "main"]
