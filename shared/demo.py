"""``paylab demo``: an outage and its recovery in under a minute, then the proof.

What it does, in one process (trio):

1. seeds generated open bills (:func:`shared.bench.seed_bills`) in a fresh data directory
   (a temporary one unless ``--data-dir`` is given, which is then kept);
2. starts the four services with the chaos proxies (``Network(settings, chaos=True)``) on
   ephemeral ports, so it runs beside a ``paylab up``, with settings that make the story
   visible in seconds (:func:`demo_settings`);
3. sends ``tps`` payments a second from ``terminals`` terminals (each its own connection
   to the acquirer's terminal listener, PIN block and MAC made as a terminal makes them),
   one distinct bill each, while ``paylab top``'s view is drawn every second with a caption
   saying what happens. Several terminals, because the queue delivers each terminal's
   entries one at a time: they drain side by side;
4. partitions the billing link at ``partition_at`` seconds of traffic (the gateway
   approves in stand-in and queues advices) and heals it at ``heal_at`` (the queue
   drains);
5. once the queue is empty, stops the traffic, waits for it to drain again, stops the
   network and reconciles the gateway's journal and queue with billing's postings
   (``gateway/reconcile.py``): :class:`Summary`.

Exit code 0 only when nothing was lost, nothing was posted twice, the reconciliation found
no mismatch and the queue is empty. The whole run stays within ``duration`` seconds: the
traffic stops early enough to leave time for the drain and the reconciliation.

:func:`summarize` and :func:`caption_for` are pure; the rest is the shell.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import secrets
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Annotated, Any

import trio
import typer

from gateway.reconcile import (
    APPROVED_ONLINE,
    APPROVED_STANDIN,
    DUPLICATED,
    LOST_KINDS,
    ORPHAN_KINDS,
    GatewayFact,
    PostingFact,
    Report,
)
from shared import codec
from shared.errors import DecodeError
from shared.framing import FrameParser
from shared.settings import SERVICES, Settings
from shared.top import View
from shared.top_cli import Screen, Targets, watch

#: Link the demo cuts.
LINK = "billing"
#: Seconds kept at the end of the run for the last drain, the stop and the reconciliation.
RESERVE = 6.0
#: Payments in flight at most (more would only queue up in this process).
MAX_IN_FLIGHT = 200

CAPTIONS = {
    "warmup": "starting: payments approved online by billing",
    "steady": "steady traffic: billing approves every payment online",
    "partitioned": "billing partitioned: payments approved in stand-in and queued",
    "healed": "healed: queue draining",
    "drained": "queue drained: billing has every payment; traffic stopped, reconciling next",
    "late": "traffic stopped early so that the queue drains in time",
}

#: Mismatch kinds of the reconciliation that mean money moved that should not have: posted
#: twice, or posted without the customer's approval (see gateway.reconcile).
DUPLICATED_KINDS = ORPHAN_KINDS | {DUPLICATED}


# -- pure parts ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Plan:
    """When things happen, in seconds from the first payment; validated on construction."""

    duration: float = 60.0
    tps: float = 20.0
    partition_at: float = 10.0
    heal_at: float = 30.0
    terminals: int = 8

    def __post_init__(self) -> None:
        if not 0 < self.tps <= 500:
            raise ValueError("--tps must be more than 0 and at most 500")
        if not 1 <= self.terminals <= 64:
            raise ValueError("--terminals must be between 1 and 64")
        if not 0 < self.partition_at < self.heal_at:
            raise ValueError("--partition-at must be more than 0 and before --heal-at")
        if self.heal_at + RESERVE + 4 > self.duration:
            raise ValueError(
                f"--heal-at ({self.heal_at:g} s) leaves no time to drain within --duration "
                f"({self.duration:g} s): keep it at least {RESERVE + 4:g} s before the end"
            )

    def bills_needed(self) -> int:
        """Enough distinct bills for the whole run at the asked rate, with a margin."""
        return int(self.tps * self.duration * 1.2) + 50


def must_stop_traffic(depth: int, drain_rate: float | None, seconds_left: float) -> bool:
    """Whether to stop the traffic now so that the queue can drain before the end.

    ``seconds_left``: time until the traffic must stop at the latest. The queue is expected
    to take ``depth / drain_rate`` seconds (no estimate before anything drained); stopping
    the traffic frees the chain for the queue, so it is stopped once that estimate no longer
    fits in the time left.
    """
    if depth == 0:
        return True
    if seconds_left <= 0:
        return True
    if not drain_rate:
        return False
    return depth / drain_rate > seconds_left


def caption_for(phase: str, depth: int | None = None) -> str:
    """The caption of a phase (see :data:`CAPTIONS`), with the queue depth when known."""
    text = CAPTIONS[phase]
    if phase in ("partitioned", "healed") and depth is not None:
        text += f" ({depth} waiting)"
    return text


@dataclass
class Tally:
    """What the demo's client saw: answers by response code, and failures to get one."""

    sent: int = 0
    in_flight: int = 0
    skipped: int = 0
    codes: Counter[str] = field(default_factory=Counter)
    no_answer: int = 0

    @property
    def accepted(self) -> int:
        """Payments the client was told are approved."""
        return self.codes.get("00", 0)


