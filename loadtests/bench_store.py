"""Billing store micro-benchmark: CPU per payment of ``BillingStore.pay_many`` (prints figures).

    python -m loadtests.bench_store [--payments 2048] [--batches 1,4,16,64] [--rounds 3]
                                    [--postgres URL]

For each batch size, ``--payments`` fresh payments (each of its own open bill, all
approved and posted) go through ``pay_many`` in batches of that size, on a SQLite file in a
temporary directory (``synchronous=FULL``: one fsync per batch), and the read half of a
payment (``replay_and_cards``) likewise. Printed: CPU microseconds per payment
(``time.process_time``, the process's user+system time, so fsync waits do not count) and
wall microseconds per payment, the median of ``--rounds`` rounds. Also printed, as the
floor: the same inserts and updates made with ``sqlite3`` directly.

With ``--postgres`` (a SQLAlchemy URL of a PostgreSQL database) the store runs there
instead, in a schema of its own that is created for the run and dropped afterwards (no
other table is touched); the floor is then not printed.
"""

from __future__ import annotations

import argparse
import hashlib
import sqlite3
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import Engine, make_url, text

from billing.posting import PaymentRequest
from billing.store import BillingStore
from shared.store.db import make_engine, session_factory, upgrade

PAN = "4000001234567899"


def _hash(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def _requests(round_: int, count: int) -> list[PaymentRequest]:
    return [
        PaymentRequest(
            idempotency_key=f"acq|term0001|{n:06d}|{round_:010d}",
            request_digest=_hash(f"{round_}|{n}"),
            bill_number=f"B{round_:03d}-{n:06d}",
            amount=10_000,
            currency="360",
            rrn=f"{n:012d}",
            stan=f"{n % 1_000_000:06d}",
            terminal_id="TERM0001",
            acquirer_id="12345",
            pan_hash=_hash(PAN),
            pan_masked="400000******7899",
            mti="0200",
        )
        for n in range(count)
    ]


def _seed(engine: Engine, round_: int, count: int) -> None:
    now = datetime.now(UTC)
    with engine.begin() as conn:
        if round_ == 0:
            conn.execute(
                text("INSERT INTO customers (id, name, created_at) VALUES (1, 'Bench', :now)"),
                {"now": now},
            )
            conn.execute(
                text(
                    "INSERT INTO cards (pan_hash, pan_masked, customer_id, pvki, pvv, status)"
                    " VALUES (:h, '400000******7899', 1, '1', '1234', 'active')"
                ),
                {"h": _hash(PAN)},
            )
        conn.execute(
            text(
                "INSERT INTO bills (bill_number, customer_id, biller, amount_due, currency,"
                " status, created_at) VALUES (:n, 1, 'PLN', 10000, '360', 'open', :now)"
            ),
            [{"n": r.bill_number, "now": now} for r in _requests(round_, count)],
        )


def _timed(run: Callable[[], None], count: int) -> tuple[float, float]:
    cpu, wall = time.process_time(), time.perf_counter()
    run()
    return (
        (time.process_time() - cpu) / count * 1e6,
        (time.perf_counter() - wall) / count * 1e6,
    )


def bench_store(url: str, batches: list[int], payments: int, rounds: int) -> None:
    engine = make_engine(url)
    upgrade(engine, "billing:migrations")
    store = BillingStore(session_factory(engine))
    round_ = 0
    print(f"{'batch':>6} {'pay cpu us':>11} {'pay wall us':>12} {'read cpu us':>12}")
    try:
        for size in batches:
            pay_cpu, pay_wall, read_cpu = [], [], []
            for _ in range(rounds):
                _seed(engine, round_, payments)
                requests = _requests(round_, payments)
                round_ += 1
                chunks = [requests[i : i + size] for i in range(0, payments, size)]
                items = [
                    [(r.idempotency_key, r.request_digest, r.pan_hash) for r in chunk]
                    for chunk in chunks
                ]

                def reads(items: list[list[tuple[str, str, str]]] = items) -> None:
                    for chunk in items:
                        store.replay_and_cards(chunk)

                def pays(chunks: list[list[PaymentRequest]] = chunks) -> None:
                    for chunk in chunks:
                        results = store.pay_many(chunk)
                        assert all(r.code == "00" for r in results), results[0]

                read_cpu.append(_timed(reads, payments)[0])
                cpu, wall = _timed(pays, payments)
                pay_cpu.append(cpu)
                pay_wall.append(wall)
            print(
                f"{size:>6} {statistics.median(pay_cpu):>11.1f} "
                f"{statistics.median(pay_wall):>12.1f} {statistics.median(read_cpu):>12.1f}"
            )
    finally:
        close = getattr(store, "close", None)  # the store's own connections, if it keeps any
        if close is not None:
            close()
        engine.dispose()


def bench_floor(path: Path, batches: list[int], payments: int) -> None:
    """The same rows through ``sqlite3`` alone: the floor of the store's CPU per payment."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("CREATE TABLE p (id INTEGER PRIMARY KEY, k TEXT UNIQUE, b TEXT, a INTEGER)")
    conn.execute("CREATE TABLE r (k TEXT PRIMARY KEY, j TEXT)")
    conn.execute("CREATE TABLE b (n TEXT PRIMARY KEY, s TEXT)")
    print(f"{'batch':>6} {'sqlite3 cpu us':>15}")
    for round_, size in enumerate(batches):
        keys = [f"{round_}-{n}" for n in range(payments)]
        conn.executemany("INSERT INTO b VALUES (?, 'open')", [(k,) for k in keys])

        def run(keys: list[str] = keys, size: int = size) -> None:
            for i in range(0, len(keys), size):
                chunk = keys[i : i + size]
                conn.execute("BEGIN IMMEDIATE")
                for k in chunk:
                    conn.execute("INSERT INTO p (k, b, a) VALUES (?, ?, 10000)", (k, k))
                conn.executemany("UPDATE b SET s = 'paid' WHERE n = ?", [(k,) for k in chunk])
                conn.executemany("INSERT INTO r VALUES (?, '{}')", [(k,) for k in chunk])
                conn.execute("COMMIT")

        print(f"{size:>6} {_timed(run, payments)[0]:>15.1f}")
    conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--payments", type=int, default=2048)
    parser.add_argument("--batches", default="1,4,16,64")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--postgres", help="a PostgreSQL URL instead of a SQLite file")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    if args.postgres:
        with postgres_schema(args.postgres) as url:
            bench_store(url, batches, args.payments, args.rounds)
        return
    with tempfile.TemporaryDirectory() as tmp:
        bench_store(f"sqlite:///{tmp}/billing.db", batches, args.payments, args.rounds)
        bench_floor(Path(tmp) / "floor.db", batches, args.payments)


@contextmanager
def postgres_schema(url: str) -> Iterator[str]:
    """``url`` narrowed to a new schema of this run's own, dropped at the end."""
    schema = f"bench_store_{uuid.uuid4().hex[:12]}"
    admin = make_engine(url)
    try:
        with admin.begin() as conn:
            conn.execute(text(f'CREATE SCHEMA "{schema}"'))
        try:
            narrowed = make_url(url).update_query_dict({"options": f"-csearch_path={schema}"})
            yield narrowed.render_as_string(hide_password=False)
        finally:
            with admin.begin() as conn:
                conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
    finally:
        admin.dispose()


if __name__ == "__main__":
    main()
