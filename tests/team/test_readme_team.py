"""The README's "Running as a team" commands are ones the CLI accepts, and each step has its test file.

The steps themselves run in tests/team/test_*.py; this file keeps the README from drifting away
from the CLI (a renamed option fails here) and from the tests (a step without its test fails here).
"""
from __future__ import annotations

import re
import shlex

import pytest
import typer
from cliutil import REPO_ROOT

from flows.cli import app

SECTION = "## Running as a team"
# step heading -> the test file that runs its commands for real
STEP_TESTS = {"PostgreSQL": "test_postgres.py", "Ray": "test_ray.py", "Prefect workers": "test_workpool.py",
              "several nodes": "test_multinode.py", "shared filesystem": "test_catalog_shared.py"}


def team_section() -> str:
    text = (REPO_ROOT / "README.md").read_text()
    start = text.index(SECTION)
    end = text.index("\n## ", start + len(SECTION))
    return text[start:end]


def steps(section: str) -> dict[str, str]:
    """'### N. title' -> the text under it."""
    parts = re.split(r"^### \d+\. (.+)$", section, flags=re.MULTILINE)
    return dict(zip(parts[1::2], parts[2::2]))


def shell_commands(text: str) -> list[str]:
    """Every command line of the bash blocks, with continuations joined and comments dropped."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip().removesuffix("&").strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def lmforge_invocations(text: str) -> list[list[str]]:
    """The argument lists of the `lmforge ...` commands (also after `VAR=value` prefixes)."""
    found = []
    for command in shell_commands(text):
        words = shlex.split(command)
        while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):
            words = words[1:]
        if words and words[0] == "lmforge":
            found.append(words[1:])
    return found


def test_every_step_has_commands_and_a_test_file() -> None:
    found = steps(team_section())
    assert len(found) == len(STEP_TESTS), list(found)
    for title, body in found.items():
        assert "<!--" not in body, f"step {title!r} is still a placeholder"
        assert shell_commands(body), f"step {title!r} has no commands"
        test_file = next(f for key, f in STEP_TESTS.items() if key in title)
        assert (REPO_ROOT / "tests" / "team" / test_file).is_file(), f"step {title!r}: no tests/team/{test_file}"


@pytest.mark.parametrize("args", lmforge_invocations(team_section()), ids=" ".join)
def test_each_lmforge_command_parses(args: list[str]) -> None:
    """The CLI accepts the command's subcommand and options as written (parsed, not run): an unknown
    command or option raises typer's usage error here."""
    group = typer.main.get_command(app)
    name, command, rest = group.resolve_command(group.context_class(group, info_name="lmforge"), list(args))
    command.make_context(name, rest)