@dataclass(frozen=True)
class Summary:
    """The reconciliation in figures (see :func:`summarize`)."""

    accepted: int
    approved_online: int
    approved_standin: int
    posted: int
    lost: int
    duplicated: int
    other_mismatches: int
    pending: int
    queue_depth: int | None
    client_codes: dict[str, int]
    no_answer: int

    @property
    def ok(self) -> bool:
        """Nothing lost, nothing duplicated, nothing else amiss, the queue empty."""
        return (
            self.lost == 0
            and self.duplicated == 0
            and self.other_mismatches == 0
            and self.pending == 0
            and self.queue_depth == 0
        )

    def lines(self) -> list[str]:
        """The summary as lines of text."""
        declined = {c: n for c, n in sorted(self.client_codes.items()) if c != "00"}
        rows: list[tuple[str, object]] = [
            ("payments accepted", self.accepted),
            ("  approved online", self.approved_online),
            ("  approved in stand-in", self.approved_standin),
            ("posted by billing", self.posted),
            ("lost", self.lost),
            ("duplicated", self.duplicated),
        ]
        if declined or self.no_answer:
            detail = ", ".join(f"{c}: {n}" for c, n in declined.items())
            if self.no_answer:
                detail += (", " if detail else "") + f"no answer: {self.no_answer}"
            rows.append(("not accepted (by code)", detail))
        if self.other_mismatches:
            rows.append(("other mismatches", self.other_mismatches))
        if self.pending:
            rows.append(("still pending", self.pending))
        rows.append(
            ("queue depth at the end", "unknown" if self.queue_depth is None else self.queue_depth)
        )
        out = [f"{label + ':':<25}{value}" for label, value in rows]
        return out


def summarize(
    tally: Tally,
    facts: Iterable[GatewayFact],
    postings: Iterable[PostingFact],
    report: Report,
    queue_depth: int | None,
) -> Summary:
    """The figures of the run, from the client's tally, both databases' facts and their
    reconciliation ``report``.

    * approved online / in stand-in: distinct transactions the gateway approved each way;
    * posted: billing's postings in force (``posted``);
    * lost: transactions with a reconciliation mismatch of the :data:`LOST_KINDS` (an
      approval without its posting, a stand-in advice dead, cancelled or declined by
      billing); those still being delivered are pending, not lost;
    * duplicated: postings beyond the first on one bill (every demo payment has its own
      bill), plus mismatches of the :data:`DUPLICATED_KINDS`; once per transaction;
    * other mismatches: the rest (an amount mismatch, say).
    """
    facts = list(facts)
    postings = list(postings)
    online = {f.key for f in facts if f.outcome == APPROVED_ONLINE}
    standin = {f.key for f in facts if f.outcome == APPROVED_STANDIN}
    in_force = [p for p in postings if p.status == "posted"]
    lost = {m.key for m in report.mismatches if m.kind in LOST_KINDS}
    duplicated = {m.key for m in report.mismatches if m.kind in DUPLICATED_KINDS}
    by_bill: dict[str, list[str]] = {}
    for p in in_force:
        by_bill.setdefault(p.bill_number, []).append(p.key)
    for keys in by_bill.values():
        duplicated |= set(sorted(keys)[1:])
    other = {
        m.key
        for m in report.mismatches
        if m.kind not in LOST_KINDS and m.kind not in DUPLICATED_KINDS
    }
    return Summary(
        accepted=tally.accepted,
        approved_online=len(online - standin),
        approved_standin=len(standin),
        posted=len(in_force),
        lost=len(lost),
        duplicated=len(duplicated),
        other_mismatches=len(other - lost - duplicated),
        pending=report.pending,
        queue_depth=queue_depth,
        client_codes=dict(tally.codes),
        no_answer=tally.no_answer,
    )


