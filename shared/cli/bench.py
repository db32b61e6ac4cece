"""``paylab bench``: the benchmark (``shared/lab/bench.py``, ``docs/performance.md``)."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from shared.cli.console import err, fail, out


def bench(
    duration: Annotated[float, typer.Option(min=0.5, help="Measured seconds per phase.")] = 10.0,
    warmup: Annotated[float, typer.Option(min=0, help="Warm-up seconds per phase.")] = 2.0,
    concurrency: Annotated[int, typer.Option(min=1, help="Requests in flight at once.")] = 64,
    connections: Annotated[int, typer.Option(min=1, help="TCP connections per phase.")] = 8,
    rate: Annotated[
        float, typer.Option(min=0, help="Offered requests per second (0: as fast as answered).")
    ] = 0.0,
    bills: Annotated[
        int, typer.Option(min=0, help="Bills seeded per payment phase (0: enough for ~4,000/s).")
    ] = 0,
    phase: Annotated[
        list[str] | None,
        typer.Option(
            help="Run only this phase (repeatable): echo, billing-inquiry, "
            "billing-payment, chain-payment."
        ),
    ] = None,
    rates: Annotated[
        str | None,
        typer.Option(
            help="After the phases, run chain-payment once per offered rate, e.g. "
            "100,300,600, and print latency and CPU per payment against the rate."
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Benchmark (not a test): TPS, latency and CPU per request of the chain, of billing,
    of a raw echo server.

    Starts hsm, billing and gateway each in its own process on free ports (a temporary
    data directory), seeds bills, drives closed-loop load, reads each service's CPU time
    from /proc, stops everything. See shared/lab/bench.py and docs/performance.md.
    """
    from rich.markup import escape

    from shared.lab.bench import BenchOptions, parse_rates, render, run_bench

    opts = BenchOptions(duration, warmup, concurrency, connections, rate, bills)
    if rates is not None:
        try:
            opts.rates = parse_rates(rates)
        except ValueError as exc:
            fail(f"--rates: {exc}")
    if phase:
        unknown = set(phase) - set(opts.phases)
        if unknown:
            fail(
                f"unknown phase(s) {', '.join(sorted(unknown))}; choose from "
                + ", ".join(opts.phases)
            )
        opts.phases = tuple(p for p in opts.phases if p in phase)
    try:
        report = run_bench(opts, lambda m: err.print(f"[dim]{escape(m)}[/]"))
    except (OSError, RuntimeError, TimeoutError) as exc:
        fail(f"benchmark failed: {exc}")
    if as_json:
        out.print_json(json.dumps(report))
    else:
        for item in render(report):
            out.print(item)
