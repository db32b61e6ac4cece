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

CPU per request: at the start and the end of each phase's measured window the bench reads
the user + system CPU time of every service process from ``/proc/<pid>/stat``
(:func:`shared.lab.network.read_cpu_seconds`; clock ticks, 10 ms each on Linux, so keep the
windows long enough: a few seconds give a few hundred ticks per busy service). A phase's
figure for a service is its CPU in the window divided by the successful answers received in
the window (:attr:`PhaseResult.window_answers`; whenever the request was sent, since that is
the work the window saw), in ms, for the processes the phase's requests pass through
(:data:`PHASE_SERVICES`). The client's own CPU (this process) is reported separately, as
before. Normalised: that figure multiplied by the Python speed yardstick measured during
the window (:class:`SpeedSampler`, :func:`window_speed`, :func:`normalise`), "thousand loop
steps per request": the same work on a faster core gives the same figure.

Rates (``rates``): after the other phases, the chain-payment phase runs once per offered
rate (closed loop paced at that rate, with :func:`rate_concurrency` workers so the rate is
really offered), for a latency-versus-offered-rate table (:func:`rate_table_rows`).

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
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import IO, Any

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


def normalise(cpu_ms: float | None, speed: float | None) -> float | None:
    """``cpu_ms`` (per request) times the Python speed ``speed`` (million loop steps per
    second): thousand loop steps per request, a figure that does not move with the core.

    ms x million steps/s = thousand steps. ``None`` if either is unknown (or ``speed`` is 0).
    """
    if cpu_ms is None or not speed:
        return None
    return cpu_ms * speed


def speed_sample(steps: int = 20_000, tries: int = 3) -> float:
    """The yardstick loop of :func:`python_speed`, short and timed in CPU time: best of
    ``tries`` runs of ``steps`` steps (about 1 ms each), in million steps per CPU second.

    CPU time (``time.thread_time``), like the services' figures from ``/proc``: a reading
    is not lowered when the scheduler runs another process in the middle of it (a busy
    machine), only when the core itself runs slower.
    """
    best = 0.0
    for _ in range(tries):
        start = time.thread_time()
        total = 0
        for i in range(steps):
            total += i
        elapsed = time.thread_time() - start
        if elapsed > 0:
            best = max(best, steps / 1e6 / elapsed)
    return best


def parse_speed_line(line: bytes) -> tuple[float, float] | None:
    """``b"<monotonic seconds> <speed>"`` (a line of :class:`SpeedSampler`'s child) ->
    ``(seconds, speed)``; ``None`` for anything else."""
    parts = line.split()
    if len(parts) != 2:
        return None
    try:
        return float(parts[0]), float(parts[1])
    except ValueError:
        return None


def window_speed(
    readings: Sequence[tuple[float, float]], start: float, end: float
) -> tuple[float, int] | None:
    """The mean of the speed readings taken between ``start`` and ``end`` (monotonic
    seconds), and how many there were; ``None`` when there were none.

    Why readings taken *during* the window: this VM's core speed flips between about 29
    and 16 million steps/s from one half-second to the next (and drifts over minutes), so
    a reading before or after a phase says little about the phase. Why the mean and not
    the median: the services' CPU time in the window is spent partly on the fast and
    partly on the slow core speed, so the work it stands for is CPU time times the
    *average* speed over the window, which readings at regular intervals estimate; the
    median of a two-valued mix jumps between the two values.
    """
    inside = [v for t, v in readings if start <= t <= end]
    if not inside:
        return None
    return statistics.fmean(inside), len(inside)


