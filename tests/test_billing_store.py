"""Billing store: exactly-once posting, idempotent replays, reversals, demo seeding.

Every test runs against a SQLite file in ``tmp_path``, and again against PostgreSQL when
``PAYLAB_TEST_POSTGRES_URL`` is set (e.g.
``postgresql+psycopg:///paylab_test?host=/var/run/postgresql``); each PostgreSQL test starts
in a PostgreSQL schema of its own, empty at the start and dropped at the end.
"""

from __future__ import annotations

import hashlib
import hmac
import threading
from collections.abc import Callable, Iterator
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import TypeVar

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from sqlalchemy import Engine, inspect, select, text
from sqlalchemy.exc import IntegrityError

from billing.demo_data import DEMO_BILLS, DEMO_CARDS, DEMO_CUSTOMERS
from billing.models import Base, Bill, Card, Customer, ProcessedRequest
from billing.posting import (
    REVERSED_BEFORE_POSTING,
    PaymentRequest,
    PaymentResult,
    ReversalRequest,
    ReversalResult,
)
from billing.store import BillingStore
from shared.store.db import DatabaseError, make_engine, session_factory, transaction, upgrade
from tests.support import DATABASE_BACKENDS, empty_database

MIGRATIONS = "billing:migrations"
VERSION_TABLE = "alembic_version_billing"

PAN_KEY = b"test pan hashing key"
PAN = DEMO_CARDS[0].pan  # 4761739001010010, holder of PLN-0001
OTHER_PAN = DEMO_CARDS[1].pan

_T = TypeVar("_T")


def pan_hash(pan: str) -> str:
    return hmac.new(PAN_KEY, pan.encode(), hashlib.sha256).hexdigest()


def fake_pvv(pan: str, pvki: str, pin: str) -> str:
    # The store only stores what it is given; the real PVV needs the HSM's key.
    digest = hashlib.sha256(f"{pan}|{pvki}|{pin}".encode()).hexdigest()
    return f"{int(digest, 16) % 10_000:04d}"


def digest_of(*parts: object) -> str:
    return hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()


def payment(
    key: str = "acq|term0001|000001|1122060000",
    bill: str = "PLN-0001",
    amount: int = 150_000,
    *,
    currency: str = "360",
    mti: str = "0200",
    pan: str = PAN,
) -> PaymentRequest:
    return PaymentRequest(
        idempotency_key=key,
        request_digest=digest_of(bill, amount, currency, pan),
        bill_number=bill,
        amount=amount,
        currency=currency,
        rrn="432106000001",
        stan=key.split("|")[2] if key.count("|") >= 2 else "000001",
        terminal_id="TERM0001",
        acquirer_id="12345",
        pan_hash=pan_hash(pan),
        pan_masked=pan[:6] + "******" + pan[-4:],
        mti=mti,
    )


def reversal(
    key: str, original: PaymentRequest | str, amount: int = 150_000, mti: str = "0420"
) -> ReversalRequest:
    original_key = original if isinstance(original, str) else original.idempotency_key
    return ReversalRequest(
        idempotency_key=key,
        request_digest=digest_of("reversal", original_key, amount),
        original_key=original_key,
        amount=amount,
        mti=mti,
    )


# --------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(params=DATABASE_BACKENDS)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A URL of an empty database (no tables at all): a SQLite file, or a fresh schema."""
    with empty_database(request.param, tmp_path, "billing") as url:
        yield url


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    """An engine on a migrated, empty database."""
    engine = make_engine(db_url)
    upgrade(engine, MIGRATIONS)
    yield engine
    engine.dispose()


@pytest.fixture
def store(engine: Engine) -> BillingStore:
    """A store over the demo data."""
    store = BillingStore(session_factory(engine))
    assert store.seed_demo_data(pan_hash, fake_pvv) is True
    return store


def bill_row(engine: Engine, bill_number: str) -> Bill:
    with transaction(session_factory(engine), write=False) as session:
        bill = session.get(Bill, bill_number)
        assert bill is not None
        return bill


# --------------------------------------------------------------------------------------------
# Schema and plumbing


