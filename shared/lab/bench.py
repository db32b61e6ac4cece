"""``paylab bench``: closed-loop load on a network of one process per service (not a test).

What it measures, in one run and with one client (this process, on trio):

* ``echo``: a raw framed echo server (:func:`serve_echo`, its own process) fed the same
  MACed 0200 frames as the chain: the ceiling of Python networking on this machine;
* ``billing-inquiry`` and ``billing-payment``: billing alone (with the HSM it asks to verify
  PINs), sent what the gateway forwards: no MAC, PIN block under the ZPK. Every payment
  posts a distinct, open bill, committed before the answer;
* ``chain-payment``: the full chain through the gateway: MAC check, PIN translation and
  billing's PIN verification at the HSM, the journal, billing's durable posting, the
  response MAC.

Each phase runs ``concurrency`` workers, each a terminal of its own (8-character id, its own
STAN counter), over ``connections`` TCP connections; a worker sends one request, waits for
its answer (matched by terminal id and STAN, fields 41 and 11) and sends the next: closed
loop. With ``rate`` > 0 the workers together start at most ``rate`` requests a second (the
"offered load" figure); latency is measured from the moment a request is handed to its
connection. A phase warms up for ``warmup`` seconds, then only requests started and
answered within the next ``duration`` seconds count. An error is an answer whose field 39
is not ``00`` (the echo phase: any answer counts) or no answer within ``timeout``.

Bills: :func:`seed_bills` writes ``count`` open bills (``amount`` each, owned by the first
demo customer, who holds :data:`BENCH_CARD`) into billing's database before billing
starts, after the schema and the demo data, exactly as billing itself would create them.
A payment phase that runs out of bills ends early and says so (``exhausted``).

The services run with ``PAYLAB_RATE_LIMIT_TERMINAL=0`` and
``PAYLAB_MAX_CONNECTIONS_PER_SOURCE=0`` (one client, thousands of terminals) and their
logs go to ``bench-services.log`` in the run's temporary directory; nothing else of the
configuration is changed, so every money rule stays in force.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import platform
import select
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import trio

from acquirer.builder import RequestBuilder, Terminal
from billing.demo_data import DEMO_CARD, GENERATED_BILL_AMOUNT, generated_bill_number
from shared import crypto
from shared.iso import codec
from shared.iso.framing import FrameParser, encode_frame
from shared.iso.messages import Message
from shared.ops.settings import Settings

#: The card every benchmark payment uses (the first demo card: PAN, PIN, holder).
BENCH_CARD = (DEMO_CARD.pan, DEMO_CARD.pin, DEMO_CARD.name)
#: Amount of every seeded bill, in minor units.
BENCH_AMOUNT = GENERATED_BILL_AMOUNT

Factory = Callable[[int], "tuple[tuple[str, str], bytes] | None"]


# -- figures ------------------------------------------------------------------------------------
def python_speed(seconds: float = 0.2) -> float:
    """Million steps per second of a fixed pure-Python loop, one core, best of a few tries.

    A yardstick for the core the figures were measured on: the services are CPU-bound
    Python, so their throughput moves with it. Compare it between runs and machines before
    comparing their figures.
    """
    best = 0.0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        total = 0
        for i in range(100_000):
            total += i
        best = max(best, 0.1 / (time.perf_counter() - start))
    return round(best, 1)


def percentile(sorted_samples: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) of ascending ``sorted_samples``, nearest-rank method.

    The result is always one of the samples: the smallest value with at least ``q`` % of the
    samples at or below it (``q`` = 0 gives the minimum, 100 the maximum). Raises
    ``ValueError`` for no samples or ``q`` outside 0..100.
    """
    if not sorted_samples:
        raise ValueError("no samples")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} is outside 0..100")
    rank = max(1, math.ceil(q / 100 * len(sorted_samples)))
    return sorted_samples[rank - 1]


def latency_summary(samples: Sequence[float]) -> dict[str, float | None]:
    """p50, p95, p99, mean and max of ``samples`` (seconds, any order), in milliseconds.

    Every value is ``None`` when there are no samples.
    """
    if not samples:
        return {k: None for k in ("p50_ms", "p95_ms", "p99_ms", "mean_ms", "max_ms")}
    ordered = sorted(samples)
    return {
        "p50_ms": percentile(ordered, 50) * 1000,
        "p95_ms": percentile(ordered, 95) * 1000,
        "p99_ms": percentile(ordered, 99) * 1000,
        "mean_ms": sum(ordered) / len(ordered) * 1000,
        "max_ms": ordered[-1] * 1000,
    }


