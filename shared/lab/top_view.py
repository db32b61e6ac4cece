"""Drawing a :class:`shared.lab.top.View` with rich (pure: a view in, a renderable out).

:func:`render` gives the full frame (about 20 lines at most, so it fits an 80x24
terminal); :func:`summary_line` gives one plain line per frame for output that is not a
terminal (CI logs). Neither does I/O.
"""

from __future__ import annotations

from rich.console import Group, RenderableType
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from shared.lab.top import ChaosRow, LinkRow, View

#: Most response codes listed (the most frequent in total first).
MAX_CODES = 6

_BREAKER_STYLE = {
    "closed": "green",
    "half_open": "yellow",
    "open": "bold red",
    "forced_open": "bold red",
    "disabled": "magenta",
}


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _count(value: int | None) -> str:
    return "-" if value is None else str(value)


def _services_line(view: View) -> Text:
    line = Text("paylab top", style="bold")
    line.append(f"  every {view.interval:.1f} s  " if view.interval > 0 else "  ")
    for name, up in view.services.items():
        line.append(" ")
        line.append("● " if up else "✖ ", style="green" if up else "bold red")
        line.append(name if up else f"{name} down", style="" if up else "bold red")
    return line


def _traffic_lines(view: View) -> list[Text]:
    tps = Text("TPS ", style="bold")
    tps.append(f"acquirer {_rate(view.tps.get('acquirer'))}  ")
    tps.append(f"gateway {_rate(view.tps.get('gateway'))}")
    answers = Text("last interval (total): ", style="bold")
    answers.append("approved ", style="green")
    answers.append(f"{view.approvals(interval=True)} ({view.approvals(interval=False)})  ")
    answers.append("declined ", style="red")
    answers.append(f"{view.declines(interval=True)} ({view.declines(interval=False)})  ")
    answers.append("stand-in ", style="yellow")
    answers.append(f"{_count(view.standin_interval)} ({_count(view.standin_total)})")
    return [tps, answers]