def test_upgrade_twice_is_harmless(engine: Engine, store: BillingStore) -> None:
    assert store.pay(payment()).code == "00"
    upgrade(engine, MIGRATIONS)
    upgrade(engine.url.render_as_string(hide_password=False), MIGRATIONS)
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE})
        assert context.get_current_revision() == "0002"
    assert store.postings_count() == 1
    assert store.seed_demo_data(pan_hash, fake_pvv) is False


def test_foreign_keys_are_enforced_after_upgrade(engine: Engine) -> None:
    # On SQLite the upgrade runs with foreign keys off (table rebuilds need it) and must
    # switch them back on before the connection returns to the pool.
    sessions = session_factory(engine)
    with pytest.raises(IntegrityError), transaction(sessions, write=True) as session:
        session.add(Bill(bill_number="X-1", customer_id=999, biller="PLN", amount_due=1))
        session.flush()


def test_migration_creates_exactly_the_model_tables(engine: Engine) -> None:
    tables = set(inspect(engine).get_table_names())
    assert tables == {"customers", "cards", "bills", "postings", "processed_requests", "ledger"} | {
        VERSION_TABLE
    }
    with engine.connect() as conn:
        context = MigrationContext.configure(
            conn, opts={"compare_type": True, "version_table": VERSION_TABLE}
        )
        assert compare_metadata(context, Base.metadata) == []


def test_env_without_a_connection_uses_the_configured_url(tmp_path: Path) -> None:
    """The ``alembic`` command-line path: no connection passed, ``sqlalchemy.url`` instead."""
    url = f"sqlite:///{tmp_path}/cli/billing.db"
    config = Config()
    config.set_main_option("script_location", MIGRATIONS)
    config.set_main_option("path_separator", "os")
    config.set_main_option("sqlalchemy.url", url)
    command.upgrade(config, "head")
    engine = make_engine(url)
    try:
        assert "processed_requests" in inspect(engine).get_table_names()
        upgrade(engine, MIGRATIONS)  # and the programmatic path agrees it is at head
    finally:
        engine.dispose()


def test_sqlite_engine_settings(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path}/deep/er/billing.db")
    try:
        with engine.connect() as conn:
            pragmas = {
                name: conn.exec_driver_sql(f"PRAGMA {name}").scalar()
                for name in ("journal_mode", "synchronous", "busy_timeout", "foreign_keys")
            }
        assert pragmas == {
            "journal_mode": "wal",
            "synchronous": 2,  # FULL
            "busy_timeout": 5000,
            "foreign_keys": 1,
        }
        assert (tmp_path / "deep" / "er").is_dir()
    finally:
        engine.dispose()


@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///:memory:"])
def test_in_memory_sqlite_is_refused(url: str) -> None:
    with pytest.raises(ValueError, match="in-memory"):
        make_engine(url)


def test_failed_transaction_rolls_back(engine: Engine, store: BillingStore) -> None:
    sessions = session_factory(engine)
    with pytest.raises(RuntimeError), transaction(sessions, write=True) as session:
        bill = session.get(Bill, "PLN-0001")
        assert bill is not None
        bill.status = "paid"
        session.flush()
        raise RuntimeError("boom")
    assert bill_row(engine, "PLN-0001").status == "open"


def test_infrastructure_errors_raise_database_error(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path}/unmigrated.db")
    try:
        store = BillingStore(session_factory(engine))
        with pytest.raises(DatabaseError):
            store.inquire("PLN-0001")
        with pytest.raises(DatabaseError):
            store.pay(payment())
    finally:
        engine.dispose()


# --------------------------------------------------------------------------------------------
# Demo data and cards


def test_seed_is_idempotent(engine: Engine, store: BillingStore) -> None:
    assert store.seed_demo_data(pan_hash, fake_pvv) is False
    with transaction(session_factory(engine), write=False) as session:
        assert len(session.scalars(select(Customer)).all()) == len(DEMO_CUSTOMERS) == 4
        assert len(session.scalars(select(Card)).all()) == len(DEMO_CARDS)
        assert len(session.scalars(select(Bill)).all()) == len(DEMO_BILLS)
    assert bill_row(engine, "TELCO-0002").status == "paid"
    assert bill_row(engine, "TELCO-0002").paid_at is not None