def demo_settings(data_dir: Path, base: Settings) -> Settings:
    """``base`` on ephemeral ports and SQLite in ``data_dir``, tuned so an outage shows in
    seconds: 1 s heartbeats, a 2 s billing deadline, a breaker that opens after 3 failures and
    probes every 2 s, the queue retried every 0.5 s, quick reconnects."""
    values: dict[str, Any] = {
        "data_dir": data_dir,
        "acquirer_db_url": None,
        "gateway_db_url": None,
        "billing_db_url": None,
        "chaos_http_port": 0,
        "heartbeat_interval": 1.0,
        "heartbeat_timeout": 1.0,
        "billing_timeout": 2.0,
        "hsm_timeout": 2.0,
        "connect_timeout": 1.0,
        "online_deadline": 4.0,
        "gateway_timeout": 8.0,
        "retry_base_delay": 0.2,
        "retry_max_delay": 0.5,
        "retry_deadline": 4.0,
        "reconnect_base_delay": 0.2,
        "reconnect_max_delay": 1.0,
        "breaker_consecutive_failures": 3,
        "breaker_open_wait": 2.0,
        "saf_retry_interval": 0.5,
        "shutdown_grace": 2.0,
        "tls_enabled": False,
    }
    for svc in SERVICES:
        values[f"{svc}_http_port"] = 0
        values[f"{svc}_iso_port"] = 0
        values[f"{svc}_address"] = None
        values[f"{svc}_backup_address"] = None
    return Settings.model_validate({**base.model_dump(), **values})


# -- the shell ----------------------------------------------------------------------------------
class Story:
    """The live part of the run: what phase it is in, and the last view seen."""

    def __init__(self, screen: Screen) -> None:
        self.screen = screen
        self.phase = "warmup"
        self.view: View | None = None
        self.changed = trio.Event()

    def caption(self) -> str:
        depth = None if self.view is None or self.view.saf is None else self.view.saf.depth
        return caption_for(self.phase, depth)

    def on_view(self, view: View) -> None:
        self.view = view
        self.screen.show(view, self.caption())
        self.changed.set()
        self.changed = trio.Event()

    def depth(self) -> int | None:
        if self.view is None or self.view.saf is None:
            return None
        return self.view.saf.depth

    async def wait_until(self, predicate: Any, deadline: float) -> bool:
        """Wait for ``predicate(view)`` to hold on a fresh view, at most until ``deadline``
        (trio clock); True when it did."""
        with trio.move_on_at(deadline):
            while True:
                await self.changed.wait()
                if self.view is not None and predicate(self.view):
                    return True
        return False


class TerminalLink:
    """One terminal's TCP connection to the acquirer's terminal listener: requests go out
    as whole frames, answers are matched to them by terminal id and STAN (fields 41, 11)."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.pending: dict[tuple[str, str], tuple[trio.Event, list[str]]] = {}
        self._send_lock = trio.Lock()

    async def receive_answers(self) -> None:
        """Match answers to requests until the connection closes."""
        parser = FrameParser(max_frame=65535)
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            while data := await self.stream.receive_some(65536):
                for frame in parser.frames(data):
                    try:
                        msg = codec.decode(frame)
                    except DecodeError:
                        continue
                    waiter = self.pending.pop((msg.get("41", ""), msg.get("11", "")), None)
                    if waiter is not None:
                        waiter[1].append(msg.get("39", ""))
                        waiter[0].set()

    async def request(self, key: tuple[str, str], frame: bytes, timeout: float) -> str | None:
        """Send ``frame`` and wait for its answer's field 39; None when none came in time."""
        done, answer = trio.Event(), list[str]()
        self.pending[key] = (done, answer)
        try:
            async with self._send_lock:
                await self.stream.send_all(frame)
            with trio.move_on_after(timeout):
                await done.wait()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            self.pending.pop(key, None)
        return answer[0] if answer and answer[0] else None


async def _pay(
    link: TerminalLink, key: tuple[str, str], frame: bytes, tally: Tally, timeout: float
) -> None:
    tally.in_flight += 1
    try:
        code = await link.request(key, frame, timeout)
    finally:
        tally.in_flight -= 1
    if code is None:
        tally.no_answer += 1
    else:
        tally.codes[code] += 1


async def drive_traffic(
    address: tuple[str, int],
    bills: Iterator[tuple[str, int]],
    plan: Plan,
    tally: Tally,
    timeout: float,
    stop: trio.Event,
) -> None:
    """Start ``plan.tps`` payments a second (open loop), spread over ``plan.terminals``
    terminals with a connection each, until ``stop`` is set or the bills run out; then
    wait for the payments already started (each bounded by ``timeout``)."""
    from shared.bench import payments

    make = payments("DM", plan.terminals, bills)
    async with trio.open_nursery() as nursery:
        links = []
        for _ in range(plan.terminals):
            link = TerminalLink(await trio.open_tcp_stream(*address))
            nursery.start_soon(link.receive_answers)
            links.append(link)
        async with trio.open_nursery() as started:
            step = 1.0 / plan.tps
            next_at = trio.current_time()
            for n in itertools.count():
                if stop.is_set():
                    break
                worker = n % plan.terminals
                if tally.in_flight >= MAX_IN_FLIGHT:
                    tally.skipped += 1
                else:
                    made = make(worker)
                    if made is None:
                        break
                    tally.sent += 1
                    started.start_soon(_pay, links[worker], made[0], made[1], tally, timeout)
                next_at += step
                with trio.move_on_at(next_at):
                    await stop.wait()
        for link in links:
            await link.stream.aclose()


