"""The docs stay true: docs/cli.md is the commands' --help, and CI runs the README's test command."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
REGENERATE = "python -m oftsurgery.cli.docs > docs/cli.md"


def test_cli_reference_matches_help():
    from oftsurgery.cli.docs import render_cli_reference

    committed = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    assert committed == render_cli_reference(), f"docs/cli.md is out of date; regenerate it: {REGENERATE}"


def test_cli_reference_check_fails_when_a_help_text_changes(monkeypatch):
    """The check above can fail: change one option's help and the rendering differs."""
    from oftsurgery.cli.commands.merge import command as merge_command
    from oftsurgery.cli.docs import render_cli_reference

    committed = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    option = next(p for p in merge_command.params if p.name == "calib_tokens")
    monkeypatch.setattr(option, "help", "A changed help text.")
    changed = render_cli_reference()
    assert changed != committed
    assert "A changed help text." in changed


def test_cli_reference_covers_every_command():
    from oftsurgery.cli.app import COMMANDS

    text = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    for name in COMMANDS:
        assert f"## oftsurgery {name}\n" in text


def _readme_command(section: str) -> str:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    match = re.search(re.escape(section) + r"[^\n]*\n+```(?:bash|sh)\n(.+?)\n```", readme, re.S)
    if match is None:
        pytest.fail(f"README.md has no fenced command after {section!r}")
    return match.group(1).strip()


def test_ci_runs_the_readme_test_command():
    command = _readme_command("Run the tests")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    commands = [line.strip() for line in ci.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert command in commands, f".ci/run does not run the README's test command: {command}"


def test_readme_first_command_runs_the_demo():
    assert _readme_command("Run the main job").endswith("oftsurgery demo")


@pytest.mark.parametrize("page", ["getting-started.md", "formats.md", "merge-methods.md", "cli.md", "architecture.md"])
def test_docs_pages_exist_and_link_targets_exist(page):
    text = (ROOT / "docs" / page).read_text(encoding="utf-8")
    for target in re.findall(r"\]\((?!https?://|#)([^)#]+)", text):
        assert (ROOT / "docs" / target).exists(), f"{page} links to missing {target}"