def test_seed_refuses_a_hasher_that_is_not_a_digest(engine: Engine) -> None:
    store = BillingStore(session_factory(engine))
    with pytest.raises(ValueError, match="hex digest"):
        store.seed_demo_data(lambda pan: pan, fake_pvv)
    assert store.seed_demo_data(pan_hash, fake_pvv) is True


def test_lookup_card(store: BillingStore) -> None:
    for pan, pin, _name in DEMO_CARDS:
        card = store.lookup_card(pan_hash(pan))
        assert card is not None
        assert card.pvki == "1"
        assert card.pvv == fake_pvv(pan, "1", pin)
        assert card.pan_masked == pan[:6] + "******" + pan[-4:]
        assert card.status == "active"
    assert store.lookup_card(pan_hash("4000000000000002")) is None


def test_no_clear_pan_in_the_database(engine: Engine, store: BillingStore) -> None:
    store.pay(payment())
    store.pay(payment("acq|term0001|000002|1122060001", "PLN-0002", 1, pan=OTHER_PAN))
    dump: list[str] = []
    with engine.connect() as conn:
        for table in Base.metadata.sorted_tables:
            dump.extend(repr(tuple(row)) for row in conn.execute(select(table)))
    text_dump = "\n".join(dump)
    assert "******" in text_dump
    for pan, _pin, _name in DEMO_CARDS:
        assert pan not in text_dump


# --------------------------------------------------------------------------------------------
# Inquiry


def test_inquiry(store: BillingStore) -> None:
    open_bill = store.inquire("PLN-0001")
    assert open_bill.code == "00"
    assert open_bill.approved
    assert (open_bill.amount_due, open_bill.currency, open_bill.biller) == (150_000, "360", "PLN")
    assert open_bill.customer_name == "Budi Santoso"

    unknown = store.inquire("PLN-9999")
    assert unknown.code == "25"
    assert unknown.amount_due is None

    paid = store.inquire("TELCO-0002")
    assert paid.code == "88"
    assert paid.amount_due == 350_000


# --------------------------------------------------------------------------------------------
# Payments


def test_payment_posts_exactly_once(engine: Engine, store: BillingStore) -> None:
    result = store.pay(payment())
    assert result.code == "00"
    assert not result.replayed
    assert result.posting_id is not None
    assert (result.bill_number, result.amount, result.customer_name) == (
        "PLN-0001",
        150_000,
        "Budi Santoso",
    )
    assert store.postings_count() == 1
    assert store.postings_count("PLN-0001") == 1
    assert store.postings_count("PLN-0002") == 0

    [posting] = store.list_postings()
    assert posting.id == result.posting_id
    assert (posting.source, posting.status, posting.amount) == ("online", "posted", 150_000)
    assert posting.pan_hash == pan_hash(PAN)
    assert posting.pan_masked == "476173******0010"

    bill = bill_row(engine, "PLN-0001")
    assert bill.status == "paid"
    assert bill.paid_at is not None
    assert store.inquire("PLN-0001").code == "88"


def test_same_request_twice_gives_one_posting_and_the_same_answer(store: BillingStore) -> None:
    first = store.pay(payment())
    second = store.pay(payment())
    assert second.replayed
    assert replace(second, replayed=False) == first
    assert store.postings_count() == 1
    replayed = store.replay(first_key := payment().idempotency_key, payment().request_digest)
    assert replayed is not None
    assert (replayed.idempotency_key, replayed.code, replayed.replayed) == (first_key, "00", True)
    assert replayed.fields["posting_id"] == first.posting_id


def test_replay_of_an_unknown_key_is_none(store: BillingStore) -> None:
    assert store.replay("never|seen|000000|0000000000", digest_of("x")) is None


def test_same_key_different_content_is_duplicate_transmission(store: BillingStore) -> None:
    first = store.pay(payment())
    clash = store.pay(payment(bill="PLN-0002", amount=275_050))
    assert clash.code == "94"
    assert not clash.replayed
    assert clash.posting_id is None
    assert store.postings_count() == 1
    assert store.inquire("PLN-0002").code == "00"
    stored = store.replay(payment().idempotency_key, digest_of("other"))
    assert stored is not None
    assert stored.code == "94"
    # The 94 is not recorded: the original answer is still the one replayed.
    again = store.pay(payment())
    assert again.replayed
    assert again.code == "00"
    assert again.posting_id == first.posting_id