class SpeedSampler:
    """A child process (``python -m shared.lab.bench speed INTERVAL``) that prints a
    :func:`speed_sample` with its ``time.monotonic()`` every ``interval`` seconds.

    :meth:`poll` collects what it printed so far into :attr:`readings` without waiting;
    :meth:`stop` ends it (safe to call more than once). It costs about 3 ms of CPU per
    reading, ~1.5 % of a core at the default interval. ``time.monotonic`` is the system's
    monotonic clock, shared by every process, so the readings line up with the parent's.
    """

    def __init__(self, interval: float = 0.2, *, stderr: IO[bytes] | int | None = None) -> None:
        self.readings: list[tuple[float, float]] = []
        self._tail = b""
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "shared.lab.bench", "speed", str(interval)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=stderr,
        )
        assert self.proc.stdout is not None
        os.set_blocking(self.proc.stdout.fileno(), False)

    def poll(self) -> list[tuple[float, float]]:
        """Read every complete line printed so far; return all readings."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while True:
            try:
                data = os.read(fd, 65536)
            except BlockingIOError:
                break
            if not data:
                break
            self._tail += data
        *lines, self._tail = self._tail.split(b"\n")
        self.readings.extend(r for line in lines if (r := parse_speed_line(line)) is not None)
        return self.readings

    def stop(self) -> None:
        """Terminate the child and wait for it."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def _sample_speed_forever(interval: float) -> None:
    """The sampler child: a :func:`speed_sample` line every ``interval`` seconds."""
    while True:
        print(f"{time.monotonic():.4f} {speed_sample():.2f}", flush=True)
        time.sleep(interval)


def cpu_per_request(
    cpu_seconds: dict[str, float], answers: int, services: Sequence[str]
) -> dict[str, float] | None:
    """CPU ms per answer of each of ``services`` (those read), and their ``total``.

    ``None`` when there were no answers or none of the services was read.
    """
    read = [s for s in services if s in cpu_seconds]
    if answers <= 0 or not read:
        return None
    per = {s: cpu_seconds[s] * 1000 / answers for s in read}
    per["total"] = sum(per.values())
    return per


def cpu_delta(start: dict[str, float], end: dict[str, float]) -> dict[str, float]:
    """CPU seconds between two readings, for the processes read both times."""
    return {name: end[name] - start[name] for name in start if name in end}


def parse_rates(text: str) -> tuple[float, ...]:
    """``"100,300,600"`` -> ``(100.0, 300.0, 600.0)``: offered rates, each > 0, in order.

    Raises ``ValueError`` for an empty list, a non-number, or a rate that is not > 0.
    """
    rates: list[float] = []
    for part in text.split(","):
        part = part.strip()
        try:
            rate = float(part)
        except ValueError:
            raise ValueError(f"not a rate: {part!r} (expected e.g. 100,300,600)") from None
        if not rate > 0 or math.isinf(rate):
            raise ValueError(f"a rate must be a positive number, not {part!r}")
        rates.append(rate)
    if not rates:
        raise ValueError("no rates given")
    return tuple(rates)


#: Seconds of latency the workers of a rate phase can absorb before the closed loop falls
#: below the offered rate: ``rate * RATE_LATENCY_ROOM`` workers.
RATE_LATENCY_ROOM = 0.5


