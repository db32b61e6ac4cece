"""gateway.saf_store.SafStore: the store-and-forward queue table.

Every test runs against a SQLite file in ``tmp_path`` and again against PostgreSQL when
``PAYLAB_TEST_POSTGRES_URL`` is set; each PostgreSQL test gets a schema of its own (created
for the test, dropped afterwards), so it neither sees nor disturbs other tests' tables.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from sqlalchemy import Engine, func, inspect, select, update

from gateway.journal import Journal, journal_row
from gateway.models import Base, JournalEntry, SafEntry
from gateway.saf_rules import (
    KIND_ADVICE,
    KIND_REVERSAL,
    PRIORITY_ADVICE,
    PRIORITY_REVERSAL,
    Claimed,
    NewEntry,
    Outcome,
    QueueFull,
    SafState,
    SafTransitionError,
    SafView,
)
from gateway.saf_store import SafStore
from shared.iso import codec
from shared.iso.messages import build_field90, idempotency_key
from shared.pan import PanHasher, mask_pan
from shared.store.db import make_engine, session_factory, transaction, upgrade
from shared.store.vault import Vault
from tests.support import DATABASE_BACKENDS, empty_database

MIGRATIONS = "gateway:migrations"
VERSION_TABLE = "alembic_version_gateway"

PAN = "4761739001010010"
OTHER_PAN = "4761739001010028"
PAN_HASH = PanHasher(b"test pan hashing key")
VAULT = Vault({"k1": bytes(range(32))}, "k1")
T0 = datetime(2026, 11, 29, 10, 0, tzinfo=UTC)
ACQ = "12345"

DONE_00 = Outcome(SafState.DONE, None, "00", None)


# --------------------------------------------------------------------------------------------
# Messages and entries


def payment_msg(
    terminal: str = "TERM0001",
    stan: str = "000001",
    *,
    amount: int = 150_000,
    pan: str = PAN,
    mti: str = "0220",
    bill: str = "PLN-0001",
) -> dict[str, str]:
    return {
        "t": mti,
        "2": pan,
        "3": "500000",
        "4": f"{amount:012d}",
        "7": "1129100000",
        "11": stan,
        "12": "100000",
        "13": "1129",
        "32": ACQ,
        "37": f"6333{stan}00",
        "41": terminal,
        "42": "PAYLAB-MERCH-01",
        "48": bill,
        "49": "360",
    }


def advice(
    terminal: str = "TERM0001",
    stan: str = "000001",
    *,
    amount: int = 150_000,
    pan: str = PAN,
    max_attempts: int = 5,
) -> NewEntry:
    msg = payment_msg(terminal, stan, amount=amount, pan=pan)
    return NewEntry(
        idempotency_key=idempotency_key(msg),
        kind=KIND_ADVICE,
        mti="0220",
        message=codec.encode(msg),
        terminal_id=terminal,
        acquirer_id=ACQ,
        stan=stan,
        rrn=msg["37"],
        bill_number=msg["48"],
        amount=amount,
        currency="360",
        pan_masked=mask_pan(pan),
        pan_hash=PAN_HASH(pan),
        max_attempts=max_attempts,
    )


def reversal(
    terminal: str = "TERM0001",
    stan: str = "000901",
    *,
    original_stan: str = "000001",
    amount: int = 150_000,
    with_field90: bool = True,
) -> NewEntry:
    original = payment_msg(terminal, original_stan, amount=amount, mti="0200")
    msg = payment_msg(terminal, stan, amount=amount, mti="0420")
    del msg["2"]  # a reversal needs no PAN
    if with_field90:
        msg["90"] = build_field90(original)
    return NewEntry(
        idempotency_key=idempotency_key(msg),
        kind=KIND_REVERSAL,
        mti="0420",
        message=codec.encode(msg),
        terminal_id=terminal,
        acquirer_id=ACQ,
        stan=stan,
        rrn=msg["37"],
        bill_number=msg["48"],
        amount=amount,
        currency="360",
        pan_masked=None,
        pan_hash=None,
        max_attempts=10,
    )


# --------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(params=DATABASE_BACKENDS)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A URL of an empty database: a SQLite file, or a fresh PostgreSQL schema."""
    with empty_database(request.param, tmp_path, "gateway") as url:
        yield url


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    engine = make_engine(db_url)
    upgrade(engine, MIGRATIONS)
    yield engine
    engine.dispose()