async def run_story(
    settings: Settings, plan: Plan, screen: Screen, bills: list[tuple[str, int]], started: float
) -> tuple[Tally, int | None]:
    """Run the network and the story; return the client's tally and the final queue depth."""
    from shared.network import Network

    network = Network(settings, chaos=True)
    tally = Tally()
    deadline = trio.current_time() + plan.duration - (time.monotonic() - started)
    final_depth: int | None = None
    async with trio.open_nursery() as nursery:
        await nursery.start(network.run)
        chaos = network.chaos
        if chaos is None:  # pragma: no cover - Network(chaos=True) always has one
            raise RuntimeError("the network has no chaos controller")
        host = settings.host
        targets = Targets(
            {name: f"http://{host}:{network.ports[name].http}" for name in network.ports},
            f"http://{host}:{network.chaos_port}",
            settings.admin_token_read,
        )
        story = Story(screen)
        watcher = trio.CancelScope()

        async def watch_all() -> None:
            with watcher:
                await watch(targets, 1.0, story.on_view)

        nursery.start_soon(watch_all)
        terminals = (host, network.ports["acquirer"].iso)
        traffic_done = trio.Event()
        stop_traffic = trio.Event()

        async def traffic() -> None:
            try:
                await drive_traffic(
                    terminals,
                    iter(bills),
                    plan,
                    tally,
                    settings.gateway_timeout + 2,
                    stop_traffic,
                )
            finally:
                traffic_done.set()

        t0 = trio.current_time()
        nursery.start_soon(traffic)
        story.phase = "steady"
        await trio.sleep_until(min(t0 + plan.partition_at, deadline))
        chaos.partition(LINK, actor="demo")
        story.phase = "partitioned"
        await trio.sleep_until(min(t0 + plan.heal_at, deadline))
        chaos.heal(LINK, actor="demo")
        story.phase = "healed"
        stop_traffic_at = deadline - RESERVE

        def time_to_stop(view: View) -> bool:
            if _drained(view):
                return True
            if view.saf is None:
                return False
            left = stop_traffic_at - trio.current_time()
            return must_stop_traffic(view.saf.depth, view.saf.drain_rate, left)

        # A fresh view after the heal, then an empty queue with the breaker closed again (or
        # a queue that would not drain in time with the traffic still running).
        await story.wait_until(time_to_stop, stop_traffic_at)
        story.phase = "drained" if story.view is not None and _drained(story.view) else "late"
        stop_traffic.set()
        with trio.move_on_at(deadline - 2.0):
            await traffic_done.wait()
        await story.wait_until(_drained, deadline - 2.0)
        final_depth = story.depth()
        watcher.cancel()
        await network.stop()
    return tally, final_depth


def _drained(view: View) -> bool:
    breakers = [link.breaker for link in view.links if link.owner == "gateway"]
    return (
        view.saf is not None
        and view.saf.depth == 0
        and view.services.get("gateway", False)
        and all(b == "closed" for b in breakers)
    )


def reconcile_run(settings: Settings) -> tuple[list[GatewayFact], list[PostingFact], Report]:
    """Read the three databases and reconcile them (the network is stopped)."""
    from gateway.reconcile import (
        load_client_facts,
        load_gateway_facts,
        load_postings,
        reconcile,
    )
    from shared.db import make_engine, session_factory

    engines = {name: make_engine(settings.db_url(name)) for name in ("acquirer", "gateway")}
    engines["billing"] = make_engine(settings.db_url("billing"))
    try:
        facts = load_gateway_facts(session_factory(engines["gateway"]))
        postings = load_postings(engines["billing"])
        clients = load_client_facts(engines["acquirer"])
    finally:
        for engine in engines.values():
            engine.dispose()
    return facts, postings, reconcile(facts, postings, clients)


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
    from shared.bench import seed_bills
    from shared.cli import _settings, err, fail, out
    from shared.db import DatabaseError
    from shared.errors import PaylabError
    from shared.log import configure_logging

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
        settings = demo_settings(directory, _settings())
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
