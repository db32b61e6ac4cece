"""Breakers judge links and recover at the reconnect pace: real processes, default settings.

Each service runs as its own ``paylab <service>`` process with the default settings (only
the ports and the data directory are set). A steady load of payments and inquiries goes
through the acquirer's HTTP API from a thread of the test.

* Answers never open a breaker: with billing's database away, billing answers 91 to every
  request; neither the gateway's billing breaker nor the acquirer's gateway breaker opens.
* A gateway restart: the time from the new gateway listening to the acquirer's first
  approval is measured and printed (``-s`` shows it). Only a generous bound, well under the
  breaker's open wait (30 s), is asserted.
* Billing stopped until the gateway's billing breaker opens, then started again: the time
  from billing listening to the first payment approved online (not in stand-in) is
  measured and printed the same way.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from shared.lab.bench import BENCH_CARD, seed_bills
from shared.ops.settings import SERVICES, Settings
from tests.proclab import free_ports
from tests.support import admin_headers

PAYLAB = [sys.executable, "-m", "shared.cli"]
#: The default open wait of a breaker: recovery must come well before it.
OPEN_WAIT = Settings(_env_file=None).breaker_open_wait  # type: ignore[call-arg]
#: The generous bound asserted on a recovery (the figure itself is printed).
RECOVERY_BOUND = OPEN_WAIT / 2


class Processes:
    """The four services as ``paylab <service>`` processes with default settings."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.data_dir = workdir / "var"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        ports = iter(free_ports(8))
        self.values: dict[str, Any] = {
            "host": "127.0.0.1",
            "data_dir": self.data_dir,
            "log_level": "info",
            "log_format": "json",
            **{f"{svc}_{kind}_port": next(ports) for svc in SERVICES for kind in ("http", "iso")},
        }
        env = {k: v for k, v in os.environ.items() if not k.startswith("PAYLAB_")}
        env.update({f"PAYLAB_{k.upper()}": str(v) for k, v in self.values.items()})
        self.env = env
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def settings(self) -> Settings:
        return Settings(_env_file=None, **self.values)  # type: ignore[call-arg]

    def http(self, name: str) -> str:
        return f"http://127.0.0.1:{self.values[f'{name}_http_port']}"

    def iso_port(self, name: str) -> int:
        return int(self.values[f"{name}_iso_port"])

    def log(self, name: str) -> str:
        path = self.data_dir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def start(self, name: str) -> None:
        with open(self.data_dir / f"{name}.log", "ab") as log:
            self.procs[name] = subprocess.Popen(
                [*PAYLAB, name], env=self.env, cwd=self.workdir, stdout=log, stderr=log
            )

    def wait_ready(self, name: str, timeout: float = 60.0) -> None:
        """Until ``/health`` answers 200 (every link up, the database writable)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            proc = self.procs[name]
            if proc.poll() is not None:
                raise AssertionError(f"{name} exited: {self.log(name)[-2000:]}")
            try:
                if httpx.get(self.http(name) + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"{name} not ready in {timeout} s: {self.log(name)[-2000:]}")

    def stop(self, name: str) -> None:
        """SIGTERM: drain and stop, as an operator's restart does."""
        proc = self.procs.pop(name)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, self.log(name)[-2000:]

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        self.procs.clear()

    def metric(self, name: str, metric: str, **labels: str) -> float:
        text = httpx.get(self.http(name) + "/metrics", timeout=10).text
        total = 0.0
        for line in text.splitlines():
            if not line.startswith(metric + "{"):
                continue
            found = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0]))
            if all(found.get(k) == v for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def breakers(self, name: str) -> dict[str, str]:
        r = httpx.get(self.http(name) + "/breakers", timeout=10, headers=admin_headers())
        return {b["name"]: b["state"] for b in r.json()["breakers"]}

    def listening_at(self, name: str, timeout: float = 60.0) -> float:
        """The moment (monotonic) ``name``'s ISO port accepts a connection."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.iso_port(name)), timeout=0.2):
                    return time.monotonic()
            except OSError:
                time.sleep(0.01)
        raise AssertionError(f"{name} not listening in {timeout} s: {self.log(name)[-2000:]}")


@dataclass(frozen=True)
class Outcome:
    """One request of the load: when it left and came back, and what came back."""

    kind: str
    sent: float
    done: float
    status: int
    code: str | None
    approval: str | None

    @property
    def approved(self) -> bool:
        return self.status == 200 and self.code == "00"


class Load:
    """Steady traffic through the acquirer's HTTP API: ``workers`` clients, each sending a
    payment then an inquiry, one request at a time, ``pause`` seconds apart."""

    def __init__(self, api: str, bills: list[str], workers: int = 4, pause: float = 0.05) -> None:
        self.api = api
        self.bills = iter(bills)
        self.workers = workers
        self.pause = pause
        self.outcomes: list[Outcome] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: trio.run(self._run), daemon=True)

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(60)
        assert not self._thread.is_alive(), "the load did not stop"

    def since(self, moment: float) -> list[Outcome]:
        return [o for o in list(self.outcomes) if o.done >= moment]

    def wait(self, until: Callable[[list[Outcome]], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not until(list(self.outcomes)):
            assert time.monotonic() < deadline, f"load condition not met in {timeout} s"
            time.sleep(0.02)

    async def _run(self) -> None:
        async with httpx.AsyncClient(timeout=30) as client, trio.open_nursery() as nursery:
            for _ in range(self.workers):
                nursery.start_soon(self._worker, client)

    async def _worker(self, client: httpx.AsyncClient) -> None:
        pan, pin, _name = BENCH_CARD
        kinds = ("payment", "inquiry")
        n = 0
        while not self._stop.is_set():
            kind = kinds[n % 2]
            n += 1
            if kind == "payment":
                bill = next(self.bills)
                body: dict[str, Any] = {"bill": bill, "amount": 10_000, "pan": pan, "pin": pin}
                path = "/payments"
            else:
                body, path = {"bill": "PLN-0002"}, "/inquiries"
            sent = time.monotonic()
            try:
                r = await client.post(self.api + path, json=body)
                answer = r.json()
                status, code = r.status_code, answer.get("response_code")
                approval = answer.get("approval_code")
            except (httpx.HTTPError, ValueError):
                status, code, approval = 0, None, None
            self.outcomes.append(Outcome(kind, sent, time.monotonic(), status, code, approval))
            await trio.sleep(self.pause)


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    procs = Processes(tmp_path)
    try:
        yield procs
    finally:
        procs.close()


def start_network(procs: Processes) -> list[str]:
    """Bills for the load (seeded before billing starts), then the four services."""
    bills = [bill for bill, _ in seed_bills(procs.settings(), 2000, "RECO")]
    for name in ("hsm", "billing", "gateway", "acquirer"):
        procs.start(name)
        procs.wait_ready(name)
    return bills


def set_billing_database(procs: Processes, down: bool) -> None:
    r = httpx.post(
        procs.http("billing") + "/faults/database",
        json={"down": down},
        timeout=10,
        headers=admin_headers(),
    )
    assert r.status_code == 200, r.text


def opened(procs: Processes, name: str, upstream: str) -> float:
    return procs.metric(
        name, "paylab_breaker_transitions_total", upstream=upstream, to_state="open"
    )


def test_answers_open_no_breaker_and_a_gateway_restart_recovers_in_seconds(
    processes: Processes,
) -> None:
    procs = processes
    bills = start_network(procs)
    with Load(procs.http("acquirer"), bills) as load:
        load.wait(lambda done: sum(o.approved for o in done) >= 10, timeout=30)

        # 1. Billing's database away: billing answers 91 to everything. Answers are link
        # successes: no breaker opens, however many 91s come back.
        set_billing_database(procs, down=True)
        since = time.monotonic()
        load.wait(
            lambda done: sum(o.code == "91" for o in done if o.sent >= since) >= 12, timeout=60
        )
        assert opened(procs, "gateway", "billing") == 0
        assert opened(procs, "acquirer", "gateway") == 0
        assert procs.breakers("gateway")["billing"] == "closed"
        assert procs.breakers("acquirer")["gateway"] == "closed"
        answered_91 = sum(o.code == "91" for o in load.since(since))
        set_billing_database(procs, down=False)
        back = time.monotonic()
        load.wait(lambda done: any(o.approved and o.sent >= back for o in done), timeout=30)

        # 2. The gateway restarts under the load.
        procs.stop("gateway")
        stopped = time.monotonic()
        procs.start("gateway")
        listening = procs.listening_at("gateway")
        load.wait(
            lambda done: any(o.approved and o.done >= listening for o in done),
            timeout=RECOVERY_BOUND + 10,
        )
        first = min(o.done for o in load.since(listening) if o.approved)
        failed_meanwhile = [o for o in load.since(stopped) if o.done < first and not o.approved]

    recovery = first - listening
    acquirer_opened = opened(procs, "acquirer", "gateway")
    print(
        f"\nanswered 91s with billing's database away: {answered_91}, breakers opened: 0"
        f"\ngateway restart: down {listening - stopped:.2f} s (stop to listening), "
        f"first approval {recovery:.2f} s after the gateway listened "
        f"(acquirer breaker opened {acquirer_opened:.0f}x on the restart, "
        f"{len(failed_meanwhile)} requests not approved meanwhile)"
    )
    assert recovery < RECOVERY_BOUND, recovery


def test_billing_back_gets_payments_approved_online_within_seconds(
    processes: Processes,
) -> None:
    procs = processes
    bills = start_network(procs)
    with Load(procs.http("acquirer"), bills) as load:
        load.wait(lambda done: sum(o.approved for o in done) >= 10, timeout=30)
        procs.stop("billing")
        # Inquiries fail for want of a link and the queued advices cannot be delivered:
        # the gateway's billing breaker opens; payments are approved in stand-in.
        deadline = time.monotonic() + 60
        while procs.breakers("gateway")["billing"] != "open":
            assert time.monotonic() < deadline, "the billing breaker never opened"
            time.sleep(0.05)
        procs.start("billing")
        listening = procs.listening_at("billing")

        def online(o: Outcome) -> bool:
            return (
                o.kind == "payment"
                and o.approved
                and o.done >= listening
                and not (o.approval or "").startswith("SI")
            )

        load.wait(lambda done: any(online(o) for o in done), timeout=RECOVERY_BOUND + 10)
        first = min(o.done for o in load.since(listening) if online(o))
        standin = sum(
            1 for o in load.outcomes if o.approved and (o.approval or "").startswith("SI")
        )
    recovery = first - listening
    print(
        f"\nbilling back: first payment approved online {recovery:.2f} s after billing "
        f"listened ({standin} payments approved in stand-in during the outage)"
    )
    assert recovery < RECOVERY_BOUND, recovery