@pytest.fixture
def store(engine: Engine) -> SafStore:
    return SafStore(session_factory(engine), VAULT)


def count_rows(engine: Engine, model: type[Base]) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(model)).scalar_one())


def claim_one(store: SafStore, owner: str = "gw", *, now: datetime = T0) -> Claimed:
    claimed = store.claim(owner, now=now, limit=10, lease=30)
    assert len(claimed) == 1, claimed
    return claimed[0]


# --------------------------------------------------------------------------------------------
# Schema


def test_migration_matches_models(engine: Engine) -> None:
    assert {"journal", "saf_entries", VERSION_TABLE} <= set(inspect(engine).get_table_names())
    with engine.connect() as conn:
        context = MigrationContext.configure(
            conn, opts={"compare_type": True, "version_table": VERSION_TABLE}
        )
        diffs = compare_metadata(context, Base.metadata)
    # Only this table's differences: the journal's are not this module's business.
    assert [d for d in diffs if "saf_entries" in repr(d)] == []
    indexes = {ix["name"] for ix in inspect(engine).get_indexes("saf_entries")}
    assert {
        "ix_saf_entries_state",
        "ix_saf_entries_terminal_id",
        "ix_saf_entries_rrn",
        "ix_saf_entries_pan_hash",
        "ix_saf_entries_original_key",
    } <= indexes


def test_downgrade_and_upgrade_again(engine: Engine) -> None:
    config = Config()
    config.set_main_option("script_location", MIGRATIONS)
    config.set_main_option("path_separator", "os")
    with engine.begin() as conn:
        config.attributes["connection"] = conn
        command.downgrade(config, "g0001")
    tables = set(inspect(engine).get_table_names())
    assert "saf_entries" not in tables and "journal" in tables
    upgrade(engine, MIGRATIONS)
    assert "saf_entries" in inspect(engine).get_table_names()


# --------------------------------------------------------------------------------------------
# Enqueue


def test_enqueue_stores_a_queued_entry(store: SafStore) -> None:
    entry = advice()
    view, created = store.enqueue(entry, now=T0)
    assert created
    assert view.state is SafState.QUEUED
    assert (view.kind, view.priority, view.mti) == (KIND_ADVICE, PRIORITY_ADVICE, "0220")
    assert (view.attempts, view.max_attempts) == (0, 5)
    assert view.next_attempt_at == T0 == view.created_at == view.updated_at
    assert view.idempotency_key == entry.idempotency_key
    assert view.pan_masked == "476173******0010"
    assert view.original_key is None
    assert store.get(view.id) == view
    assert store.get_by_key(entry.idempotency_key) == view
    assert store.get_by_key("no|such|key|0") is None
    assert store.depth() == 1


def test_enqueue_is_idempotent(store: SafStore, engine: Engine) -> None:
    first, created = store.enqueue(advice(), now=T0)
    row = journal_row(
        payment_msg(mti="0200"),
        "00",
        received_at=T0,
        duration_ms=1.0,
        pan_hash=PAN_HASH,
    )
    again, created_again = store.enqueue(
        advice(), now=T0 + timedelta(seconds=5), journal_rows=[row]
    )
    assert created and not created_again
    assert again == first
    assert count_rows(engine, SafEntry) == 1
    assert count_rows(engine, JournalEntry) == 0  # nothing written the second time