def rate_concurrency(rate: float, base: int) -> int:
    """Workers for a phase offered ``rate`` a second: at least ``base``, and enough that
    answers as slow as :data:`RATE_LATENCY_ROOM` seconds still let the rate be offered (a
    closed loop offers at most workers / latency)."""
    return max(base, math.ceil(rate * RATE_LATENCY_ROOM))


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
    #: Requests offered a second (0: closed loop, as fast as answered) and workers.
    offered_rate: float = 0.0
    concurrency: int = 0
    #: Successful answers received within the window, whenever sent (CPU's denominator).
    window_answers: int = 0
    #: The processes this phase's requests pass through, and their CPU in the window.
    services: tuple[str, ...] = ()
    service_cpu_seconds: dict[str, float] = field(default_factory=dict)
    #: The Python speed yardstick during the window (:func:`window_speed`) and its readings.
    python_speed: float | None = None
    python_speed_samples: int = 0

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
        d["services"] = list(self.services)
        d["service_cpu_seconds"] = {k: round(v, 3) for k, v in self.service_cpu_seconds.items()}
        d["python_speed"] = None if self.python_speed is None else round(self.python_speed, 1)
        d["python_speed_samples"] = self.python_speed_samples
        per = cpu_per_request(self.service_cpu_seconds, self.window_answers, self.services)
        # ms per request, per service and the total of the phase's services.
        d["service_cpu_ms_per_request"] = (
            None if per is None else {k: round(v, 3) for k, v in per.items() if k != "total"}
        )
        d["service_cpu_ms_total"] = None if per is None else round(per["total"], 3)
        # The same, times the yardstick: thousand loop steps per request.
        steps = {k: normalise(v, self.python_speed) for k, v in (per or {}).items()}
        d["service_ksteps_per_request"] = (
            None
            if per is None or self.python_speed is None
            else {k: round(v, 2) for k, v in steps.items() if k != "total" and v is not None}
        )
        total = steps.get("total")
        d["service_ksteps_total"] = None if total is None else round(total, 2)
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
    cpu_probe: Callable[[], dict[str, float]] | None = None,
) -> PhaseResult:
    """Run one closed-loop phase against ``host:port``, filling and returning ``result``.

    ``cpu_probe`` (CPU seconds so far of each service process, by name) is called when the
    measured window starts and when it ends; the difference goes to
    ``result.service_cpu_seconds``.
    """
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
            msg = slot.msg
            code = "timeout" if msg is None else msg.get("39", "--")
            ok = msg is not None and (not expect_approval or code == "00")
            if ok and window.start <= t1 <= window.end:
                result.window_answers += 1
            if t0 < window.start or t1 > window.end:
                continue
            if ok:
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
        services_start = cpu_probe() if cpu_probe is not None else {}
        window.start = clock()
        cpu_start = time.process_time()
        planned_end = window.start + duration
        window.end = min(window.end, planned_end)  # bills may have run out in the warm-up
        while clock() < window.end:
            await trio.sleep(min(0.05, max(0.0, window.end - clock())))
        result.seconds = max(0.0, window.end - window.start)
        result.client_cpu_seconds = time.process_time() - cpu_start
        if cpu_probe is not None:
            result.service_cpu_seconds = cpu_delta(services_start, cpu_probe())
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
    #: Offered rates of the extra chain-payment phases run after ``phases`` (may be empty).
    rates: tuple[float, ...] = ()

    def bills_per_phase(self) -> int:
        """Bills seeded for each payment phase (``bills`` or an estimate above any rate seen)."""
        return self.bills or max(2_000, int(4_000 * (self.duration + self.warmup)))

    def bills_per_rate(self, rate: float) -> int:
        """Bills seeded for the chain-payment phase offered ``rate`` a second.

        ``bills`` if given; otherwise what the rate can use in the warm-up and the window
        (the workers start at most ``rate`` a second, plus a 50 ms catch-up and one per
        worker), with a fifth more, and never more than :meth:`bills_per_phase`.
        """
        if self.bills:
            return self.bills
        workers = rate_concurrency(rate, self.concurrency)
        need = math.ceil(rate * (self.warmup + self.duration + 0.1) * 1.2) + workers
        return min(self.bills_per_phase(), need)


def _settings_for(data_dir: Path) -> Settings:
    from shared.ops.settings import load_settings

    overrides: dict[str, Any] = {"data_dir": data_dir, "log_level": "warning"}
    for svc in ("acquirer", "gateway", "billing", "hsm"):
        overrides[f"{svc}_http_port"] = 0
        overrides[f"{svc}_iso_port"] = 0
    return load_settings(**overrides)


@dataclass
class _Run:
    """One phase to run: what it drives, how, and the report list its result goes to."""

    kind: str  # a key of PHASE_SERVICES
    result: PhaseResult
    port: int
    factory: Factory
    approve: bool
    rate: float
    workers: int
    into: list[PhaseResult]


#: The service processes each phase's requests pass through (their CPU is reported).
PHASE_SERVICES: dict[str, tuple[str, ...]] = {
    "echo": ("echo",),
    "billing-inquiry": ("hsm", "billing"),
    "billing-payment": ("hsm", "billing"),
    "chain-payment": ("hsm", "billing", "gateway"),
}


