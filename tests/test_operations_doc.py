"""docs/operations.md and lab 7 hold together: the measured RTO/RPO are there, the four
operating procedures are there, and every ``paylab`` command they tell an operator to
type exists (command, sub-command and options)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import typer.main

from shared.cli.app import app

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "docs" / "operations.md", ROOT / "docs" / "labs" / "07-backup-and-recovery.md"]


def commands(page: Path) -> list[str]:
    """The ``paylab ...`` lines of the page's shell blocks (comments and pipes cut off)."""
    found = []
    for block in re.findall(r"```sh\n(.*?)```", page.read_text(), re.S):
        for line in block.splitlines():
            for part in re.split(r"&&|\|\||\||;", line.split("  #")[0]):
                part = part.strip()
                if part.startswith(("paylab ", "time paylab ")):
                    found.append(part.removeprefix("time "))
    return found


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_paylab_command_of_the_page_exists(page: Path) -> None:
    root = typer.main.get_command(app)
    lines = commands(page)
    assert len(lines) >= 5
    for line in lines:
        words = shlex.split(line)[1:]
        command: Any = root
        while getattr(command, "commands", None) and words and not words[0].startswith("-"):
            sub = command.commands.get(words[0])
            assert sub is not None, f"{page.name}: {line}: no command {words[0]!r}"
            command, words = sub, words[1:]
        known = {opt for p in command.params for opt in getattr(p, "opts", [])}
        for word in words:
            if word.startswith("--"):
                assert word.split("=")[0] in known, f"{page.name}: {line}: no option {word}"


def test_operations_page_holds_the_measured_figures_and_the_procedures() -> None:
    text = (ROOT / "docs" / "operations.md").read_text()
    assert re.search(r"\*\*RTO\*\* in the drill.*\d+(\.\d+)? s", text)
    assert re.search(r"\*\*RPO\*\* in the drill", text)
    for title in (
        "### 1. Restarting one service without losing a payment",
        "### 2. Database maintenance",
        "### 3. A security incident",
        "### 4. Performance troubleshooting",
    ):
        assert title in text