@dataclass
class PhaseResult:
    """The figures of one phase (see the module docstring for what counts)."""

    name: str
    description: str
    completed: int = 0
    errors: int = 0
    seconds: float = 0.0
    exhausted: bool = False
    client_cpu_seconds: float = 0.0
    error_codes: dict[str, int] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list, repr=False)

    @property
    def tps(self) -> float:
        """Successful answers per second of the measured window."""
        return self.completed / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready figures (latencies summarised)."""
        d = asdict(self)
        del d["latencies"]
        d["tps"] = round(self.tps, 1)
        d["seconds"] = round(self.seconds, 3)
        d["client_cpu_seconds"] = round(self.client_cpu_seconds, 3)
        done = self.completed + self.errors
        d["client_cpu_ms_per_request"] = (
            round(self.client_cpu_seconds / done * 1000, 3) if done else None
        )
        d.update(
            {k: v if v is None else round(v, 3) for k, v in latency_summary(self.latencies).items()}
        )
        return d


# -- the echo server ----------------------------------------------------------------------------
async def _echo_connection(stream: trio.SocketStream) -> None:
    parser = FrameParser(max_frame=65535)
    try:
        async with stream:
            while data := await stream.receive_some(65536):
                frames = parser.frames(data)
                if frames:
                    await stream.send_all(
                        b"".join(encode_frame(f, max_frame=65535) for f in frames)
                    )
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


async def serve_echo(
    host: str, port: int, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
) -> None:
    """Answer every binary2 frame with itself, on ``host:port`` (0: any); report the port."""
    listeners = await trio.open_tcp_listeners(port, host=host)
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(_echo_connection, listeners)


async def _serve_echo_and_report(host: str, port: int) -> None:
    """Serve echo; once listening, print the bound port on stdout (the parent reads it)."""
    async with trio.open_nursery() as nursery:
        bound = await nursery.start(serve_echo, host, port)
        print(bound, flush=True)


def _read_echo_port(proc: subprocess.Popen[bytes], timeout: float) -> int:
    """The port the echo server printed once it was listening (it binds port 0 itself, so
    no other process can take the port between choosing and binding it)."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    line = proc.stdout.readline() if ready else b""
    if not line.strip().isdigit():
        code = proc.poll()
        raise RuntimeError(f"the echo server did not start (exit code {code})")
    return int(line)


# -- seeding ------------------------------------------------------------------------------------
def seed_bills(
    settings: Settings, count: int, prefix: str, *, append: bool = False
) -> list[tuple[str, int]]:
    """Create ``count`` open bills ``<prefix>-<n>`` in billing's database; return them.

    Brings the schema up to date and loads the demo data first (as billing does on start,
    with the same PAN hash key and PVK, so billing then finds it there), and gives every bill
    to the demo customer holding :data:`BENCH_CARD`, amount :data:`BENCH_AMOUNT`, currency
    360. Numbering starts at 0; with ``append`` it continues after the bills of ``prefix``
    already there (``paylab bills add`` run twice). Without it the numbers must not exist
    yet (``prefix`` makes them unique per run). Safe while billing runs (one transaction).
    """
    from sqlalchemy import func, insert, select

    from billing.demo_data import DEMO_CURRENCY
    from billing.models import BILL_OPEN, Bill, Customer, utcnow
    from billing.store import BillingStore
    from hsm.keyfile import load_key_file
    from shared import crypto
    from shared.pan import PanHasher
    from shared.store.db import make_engine, session_factory, transaction, upgrade

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    engine = make_engine(settings.db_url("billing"))
    try:
        upgrade(engine, "billing:migrations")
        sessions = session_factory(engine)
        pvk = load_key_file(settings.key_file).keys["PVK"].clear
        BillingStore(sessions).seed_demo_data(
            PanHasher(settings.pan_hash_key.encode()),
            lambda pan, pvki, pin: crypto.pvv(pvk, pan, pvki, pin),
        )
        now = utcnow()
        with transaction(sessions, write=True) as session:
            start = 0
            if append:
                pattern = f"{prefix}-%"
                start = (
                    session.scalar(
                        select(func.count()).select_from(Bill).where(Bill.bill_number.like(pattern))
                    )
                    or 0
                )
            bills = [
                (generated_bill_number(prefix, i), BENCH_AMOUNT)
                for i in range(start, start + count)
            ]
            customer_id = session.scalar(select(Customer.id).where(Customer.name == BENCH_CARD[2]))
            if customer_id is None:
                raise RuntimeError(f"demo customer {BENCH_CARD[2]!r} missing from billing")
            rows = [
                {
                    "bill_number": number,
                    "customer_id": customer_id,
                    "biller": "PLN",
                    "amount_due": amount,
                    "currency": DEMO_CURRENCY,
                    "status": BILL_OPEN,
                    "created_at": now,
                }
                for number, amount in bills
            ]
            for i in range(0, len(rows), 5000):
                session.execute(insert(Bill), rows[i : i + 5000])
        return bills
    finally:
        engine.dispose()