def _read_cpu_at(pids: dict[str, int], edges: list[float]) -> dict[str, float]:
    """:func:`read_cpu`, noting when (``time.monotonic()``) in ``edges``."""
    edges.append(time.monotonic())
    return read_cpu(pids)


def read_cpu(pids: dict[str, int]) -> dict[str, float]:
    """CPU seconds so far of each process in ``pids`` (name -> pid) still there."""
    from shared.lab.network import read_cpu_seconds

    seconds = {name: read_cpu_seconds(pid) for name, pid in pids.items()}
    return {name: v for name, v in seconds.items() if v is not None}


def run_bench(
    opts: BenchOptions, progress: Callable[[str], None] = lambda _m: None
) -> dict[str, Any]:
    """Start the processes, run the phases, stop everything; return the JSON-ready report.

    The phases of ``opts.phases`` run in order, then one chain-payment phase per rate of
    ``opts.rates`` (the report's ``rates``). Each phase's ``python_speed`` is the mean of
    the readings a :class:`SpeedSampler` took during its measured window
    (:func:`window_speed`); the machine's ``python_speed_before`` and ``_after`` are
    :func:`python_speed` before the first phase and after the last.

    Raises whatever stops the services from starting (see
    :meth:`shared.lab.network.ProcessNetwork.start`); the processes are stopped in every case.
    """
    from shared.lab.network import ProcessNetwork, read_rss

    phases: list[PhaseResult] = []
    rate_phases: list[PhaseResult] = []
    rss: dict[str, dict[str, float]] = {}
    speeds: list[float] = []
    sampler: SpeedSampler | None = None
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="paylab-bench-") as tmp:
        settings = _settings_for(Path(tmp) / "var")
        n_bills = opts.bills_per_phase()
        rate_bills = [opts.bills_per_rate(r) for r in opts.rates]
        progress(f"seeding {2 * n_bills + sum(rate_bills)} bills into billing's database")
        run_id = f"B{int(time.time()) % 0xFFFFFF:06X}"
        chain_bills = seed_bills(settings, n_bills, f"{run_id}C")
        billing_bills = seed_bills(settings, n_bills, f"{run_id}B")
        extra = seed_bills(settings, sum(rate_bills), f"{run_id}R") if opts.rates else []
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
            sampler = SpeedSampler(stderr=log)
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
            runs: list[_Run] = []
            for name in opts.phases:
                port, factory, approve, description = targets[name]
                runs.append(
                    _Run(
                        name,
                        PhaseResult(name, description),
                        port,
                        factory,
                        approve,
                        opts.rate,
                        opts.concurrency,
                        phases,
                    )
                )
            taken = 0
            for i, rate in enumerate(opts.rates):
                workers = rate_concurrency(rate, opts.concurrency)
                bills = iter(extra[taken : taken + rate_bills[i]])
                taken += rate_bills[i]
                runs.append(
                    _Run(
                        "chain-payment",
                        PhaseResult(f"chain-payment@{rate:g}/s", f"(a) full chain, {rate:g}/s"),
                        ports["gateway"].iso,
                        payments(f"R{i}", workers, bills),
                        True,
                        rate,
                        workers,
                        rate_phases,
                    )
                )
            speeds.append(python_speed())
            for run in runs:
                result = run.result
                name = result.name
                paced = f", offered {run.rate:g}/s, {run.workers} workers" if run.rate else ""
                progress(f"phase {name}: {opts.warmup:g} s warm-up + {opts.duration:g} s{paced}")
                result.offered_rate = run.rate
                result.concurrency = run.workers
                result.services = PHASE_SERVICES[run.kind]
                probe_pids = {s: pids[s] for s in result.services if s in pids}
                edges: list[float] = []  # the window's start and end, monotonic seconds
                try:
                    trio.run(
                        partial(
                            drive,
                            settings.host,
                            run.port,
                            run.factory,
                            result,
                            concurrency=run.workers,
                            connections=opts.connections,
                            warmup=opts.warmup,
                            duration=opts.duration,
                            rate=run.rate,
                            timeout=opts.timeout,
                            expect_approval=run.approve,
                            cpu_probe=partial(_read_cpu_at, probe_pids, edges),
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
                if len(edges) == 2:
                    speed = window_speed(sampler.poll(), edges[0], edges[1])
                    if speed is not None:
                        result.python_speed, result.python_speed_samples = speed
                run.into.append(result)
                dead = net.dead()
                if dead:
                    raise RuntimeError(f"service process died during {name}: {dead}")
            speeds.append(python_speed())
            for name, pid in pids.items():
                sizes = read_rss(pid)
                if sizes is not None:
                    rss[name] = {
                        "rss_mb": round(sizes[0] / 2**20, 1),
                        "peak_mb": round(sizes[1] / 2**20, 1),
                    }
        finally:
            if sampler is not None:
                sampler.stop()
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
            # virtual machine's core speed drifts: a fixed pure-Python loop, timed before
            # the first phase and after the last (each phase has its own, taken during its
            # window: see the phases' python_speed).
            "python_speed_before": speeds[0] if speeds else None,
            "python_speed_after": speeds[-1] if speeds else None,
            # The step of the services' CPU figures (/proc counts clock ticks).
            "cpu_tick_ms": round(1000 / os.sysconf("SC_CLK_TCK"), 3),
        },
        "options": asdict(opts)
        | {"bills_per_phase": opts.bills_per_phase(), "bills_per_rate": rate_bills},
        "phases": [p.as_dict() for p in phases],
        "rates": [p.as_dict() for p in rate_phases],
        "ratios": ratios,
        "rss": rss,
    }


