"""``paylab top``: the live view of a running network (the shell is ``shared/lab/watch.py``)."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Annotated

import typer

from shared.cli.console import err, fail, load_settings, out
from shared.cli.options import AcquirerUrl, BillingUrl, ChaosUrl, GatewayUrl, HsmUrl, ReaderToken

if TYPE_CHECKING:
    from shared.lab.watch import Targets


def top(
    interval: Annotated[
        str, typer.Option(help="Time between frames: 1s, 500ms, 2 (seconds).")
    ] = "1s",
    once: Annotated[
        bool, typer.Option("--once", help="Print one frame (two reads one interval apart), exit.")
    ] = False,
    gateway_url: GatewayUrl = None,
    acquirer_url: AcquirerUrl = None,
    billing_url: BillingUrl = None,
    hsm_url: HsmUrl = None,
    chaos_url: ChaosUrl = None,
    token: ReaderToken = None,
) -> None:
    """Live view of a running network: TPS, answers by code, links, breakers, queue, chaos.

    Reads each service's /metrics and /breakers, the gateway's /links and /saf/stats (and
    the chaos controller's /chaos when there is one). A service that does not answer is
    shown as down; exit code 1 when none answers. Ctrl-C ends it.
    """
    import trio

    from shared.lab.top import View, parse_seconds
    from shared.lab.top_view import render
    from shared.lab.watch import Screen, Targets, chaos_answers, default_targets, watch
    from shared.lab.watch import once as one_view

    try:
        seconds = parse_seconds(interval)
    except ValueError as exc:
        fail(f"--interval: {exc}")
    targets = default_targets(
        load_settings(), gateway_url, acquirer_url, billing_url, hsm_url, chaos_url, token
    )
    for name, url in (*targets.services.items(), ("chaos", targets.chaos)):
        if url is not None and not url.startswith(("http://", "https://")):
            fail(f"--{name}-url must start with http:// or https:// (got {url!r})")
    # A chaos controller is optional: ask for it only if it answers now.
    chaos_checked = trio.run(chaos_answers, targets)
    if not chaos_checked and chaos_url is None:
        targets = Targets(targets.services, None, targets.token)

    def nothing_up(view: View) -> bool:
        return view.all_down

    if once:
        view = trio.run(one_view, targets, seconds)
        if view is None or nothing_up(view):
            fail(_all_down_message(targets))
        out.print(render(view))
        return
    first = trio.run(one_view, targets, min(seconds, 0.2))
    if first is None or nothing_up(first):
        fail(_all_down_message(targets))
    # Ctrl-C is how top is meant to end.
    with Screen(out) as screen, contextlib.suppress(KeyboardInterrupt):
        trio.run(watch, targets, seconds, screen.show)
    err.print("[dim]paylab top stopped[/]")


def _all_down_message(targets: Targets) -> str:
    ports = ", ".join(targets.services.values())
    return f"no service answers ({ports}); is the network running (paylab up)?"
