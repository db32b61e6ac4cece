"""``paylab demo``: an outage and its recovery in under a minute, then the proof (the
story itself is ``shared/lab/demo.py``)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import IO, Annotated

import typer

from shared.cli.console import err, fail, load_settings, out


def _process_age() -> float:
    """Seconds since this process started (Linux; 0 elsewhere), so that the start-up of
    the interpreter counts in ``--duration`` too."""
    try:
        with open("/proc/self/stat", encoding="ascii") as f:
            # Field 22, counted after the command name (which may hold spaces).
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime", encoding="ascii") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


def _unwrap(exc: BaseException) -> BaseException:
    """The error inside the exception groups trio wraps around a task's failure."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


def demo(
    duration: Annotated[
        float, typer.Option(min=20, max=600, help="Most seconds the whole run may take.")
    ] = 60.0,
    tps: Annotated[float, typer.Option(help="Payments started per second.")] = 20.0,
    terminals: Annotated[
        int, typer.Option(help="Terminals the payments come from (each its own connection).")
    ] = 8,
    partition_at: Annotated[
        float, typer.Option(help="Seconds of traffic before billing is partitioned.")
    ] = 10.0,
    heal_at: Annotated[
        float, typer.Option(help="Seconds of traffic at which the partition is healed.")
    ] = 30.0,
    data_dir: Annotated[
        Path | None,
        typer.Option("--data-dir", help="Keep the databases and logs here (default: a temp dir)."),
    ] = None,
) -> None:
    """An outage and its recovery in under a minute: billing cut off, payments approved in
    stand-in and queued, the link healed, the queue drained, then the reconciliation.

    Runs its own network (ephemeral ports, fresh databases) beside any `paylab up`. Exit
    code 0 only when nothing was lost or posted twice and the queue is empty.
    """
    import secrets
    import shutil
    import tempfile

    import trio

    from shared.errors import PaylabError
    from shared.lab.bench import seed_bills
    from shared.lab.demo import Plan, demo_settings, reconcile_run, run_story, summarize
    from shared.lab.watch import Screen
    from shared.ops.log import configure_logging
    from shared.store.db import DatabaseError

    started = time.monotonic() - _process_age()
    try:
        plan = Plan(duration, tps, partition_at, heal_at, terminals)
    except ValueError as exc:
        fail(str(exc))
        raise  # unreachable
    own_dir = data_dir is None
    # A directory of its own: figures of an earlier run would be counted in the summary.
    if (
        data_dir is not None
        and data_dir.exists()
        and (not data_dir.is_dir() or any(data_dir.iterdir()))
    ):
        fail(f"--data-dir {data_dir} must be a new or empty directory")
    directory = Path(tempfile.mkdtemp(prefix="paylab-demo-")) if own_dir else data_dir
    assert directory is not None
    log_file: IO[str] | None = None
    try:
        directory.mkdir(parents=True, exist_ok=True)
        settings = demo_settings(directory, load_settings())
        # The services log to a file, so the screen shows the story only.
        log_file = (directory / "demo-services.log").open("a", encoding="utf-8")
        configure_logging("warning", "json", stream=log_file)
        err.print(f"[dim]seeding {plan.bills_needed()} bills in {directory}...[/]")
        bills = seed_bills(settings, plan.bills_needed(), f"DEMO{secrets.token_hex(2).upper()}")
        with Screen(out) as screen:
            tally, depth = trio.run(run_story, settings, plan, screen, bills, started)
        facts, postings, report = reconcile_run(settings)
    except Exception as exc:
        inner = _unwrap(exc)
        if isinstance(inner, (OSError, PaylabError, DatabaseError, RuntimeError, ValueError)):
            fail(f"demo failed: {inner}")
        raise
    finally:
        if log_file is not None:
            log_file.close()
        if own_dir:
            shutil.rmtree(directory, ignore_errors=True)
    summary = summarize(tally, facts, postings, report, depth)
    out.print()
    out.print(
        "[bold]reconciliation[/] (clients' answers, the gateway's journal and queue, "
        "billing's postings)"
    )
    for line in summary.lines():
        out.print(f"  {line}", markup=False)
    out.print(f"  took {time.monotonic() - started:.0f} s", markup=False)
    if not own_dir:
        out.print(f"  databases and service log kept in {directory}", markup=False)
    if not summary.ok:
        for m in report.mismatches[:10]:
            err.print(f"  {m.kind} {m.detail}", markup=False, style="red")
        hint = " (--data-dir DIR keeps the services' log)" if own_dir else ""
        fail(f"the run did not end clean: see the figures above{hint}")