# -- requests -----------------------------------------------------------------------------------
class _OneEncodeBuilder(RequestBuilder):
    """A :class:`RequestBuilder` that encodes each message once (the client's CPU is scarce).

    :meth:`sign` keeps the payload it MACed: the MAC covers the encoding up to the MAC
    field, which comes last, so the payload is those bytes plus the MAC (what
    ``codec.encode`` of the signed message gives; ``tests/test_bench.py`` checks it). With
    ``mac=False`` it adds no MAC (billing's form) and the payload is the plain encoding.
    """

    def __init__(self, terminal: Terminal, *, mac: bool = True) -> None:
        super().__init__(terminal)
        self.mac = mac
        self.payload = b""

    def sign(self, msg: Message) -> Message:
        if not self.mac:
            self.payload = codec.encode(msg)
            return msg
        field, data = codec.encode_for_mac(msg)
        mac = crypto.mac_alg3(self.terminal.tak, data).hex().upper()
        msg[field] = mac
        self.payload = data + mac.encode("ascii")
        return msg


def _builders(
    prefix: str, n: int, *, tpk_name: str = "TPK", mac: bool = True
) -> list[_OneEncodeBuilder]:
    from hsm.keyfile import load_key_file

    keys = load_key_file()
    return [
        _OneEncodeBuilder(
            Terminal(
                acquirer_id="008",
                terminal_id=f"{prefix}{i:06d}",
                merchant_id="PAYLAB-MERCH-01",
                currency="360",
                tpk=keys.keys[tpk_name].clear,
                tak=keys.keys["TAK"].clear,
            ),
            mac=mac,
        )
        for i in range(n)
    ]


def payments(
    prefix: str, n: int, bills: Iterator[tuple[str, int]], *, forwarded: bool = False
) -> Factory:
    """Payment frames, one distinct bill each, worker ``w`` as terminal ``<prefix><w>``.

    ``forwarded``: as the gateway forwards them to billing (no MAC, PIN block under the
    ZPK); otherwise as a terminal sends them (PIN block under the TPK, MACed).
    """
    builders = _builders(prefix, n, tpk_name="ZPK" if forwarded else "TPK", mac=not forwarded)
    pan, pin, _ = BENCH_CARD

    def make(worker: int) -> tuple[tuple[str, str], bytes] | None:
        bill = next(bills, None)
        if bill is None:
            return None
        builder = builders[worker]
        msg = builder.payment(bill[0], bill[1], pan, pin)
        return (msg["41"], msg["11"]), encode_frame(builder.payload, max_frame=65535)

    return make


def inquiries(prefix: str, n: int, bills: Sequence[tuple[str, int]]) -> Factory:
    """Inquiry frames (no MAC: billing's form) cycling over ``bills``."""
    builders = _builders(prefix, n, mac=False)
    cycle = itertools.cycle([b for b, _ in bills])

    def make(worker: int) -> tuple[tuple[str, str], bytes] | None:
        builder = builders[worker]
        msg = builder.inquiry(next(cycle))
        return (msg["41"], msg["11"]), encode_frame(builder.payload, max_frame=65535)

    return make


# -- the client ---------------------------------------------------------------------------------
class _Slot:
    __slots__ = ("event", "msg")

    def __init__(self) -> None:
        self.event = trio.Event()
        self.msg: dict[str, str] | None = None