def test_amount_mismatch_is_13_and_recorded(engine: Engine, store: BillingStore) -> None:
    wrong = payment(amount=149_999)
    result = store.pay(wrong)
    assert result.code == "13"
    assert result.amount_due == 150_000
    assert result.posting_id is None
    assert bill_row(engine, "PLN-0001").status == "open"
    repeat = store.pay(wrong)
    assert (repeat.code, repeat.replayed) == ("13", True)
    assert store.postings_count() == 0


def test_currency_mismatch_is_13(store: BillingStore) -> None:
    assert store.pay(payment(currency="840")).code == "13"
    assert store.postings_count() == 0


def test_unknown_bill_is_25_and_recorded(store: BillingStore) -> None:
    request = payment(bill="PLN-9999")
    assert store.pay(request).code == "25"
    repeat = store.pay(request)
    assert (repeat.code, repeat.replayed, repeat.bill_number) == ("25", True, "PLN-9999")


def test_already_paid_is_88(store: BillingStore) -> None:
    seeded_paid = store.pay(payment("acq|term0009|000001|1122060000", "TELCO-0002", 350_000))
    assert seeded_paid.code == "88"
    assert store.pay(payment("acq|term0001|000001|1122060000")).code == "00"
    second = store.pay(payment("acq|term0001|000002|1122060005"))
    assert second.code == "88"
    assert second.customer_name == "Budi Santoso"
    assert store.postings_count("PLN-0001") == 1


def test_advice_posts(store: BillingStore) -> None:
    advice = payment(mti="0220")
    result = store.pay(advice)
    assert result.code == "00"
    [posting] = store.list_postings()
    assert posting.source == "advice"
    repeat = store.pay(replace(advice, mti="0221"))
    assert (repeat.code, repeat.replayed, repeat.posting_id) == ("00", True, result.posting_id)
    assert store.postings_count() == 1


def test_advice_of_an_online_payment_replays_it(store: BillingStore) -> None:
    online = store.pay(payment())
    advice = store.pay(payment(mti="0220"))
    assert (advice.code, advice.replayed, advice.posting_id) == ("00", True, online.posting_id)
    assert store.postings_count() == 1


def test_advice_on_a_paid_bill_is_a_recorded_88(store: BillingStore) -> None:
    store.pay(payment("acq|term0002|000009|1122060000"))
    advice = payment(mti="0220")
    result = store.pay(advice)
    assert (result.code, result.replayed) == ("88", False)
    assert store.replay(advice.idempotency_key, advice.request_digest) is not None
    assert store.pay(replace(advice, mti="0221")).replayed
    assert store.postings_count() == 1


def test_record_decline_replays(store: BillingStore) -> None:
    key, digest = "acq|term0001|000042|1122060000", digest_of("wrong pin")
    recorded = store.record_decline(key, digest, "0200", "55", {"reason": "pin"})
    assert (recorded.code, recorded.replayed, dict(recorded.fields)) == (
        "55",
        False,
        {"reason": "pin"},
    )
    again = store.record_decline(key, digest, "0200", "55", {"reason": "pin"})
    assert (again.code, again.replayed) == ("55", True)
    replayed = store.replay(key, digest)
    assert replayed is not None
    assert (replayed.code, replayed.mti) == ("55", "0200")
    assert store.replay(key, digest_of("other")) is not None
    assert store.record_decline(key, digest_of("other"), "0200", "14", {}).code == "94"

    # A payment under the declined key replays the decline, whatever it asks for.
    paid = store.pay(replace(payment(key), request_digest=digest))
    assert (paid.code, paid.replayed) == ("55", True)
    assert store.postings_count() == 0

    with pytest.raises(ValueError):
        store.record_decline("another", digest, "0200", "00", {})


# --------------------------------------------------------------------------------------------
# Reversals


