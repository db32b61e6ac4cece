"""The shipped scenarios (``shared/lab/scenario/shipped/``), each on a network of its own with chaos
proxies: this is how CI runs them all. Also the runner's failure path and the CLI (a real
subprocess): exit codes 0, 1 and 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.resources.abc import Traversable
from pathlib import Path

import pytest

from shared.lab.scenario.files import load_file, shipped_files
from shared.lab.scenario.format import load_scenario
from shared.lab.scenario.report import Report, StepResult
from shared.lab.scenario.runner import run_self_started

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = shipped_files()


def test_every_issue_scenario_is_shipped() -> None:
    names = " ".join(p.name for p in SHIPPED)
    for topic in (
        "normal-flow",
        "retries",
        "breaker",
        "billing-outage",
        "reversal-after-timeout",
        "billing-database-failure",
        "connection-flood",
    ):
        assert topic in names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name.removesuffix(".json"))
async def test_shipped_scenario_passes(path: Traversable, tmp_path: Path) -> None:
    seen: list[StepResult] = []
    report = await run_self_started(
        load_file(path), str(path), on_result=seen.append, data_dir=tmp_path / "var"
    )
    failure = report.first_failure()
    assert report.ok, (
        f"step {failure.index} {failure.name}: {failure.detail}" if failure else report
    )
    assert [r.index for r in seen] == list(range(1, report.total_steps + 1))


WRONG = {
    "name": "wrong expectation",
    "description": "an inquiry of a bill that exists is expected to be declined",
    "steps": [
        {"do": "inquire", "bill": "PLN-0001", "expect": ["00"]},
        {"do": "inquire", "name": "expects the impossible", "bill": "PLN-0001", "expect": ["25"]},
        {"do": "inquire", "bill": "PLN-0002", "expect": ["00"]},
    ],
}


async def test_a_failed_step_stops_the_scenario(tmp_path: Path) -> None:
    scenario = load_scenario(json.dumps(WRONG))
    report = await run_self_started(scenario, "wrong.json", data_dir=tmp_path / "var")
    assert not report.ok
    assert [r.ok for r in report.results] == [True, False]
    failure = report.first_failure()
    assert failure is not None and failure.index == 2
    assert failure.name == "expects the impossible"
    assert failure.detail == "inquiry of PLN-0001: got 00, expected 25"
    assert report.skipped == 1


async def test_keep_going_runs_every_step(tmp_path: Path) -> None:
    scenario = load_scenario(json.dumps(WRONG))
    report: Report = await run_self_started(
        scenario, "wrong.json", keep_going=True, data_dir=tmp_path / "var"
    )
    assert [r.ok for r in report.results] == [True, False, True]
    assert report.skipped == 0 and not report.ok


async def test_a_fault_the_chaos_api_refuses_fails_the_step_clearly(tmp_path: Path) -> None:
    scenario = load_scenario(
        json.dumps(
            {
                "name": "x",
                "steps": [{"do": "fault", "link": "billing", "faults": {"latency": "soon"}}],
            }
        )
    )
    report = await run_self_started(scenario, "x.json", data_dir=tmp_path / "var")
    assert not report.ok
    assert "answered HTTP 400" in report.results[0].detail


def _paylab(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PAYLAB_")}
    return subprocess.run(
        [sys.executable, "-m", "shared.cli", "scenarios", *args],
        cwd=cwd,
        env={**env, "COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_runs_a_shipped_scenario(tmp_path: Path) -> None:
    path = ROOT / "shared" / "lab" / "scenario" / "shipped" / "01-normal-flow.json"
    done = _paylab("run", str(path), cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "PASS  1. inquire PLN-0001" in done.stdout
    assert "FAIL" not in done.stdout
    assert "PASS normal flow" in done.stdout


def test_cli_exit_code_1_names_the_failed_step(tmp_path: Path) -> None:
    path = tmp_path / "wrong.json"
    path.write_text(json.dumps(WRONG))
    done = _paylab("run", "--json", str(path), cwd=tmp_path)
    assert done.returncode == 1, done.stdout + done.stderr
    result = json.loads(done.stdout)
    assert result["ok"] is False
    (scenario,) = result["scenarios"]
    assert scenario["failed"] == 1 and scenario["skipped"] == 1
    assert scenario["steps"][1]["name"] == "expects the impossible"
    assert scenario["steps"][1]["ok"] is False


def test_cli_exit_code_2_for_a_bad_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"name": "bad", "steps": [{"do": "wait", "until": {}}]}))
    done = _paylab("run", str(path), str(tmp_path / "missing.json"), cwd=tmp_path)
    assert done.returncode == 2
    assert "step 1 (wait)" in done.stderr
    assert "Traceback" not in done.stderr
    done = _paylab("run", str(tmp_path / "missing.json"), cwd=tmp_path)
    assert done.returncode == 2 and "cannot read" in done.stderr


def test_cli_lists_the_shipped_scenarios(tmp_path: Path) -> None:
    done = _paylab("list", "--json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    items = json.loads(done.stdout)
    assert [Path(i["file"]).name for i in items] == [p.name for p in SHIPPED]
    assert all(i["description"] for i in items)
