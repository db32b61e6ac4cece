"""An installed paylab, not a checkout: build the wheel, install it in a fresh virtual
environment outside the checkout, and run what reads package data at run time
(``paylab scenarios list`` and one shipped scenario, which also starts the services: the
HSM's key file and the alembic migrations are package data too).

The wheel is installed without its dependencies; the fresh environment finds them in the
environment running the tests (a ``.pth`` line), so no package index is needed beyond
the build backend's (setuptools, wheel) that ``pip wheel`` fetches for an isolated build.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
#: What the wheel is built from (as deploy/Dockerfile copies it).
SOURCES = ("pyproject.toml", "README.md", "acquirer", "gateway", "billing", "hsm", "shared")


def _run(cmd: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PAYLAB_", "PYTHON"))}
    done = subprocess.run(
        cmd,
        cwd=cwd,
        env={**env, "COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, f"{cmd}\n{done.stdout}\n{done.stderr}"
    return done


@pytest.mark.timeout(420)
def test_a_wheel_install_runs_the_shipped_scenarios(tmp_path: Path) -> None:
    # Build from a copy, so that the checkout gets no build/ or egg-info of this run.
    src = tmp_path / "src"
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=ignore)
        else:
            shutil.copy2(path, src / name)
    dist = tmp_path / "dist"
    _run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dist), str(src)],
        tmp_path,
        300,
    )
    (wheel,) = dist.glob("paylab-*.whl")

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp_path, 60)
    python = venv / "bin" / "python"
    purelib = _run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        tmp_path,
        30,
    ).stdout.strip()
    # The dependencies: those of the environment running this test.
    (Path(purelib) / "_paylab_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run(
        [
            *(sys.executable, "-m", "pip", "--python", str(python), "install", "-q"),
            *("--no-deps", "--no-index", str(wheel)),
        ],
        tmp_path,
        120,
    )

    work = tmp_path / "elsewhere"  # neither the checkout nor the build copy
    work.mkdir()
    paylab = str(venv / "bin" / "paylab")
    listed = json.loads(_run([paylab, "scenarios", "list", "--json"], work, 60).stdout)
    assert listed, "the wheel ships no scenario"
    shipped = sorted(p.name for p in (ROOT / "shared/lab/scenario/shipped").glob("*.json"))
    assert [Path(i["file"]).name for i in listed] == shipped
    for item in listed:
        assert Path(item["file"]).is_relative_to(purelib), item["file"]

    done = _run([paylab, "scenarios", "run", "01-normal-flow"], work, 120)
    assert "PASS normal flow" in done.stdout, done.stdout
    assert "FAIL" not in done.stdout

    # The templates of `paylab send` and the browser console are package data too.
    templates = _run([paylab, "send", "--list"], work, 60).stdout
    for name in ("inquiry", "payment", "advice", "reversal", "echo"):
        assert name in templates, templates
    static = Path(purelib) / "shared" / "lab" / "console" / "static"
    assert sorted(p.name for p in static.iterdir()) == ["app.js", "index.html", "style.css"]
