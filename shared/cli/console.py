"""What every ``paylab`` command prints with and fails with.

:data:`out` and :data:`err` are the two consoles (stdout, stderr); :func:`fail` prints one
line and exits; :func:`load_settings` reads the configuration as a command sees it (an
invalid configuration is one line and exit code 1, never a traceback). Every command
module imports these; none imports another command module.

This module stays cheap to import (typer and rich only): ``paylab --help`` loads every
command module, and each of them imports what its command needs when it runs.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape

if TYPE_CHECKING:
    from shared.ops.settings import Settings


class _Console(Console):
    """A console that falls silent when its reader goes away (``paylab pay | head -1``).

    rich's default exits with status 1 on a broken pipe, which would hide the outcome a
    script reads from the exit code; here the output is dropped and the command goes on.
    """

    def on_broken_pipe(self) -> None:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, (sys.stderr if self.stderr else sys.stdout).fileno())
        os.close(devnull)
        self.quiet = True


out = _Console()
err = _Console(stderr=True)


def fail(message: str, code: int = 1) -> NoReturn:
    """Print one line to stderr and exit."""
    err.print(f"[bold red]error:[/] {escape(message)}")
    raise typer.Exit(code)


def load_settings(data_dir: Path | None = None) -> Settings:
    """The settings (``PAYLAB_*``, ``.env``), with ``data_dir`` when given; an invalid
    configuration fails the command with one line."""
    from shared.ops.settings import load_settings as load

    try:
        overrides: dict[str, Any] = {}
        if data_dir is not None:
            overrides["data_dir"] = data_dir
        return load(**overrides)
    except Exception as exc:  # pydantic's ValidationError: show it as a configuration error
        fail(f"invalid configuration: {exc}")