class _Connection:
    """One TCP connection: a batching sender task and a receiver matching by (41, 11)."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.pending: dict[tuple[str, str], _Slot] = {}
        self.send_in, self._send_out = trio.open_memory_channel[bytes](math.inf)

    async def sender(self) -> None:
        async with self._send_out:
            async for frame in self._send_out:
                batch = [frame]
                while True:
                    try:
                        batch.append(self._send_out.receive_nowait())
                    except trio.WouldBlock:
                        break
                await self.stream.send_all(b"".join(batch))

    async def receiver(self) -> None:
        parser = FrameParser(max_frame=65535)
        while data := await self.stream.receive_some(262144):
            for frame in parser.frames(data):
                msg = codec.decode(frame)
                slot = self.pending.pop((msg.get("41", ""), msg.get("11", "")), None)
                if slot is not None:
                    slot.msg = msg
                    slot.event.set()


@dataclass
class _Window:
    start: float = math.inf
    end: float = math.inf
    next_start: float = 0.0


async def drive(
    host: str,
    port: int,
    factory: Factory,
    result: PhaseResult,
    *,
    concurrency: int,
    connections: int,
    warmup: float,
    duration: float,
    rate: float = 0.0,
    timeout: float = 10.0,
    expect_approval: bool = True,
) -> PhaseResult:
    """Run one closed-loop phase against ``host:port``, filling and returning ``result``."""
    conns = [
        _Connection(await trio.open_tcp_stream(host, port))
        for _ in range(min(connections, concurrency))
    ]
    window = _Window()
    clock = time.perf_counter

    async def worker(w: int) -> None:
        conn = conns[w % len(conns)]
        while True:
            if rate > 0:
                now = trio.current_time()
                slot_at = max(window.next_start, now - 0.05)
                window.next_start = slot_at + 1.0 / rate
                await trio.sleep_until(slot_at)
            item = factory(w)
            if item is None:
                result.exhausted = True
                window.end = min(window.end, clock())
                return
            key, frame = item
            slot = _Slot()
            conn.pending[key] = slot
            t0 = clock()
            try:
                conn.send_in.send_nowait(frame)
            except trio.BrokenResourceError:
                # The connection's sender has ended: the phase is over (a worker woken by
                # an answer in the same tick as the end-of-phase cancel gets here), or the
                # connection broke, which the sender or receiver reports itself.
                return
            with trio.move_on_after(timeout):
                await slot.event.wait()
            t1 = clock()
            if slot.msg is None:
                conn.pending.pop(key, None)
            if t0 < window.start or t1 > window.end:
                continue
            msg = slot.msg
            code = "timeout" if msg is None else msg.get("39", "--")
            if msg is not None and (not expect_approval or code == "00"):
                result.completed += 1
                result.latencies.append(t1 - t0)
            else:
                result.errors += 1
                result.error_codes[code] = result.error_codes.get(code, 0) + 1

    async with trio.open_nursery() as nursery:
        for c in conns:
            nursery.start_soon(c.sender)
            nursery.start_soon(c.receiver)
        window.next_start = trio.current_time()
        for w in range(concurrency):
            nursery.start_soon(worker, w)
        await trio.sleep(warmup)
        window.start = clock()
        cpu_start = time.process_time()
        planned_end = window.start + duration
        window.end = min(window.end, planned_end)  # bills may have run out in the warm-up
        while clock() < window.end:
            await trio.sleep(min(0.05, max(0.0, window.end - clock())))
        result.seconds = max(0.0, window.end - window.start)
        result.client_cpu_seconds = time.process_time() - cpu_start
        nursery.cancel_scope.cancel()
    for c in conns:
        await c.stream.aclose()
    return result


# -- the whole run ------------------------------------------------------------------------------
@dataclass
class BenchOptions:
    """What ``paylab bench`` was asked to do."""

    duration: float = 10.0
    warmup: float = 2.0
    concurrency: int = 64
    connections: int = 8
    rate: float = 0.0
    bills: int = 0
    timeout: float = 10.0
    phases: tuple[str, ...] = ("echo", "billing-inquiry", "billing-payment", "chain-payment")

    def bills_per_phase(self) -> int:
        """Bills seeded for each payment phase (``bills`` or an estimate above any rate seen)."""
        return self.bills or max(2_000, int(4_000 * (self.duration + self.warmup)))


def _settings_for(data_dir: Path) -> Settings:
    from shared.ops.settings import load_settings

    overrides: dict[str, Any] = {"data_dir": data_dir, "log_level": "warning"}
    for svc in ("acquirer", "gateway", "billing", "hsm"):
        overrides[f"{svc}_http_port"] = 0
        overrides[f"{svc}_iso_port"] = 0
    return load_settings(**overrides)


def run_bench(
    opts: BenchOptions, progress: Callable[[str], None] = lambda _m: None
) -> dict[str, Any]:
    """Start the processes, run the phases, stop everything; return the JSON-ready report.

    Raises whatever stops the services from starting (see
    :meth:`shared.lab.network.ProcessNetwork.start`); the processes are stopped in every case.
    """
    from shared.lab.network import ProcessNetwork, read_rss

    phases: list[PhaseResult] = []
    rss: dict[str, dict[str, float]] = {}
    load_before = os.getloadavg()
    speed_before = python_speed()
    with tempfile.TemporaryDirectory(prefix="paylab-bench-") as tmp:
        settings = _settings_for(Path(tmp) / "var")
        n_bills = opts.bills_per_phase()
        progress(f"seeding {2 * n_bills} bills into billing's database")
        run_id = f"B{int(time.time()) % 0xFFFFFF:06X}"
        chain_bills = seed_bills(settings, n_bills, f"{run_id}C")
        billing_bills = seed_bills(settings, n_bills, f"{run_id}B")
        log = open(Path(tmp) / "bench-services.log", "wb")  # noqa: SIM115 - closed below
        env = {
            "PAYLAB_RATE_LIMIT_TERMINAL": "0",
            "PAYLAB_MAX_CONNECTIONS_PER_SOURCE": "0",
            "PAYLAB_LOG_LEVEL": "warning",
            "PAYLAB_LOG_FORMAT": "json",
            "PAYLAB_TLS_ENABLED": "false",  # the bench's own clients speak plain TCP
        }
        net = ProcessNetwork(settings, ("hsm", "billing", "gateway"), env=env, output=log)
        echo = subprocess.Popen(
            [sys.executable, "-m", "shared.lab.bench", "echo", settings.host, "0"],
            stdout=subprocess.PIPE,
            stderr=log,
        )
        try:
            progress("starting hsm, billing, gateway (one process each) and the echo server")
            ports = net.start()
            echo_port = _read_echo_port(echo, 30)
            pids = {**net.pids(), "echo": echo.pid}
            targets: dict[str, tuple[int, Factory, bool, str]] = {
                "echo": (
                    echo_port,
                    payments("BE", opts.concurrency, iter(_bill_stream(run_id))),
                    False,
                    "(c) raw framed echo server, same frames, same client",
                ),
                "billing-inquiry": (
                    ports["billing"].iso,
                    inquiries("BI", opts.concurrency, chain_bills),
                    True,
                    "(b) billing alone: inquiries",
                ),
                "billing-payment": (
                    ports["billing"].iso,
                    payments("BB", opts.concurrency, iter(billing_bills), forwarded=True),
                    True,
                    "(b) billing alone: payments (HSM PIN verify, posting committed)",
                ),
                "chain-payment": (
                    ports["gateway"].iso,
                    payments("BC", opts.concurrency, iter(chain_bills)),
                    True,
                    "(a) full chain through the gateway: MACed payments",
                ),
            }
            for name in opts.phases:
                port, factory, approve, description = targets[name]
                progress(f"phase {name}: {opts.warmup:g} s warm-up + {opts.duration:g} s")
                result = PhaseResult(name, description)
                try:
                    trio.run(
                        partial(
                            drive,
                            settings.host,
                            port,
                            factory,
                            result,
                            concurrency=opts.concurrency,
                            connections=opts.connections,
                            warmup=opts.warmup,
                            duration=opts.duration,
                            rate=opts.rate,
                            timeout=opts.timeout,
                            expect_approval=approve,
                        )
                    )
                except Exception as exc:  # trio wraps a task's error in an ExceptionGroup
                    leaf: BaseException = exc
                    while isinstance(leaf, BaseExceptionGroup):
                        leaf = leaf.exceptions[0]
                    if isinstance(leaf, trio.BrokenResourceError | trio.ClosedResourceError):
                        cause = leaf.__cause__ or leaf
                        raise RuntimeError(f"connection lost during {name}: {cause!r}") from exc
                    raise
                phases.append(result)
                dead = net.dead()
                if dead:
                    raise RuntimeError(f"service process died during {name}: {dead}")
            for name, pid in pids.items():
                sizes = read_rss(pid)
                if sizes is not None:
                    rss[name] = {
                        "rss_mb": round(sizes[0] / 2**20, 1),
                        "peak_mb": round(sizes[1] / 2**20, 1),
                    }
        finally:
            net.stop()
            echo.terminate()
            try:
                echo.wait(timeout=10)
            except subprocess.TimeoutExpired:
                echo.kill()
                echo.wait()
            log.close()
    by_name = {p.name: p for p in phases}
    ratios: dict[str, float | None] = {}
    echo_tps = by_name["echo"].tps if "echo" in by_name else 0.0
    for key, name in (("chain_vs_echo", "chain-payment"), ("billing_vs_echo", "billing-payment")):
        ratios[key] = (
            round(by_name[name].tps / echo_tps, 4) if name in by_name and echo_tps > 0 else None
        )
    return {
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            # Other work on the machine skews every figure: the 1-minute load average
            # before and after the run (a quiet 2-core machine stays well under 2).
            "load_average_before": round(load_before[0], 2),
            "load_average_after": round(os.getloadavg()[0], 2),
            # The same figures on a faster or slower core scale with it, and a shared
            # virtual machine's core speed drifts: a fixed pure-Python loop, timed.
            "python_speed_before": speed_before,
            "python_speed_after": python_speed(),
        },
        "options": asdict(opts) | {"bills_per_phase": opts.bills_per_phase()},
        "phases": [p.as_dict() for p in phases],
        "ratios": ratios,
        "rss": rss,
    }


def _bill_stream(run_id: str) -> Iterator[tuple[str, int]]:
    """Endless bill numbers for the echo phase (nothing is posted there)."""
    for i in itertools.count():
        yield f"{run_id}E-{i % 10_000_000:07d}", BENCH_AMOUNT


def render(report: dict[str, Any]) -> list[Any]:
    """Rich renderables of ``report``: the phase table, ratios and RSS lines."""
    from rich import box
    from rich.table import Table

    def ms(v: float | None) -> str:
        if v is None:
            return "-"
        return f"{v:.0f}" if v >= 100 else f"{v:.1f}"

    o = report["options"]
    table = Table(
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        title=(
            f"paylab bench: concurrency {o['concurrency']}, {o['connections']} connections, "
            f"{o['duration']:g} s (+{o['warmup']:g} s warm-up)"
            + (f", offered {o['rate']:g}/s" if o["rate"] else "")
        ),
    )
    cols = ("phase", "TPS", "p50 ms", "p95 ms", "p99 ms", "max ms", "ok", "errors", "cpu ms")
    for col in cols:
        table.add_column(col, justify="left" if col == "phase" else "right", no_wrap=col == "phase")
    for p in report["phases"]:
        errors = str(p["errors"]) + (" (bills ran out)" if p["exhausted"] else "")
        table.add_row(
            p["name"],
            f"{p['tps']:.0f}",
            ms(p["p50_ms"]),
            ms(p["p95_ms"]),
            ms(p["p99_ms"]),
            ms(p["max_ms"]),
            str(p["completed"]),
            errors,
            ms(p["client_cpu_ms_per_request"]),
        )
    lines: list[Any] = [table]
    r = report["ratios"]
    for key, label in (
        ("chain_vs_echo", "(a)/(c) chain / echo"),
        ("billing_vs_echo", "(b)/(c) billing / echo"),
    ):
        if r.get(key) is not None:
            lines.append(f"{label}: {r[key]:.1%}")
    for name, sizes in report["rss"].items():
        lines.append(f"RSS {name}: {sizes['rss_mb']:.1f} MB (peak {sizes['peak_mb']:.1f} MB)")
    m = report["machine"]
    lines.append(
        f"machine: {m['cpus']} CPUs, Python {m['python']}, {m['platform']}; load average "
        f"{m['load_average_before']:.2f} before, {m['load_average_after']:.2f} after; "
        f"Python speed {m['python_speed_before']:.1f} before, {m['python_speed_after']:.1f} "
        "after (million loop steps/s)"
    )
    return lines


def _main(argv: Sequence[str]) -> int:
    """``python -m shared.lab.bench echo HOST PORT``: run the echo server until killed."""
    if len(argv) == 3 and argv[0] == "echo":
        with contextlib.suppress(KeyboardInterrupt):
            trio.run(_serve_echo_and_report, argv[1], int(argv[2]))
        return 0
    print("usage: python -m shared.lab.bench echo HOST PORT (the benchmark is `paylab bench`)")
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