def _ms(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    ms = seconds * 1000
    return f"{ms:.1f} ms" if ms < 10 else f"{ms:.0f} ms"


def _latency_line(view: View) -> Text:
    """p50/p95 per measured hop, over the interval (or the whole run, marked so)."""
    line = Text("latency ", style="bold")
    if not view.latency:
        line.append("- (acquirer and gateway not answering)", style="red")
        return line
    parts = []
    for row in view.latency:
        if row.count == 0:
            parts.append(f"{row.label} - (no requests yet)")
        else:
            since = "" if row.interval else " since start"
            parts.append(f"{row.label} p50 {_ms(row.p50)} p95 {_ms(row.p95)}{since}")
    line.append("  ".join(parts))
    return line


def _codes_table(view: View) -> Table:
    source = view.codes_source
    title = f"0200 answers at the {source}" if source else "0200 answers (no source answering)"
    table = Table(
        title=title,
        title_justify="left",
        title_style="bold",
        box=None,
        padding=(0, 1),
        show_edge=False,
    )
    table.add_column("code", no_wrap=True)
    table.add_column("meaning", no_wrap=True, max_width=40, overflow="ellipsis")
    table.add_column("last", justify="right", no_wrap=True)
    table.add_column("total", justify="right", no_wrap=True)
    rows = sorted(view.codes, key=lambda r: (-r.total, r.code))[:MAX_CODES]
    for row in rows:
        style = "green" if row.approved else "red"
        table.add_row(
            f"[{style}]{row.code}[/]", escape(row.meaning), str(row.interval), str(row.total)
        )
    if not rows:
        table.add_row("-", "no payments yet", "0", "0")
    return table


def _chaos_for(link: LinkRow, chaos: dict[str, ChaosRow]) -> str:
    row = chaos.get(link.upstream)
    if row is None:
        return ""
    if row.partitioned:
        return "[bold red]PARTITIONED[/]" + (f" {escape(row.faults)}" if row.faults else "")
    return f"[yellow]{escape(row.faults)}[/]" if row.faults else ""


def _links_table(view: View) -> Table:
    chaos = {c.link: c for c in view.chaos or []}
    table = Table(title="links", title_justify="left", title_style="bold", box=None, padding=(0, 1))
    table.add_column("link", no_wrap=True)
    table.add_column("conns", justify="right", no_wrap=True)
    table.add_column("breaker", no_wrap=True)
    table.add_column("in flight", justify="right", no_wrap=True)
    if view.chaos is not None:
        table.add_column("chaos", no_wrap=True, max_width=30, overflow="ellipsis")
    for link in view.links:
        conns = _count(link.healthy) + ("" if link.target is None else f"/{link.target}")
        state = link.breaker or "?"
        breaker = f"[{_BREAKER_STYLE.get(state, 'white')}]{state}[/]"
        if link.open_remaining:
            breaker += f" {link.open_remaining:.0f}s"
        cells = [f"{link.owner} → {link.upstream}", conns, breaker, _count(link.in_flight)]
        if view.chaos is not None:
            cells.append(_chaos_for(link, chaos))
        table.add_row(*cells)
    if not view.links:
        table.add_row("-", "-", "-", "-", *([""] if view.chaos is not None else []))
    return table


def _saf_line(view: View) -> Text:
    line = Text("queue ", style="bold")
    saf = view.saf
    if saf is None:
        line.append("unknown (gateway not answering)", style="red")
        return line
    line.append(f"{saf.depth} waiting", style="bold yellow" if saf.depth else "green")
    line.append(f" ({saf.in_flight} in flight)  ")
    line.append(f"dead {saf.dead}", style="bold red" if saf.dead else "")
    line.append(f"  drain {_rate(saf.drain_rate)}/s  delivered {saf.done}")
    if saf.depth and saf.oldest_age:
        line.append(f"  oldest {saf.oldest_age:.0f}s")
    return line


def _other_chaos(view: View) -> Text | None:
    if not view.chaos:
        return None
    shown = {link.upstream for link in view.links}
    extra = [c for c in view.chaos if c.link not in shown and (c.partitioned or c.faults)]
    if not extra:
        return None
    line = Text("chaos ", style="bold")
    line.append(
        "; ".join(f"{c.link}: {'partitioned' if c.partitioned else c.faults}" for c in extra),
        style="yellow",
    )
    return line


def render(view: View, caption: str | None = None) -> RenderableType:
    """The full frame: services, traffic, codes, links, queue, chaos, errors, caption."""
    parts: list[RenderableType] = [_services_line(view)]
    if caption:
        parts.append(Text(caption, style="bold cyan"))
    parts += [
        *_traffic_lines(view),
        _latency_line(view),
        _codes_table(view),
        _links_table(view),
        _saf_line(view),
    ]
    other = _other_chaos(view)
    if other is not None:
        parts.append(other)
    parts += error_lines(view)
    return Group(*parts)


def error_lines(view: View, limit: int = 3) -> list[Text]:
    """One line naming every service that does not answer (all of them, the HSM too),
    then up to ``limit`` other errors (an admin endpoint, the chaos controller)."""
    lines = []
    down = [name for name, up in view.services.items() if not up]
    if down:
        lines.append(Text(f"! not answering: {', '.join(down)}", style="bold red"))
    others = [(s, m) for s, m in sorted(view.errors.items()) if s not in down]
    for source, message in others[:limit]:
        lines.append(Text(f"! {source}: {message}", style="red", overflow="ellipsis", no_wrap=True))
    return lines


def summary_line(view: View, caption: str | None = None, elapsed: float | None = None) -> str:
    """One plain line for logs: TPS, approvals, stand-in, breakers, queue, what is down."""
    parts = []
    if elapsed is not None:
        parts.append(f"{elapsed:5.1f}s")
    parts.append(f"tps {_rate(view.tps.get('acquirer'))}")
    parts.append(
        f"approved {view.approvals(interval=True)}/{view.approvals(interval=False)}"
        f" declined {view.declines(interval=True)}/{view.declines(interval=False)}"
        f" stand-in {_count(view.standin_interval)}/{_count(view.standin_total)}"
    )
    measured = [row for row in view.latency if row.count]
    if measured:
        row = measured[0]
        parts.append(f"p50 {_ms(row.p50)} p95 {_ms(row.p95)}".replace(" ms", "ms"))
    breakers = [
        f"{link.owner}/{link.upstream}:{link.breaker}" for link in view.links if link.breaker
    ]
    if breakers:
        parts.append("breakers " + ",".join(breakers))
    if view.saf is not None:
        parts.append(f"queue {view.saf.depth} drain {_rate(view.saf.drain_rate)}/s")
    parted = [c.link for c in view.chaos or [] if c.partitioned]
    if parted:
        parts.append("partitioned " + ",".join(parted))
    down = [name for name, up in view.services.items() if not up]
    if down:
        parts.append("down " + ",".join(down))
    if caption:
        parts.append(f"| {caption}")
    return "  ".join(parts)
