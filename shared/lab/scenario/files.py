"""Scenario files: reading one, and the scenarios shipped with paylab.

The shipped scenarios are package data (``shared/lab/scenario/shipped/*.json``), read
through :mod:`importlib.resources`, so an installed paylab (a wheel, the Docker image) has
them as a checkout does. :func:`resolve` lets a command name one of them instead of a
path: ``04-billing-outage`` or ``04-billing-outage.json``.
"""

from __future__ import annotations

from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path

from shared.lab.scenario.format import Scenario, ScenarioError, load_scenario

#: Where the shipped scenarios are: a folder of this package.
SHIPPED_DIR = "shipped"


def shipped_files() -> list[Traversable]:
    """The shipped scenario files, in their numbered order."""
    folder = files(__package__ or "shared.lab.scenario").joinpath(SHIPPED_DIR)
    return sorted(
        (f for f in folder.iterdir() if f.is_file() and f.name.endswith(".json")),
        key=lambda f: f.name,
    )


def resolve(name: Path) -> Path | Traversable:
    """``name`` itself when such a file exists (or it names no shipped scenario), else the
    shipped scenario of that name (with or without ``.json``)."""
    if name.exists() or len(name.parts) != 1:
        return name
    wanted = name.name if name.name.endswith(".json") else f"{name.name}.json"
    for shipped in shipped_files():
        if shipped.name == wanted:
            return shipped
    return name


def load_file(source: Path | Traversable) -> Scenario:
    """Read and validate one scenario file; :class:`ScenarioError` when it cannot be used."""
    from shared.ops.settings import Settings

    try:
        text = source.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ScenarioError(f"{source}: cannot read: {exc}") from None
    return load_scenario(text, str(source), known_settings=Settings.model_fields)
