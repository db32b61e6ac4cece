"""Store-and-forward benchmark: enqueue rate and drain rate (prints figures; not a test).

    python -m loadtests.bench_saf [--entries 5000] [--terminals 64] [--postgres URL]

* enqueue: ``SafStore.enqueue`` one entry per transaction, each committed before the next
  (the commit-before-answer guarantee), from one thread: entries per second;
* drain: a gateway (with its HSM) whose queue holds ``--entries`` advices from
  ``--terminals`` terminals, forwarding to an instant billing stand-in that answers every
  advice 00: entries delivered per second, from billing reachable to an empty queue.

Run on SQLite files in a temporary directory, and on PostgreSQL when ``--postgres`` is
given (its ``saf_entries`` and ``journal`` tables are emptied first).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

import trio
from sqlalchemy import text

from gateway.saf_rules import KIND_ADVICE, NewEntry
from gateway.saf_store import SafStore
from gateway.service import GatewayService
from gateway.standin import advice_of
from shared.iso import codec
from shared.iso.framing import FrameParser, encode_frame
from shared.iso.messages import make_response
from shared.lab.network import Network
from shared.ops.settings import Settings
from shared.pan import PanHasher, mask_pan
from shared.store.db import make_engine, session_factory, upgrade
from shared.store.vault import Vault
from tests.support import DEMO_PAN, DEMO_PIN, lab_settings, terminal_builder

HASHER = PanHasher(b"bench-pan-hash-key")


def entries(n: int, terminals: int) -> list[NewEntry]:
    """``n`` advices spread over ``terminals`` terminals."""
    builders = [terminal_builder(f"BENCH{i:03d}") for i in range(terminals)]
    out = []
    for i in range(n):
        pay = builders[i % terminals].payment(f"BENCH-{i:06d}", 1000, DEMO_PAN, DEMO_PIN)
        advice = advice_of(pay)
        out.append(
            NewEntry(
                idempotency_key=f"{advice['32']}|{advice['41']}|{advice['11']}|{advice['7']}",
                kind=KIND_ADVICE,
                mti="0220",
                message=codec.encode(advice),
                terminal_id=advice["41"],
                acquirer_id=advice["32"],
                stan=advice["11"],
                rrn=advice["37"],
                bill_number=advice["48"],
                amount=1000,
                currency=advice["49"],
                pan_masked=mask_pan(DEMO_PAN),
                pan_hash=HASHER(DEMO_PAN),
                max_attempts=20,
            )
        )
    return out


def bench_enqueue(url: str, batch: list[NewEntry]) -> float:
    engine = make_engine(url)
    upgrade(engine, "gateway:migrations")
    store = SafStore(
        session_factory(engine), Vault.from_secret("bench-data-key-0123"), max_size=10**9
    )
    start = time.perf_counter()
    for entry in batch:
        store.enqueue(entry, now=datetime.now(UTC))
    elapsed = time.perf_counter() - start
    engine.dispose()
    return len(batch) / elapsed


async def instant_billing(nursery: trio.Nursery) -> tuple[int, list[int]]:
    """Answers every request 00 at once; counts the advices it saw."""
    seen = [0]

    async def serve(stream: trio.SocketStream) -> None:
        parser = FrameParser()
        async for data in stream:
            out = bytearray()
            for frame in parser.frames(data):
                msg = codec.decode(frame)
                if msg["t"] in ("0220", "0221"):
                    seen[0] += 1
                out += encode_frame(codec.encode(make_response(msg, "00")))
            await stream.send_all(bytes(out))

    listeners = await nursery.start(partial(trio.serve_tcp, serve, 0, host="127.0.0.1"))
    return int(listeners[0].socket.getsockname()[1]), seen


async def bench_drain(settings: Settings, batch: list[NewEntry]) -> float:
    async with trio.open_nursery() as nursery:
        port, seen = await instant_billing(nursery)
        # Fill the queue before the gateway starts, so the drain is measured alone.
        engine = make_engine(settings.db_url("gateway"))
        upgrade(engine, "gateway:migrations")
        store = SafStore(
            session_factory(engine),
            Vault.from_secrets(settings.data_keys(), settings.data_key_id),
            max_size=10**9,
        )
        for entry in batch:
            store.enqueue(entry, now=datetime.now(UTC))
        engine.dispose()
        net = Network(
            settings.model_copy(update={"billing_address": f"127.0.0.1:{port}"}),
            names=("hsm", "gateway"),
        )
        start = time.perf_counter()
        await nursery.start(net.run)
        gateway = net.services["gateway"]
        assert isinstance(gateway, GatewayService) and gateway.saf is not None
        saf = gateway.saf
        while await trio.to_thread.run_sync(saf.depth):
            await trio.sleep(0.2)
        elapsed = time.perf_counter() - start
        await net.stop()
        nursery.cancel_scope.cancel()
    assert seen[0] >= len(batch)
    return len(batch) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=5000)
    parser.add_argument("--terminals", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=64, help="PAYLAB_SAF_CONCURRENCY")
    parser.add_argument("--postgres", help="also run on this SQLAlchemy PostgreSQL URL")
    args = parser.parse_args()
    batch = entries(args.entries, args.terminals)
    targets = [("sqlite", None)] + ([("postgresql", args.postgres)] if args.postgres else [])
    for name, pg in targets:
        with tempfile.TemporaryDirectory() as tmp:
            data = Path(tmp)
            url = pg or f"sqlite:///{data / 'enqueue.db'}"
            if pg:
                _empty(pg)
            rate = bench_enqueue(url, batch)
            print(
                f"{name:<10} enqueue  {rate:8.0f} entries/s"
                f"  ({len(batch)} entries, one commit each)"
            )
            if pg:
                _empty(pg)
            settings = lab_settings(
                data, log_level="error", gateway_db_url=pg, saf_concurrency=args.concurrency
            )
            drain = trio.run(bench_drain, settings, batch)
            print(
                f"{name:<10} drain    {drain:8.0f} entries/s"
                f"  ({args.terminals} terminals, instant billing)"
            )


def _empty(url: str) -> None:
    engine = make_engine(url)
    upgrade(engine, "gateway:migrations")
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM saf_entries"))
        conn.execute(text("DELETE FROM journal"))
    engine.dispose()


if __name__ == "__main__":
    main()
