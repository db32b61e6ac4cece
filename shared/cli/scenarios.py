"""``paylab scenarios``: run scenario files and list the shipped ones.

``paylab scenarios run FILE... [--attach] [--keep-going] [--json]`` prints PASS or FAIL per
step and exits 0 when every scenario passed, 1 when one failed, 2 when a file cannot be
used (nothing runs then). A FILE that does not exist may name a shipped scenario
(``04-billing-outage``). ``paylab scenarios list`` shows the shipped scenarios
(``shared/lab/scenario/shipped/``, package data) with their descriptions. The format:
``docs/scenarios.md``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape

from shared.cli.console import err, fail, load_settings, out

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

    from shared.lab.scenario.format import Scenario
    from shared.lab.scenario.report import Report, StepResult
    from shared.ops.settings import Settings

app = typer.Typer(
    help="Scripted scenarios: drive the network, break it, check it.", no_args_is_help=True
)


def _line(result: StepResult) -> str:
    verdict = "[bold green]PASS[/]" if result.ok else "[bold red]FAIL[/]"
    return (
        f"  {verdict} {result.index:>2}. {escape(result.name)}  "
        f"[dim]{escape(result.detail)} ({result.seconds:.2f} s)[/]"
    )


def _run_one(
    path: Path | Traversable,
    scenario: Scenario,
    settings: Settings,
    attach: bool,
    keep_going: bool,
    show: Callable[[StepResult], None],
) -> Report:
    """One scenario, in a trio run of its own; a network that cannot start is a failed
    report (with the reason), not a traceback."""
    import trio

    from shared.errors import PaylabError
    from shared.lab.scenario.report import Report
    from shared.lab.scenario.runner import run_attached, run_self_started

    if attach:
        call = partial(
            run_attached, scenario, str(path), settings, keep_going=keep_going, on_result=show
        )
    else:
        call = partial(run_self_started, scenario, str(path), keep_going=keep_going, on_result=show)
    problem: BaseException
    try:
        return trio.run(call)
    except* (OSError, RuntimeError, PaylabError) as group:
        problem = group.exceptions[0]
        while isinstance(problem, BaseExceptionGroup):
            problem = problem.exceptions[0]
    report = Report(scenario.name, str(path), total_steps=len(scenario.steps))
    report.error = f"cannot run: {problem}"
    return report


@app.command("run")
def run(
    files: Annotated[
        list[Path],
        typer.Argument(
            help="Scenario JSON files, or names of the shipped ones (paylab scenarios list)."
        ),
    ],
    attach: Annotated[
        bool,
        typer.Option(
            "--attach",
            help="Use the running network (ports from the settings) instead of starting one.",
        ),
    ] = False,
    keep_going: Annotated[
        bool, typer.Option("--keep-going", help="Run the remaining steps after a failure.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the results as JSON.")] = False,
) -> None:
    """Run scenario files: PASS/FAIL per step; exit 0 all passed, 1 a failure, 2 a bad file."""
    from shared.lab.scenario.files import load_file, resolve
    from shared.lab.scenario.format import ScenarioError
    from shared.lab.scenario.report import exit_code
    from shared.ops.log import configure_logging

    scenarios: list[tuple[Path | Traversable, Scenario]] = []
    for name in files:
        path = resolve(name)
        try:
            scenarios.append((path, load_file(path)))
        except ScenarioError as exc:
            fail(str(exc), code=2)
    settings = load_settings()
    # Faults are injected on purpose: the services' own error logs would only be noise here.
    configure_logging("critical" if not attach else settings.log_level, settings.log_format)

    def show(result: StepResult) -> None:
        if not as_json:
            out.print(_line(result), soft_wrap=True)

    reports: list[Report] = []
    for path, scenario in scenarios:
        if not as_json:
            out.print(f"[bold]{escape(scenario.name)}[/] [dim]({escape(str(path))})[/]")
        report = _run_one(path, scenario, settings, attach, keep_going, show)
        reports.append(report)
        if not as_json:
            colour = "green" if report.ok else "red"
            out.print(f"[{colour}]{escape(report.summary())}[/]")
    if as_json:
        out.print_json(
            json.dumps(
                {"ok": all(r.ok for r in reports), "scenarios": [r.as_dict() for r in reports]}
            )
        )
    elif len(reports) > 1:
        passed = sum(r.ok for r in reports)
        err.print(f"{passed} of {len(reports)} scenarios passed")
    raise typer.Exit(exit_code(reports))


@app.command("list")
def list_scenarios(
    as_json: Annotated[bool, typer.Option("--json", help="Print the list as JSON.")] = False,
) -> None:
    """The shipped scenarios and what each one shows."""
    from rich.table import Table

    from shared.lab.scenario.files import load_file, shipped_files
    from shared.lab.scenario.format import ScenarioError

    items: list[dict[str, str]] = []
    for path in shipped_files():
        try:
            s = load_file(path)
        except ScenarioError as exc:
            fail(str(exc), code=2)
            raise  # unreachable
        items.append(
            {
                "file": str(path),
                "name": s.name,
                "description": s.description,
                "steps": str(len(s.steps)),
            }
        )
    if as_json:
        out.print_json(json.dumps(items))
        return
    table = Table()
    for col in ("file", "name", "steps", "description"):
        table.add_column(col, overflow="fold", no_wrap=col in ("file", "name", "steps"))
    for it in items:
        table.add_row(Path(it["file"]).name, it["name"], it["steps"], it["description"])
    out.print(table)