def test_reversal_undoes_the_posting_and_reopens_the_bill(
    engine: Engine, store: BillingStore
) -> None:
    original = payment()
    paid = store.pay(original)
    result = store.reverse(reversal("acq|term0001|000002|1122060100", original))
    assert result.code == "00"
    assert (result.bill_number, result.posting_id) == ("PLN-0001", paid.posting_id)
    assert not result.replayed

    [posting] = store.list_postings()
    assert posting.status == "reversed"
    assert posting.reversed_at is not None
    bill = bill_row(engine, "PLN-0001")
    assert (bill.status, bill.paid_at) == ("open", None)
    assert store.inquire("PLN-0001").code == "00"

    # The original's repeats still replay its own answer; a new payment can post again.
    assert store.pay(original).replayed
    assert store.pay(payment("acq|term0001|000003|1122060200")).code == "00"
    assert store.postings_count("PLN-0001") == 2


def test_repeat_of_a_reversed_payment_is_12_without_approval_code(store: BillingStore) -> None:
    """Once its posting is reversed, a payment's approval is never replayed: every repeat
    (online or advice form, batched or read first) answers 12, without field 38's posting id,
    and posts nothing."""
    original = payment()
    key, digest = original.idempotency_key, original.request_digest
    assert store.pay(original).code == "00"
    assert store.reverse(reversal("acq|term0001|000002|1122060100", original)).code == "00"
    for repeat in (original, replace(original, mti="0220"), replace(original, mti="0221")):
        result = store.pay(repeat)
        assert (result.code, result.replayed, result.posting_id) == ("12", True, None)
        assert result.fields.get("reversed") is True
    seen = store.replay(key, digest)
    assert seen is not None and seen.code == "12" and "posting_id" not in seen.fields
    [(read, card)] = store.replay_and_cards([(key, digest, pan_hash(PAN))])
    assert read is not None and read.code == "12" and card is None
    assert store.record_decline(key, digest, "0200", "55", {}).code == "12"
    # Two repeats in one batch: the same 12 for both, still one posting, reversed.
    batch = store.pay_many([original, original])
    assert [(r.code, r.replayed) for r in batch] == [("12", True), ("12", True)]
    assert [p.status for p in store.list_postings()] == ["reversed"]
    # Other content under the same key is still a duplicate transmission.
    assert store.pay(replace(original, request_digest=digest_of("other"))).code == "94"


def test_reversal_twice_is_idempotent(engine: Engine, store: BillingStore) -> None:
    original = payment()
    store.pay(original)
    first = store.reverse(reversal("acq|term0001|000002|1122060100", original))
    repeat = store.reverse(reversal("acq|term0001|000002|1122060100", original, mti="0421"))
    assert (repeat.code, repeat.replayed) == ("00", True)
    assert replace(repeat, replayed=False) == first
    other_message = store.reverse(reversal("acq|term0001|000003|1122060300", original))
    assert (other_message.code, other_message.replayed) == ("00", False)
    assert [p.status for p in store.list_postings()] == ["reversed"]
    assert bill_row(engine, "PLN-0001").status == "open"


def test_reversal_with_another_amount_is_13(engine: Engine, store: BillingStore) -> None:
    original = payment()
    store.pay(original)
    result = store.reverse(reversal("acq|term0001|000002|1122060100", original, amount=1))
    assert result.code == "13"
    assert [p.status for p in store.list_postings()] == ["posted"]
    assert bill_row(engine, "PLN-0001").status == "paid"


def test_reversal_before_payment_blocks_the_payment(engine: Engine, store: BillingStore) -> None:
    original = payment()
    reversal_key = "acq|term0001|000002|1122060100"
    early = store.reverse(reversal(reversal_key, original))
    assert (early.code, early.replayed, early.posting_id) == ("25", False, None)

    late = store.pay(original)
    assert late.code == "12"
    assert late.replayed
    assert late.posting_id is None
    assert store.postings_count() == 0
    assert bill_row(engine, "PLN-0001").status == "open"
    # The advice form of the same payment is blocked too, whatever its digest.
    assert store.pay(replace(original, mti="0220", request_digest=digest_of("x"))).code == "12"

    repeat = store.reverse(reversal(reversal_key, original, mti="0421"))
    assert (repeat.code, repeat.replayed) == ("25", True)
    with transaction(session_factory(engine), write=False) as session:
        tombstone = session.get(ProcessedRequest, original.idempotency_key)
        assert tombstone is not None
        assert (tombstone.request_digest, tombstone.response_code) == (
            REVERSED_BEFORE_POSTING,
            "12",
        )