def test_concurrent_enqueue_of_one_key_stores_one_entry(db_url: str, engine: Engine) -> None:
    results: list[bool] = []
    barrier = threading.Barrier(4)

    def enqueue() -> None:
        own = make_engine(db_url)
        try:
            st = SafStore(session_factory(own), VAULT)
            barrier.wait()
            results.append(st.enqueue(advice(), now=T0)[1])
        finally:
            own.dispose()

    threads = [threading.Thread(target=enqueue) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [False, False, False, True]
    assert count_rows(engine, SafEntry) == 1


def test_journal_rows_are_committed_with_the_entry(store: SafStore, engine: Engine) -> None:
    msg = payment_msg(mti="0200")
    row = journal_row(msg, "00", received_at=T0, duration_ms=1.5, pan_hash=PAN_HASH)
    store.enqueue(advice(), now=T0, journal_rows=[row])
    found = Journal(session_factory(engine)).find(rrn=msg["37"])
    assert len(found) == 1
    assert (found[0].status, found[0].mti, found[0].pan_masked) == (
        "approved",
        "0200",
        "476173******0010",
    )


def test_queue_full_writes_nothing(engine: Engine) -> None:
    store = SafStore(session_factory(engine), VAULT, max_size=3)
    for stan in ("000001", "000002", "000003"):
        store.enqueue(advice(f"TERM{stan[-4:]}", stan), now=T0)
    row = journal_row(
        payment_msg(stan="000004", mti="0200"),
        "00",
        received_at=T0,
        duration_ms=1.0,
        pan_hash=PAN_HASH,
    )
    with pytest.raises(QueueFull):
        store.enqueue(advice("TERM0004", "000004"), now=T0, journal_rows=[row])
    assert count_rows(engine, SafEntry) == 3
    assert count_rows(engine, JournalEntry) == 0
    # A key already queued is still answered (it takes no room).
    assert store.enqueue(advice("TERM0001", "000001"), now=T0)[1] is False
    # Delivering one makes room again.
    claimed = store.claim("gw", now=T0, limit=1, lease=30)[0]
    assert store.finish(claimed.id, "gw", DONE_00, now=T0)
    assert store.enqueue(advice("TERM0004", "000004"), now=T0)[1] is True


def test_reversal_original_key_comes_from_field_90(store: SafStore) -> None:
    view, _ = store.enqueue(reversal(original_stan="000001"), now=T0)
    assert view.kind == KIND_REVERSAL and view.priority == PRIORITY_REVERSAL
    assert view.original_key == idempotency_key(payment_msg(stan="000001"))
    explicit = replace(reversal(stan="000902", with_field90=False), original_key="a|b|c|d")
    assert store.enqueue(explicit, now=T0)[0].original_key == "a|b|c|d"


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param(lambda e: replace(e, message=b"not iso"), id="undecodable"),
        pytest.param(
            lambda e: replace(e, message=codec.encode({**payment_msg(), "52": "0123456789ABCDEF"})),
            id="pin-block",
        ),
        pytest.param(lambda e: replace(e, message=codec.encode(payment_msg(mti="0221"))), id="mti"),
        pytest.param(lambda e: replace(e, idempotency_key="other|key"), id="key"),
    ],
)
def test_enqueue_refuses_inconsistent_messages(
    store: SafStore, bad: Callable[[NewEntry], NewEntry]
) -> None:
    with pytest.raises(ValueError):
        store.enqueue(bad(advice()), now=T0)
    assert store.depth() == 0


def test_enqueue_refuses_reversal_without_original(store: SafStore) -> None:
    with pytest.raises(ValueError, match="field 90"):
        store.enqueue(reversal(with_field90=False), now=T0)


def test_enqueue_refuses_naive_time(store: SafStore) -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        store.enqueue(advice(), now=datetime(2026, 11, 29, 10, 0))


