"""``paylab --version``: the installed package's version, from its metadata."""

from __future__ import annotations

from typing import Annotated

import typer

from shared.cli.console import out


def _show_version(value: bool) -> None:
    if not value:
        return
    from importlib.metadata import PackageNotFoundError, version

    try:
        found = version("paylab")
    except PackageNotFoundError:  # a checkout run without `pip install -e .`
        found = "unknown (not installed)"
    out.print(f"paylab {found}")
    raise typer.Exit()


def root(
    show_version: Annotated[
        bool,
        typer.Option(
            "--version",
            help="Print paylab's version and exit.",
            callback=_show_version,
            is_eager=True,
        ),
    ] = False,
) -> None:
    """paylab: an ISO-8583 bill-payment network simulator."""