def test_reversal_of_a_declined_payment_is_25_without_tombstone(store: BillingStore) -> None:
    declined = payment(amount=1)
    assert store.pay(declined).code == "13"
    result = store.reverse(reversal("acq|term0001|000002|1122060100", declined, amount=1))
    assert result.code == "25"
    repeat = store.pay(declined)
    assert (repeat.code, repeat.replayed) == ("13", True)


def test_reversal_needs_its_own_key() -> None:
    with pytest.raises(ValueError):
        reversal("same|key|000001|1122060000", "same|key|000001|1122060000")


# --------------------------------------------------------------------------------------------
# Concurrency (threads, as the service calls the store from worker threads)


def run_concurrently(calls: list[Callable[[], _T]]) -> list[_T]:
    barrier = threading.Barrier(len(calls))
    results: list[_T | None] = [None] * len(calls)
    errors: list[BaseException] = []

    def run(index: int, call: Callable[[], _T]) -> None:
        try:
            barrier.wait()
            results[index] = call()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i, c)) for i, c in enumerate(calls)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors, errors
    return [r for r in results if r is not None]


def test_concurrent_identical_payments_post_once(store: BillingStore) -> None:
    request = payment()
    results: list[PaymentResult] = run_concurrently([lambda: store.pay(request)] * 4)
    assert [r.code for r in results] == ["00"] * 4
    assert sum(not r.replayed for r in results) == 1
    assert len({r.posting_id for r in results}) == 1
    assert store.postings_count() == 1


def test_concurrent_payments_of_one_bill_post_once(store: BillingStore) -> None:
    requests = [payment(f"acq|term0001|{n:06d}|1122060000") for n in range(1, 5)]
    calls: list[Callable[[], PaymentResult]] = [partial(store.pay, r) for r in requests]
    results = run_concurrently(calls)
    assert sorted(r.code for r in results) == ["00", "88", "88", "88"]
    assert store.postings_count() == 1


def test_concurrent_payment_and_reversal_never_leave_money_posted(
    engine: Engine, store: BillingStore
) -> None:
    original = payment()
    undo = reversal("acq|term0001|000002|1122060100", original)
    calls: list[Callable[[], PaymentResult | ReversalResult]] = [
        partial(store.pay, original),
        partial(store.reverse, undo),
    ]
    paid, reversed_ = run_concurrently(calls)
    # Either order is fine; in both, nothing stays posted and the bill is open again.
    assert (paid.code, reversed_.code) in {("00", "00"), ("12", "25")}
    assert all(p.status == "reversed" for p in store.list_postings())
    assert bill_row(engine, "PLN-0001").status == "open"


def test_sqlite_writers_wait_for_each_other(tmp_path: Path) -> None:
    """BEGIN IMMEDIATE: read-then-write transactions queue instead of failing as locked."""
    engine = make_engine(f"sqlite:///{tmp_path}/race.db")
    try:
        with engine.begin() as conn:
            conn.execute(text("CREATE TABLE counter (n INTEGER NOT NULL)"))
            conn.execute(text("INSERT INTO counter VALUES (0)"))
        sessions = session_factory(engine)

        def increment() -> int:
            for _ in range(20):
                with transaction(sessions, write=True) as session:
                    n = session.execute(text("SELECT n FROM counter")).scalar_one()
                    session.execute(text("UPDATE counter SET n = :n"), {"n": n + 1})
            return 1

        run_concurrently([increment] * 4)
        with engine.connect() as conn:
            assert conn.execute(text("SELECT n FROM counter")).scalar_one() == 80
    finally:
        engine.dispose()


def test_postings_count_and_list(store: BillingStore) -> None:
    for n, bill in enumerate(("PLN-1001", "PLN-1002", "PLN-1003"), start=1):
        amount = next(b.amount_due for b in DEMO_BILLS if b.bill_number == bill)
        assert store.pay(payment(f"acq|term0001|{n:06d}|1122060000", bill, amount)).approved
    assert store.postings_count() == 3
    assert store.postings_count("PLN-1002") == 1
    assert [p.bill_number for p in store.list_postings(limit=2)] == ["PLN-1001", "PLN-1002"]