@pytest.mark.parametrize(
    "change",
    [
        {"kind": "refund"},
        {"mti": "0420"},
        {"idempotency_key": ""},
        {"idempotency_key": "x" * 65},
        {"terminal_id": "T" * 17},
        {"pan_masked": PAN},
        {"amount": -1},
        {"max_attempts": 0},
        {"message": b""},
    ],
)
def test_new_entry_validation(change: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        replace(advice(), **change)  # type: ignore[arg-type]


def test_times_are_stored_in_utc(store: SafStore) -> None:
    local = T0.astimezone(timezone(timedelta(hours=7)))
    view, _ = store.enqueue(advice(), now=local)
    assert view.created_at == T0 and view.created_at.tzinfo is UTC
    # Due at once whatever zone "now" is given in.
    assert len(store.claim("gw", now=local, limit=1, lease=1)) == 1


# --------------------------------------------------------------------------------------------
# Claim


def test_claim_order_priority_then_fifo(store: SafStore) -> None:
    ids = [store.enqueue(advice(f"TERM000{i}", f"00000{i}"), now=T0)[0].id for i in (1, 2, 3)]
    rev = store.enqueue(reversal("TERM0009", "000909"), now=T0 + timedelta(seconds=1))[0].id
    claimed = store.claim("gw", now=T0 + timedelta(seconds=2), limit=10, lease=30)
    assert [c.id for c in claimed] == [rev, *ids]
    first = claimed[0]
    assert (first.kind, first.mti_to_send, first.attempts) == (KIND_REVERSAL, "0420", 1)
    assert codec.decode(first.message)["t"] == "0420"
    view = store.get(first.id)
    assert view is not None and view.state is SafState.IN_FLIGHT
    assert (view.lease_owner, view.lease_until) == ("gw", T0 + timedelta(seconds=32))
    assert store.claim("gw", now=T0 + timedelta(seconds=2), limit=10, lease=30) == []


def test_claim_respects_limit_and_due_time(store: SafStore) -> None:
    for i in range(1, 6):
        store.enqueue(advice(f"TERM000{i}", f"00000{i}"), now=T0)
    assert store.claim("gw", now=T0 - timedelta(seconds=1), limit=10, lease=30) == []
    assert len(store.claim("gw", now=T0, limit=2, lease=30)) == 2
    assert len(store.claim("gw", now=T0, limit=10, lease=30)) == 3


def test_one_terminal_is_forwarded_one_entry_at_a_time_in_order(store: SafStore) -> None:
    a1 = store.enqueue(advice("TERMAAAA", "000001"), now=T0)[0].id
    a2 = store.enqueue(advice("TERMAAAA", "000002"), now=T0)[0].id
    b1 = store.enqueue(advice("TERMBBBB", "000003"), now=T0)[0].id
    ar = store.enqueue(reversal("TERMAAAA", "000004", original_stan="000009"), now=T0)[0].id

    # The terminal's reversal goes first; the other terminal proceeds in parallel.
    assert [c.id for c in store.claim("gw", now=T0, limit=10, lease=30)] == [ar, b1]
    # While it is in flight, nothing else of that terminal goes.
    assert store.claim("gw", now=T0, limit=10, lease=30) == []
    assert store.finish(ar, "gw", DONE_00, now=T0)
    assert store.finish(b1, "gw", DONE_00, now=T0)
    head = claim_one(store)
    assert head.id == a1
    # The head goes back to the queue for later: the entry behind it waits too.
    later = T0 + timedelta(seconds=60)
    retry = Outcome(SafState.QUEUED, later, None, "timeout")
    assert store.finish(a1, "gw", retry, now=T0)
    assert store.claim("gw", now=T0 + timedelta(seconds=30), limit=10, lease=30) == []
    again = claim_one(store, now=later)
    assert (again.id, again.attempts, again.mti_to_send) == (a1, 2, "0221")
    assert store.finish(a1, "gw", DONE_00, now=later)
    assert claim_one(store, now=later).id == a2


def test_a_reversal_queued_while_an_advice_is_in_flight_waits(store: SafStore) -> None:
    adv = store.enqueue(advice("TERMAAAA", "000001"), now=T0)[0].id
    assert claim_one(store).id == adv
    rev = store.enqueue(reversal("TERMAAAA", "000002"), now=T0)[0].id
    assert store.claim("gw", now=T0, limit=10, lease=30) == []
    assert store.finish(adv, "gw", DONE_00, now=T0)
    assert claim_one(store).id == rev


def test_expired_lease_is_taken_over(store: SafStore) -> None:
    entry_id = store.enqueue(advice(), now=T0)[0].id
    first = claim_one(store, "gw-a")
    assert first.mti_to_send == "0220"
    assert store.claim("gw-b", now=T0 + timedelta(seconds=29), limit=10, lease=30) == []
    taken = claim_one(store, "gw-b", now=T0 + timedelta(seconds=31))
    assert (taken.id, taken.attempts, taken.mti_to_send) == (entry_id, 2, "0221")
    # The first owner's late answer is refused; the new owner's applies.
    assert not store.finish(entry_id, "gw-a", DONE_00, now=T0 + timedelta(seconds=32))
    assert store.finish(entry_id, "gw-b", DONE_00, now=T0 + timedelta(seconds=33))


def test_expired_head_blocks_the_rest_of_its_terminal(store: SafStore) -> None:
    first = store.enqueue(advice("TERMAAAA", "000001"), now=T0)[0].id
    store.enqueue(advice("TERMAAAA", "000002"), now=T0)
    claim_one(store, "gw-a")
    # After expiry only the head is taken over, never the one behind it as well.
    taken = store.claim("gw-b", now=T0 + timedelta(minutes=5), limit=10, lease=30)
    assert [c.id for c in taken] == [first]


def test_undecryptable_entry_goes_dead_and_does_not_block(engine: Engine) -> None:
    sessions = session_factory(engine)
    old = SafStore(sessions, Vault({"old": bytes(32)}, "old"))
    bad = old.enqueue(advice("TERM0001", "000001"), now=T0)[0].id
    store = SafStore(sessions, VAULT)
    good = store.enqueue(advice("TERM0002", "000002"), now=T0)[0].id
    assert [c.id for c in store.claim("gw", now=T0, limit=10, lease=30)] == [good]
    view = store.get(bad)
    assert view is not None and view.state is SafState.DEAD
    assert view.last_error is not None and "unknown data key id 'old'" in view.last_error


def test_moved_payload_does_not_open(store: SafStore, engine: Engine) -> None:
    one = store.enqueue(advice("TERM0001", "000001"), now=T0)[0].id
    two = store.enqueue(advice("TERM0002", "000002"), now=T0)[0].id
    with transaction(session_factory(engine), write=True) as s:
        payload = s.scalar(select(SafEntry.payload).where(SafEntry.id == one))
        s.execute(update(SafEntry).where(SafEntry.id == two).values(payload=payload))
    assert [c.id for c in store.claim("gw", now=T0, limit=10, lease=30)] == [one]
    view = store.get(two)
    assert view is not None and view.state is SafState.DEAD


def test_claim_arguments(store: SafStore) -> None:
    with pytest.raises(ValueError):
        store.claim("gw", now=T0, limit=0, lease=1.0)
    with pytest.raises(ValueError):
        store.claim("gw", now=T0, limit=1, lease=0.0)
    with pytest.raises(ValueError):
        store.claim("", now=T0, limit=1, lease=1)


# --------------------------------------------------------------------------------------------
# Finish, release, late responses


def test_finish_checks_the_owner(store: SafStore, engine: Engine) -> None:
    entry_id = store.enqueue(advice(), now=T0)[0].id
    claim_one(store, "gw-a")
    row = journal_row(payment_msg(), "00", received_at=T0, duration_ms=1.0, pan_hash=PAN_HASH)
    assert not store.finish(entry_id, "gw-b", DONE_00, now=T0, journal_rows=[row])
    view = store.get(entry_id)
    assert view is not None and view.state is SafState.IN_FLIGHT and view.lease_owner == "gw-a"
    assert count_rows(engine, JournalEntry) == 0
    assert store.finish(
        entry_id, "gw-a", DONE_00, now=T0 + timedelta(seconds=1), journal_rows=[row]
    )
    view = store.get(entry_id)
    assert view is not None
    assert (view.state, view.response_code, view.lease_owner, view.lease_until) == (
        SafState.DONE,
        "00",
        None,
        None,
    )
    assert view.done_at == T0 + timedelta(seconds=1)
    assert count_rows(engine, JournalEntry) == 1
    # Finished: a second finish changes nothing.
    assert not store.finish(entry_id, "gw-a", DONE_00, now=T0)
    assert not store.finish(999_999, "gw-a", DONE_00, now=T0)


def test_finish_outcomes(store: SafStore) -> None:
    entry_id = store.enqueue(advice(), now=T0)[0].id
    claim_one(store)
    later = T0 + timedelta(seconds=45)
    assert store.finish(
        entry_id, "gw", Outcome(SafState.QUEUED, later, "91", "transient response 91"), now=T0
    )
    view = store.get(entry_id)
    assert view is not None
    assert (view.state, view.next_attempt_at, view.response_code, view.last_error) == (
        SafState.QUEUED,
        later,
        "91",
        "transient response 91",
    )
    claim_one(store, now=later)
    dead = Outcome(SafState.DEAD, None, None, "x" * 500)
    assert store.finish(entry_id, "gw", dead, now=later)
    view = store.get(entry_id)
    assert view is not None and view.state is SafState.DEAD and view.last_error == "x" * 200
    assert view.done_at is None


def test_finish_refuses_an_impossible_state(store: SafStore) -> None:
    entry_id = store.enqueue(advice(), now=T0)[0].id
    claim_one(store)
    with pytest.raises(SafTransitionError):
        store.finish(entry_id, "gw", Outcome(SafState.IN_FLIGHT, None, None, None), now=T0)


def test_release_owner(store: SafStore) -> None:
    a = store.enqueue(advice("TERM0001", "000001"), now=T0)[0].id
    store.enqueue(advice("TERM0002", "000002"), now=T0)
    claimed = store.claim("gw-a", now=T0, limit=1, lease=300)
    assert [c.id for c in claimed] == [a]
    claim_one(store, "gw-b")
    assert store.release_owner("gw-a", now=T0 + timedelta(seconds=1)) == 1
    view = store.get(a)
    assert view is not None
    assert (view.state, view.lease_owner, view.attempts) == (SafState.QUEUED, None, 1)
    again = claim_one(store, "gw-a", now=T0 + timedelta(seconds=1))
    assert (again.id, again.mti_to_send) == (a, "0221")
    assert store.release_owner("nobody", now=T0) == 0


def test_record_late_response(store: SafStore) -> None:
    adv = store.enqueue(advice(stan="000001"), now=T0)[0]
    rev = store.enqueue(reversal(stan="000902", original_stan="000005"), now=T0)[0]
    seen = store.record_late_response(adv.idempotency_key, "00", now=T0 + timedelta(seconds=9))
    assert seen is not None and seen.id == adv.id and seen.late_response_code == "00"
    assert seen.state is SafState.QUEUED  # a late answer changes no state
    original = idempotency_key(payment_msg(stan="000005"))
    seen = store.record_late_response(original, "96", now=T0)
    assert seen is not None and seen.id == rev.id and seen.late_response_code == "96"
    assert store.record_late_response("no|such|key|0", "00", now=T0) is None


# --------------------------------------------------------------------------------------------
# Operators


def test_cancelled_entry_is_never_claimed(store: SafStore) -> None:
    entry_id = store.enqueue(advice(), now=T0)[0].id
    view = store.cancel(entry_id, now=T0 + timedelta(seconds=1))
    assert view.state is SafState.CANCELLED and view.updated_at == T0 + timedelta(seconds=1)
    assert store.claim("gw", now=T0 + timedelta(days=1), limit=10, lease=30) == []
    assert store.depth() == 0
    with pytest.raises(SafTransitionError):
        store.cancel(entry_id, now=T0)
    with pytest.raises(SafTransitionError):
        store.retry(entry_id, now=T0)


def test_cancel_in_flight_makes_finish_fail(store: SafStore) -> None:
    entry_id = store.enqueue(advice(), now=T0)[0].id
    claim_one(store)
    assert store.cancel(entry_id, now=T0).lease_owner is None
    assert not store.finish(entry_id, "gw", DONE_00, now=T0)
    view = store.get(entry_id)
    assert view is not None and view.state is SafState.CANCELLED


def test_done_cannot_be_cancelled_and_missing_is_lookup_error(store: SafStore) -> None:
    entry_id = store.enqueue(advice(), now=T0)[0].id
    claim_one(store)
    store.finish(entry_id, "gw", DONE_00, now=T0)
    with pytest.raises(SafTransitionError):
        store.cancel(entry_id, now=T0)
    with pytest.raises(LookupError):
        store.cancel(123_456, now=T0)
    with pytest.raises(LookupError):
        store.retry(123_456, now=T0)


def test_dead_entry_retried_is_claimable_again(store: SafStore) -> None:
    entry_id = store.enqueue(advice(max_attempts=1), now=T0)[0].id
    claim_one(store)
    store.finish(entry_id, "gw", Outcome(SafState.DEAD, None, None, "timeout"), now=T0)
    assert store.claim("gw", now=T0 + timedelta(days=1), limit=10, lease=30) == []
    assert store.depth() == 0
    later = T0 + timedelta(hours=2)
    view = store.retry(entry_id, now=later)
    assert (view.state, view.attempts, view.next_attempt_at) == (SafState.QUEUED, 0, later)
    again = claim_one(store, now=later)
    assert (again.id, again.attempts) == (entry_id, 1)
    with pytest.raises(SafTransitionError):  # in flight, not dead
        store.retry(entry_id, now=later)


def test_dead_entry_can_be_cancelled(store: SafStore) -> None:
    entry_id = store.enqueue(advice(), now=T0)[0].id
    claim_one(store)
    store.finish(entry_id, "gw", Outcome(SafState.DEAD, None, None, "timeout"), now=T0)
    assert store.cancel(entry_id, now=T0).state is SafState.CANCELLED


def test_purge(store: SafStore) -> None:
    def entry(n: int) -> int:
        return store.enqueue(advice(f"TERM{n:04d}", f"{n:06d}"), now=T0)[0].id

    old_done, new_done, old_cancelled, old_dead, old_queued = (entry(n) for n in range(1, 6))
    store.claim("gw", now=T0, limit=10, lease=30)
    store.finish(old_done, "gw", DONE_00, now=T0)
    store.finish(new_done, "gw", DONE_00, now=T0 + timedelta(days=2))
    store.cancel(old_cancelled, now=T0)
    store.finish(old_dead, "gw", Outcome(SafState.DEAD, None, None, "timeout"), now=T0)
    store.finish(old_queued, "gw", Outcome(SafState.QUEUED, T0, None, "timeout"), now=T0)
    assert store.purge(older_than=T0 + timedelta(days=1)) == 2
    assert store.get(old_done) is None and store.get(old_cancelled) is None
    for kept in (new_done, old_dead, old_queued):
        assert store.get(kept) is not None
    assert store.purge(older_than=T0 + timedelta(days=1)) == 0


def test_stats(store: SafStore) -> None:
    empty = store.stats(now=T0)
    assert dict(empty.counts) == {s.value: 0 for s in SafState}
    assert (empty.depth, empty.oldest_queued_age_seconds) == (0, None)
    store.enqueue(advice("TERM0001", "000001"), now=T0)
    store.enqueue(advice("TERM0002", "000002"), now=T0 + timedelta(seconds=10))
    store.enqueue(advice("TERM0003", "000003"), now=T0 + timedelta(seconds=20))
    done = store.claim("gw", now=T0 + timedelta(seconds=30), limit=1, lease=30)[0]
    store.finish(done.id, "gw", DONE_00, now=T0 + timedelta(seconds=30))
    store.claim("gw", now=T0 + timedelta(seconds=30), limit=1, lease=30)
    stats = store.stats(now=T0 + timedelta(seconds=60))
    assert dict(stats.counts) == {
        "queued": 1,
        "in_flight": 1,
        "done": 1,
        "dead": 0,
        "cancelled": 0,
    }
    assert stats.depth == 2 == store.depth()
    assert stats.oldest_queued_age_seconds == 50.0
    assert json.loads(json.dumps(stats.as_dict()))["counts"]["done"] == 1


def test_list_and_get(store: SafStore) -> None:
    ids = [store.enqueue(advice(f"TERM{n:04d}", f"{n:06d}"), now=T0)[0].id for n in range(1, 8)]
    store.cancel(ids[2], now=T0)
    assert [v.id for v in store.list()] == ids[::-1]
    page1 = store.list(limit=3)
    page2 = store.list(limit=3, before_id=page1[-1].id)
    page3 = store.list(limit=3, before_id=page2[-1].id)
    assert [v.id for v in page1 + page2 + page3] == ids[::-1]
    assert [v.id for v in store.list(state=SafState.CANCELLED)] == [ids[2]]
    assert [v.id for v in store.list(stan="000004")] == [ids[3]]
    rrn = payment_msg(stan="000005")["37"]
    assert [v.id for v in store.list(rrn=rrn)] == [ids[4]]
    assert store.get(10**9) is None
    with pytest.raises(ValueError):
        store.list(limit=0)


def test_view_as_dict_is_json_ready(store: SafStore) -> None:
    view = store.enqueue(advice(), now=T0)[0]
    data = json.loads(json.dumps(view.as_dict()))
    assert data["state"] == "queued"
    assert data["created_at"] == "2026-11-29T10:00:00+00:00"
    assert "payload" not in data and "key_id" not in data
    assert set(data) == set(SafView.__dataclass_fields__)


def test_standin_amount_since(store: SafStore) -> None:
    since = T0 - timedelta(hours=1)
    store.enqueue(advice("TERM0001", "000001", amount=100), now=T0)
    store.enqueue(advice("TERM0002", "000002", amount=200), now=T0)
    cancelled = store.enqueue(advice("TERM0003", "000003", amount=400), now=T0)[0].id
    store.cancel(cancelled, now=T0)
    store.enqueue(advice("TERM0004", "000004", amount=800), now=since - timedelta(seconds=1))
    store.enqueue(advice("TERM0005", "000005", amount=1600, pan=OTHER_PAN), now=T0)
    store.enqueue(reversal("TERM0001", "000006", amount=3200), now=T0)
    assert store.standin_amount_since(PAN_HASH(PAN), since) == 300
    assert store.standin_amount_since(PAN_HASH(OTHER_PAN), since) == 1600
    assert store.standin_amount_since("0" * 64, since) == 0


# --------------------------------------------------------------------------------------------
# Card data at rest


def test_no_clear_pan_in_the_database_file(tmp_path: Path) -> None:
    path = tmp_path / "pan-check" / "gateway.db"
    engine = make_engine(f"sqlite:///{path}")
    try:
        upgrade(engine, MIGRATIONS)
        store = SafStore(session_factory(engine), VAULT)
        msg = payment_msg(mti="0200")
        rows = [journal_row(msg, "00", received_at=T0, duration_ms=1.0, pan_hash=PAN_HASH)]
        store.enqueue(advice(), now=T0, journal_rows=rows)
        store.enqueue(advice("TERM0002", "000002"), now=T0)
        claimed = store.claim("gw", now=T0, limit=10, lease=30)
        # Positive control: the queued message does carry the PAN.
        assert all(PAN.encode() in c.message for c in claimed)
        store.finish(claimed[0].id, "gw", DONE_00, now=T0)
        files = [p for p in path.parent.iterdir() if p.name.startswith("gateway.db")]
        assert any(p.stat().st_size > 0 for p in files)
        for p in files:  # the database and its WAL
            data = p.read_bytes()
            assert PAN.encode() not in data, p.name
            assert PAN.encode("utf-16-le") not in data, p.name
    finally:
        engine.dispose()
    # And with everything checkpointed into the main file.
    data = path.read_bytes()
    assert PAN.encode() not in data
    assert b"476173******0010" in data


# --------------------------------------------------------------------------------------------
# Concurrency


def test_concurrent_claimers_take_each_entry_exactly_once(db_url: str, engine: Engine) -> None:
    """Two replicas, each with its own engine, drain 500 entries of 50 terminals."""
    store = SafStore(session_factory(engine), VAULT)
    expected: dict[str, list[int]] = {}
    n = 0
    for _ in range(10):
        for term_no in range(50):
            n += 1
            terminal = f"T{term_no:07d}"
            view, _ = store.enqueue(advice(terminal, f"{n:06d}"), now=T0)
            expected.setdefault(terminal, []).append(view.id)
    assert store.depth() == 500

    lock = threading.Lock()
    in_flight: set[str] = set()
    claimed_by: dict[str, list[Claimed]] = {"gw-a": [], "gw-b": []}
    sequence: list[Claimed] = []  # every claim, in the order the claims committed
    failures: list[str] = []

    def replica(owner: str) -> None:
        own = make_engine(db_url)
        try:
            st = SafStore(session_factory(own), VAULT)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                batch = st.claim(owner, now=T0, limit=16, lease=600)
                if not batch:
                    if st.depth() == 0:
                        return
                    time.sleep(0.001)
                    continue
                with lock:
                    for c in batch:
                        if c.terminal_id in in_flight:
                            failures.append(f"{c.terminal_id} twice in flight")
                        in_flight.add(c.terminal_id)
                    claimed_by[owner].extend(batch)
                    sequence.extend(batch)
                for c in batch:
                    with lock:  # before the commit: the next claim can only follow it
                        in_flight.discard(c.terminal_id)
                    if not st.finish(c.id, owner, DONE_00, now=T0):
                        failures.append(f"finish of {c.id} refused")
            failures.append(f"{owner} timed out")
        except Exception as exc:  # pragma: no cover - reported below
            failures.append(repr(exc))
        finally:
            own.dispose()

    threads = [threading.Thread(target=replica, args=(o,)) for o in claimed_by]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
    every = claimed_by["gw-a"] + claimed_by["gw-b"]
    ids = [c.id for c in every]
    assert len(ids) == len(set(ids)) == 500
    assert all(c.attempts == 1 for c in every)
    # Each terminal's entries were claimed in order (one at a time), whichever replica.
    order: dict[str, list[int]] = {}
    for c in sequence:
        order.setdefault(c.terminal_id, []).append(c.id)
    assert order == expected
    assert {c.terminal_id for c in claimed_by["gw-a"]} and {
        c.terminal_id for c in claimed_by["gw-b"]
    }
    assert store.stats(now=T0).counts["done"] == 500
