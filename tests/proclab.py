"""Services as real processes for the tests where a crash, a freeze or the command line is
the point: :class:`Lab` runs each ``paylab <service>`` as its own process on free ports over
one data directory, and can stop (SIGTERM), kill (SIGKILL), freeze (SIGSTOP) and thaw them.
:class:`ThreadedNetwork` runs services in this process beside them.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import httpx
import trio
from sqlalchemy import insert, select

from billing.models import BILL_OPEN, Bill, Customer, Posting
from billing.store import BillingStore
from shared import crypto
from shared.db import make_engine, session_factory, transaction, upgrade
from shared.network import Network
from shared.pan import PanHasher
from shared.settings import SERVICES, Settings
from tests.support import KEYS, admin_headers

T = TypeVar("T")

PAYLAB = [sys.executable, "-m", "shared.cli"]
#: Settings every test network shares: no rate limit in the way of a burst of payments,
#: stand-in limits high enough for a thousand payments of one card, and an upstream that
#: comes back is found again within a second.
SAF_SETTINGS: dict[str, Any] = {
    "rate_limit_terminal": 0.0,
    "standin_max_amount": 1_000_000,
    "standin_customer_daily_amount": 10**12,
    "reconnect_base_delay": 0.1,
    "reconnect_max_delay": 0.5,
    "breaker_open_wait": 1.0,
}
#: Amount of every bill the tests create (within the stand-in limits above).
BILL_AMOUNT = 10_000


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class ThreadedNetwork:
    """Services in this process, run by a trio loop of their own in a thread: quick to
    start, and the blocking waits of a synchronous test do not stall them."""

    def __init__(self, settings: Settings, names: Sequence[str]) -> None:
        self.network = Network(settings, names)
        self._token: trio.lowlevel.TrioToken | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="-".join(names), daemon=True)

    def _main(self) -> None:
        async def main() -> None:
            self._token = trio.lowlevel.current_trio_token()
            async with trio.open_nursery() as nursery:
                await nursery.start(self.network.run)
                self._ready.set()

        try:
            trio.run(main)
        except BaseException as exc:
            self._error = exc
        finally:
            self._ready.set()

    def start(self) -> None:
        self._thread.start()
        assert self._ready.wait(30), "services not started within 30 s"
        if self._error is not None:
            raise self._error

    def stop(self) -> None:
        if self._thread.is_alive() and self._token is not None:
            trio.from_thread.run(self.network.stop, trio_token=self._token)
        self._thread.join(30)
        assert not self._thread.is_alive(), "services not stopped within 30 s"
        if self._error is not None:
            raise self._error


class Lab:
    """Services as separate ``paylab <service>`` processes on free ports, one data dir.

    ``start`` accepts per-process environment overrides (a second gateway's ports and
    replica id); logs go to files in the data dir (never a pipe that could fill up).
    """

    def __init__(self, workdir: Path, **settings: Any) -> None:
        self.workdir = workdir
        self.data_dir = workdir / "var"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        ports = iter(free_ports(8))
        values: dict[str, Any] = {
            **SAF_SETTINGS,
            "host": "127.0.0.1",
            "data_dir": self.data_dir,
            "log_level": "warning",
            "log_format": "json",
            "shutdown_grace": 2.0,
            **{f"{svc}_{kind}_port": next(ports) for svc in SERVICES for kind in ("http", "iso")},
            **settings,
        }
        self.values = values
        env = {k: v for k, v in os.environ.items() if not k.startswith("PAYLAB_")}
        env.update({f"PAYLAB_{key.upper()}": str(value) for key, value in values.items()})
        self.env = env
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.envs: dict[str, dict[str, str]] = {}
        self.threads: list[ThreadedNetwork] = []

    def settings(self) -> Settings:
        """The settings the processes read from their environment."""
        return Settings(_env_file=None, **self.values)  # type: ignore[call-arg]

    def http(self, name: str) -> str:
        service = name.split("#")[0]
        env = self.envs.get(name, self.env)
        return f"http://127.0.0.1:{env[f'PAYLAB_{service.upper()}_HTTP_PORT']}"

    def iso_port(self, name: str) -> int:
        service = name.split("#")[0]
        env = self.envs.get(name, self.env)
        return int(env[f"PAYLAB_{service.upper()}_ISO_PORT"])

    def start(self, *names: str, overrides: dict[str, dict[str, str]] | None = None) -> None:
        """Start ``names`` (``service`` or ``service#n``) together; return once each serves
        HTTP and its HSM link (if any) is up."""
        for name in names:
            assert name not in self.procs or self.procs[name].poll() is not None, name
            env = {**self.env, **(overrides or {}).get(name, {})}
            self.envs[name] = env
            log = open(self.data_dir / f"{name.replace('#', '-')}.log", "ab")  # noqa: SIM115
            self.procs[name] = subprocess.Popen(
                [*PAYLAB, name.split("#")[0]], env=env, cwd=self.workdir, stdout=log, stderr=log
            )
            log.close()
        for name in names:
            self.wait_ready(name)

    def run_in_thread(self, *names: str) -> ThreadedNetwork:
        """Start ``names`` in this process (see ThreadedNetwork), on the lab's ports."""
        threaded = ThreadedNetwork(self.settings(), names)
        self.threads.append(threaded)
        threaded.start()
        return threaded

    def wait_ready(self, name: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        proc = self.procs[name]
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise AssertionError(f"{name} exited with {proc.returncode}: {self.log_tail(name)}")
            try:
                body = httpx.get(self.http(name) + "/health", timeout=1).json()
                deps = body.get("dependencies", {})
                if deps.get("hsm", {"ok": True})["ok"]:
                    return
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.05)
        raise AssertionError(f"{name} not ready within {timeout} s: {self.log_tail(name)}")

    def log_tail(self, name: str) -> str:
        path = self.data_dir / f"{name.replace('#', '-')}.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def stop(self, name: str) -> None:
        """SIGTERM: drain and stop."""
        proc = self.procs.pop(name)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0, self.log_tail(name)

    def kill(self, name: str) -> None:
        """SIGKILL: no drain, no clean close."""
        proc = self.procs.pop(name)
        proc.kill()
        proc.wait(timeout=20)

    def freeze(self, name: str) -> None:
        """SIGSTOP: the process holds its sockets and answers nothing (a hung host)."""
        self.procs[name].send_signal(signal.SIGSTOP)

    def thaw(self, name: str) -> None:
        """SIGCONT: the frozen process goes on where it stopped."""
        self.procs[name].send_signal(signal.SIGCONT)

    def close(self) -> None:
        for name in list(self.procs):
            proc = self.procs.pop(name)
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)  # a frozen process dies on SIGKILL too
                proc.kill()
                proc.wait(timeout=20)
        for threaded in self.threads:
            threaded.stop()

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run one ``paylab`` command to completion (a wide console: no folded cells)."""
        return subprocess.run(
            [*PAYLAB, *args],
            env={**self.env, "COLUMNS": "200"},
            cwd=self.workdir,
            capture_output=True,
            text=True,
            timeout=60,
        )

    def get(self, name: str, path: str) -> Any:
        r = httpx.get(self.http(name) + path, timeout=10, headers=admin_headers())
        assert r.status_code == 200, r.text
        return r.json()

    def metrics(self, name: str) -> str:
        return httpx.get(self.http(name) + "/metrics", timeout=10).text


def new_lab(labs: list[Lab], workdir: Path, **settings: Any) -> Lab:
    lab = Lab(workdir, **settings)
    labs.append(lab)
    return lab


def wait_until(
    probe: Callable[[], T], ok: Callable[[T], bool], timeout: float, step: float = 0.05
) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if ok(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s; last {value!r}")
        time.sleep(step)


# --------------------------------------------------------------------------------------------
# Billing's database: the demo data plus as many bills as a test needs


def bill_numbers(prefix: str, n: int) -> list[str]:
    return [f"{prefix}-{i:05d}" for i in range(1, n + 1)]


def prepare_billing_db(url: str, bills: Sequence[str], pan_hash_key: str) -> None:
    """Create billing's schema, seed the demo data, and add ``bills`` (open, BILL_AMOUNT).

    Billing's own start-up seeds only an empty database, so it keeps what is made here.
    """
    upgrade(url, "billing:migrations")
    engine = make_engine(url)
    try:
        sessions = session_factory(engine)
        pvk = KEYS.keys["PVK"].clear
        BillingStore(sessions).seed_demo_data(
            PanHasher(pan_hash_key.encode()), lambda pan, pvki, pin: crypto.pvv(pvk, pan, pvki, pin)
        )
        now = datetime.now(UTC)
        with transaction(sessions, write=True) as s:
            customer = s.scalar(select(Customer.id).order_by(Customer.id).limit(1))
            if bills:
                s.execute(
                    insert(Bill),
                    [
                        {
                            "bill_number": b,
                            "customer_id": customer,
                            "biller": "PLN",
                            "amount_due": BILL_AMOUNT,
                            "currency": "360",
                            "status": BILL_OPEN,
                            "created_at": now,
                        }
                        for b in bills
                    ],
                )
    finally:
        engine.dispose()


@dataclass(frozen=True)
class PostingRow:
    id: int
    key: str
    terminal_id: str
    stan: str
    bill_number: str
    source: str
    status: str


def billing_postings(url: str) -> list[PostingRow]:
    """Every posting in billing's database, in posting order."""
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                select(
                    Posting.id,
                    Posting.idempotency_key,
                    Posting.terminal_id,
                    Posting.stan,
                    Posting.bill_number,
                    Posting.source,
                    Posting.status,
                ).order_by(Posting.id)
            ).all()
    finally:
        engine.dispose()
    return [PostingRow(*row) for row in rows]