# --------------------------------------------------------------------------------------------
# Batches (the service's group commit)


def test_pay_many_applies_the_rules_in_order_in_one_transaction(
    engine: Engine, store: BillingStore
) -> None:
    first = payment("acq|term0001|000001|1122060000")
    again = payment("acq|term0001|000001|1122060000")  # same key: replays the first
    same_bill = payment("acq|term0001|000002|1122060000")  # another key, same bill: 88
    wrong_amount = payment("acq|term0001|000003|1122060000", "PLN-0002", 1)
    unknown = payment("acq|term0001|000004|1122060000", "NOPE-0001", 5)
    other = payment("acq|term0001|000005|1122060000", "PLN-0002", 275_050)
    results = store.pay_many([first, again, same_bill, wrong_amount, unknown, other])
    assert [r.code for r in results] == ["00", "00", "88", "13", "25", "00"]
    assert [r.replayed for r in results] == [False, True, False, False, False, False]
    assert results[1].posting_id == results[0].posting_id
    assert store.postings_count() == 2
    # Each outcome is recorded as if the requests had come one by one.
    for request, result in zip(
        [first, same_bill, wrong_amount, unknown, other],
        [results[i] for i in (0, 2, 3, 4, 5)],
        strict=True,
    ):
        assert store.pay(request) == replace(result, replayed=True)
    assert store.pay_many([]) == []


def test_pay_many_posts_nothing_when_the_transaction_fails(engine: Engine) -> None:
    store = BillingStore(session_factory(engine))
    store.seed_demo_data(pan_hash, fake_pvv)
    requests = [payment(f"acq|term0001|{n:06d}|1122060000", f"PLN-000{n}") for n in (1, 2)]
    requests[1] = replace(requests[1], amount=275_050)
    with engine.begin() as conn:  # the batch's last write fails: a table gone away
        conn.execute(text("ALTER TABLE processed_requests RENAME TO processed_away"))
    try:
        with pytest.raises(DatabaseError):
            store.pay_many(requests)
    finally:
        with engine.begin() as conn:
            conn.execute(text("ALTER TABLE processed_away RENAME TO processed_requests"))
    assert store.postings_count() == 0
    assert [r.code for r in store.pay_many(requests)] == ["00", "00"]


def test_replay_and_cards_in_one_read(engine: Engine, store: BillingStore) -> None:
    done = store.pay(payment())
    blocked_pan = DEMO_CARDS[1].pan
    with engine.begin() as conn:
        conn.execute(
            text("UPDATE cards SET status = 'blocked' WHERE pan_hash = :h"),
            {"h": pan_hash(blocked_pan)},
        )
    items = [
        (payment().idempotency_key, payment().request_digest, pan_hash(PAN)),  # seen
        (payment().idempotency_key, "another digest", pan_hash(PAN)),  # seen, other content
        ("acq|term0001|000009|1122060000", "d", pan_hash(PAN)),  # new, known card
        ("acq|term0001|000010|1122060000", "d", pan_hash(blocked_pan)),  # new, blocked card
        ("acq|term0001|000011|1122060000", "d", pan_hash("4000000000000002")),  # unknown card
    ]
    out = store.replay_and_cards(items)
    assert out[0][0] is not None and out[0][0].replayed and out[0][1] is None
    assert out[0][0].fields["posting_id"] == done.posting_id
    assert out[1][0] is not None and out[1][0].code == "94" and out[1][1] is None
    assert out[2][0] is None and out[2][1] == store.lookup_card(pan_hash(PAN))
    assert out[3][0] is None and out[3][1] is not None and out[3][1].status != "active"
    assert out[4] == (None, None)
    assert store.replay_and_cards([]) == []


def test_inquire_many_keeps_order_and_repeats(store: BillingStore) -> None:
    store.pay(payment())
    numbers = ["PLN-0002", "PLN-0001", "NOPE-0001", "PLN-0002"]
    results = store.inquire_many(numbers)
    assert [r.bill_number for r in results] == numbers
    assert [r.code for r in results] == ["00", "88", "25", "00"]
    assert results[0] == store.inquire("PLN-0002")
    assert results[0].customer_name == "Siti Rahayu"