def _bill_stream(run_id: str) -> Iterator[tuple[str, int]]:
    """Endless bill numbers for the echo phase (nothing is posted there)."""
    for i in itertools.count():
        yield f"{run_id}E-{i % 10_000_000:07d}", BENCH_AMOUNT


def _ms(v: float | None) -> str:
    """A millisecond figure for the tables: ``-`` when unknown, 3 significant-ish digits."""
    if v is None:
        return "-"
    if v >= 100:
        return f"{v:.0f}"
    return f"{v:.1f}" if v >= 10 else f"{v:.2f}"


def _steps(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def cpu_line(phase: dict[str, Any]) -> str | None:
    """One line of a phase's CPU figures per request (``None`` when the services' CPU is
    unknown), e.g. ``CPU chain-payment: hsm 0.35 + billing 0.76 + gateway 0.83 = 1.94 ms,
    46.6 k steps (speed 24.0); client 0.24 ms``."""
    per = phase.get("service_cpu_ms_per_request")
    if not per:
        return None
    parts = " + ".join(f"{name} {_ms(v)}" for name, v in per.items())
    line = f"CPU {phase['name']}: {parts} = {_ms(phase['service_cpu_ms_total'])} ms"
    if phase.get("service_ksteps_total") is not None:
        line += f", {phase['service_ksteps_total']:.1f} k steps (speed {phase['python_speed']:.1f})"
    return line + f"; client {_ms(phase['client_cpu_ms_per_request'])} ms"


#: The services whose CPU the rate table shows, in the order of the chain.
RATE_TABLE_SERVICES = ("gateway", "billing", "hsm")


def rate_table_rows(rates: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """The latency-versus-offered-rate table: its header and one row of text per rate phase.

    ``rates`` are the report's ``rates`` (phase dicts with ``offered_rate``), in the order
    they ran. Columns: offered rate (a second), achieved TPS, p50/p95/p99/max latency in
    ms, errors, CPU ms per payment of each service of :data:`RATE_TABLE_SERVICES` and their
    total (the normalised total and whether bills ran out are in the JSON and the CPU lines).
    """
    header = [
        "offered",
        "TPS",
        "p50",
        "p95",
        "p99",
        "max",
        "errors",
        *RATE_TABLE_SERVICES,
        "total",
    ]
    rows = []
    for p in rates:
        per = p.get("service_cpu_ms_per_request") or {}
        rows.append(
            [
                f"{p['offered_rate']:g}",
                f"{p['tps']:.0f}",
                _ms(p["p50_ms"]),
                _ms(p["p95_ms"]),
                _ms(p["p99_ms"]),
                _ms(p["max_ms"]),
                str(p["errors"]),
                *(_ms(per.get(s)) for s in RATE_TABLE_SERVICES),
                _ms(p["service_cpu_ms_total"]),
            ]
        )
    return header, rows


def render(report: dict[str, Any]) -> list[Any]:
    """Rich renderables of ``report``: the phase table, CPU lines, the rate table, ratios,
    RSS and machine lines."""
    from rich import box
    from rich.table import Table

    o = report["options"]
    table = Table(
        box=box.SIMPLE_HEAD,
        show_edge=False,
        padding=(0, 1, 0, 0),  # one space between columns: the tables fit 80 columns
        title=(
            f"paylab bench: concurrency {o['concurrency']}, {o['connections']} connections, "
            f"{o['duration']:g} s (+{o['warmup']:g} s warm-up)"
            + (f", offered {o['rate']:g}/s" if o["rate"] else "")
            + "\nlatency in ms; client: its CPU ms per request; ksteps: the services' CPU per"
            + " request in thousand loop steps (CPU ms x Python speed)"
        ),
    )
    cols = (
        "phase",
        "TPS",
        "p50",
        "p95",
        "p99",
        "max",
        "ok",
        "errors",
        "client",
        "ksteps",
    )
    for col in cols:
        table.add_column(col, justify="left" if col == "phase" else "right", no_wrap=col == "phase")
    for p in report["phases"]:
        errors = str(p["errors"]) + (" (bills ran out)" if p["exhausted"] else "")
        table.add_row(
            p["name"],
            f"{p['tps']:.0f}",
            _ms(p["p50_ms"]),
            _ms(p["p95_ms"]),
            _ms(p["p99_ms"]),
            _ms(p["max_ms"]),
            str(p["completed"]),
            errors,
            _ms(p["client_cpu_ms_per_request"]),
            _steps(p["service_ksteps_total"]),
        )
    lines: list[Any] = [table]
    for p in [*report["phases"], *report.get("rates", [])]:
        line = cpu_line(p)
        if line is not None:
            lines.append(line)
    if report.get("rates"):
        header, rows = rate_table_rows(report["rates"])
        rate_table = Table(
            box=box.SIMPLE_HEAD,
            show_edge=False,
            padding=(0, 1, 0, 0),
            title="chain-payment against the offered rate: latency (ms), CPU ms per payment",
        )
        for col in header:
            rate_table.add_column(col, justify="right")
        for row in rows:
            rate_table.add_row(*row)
        lines.append(rate_table)
        short = [f"{p['offered_rate']:g}/s" for p in report["rates"] if p["exhausted"]]
        if short:
            lines.append(f"bills ran out at {', '.join(short)}: those rows ended early")
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
    speed = (
        f"Python speed {m['python_speed_before']:.1f} before, {m['python_speed_after']:.1f} "
        "after (million loop steps/s)"
        if m["python_speed_before"] is not None
        else "Python speed not measured"
    )
    lines.append(
        f"machine: {m['cpus']} CPUs, Python {m['python']}, {m['platform']}; load average "
        f"{m['load_average_before']:.2f} before, {m['load_average_after']:.2f} after; "
        f"{speed}; services' CPU in {m['cpu_tick_ms']:g} ms ticks"
    )
    return lines


def _main(argv: Sequence[str]) -> int:
    """``python -m shared.lab.bench echo HOST PORT``: run the echo server until killed;
    ``speed INTERVAL``: the :class:`SpeedSampler` child, until killed."""
    if len(argv) == 3 and argv[0] == "echo":
        with contextlib.suppress(KeyboardInterrupt):
            trio.run(_serve_echo_and_report, argv[1], int(argv[2]))
        return 0
    if len(argv) == 2 and argv[0] == "speed":
        with contextlib.suppress(KeyboardInterrupt, BrokenPipeError):
            _sample_speed_forever(float(argv[1]))
        return 0
    print(
        "usage: python -m shared.lab.bench echo HOST PORT | speed INTERVAL"
        " (the benchmark is `paylab bench`)"
    )
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
