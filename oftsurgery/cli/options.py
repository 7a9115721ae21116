"""Option types and option groups shared by several commands, checked when the command line is read.

A value that cannot be right (`--max-shard-size inf`, `--target-regex '('`, `--eps nan`) is a bad
command line: click reports it in one `Error: Invalid value for ...` line with exit code 2, before
any file is opened.
"""

from __future__ import annotations

import math
import re

import click


class SizeType(click.ParamType):
    """A byte size such as 5GB, 500MB or 1048576."""

    name = "size"

    def convert(self, value, param, ctx):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        from oftsurgery.errors import OftSurgeryError
        from oftsurgery.merge import parse_size

        try:
            return parse_size(str(value))
        except OftSurgeryError as exc:
            self.fail(str(exc), param, ctx)


class RegexType(click.ParamType):
    """A regular expression, compiled to check it (the text is passed on)."""

    name = "regex"

    def convert(self, value, param, ctx):
        try:
            re.compile(value)
        except re.error as exc:
            self.fail(f"{value!r} is not a valid regular expression ({exc}).", param, ctx)
        return value


class FiniteFloat(click.ParamType):
    """A finite number, optionally bounded below (click.FloatRange lets nan through)."""

    name = "float"

    def __init__(self, minimum: float | None = None, minimum_open: bool = False):
        self.minimum, self.minimum_open = minimum, minimum_open

    def convert(self, value, param, ctx):
        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number.", param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        if self.minimum is not None and (number < self.minimum or (self.minimum_open and number == self.minimum)):
            bound = ">" if self.minimum_open else ">="
            self.fail(f"{value!r} must be {bound} {self.minimum:g}.", param, ctx)
        return number


SIZE = SizeType()
REGEX = RegexType()


def hub_limits(command):
    """--timeout / --retries / --retry-wait: how long a push waits for the Hub, and how often it retries."""
    from oftsurgery.push import DEFAULT_RETRIES, DEFAULT_RETRY_WAIT, DEFAULT_TIMEOUT

    options = [
        click.option("--timeout", type=FiniteFloat(0, minimum_open=True), default=DEFAULT_TIMEOUT, show_default=True,
                     envvar="OFTSURGERY_HUB_TIMEOUT", metavar="SECONDS",
                     help="Hub requests: seconds to wait to connect and for each answer [env OFTSURGERY_HUB_TIMEOUT]."),
        click.option("--retries", type=click.IntRange(min=0), default=DEFAULT_RETRIES, show_default=True,
                     envvar="OFTSURGERY_HUB_RETRIES",
                     help="Hub requests: further attempts after a network error, a timeout or a 408/429/5xx answer "
                          "[env OFTSURGERY_HUB_RETRIES]."),
        click.option("--retry-wait", type=FiniteFloat(0), default=DEFAULT_RETRY_WAIT, show_default=True,
                     envvar="OFTSURGERY_HUB_RETRY_WAIT", metavar="SECONDS",
                     help="Hub requests: seconds before the first retry, doubled for each next one "
                          "[env OFTSURGERY_HUB_RETRY_WAIT]."),
    ]
    for option in reversed(options):
        command = option(command)
    return command
