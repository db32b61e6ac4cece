"""The ``paylab`` command line (typer + rich): the root command and its registrations.

One module per command or command group (``shared/cli/<name>.py``); each of them prints
and fails through ``shared/cli/console.py`` and shares options through
``shared/cli/options.py``. Command modules never import each other. Every command imports
what it needs when it runs, so ``paylab --help`` loads typer, rich and these modules only.

Every command turns expected failures (nothing listening, a port in use, a bad value)
into one clear line and a non-zero exit code, never a traceback.
"""

from __future__ import annotations

import sys

import typer

from shared.cli import (
    bench,
    bills,
    breaker,
    certs,
    chaos,
    config,
    db,
    decode,
    demo,
    lab,
    lab_reset,
    links,
    payments,
    reconcile,
    saf,
    scenarios,
    send,
    top,
    trace,
    txn,
    up,
    version,
)

app = typer.Typer(
    name="paylab",
    help="paylab: an ISO-8583 bill-payment network simulator.",
    no_args_is_help=True,
    add_completion=False,
)

app.callback()(version.root)  # paylab --version

# Commands, in the order of the help.
app.command("up")(up.up)
for _name in up.SERVICES:
    app.command(name=_name)(up.service_command(_name))
app.command("pay")(payments.pay)
app.command("inquire")(payments.inquire)
app.command("reverse")(payments.reverse)
app.command("txn")(txn.txn)
app.command("links")(links.links)
app.command("reconcile")(reconcile.reconcile)
app.command("bench")(bench.bench)
app.command("certs")(certs.certs)
app.command("config")(config.config)
app.command("top")(top.top)
app.command("demo")(demo.demo)
app.command("trace")(trace.trace)
app.command("decode")(decode.decode)
app.command("send")(send.send)

# Command groups.
app.add_typer(db.app, name="db")
app.add_typer(breaker.app, name="breaker")
app.add_typer(saf.app, name="saf")
app.add_typer(bills.app, name="bills")
app.add_typer(scenarios.app, name="scenarios")
app.add_typer(chaos.app, name="chaos")
app.add_typer(lab.app, name="lab")
lab.app.command("reset")(lab_reset.reset)


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
