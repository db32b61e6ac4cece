"""shared.lab.reconcile: the comparison rules, and the loaders on real SQLite databases."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from billing.models import Bill, Customer, Posting
from gateway.journal import journal_row
from gateway.models import JournalEntry
from gateway.saf_rules import NewEntry, Outcome, SafState
from gateway.saf_store import SafStore
from shared.iso import codec
from shared.iso.messages import idempotency_key
from shared.lab.reconcile.rules import (
    APPROVED_ONLINE,
    APPROVED_STANDIN,
    REVERSAL,
    ClientFact,
    GatewayFact,
    Mismatch,
    PostingFact,
    Report,
    reconcile,
)
from shared.lab.reconcile.sources import load_gateway_facts, load_postings
from shared.pan import PanHasher, mask_pan
from shared.store.db import make_engine, session_factory, transaction, upgrade
from shared.store.vault import Vault

K = "12345|TERM0001|000001|1129100000"
AMOUNT = 150_000


def online(amount: int | None = AMOUNT, key: str = K) -> GatewayFact:
    return GatewayFact(key, APPROVED_ONLINE, rrn="633300000100", amount=amount)


def standin(state: str | None, code: str | None = None, amount: int = AMOUNT) -> GatewayFact:
    return GatewayFact(K, APPROVED_STANDIN, state, code, "633300000100", amount)


def reversal(state: str | None, code: str | None = None, origin: str = "gateway") -> GatewayFact:
    """A reversal of K: ``gateway`` decided it (after a 68), or an ``acquirer`` asked."""
    return GatewayFact(K, REVERSAL, state, code, "633300090100", AMOUNT, origin)


def asked(state: str | None, code: str | None = None) -> GatewayFact:
    """The client's own reversal of K, as the gateway saw it."""
    return reversal(state, code, origin="acquirer")


def client(key: str = K, *codes: str) -> ClientFact:
    """What the client was answered for payment ``key`` (00 by default)."""
    codes = codes or ("00",)
    return ClientFact(key, "payment", "00" in codes, tuple(codes), None, "633300000100", AMOUNT)


def client_reversal(code: str = "00", original: str = K) -> ClientFact:
    return ClientFact(f"R|{original}", "reversal", code == "00", (code,), original)


def posted(amount: int = AMOUNT, key: str = K, bill: str | None = None) -> PostingFact:
    """A posting in force: of bill PLN-0001 for K, of a bill of its own for another key."""
    return PostingFact(key, "posted", amount, bill or ("PLN-0001" if key == K else f"B-{key}"))


def reversed_(key: str = K) -> PostingFact:
    return PostingFact(key, "reversed", AMOUNT, "PLN-0001")


def kinds(report: Report) -> list[str]:
    return [m.kind for m in report.mismatches]


def check(facts: list[GatewayFact], postings: list[PostingFact]) -> Report:
    return reconcile(facts, postings)


# --------------------------------------------------------------------------------------------
# Approved online


def test_online_approval_with_its_posting_is_clean() -> None:
    report = check([online()], [posted()])
    assert (report.checked, report.pending, report.clean) == (1, 0, True)


def test_online_approval_without_posting() -> None:
    assert kinds(check([online()], [])) == ["lost"]


def test_online_approval_with_reversed_posting_and_no_reversal() -> None:
    assert kinds(check([online()], [reversed_()])) == ["lost"]


def test_online_approval_with_another_amount() -> None:
    report = check([online(amount=100)], [posted(amount=150_000)])
    assert kinds(report) == ["amount_mismatch"]
    assert "100" in report.mismatches[0].detail and "150000" in report.mismatches[0].detail


def test_online_approval_without_known_amount_is_not_compared() -> None:
    assert check([online(amount=None)], [posted()]).clean


def test_repeated_approvals_count_once() -> None:
    report = check([online(), online()], [posted()])
    assert (report.checked, report.clean) == (1, True)


# --------------------------------------------------------------------------------------------
# Approved in stand-in


@pytest.mark.parametrize("state", ["queued", "in_flight"])
def test_standin_advice_on_its_way_is_pending(state: str) -> None:
    report = check([standin(state)], [])
    assert (report.pending, report.clean) == (1, True)


def test_standin_delivered_and_posted_is_clean() -> None:
    assert check([standin("done", "00")], [posted()]).clean


def test_standin_delivered_but_no_posting() -> None:
    assert kinds(check([standin("done", "00")], [])) == ["lost"]


def test_standin_delivered_with_another_amount() -> None:
    assert kinds(check([standin("done", "00", amount=1)], [posted()])) == ["amount_mismatch"]


@pytest.mark.parametrize("code", ["88", "13", "25", "12"])
def test_standin_declined_by_biller(code: str) -> None:
    report = check([standin("done", code)], [])
    assert kinds(report) == ["standin_declined_by_biller"]
    assert code in report.mismatches[0].detail and "refund" in report.mismatches[0].detail


@pytest.mark.parametrize("state", ["dead", "cancelled"])
def test_standin_not_delivered(state: str) -> None:
    report = check([standin(state)], [])
    assert kinds(report) == ["standin_not_delivered"]
    assert state in report.mismatches[0].detail


def test_standin_whose_entry_was_purged_is_judged_like_an_online_approval() -> None:
    assert check([standin(None)], [posted()]).clean
    assert kinds(check([standin(None)], [])) == ["lost"]


def test_standin_wins_over_an_online_fact_of_the_same_key() -> None:
    assert kinds(check([online(), standin("dead")], [])) == ["standin_not_delivered"]


# --------------------------------------------------------------------------------------------
# Reversals


@pytest.mark.parametrize("code", ["00", "25"])
def test_reversal_done_and_posting_reversed_or_absent_is_clean(code: str) -> None:
    assert check([online(), asked("done", code)], [reversed_()]).clean
    assert check([reversal("done", code)], []).clean
    assert check([reversal("done", code)], [reversed_()]).clean


def test_online_answered_reversal_counts_as_done() -> None:
    assert check([online(), asked(None)], [reversed_()]).clean
    assert kinds(check([online(), asked(None)], [posted()])) == ["reversal_not_applied"]


def test_reversal_done_but_posting_still_posted() -> None:
    report = check([online(), asked("done", "13")], [posted()])
    assert kinds(report) == ["reversal_not_applied"]
    assert "13" in report.mismatches[0].detail
    # The gateway's own reversal after a 68, refused by billing (13), of a payment that was
    # not approved to the client: the posting stands without an approval.
    assert kinds(check([reversal("done", "13")], [posted()])) == ["reversal_not_applied"]


@pytest.mark.parametrize("state", ["queued", "in_flight"])
def test_reversal_on_its_way_is_pending(state: str) -> None:
    for facts in ([online(), asked(state)], [reversal(state)]):
        report = check(facts, [posted()])
        assert (report.pending, report.clean) == (1, True)
        # Already undone (or never posted): nothing is left to explain.
        report = check(facts, [])
        assert (report.pending, report.clean) == (0, True)


@pytest.mark.parametrize("state", ["dead", "cancelled"])
def test_reversal_not_delivered(state: str) -> None:
    assert kinds(check([reversal(state)], [posted()])) == ["reversal_not_delivered"]
    assert kinds(check([online(), asked(state)], [posted()])) == ["reversal_not_delivered"]
    assert check([reversal(state)], []).clean  # nothing to undo


def test_approved_payment_undone_by_the_gateways_own_reversal_is_lost() -> None:
    """The restart case: a client got 00 for a re-send, the gateway's reversal (decided
    after the first send's 68) undid the posting. The customer holds an approval."""
    report = check([online(), reversal("done", "00")], [reversed_()])
    assert kinds(report) == ["lost"] and report.lost == 1
    assert "gateway's own reversal" in report.mismatches[0].detail
    with_client = reconcile([reversal("done", "00")], [reversed_()], [client(K, "68", "00")])
    assert kinds(with_client) == ["lost"]


def test_approved_payment_with_a_gateway_reversal_still_queued_is_lost() -> None:
    report = check([online(), reversal("queued")], [posted()])
    assert kinds(report) == ["lost"]
    assert "paylab saf cancel" in report.mismatches[0].detail


def test_undelivered_reversal_of_an_already_reversed_posting_is_clean() -> None:
    assert check([reversal("dead")], [reversed_()]).clean


def test_a_done_reversal_outweighs_a_dead_one() -> None:
    assert check([reversal("dead"), reversal("done", "00")], [reversed_()]).clean


def test_reversal_decides_over_a_standin() -> None:
    # The acquirer reversed a stand-in payment: the advice, replaying billing's tombstone,
    # was declined; no refund is due because nothing was kept.
    assert check([standin("done", "12"), asked("done", "25")], []).clean
    assert check([standin("queued"), asked("done", "25")], []).clean


# --------------------------------------------------------------------------------------------
# Postings without approval, and the report


def test_posted_without_approval() -> None:
    report = check([], [posted()])
    assert kinds(report) == ["orphan"] and report.orphans == 1
    assert "PLN-0001" in report.mismatches[0].detail


def test_reversed_posting_without_any_fact_is_clean() -> None:
    assert check([], [reversed_()]).clean


def test_report_counts_and_order() -> None:
    facts = [
        online(key="c"),
        GatewayFact("a", APPROVED_STANDIN, "queued"),
        GatewayFact("b", REVERSAL, "in_flight"),
        online(key="e"),
    ]
    postings = [posted(key="c"), posted(key="d"), posted(key="b")]
    report = reconcile(iter(facts), iter(postings))
    assert (report.checked, report.pending) == (5, 2)
    assert report.mismatches == [
        Mismatch("d", "orphan", report.mismatches[0].detail),
        Mismatch("e", "lost", report.mismatches[1].detail),
    ]
    assert not report.clean
    data = json.loads(json.dumps(report.as_dict()))
    assert data["clean"] is False and [m["key"] for m in data["mismatches"]] == ["d", "e"]


def test_empty_is_clean() -> None:
    assert reconcile([], []) == Report(checked=0, pending=0, mismatches=[])


def test_facts_validate_their_values() -> None:
    with pytest.raises(ValueError):
        GatewayFact(K, "approved_somehow")
    with pytest.raises(ValueError):
        GatewayFact(K, APPROVED_STANDIN, "lost")
    with pytest.raises(ValueError):
        PostingFact(K, "pending", 1, "PLN-0001")


# --------------------------------------------------------------------------------------------
# The client's side: what the acquirer answered


def test_client_answered_00_and_posted_is_clean() -> None:
    report = reconcile([online()], [posted()], [client()])
    assert report.clean and report.client_side
    assert (report.approved, report.posted, report.journal_gaps) == (1, 1, [])


def test_client_answer_decides_over_the_gateways() -> None:
    # The gateway approved, but the acquirer timed out first and told the client 68: the
    # posting in force is an orphan from the client's side.
    assert kinds(reconcile([online()], [posted()], [client(K, "68")])) == ["orphan"]
    # A 68 and then, for the re-send, a 00: the client holds an approval.
    assert reconcile([online()], [posted()], [client(K, "68", "00")]).clean


def test_withheld_approval_reversed_online_is_no_false_alarm() -> None:
    """Disk full on the gateway: billing posted, the journal could not be written, the
    gateway told the client 96 and reversed the posting online. Nothing is wrong."""
    assert reconcile([], [reversed_()], [client(K, "96")]).clean
    # The reversal failed too: the posting stands without an approval, and it is said.
    assert kinds(reconcile([], [posted()], [client(K, "96")])) == ["orphan"]


def test_client_00_without_a_gateway_record_is_a_journal_gap_not_a_mismatch() -> None:
    report = reconcile([], [posted()], [client()])
    assert report.clean and report.journal_gaps == [K]
    assert report.as_dict()["journal_gaps"] == 1


def test_client_reversal_answered_00_must_be_applied() -> None:
    assert reconcile([online()], [reversed_()], [client(), client_reversal()]).clean
    report = reconcile([online()], [posted()], [client(), client_reversal()])
    assert kinds(report) == ["reversal_not_delivered"]
    # A reversal the client was refused leaves the payment in force, as it should be.
    assert reconcile([online()], [posted()], [client(), client_reversal("96")]).clean


def test_bill_posted_twice_is_duplicated() -> None:
    other = "12345|TERM0001|000002|1129100000"
    report = reconcile(
        [online(), online(key=other)],
        [posted(), posted(key=other, bill="PLN-0001")],
        [client(), client(other)],
    )
    assert kinds(report) == ["duplicated"] and report.duplicated == 1
    assert "PLN-0001" in report.mismatches[0].detail
    # A reversed posting beside one in force is not a second posting.
    again = reconcile(
        [online(key=other)], [reversed_(), posted(key=other, bill="PLN-0001")], [client(other)]
    )
    assert again.duplicated == 0 and again.clean


def test_client_facts_validate_their_values() -> None:
    with pytest.raises(ValueError):
        ClientFact(K, "refund", True)
    with pytest.raises(ValueError):
        ClientFact(K, "reversal", True)  # no original


# --------------------------------------------------------------------------------------------
# Loaders

T0 = datetime(2026, 11, 29, 10, 0, tzinfo=UTC)
PAN = "4761739001010010"
PAN_HASH = PanHasher(b"test pan hashing key")
VAULT = Vault.from_secret("test vault secret")


def message(stan: str, mti: str = "0200", pc: str = "500000", **extra: str) -> dict[str, str]:
    return {
        "t": mti,
        "2": PAN,
        "3": pc,
        "4": f"{AMOUNT:012d}",
        "7": "1129100000",
        "11": stan,
        "32": "12345",
        "37": f"6333{stan}00",
        "41": f"TERM{stan[-4:]}",  # one terminal per transaction unless told otherwise
        "48": f"B-{stan}",
        "49": "360",
        **extra,
    }


def saf_entry(msg: dict[str, str], kind: str, original: str | None = None) -> NewEntry:
    return NewEntry(
        idempotency_key=idempotency_key(msg),
        kind=kind,
        mti=msg["t"],
        message=codec.encode(msg),
        terminal_id=msg["41"],
        acquirer_id=msg["32"],
        stan=msg["11"],
        rrn=msg["37"],
        bill_number=msg["48"],
        amount=AMOUNT,
        currency="360",
        pan_masked=mask_pan(PAN),
        pan_hash=PAN_HASH(PAN),
        max_attempts=3,
        original_key=original,
    )


def test_loaders_on_real_databases(tmp_path: Path) -> None:
    gw_engine = make_engine(f"sqlite:///{tmp_path}/gateway.db")
    billing_engine = make_engine(f"sqlite:///{tmp_path}/billing.db")
    try:
        upgrade(gw_engine, "gateway:migrations")
        upgrade(billing_engine, "billing:migrations")
        gw = session_factory(gw_engine)
        store = SafStore(gw, VAULT)

        def key(stan: str) -> str:
            return idempotency_key(message(stan))

        def jrow(msg: dict[str, str], code: str = "00") -> dict[str, object]:
            return journal_row(msg, code, received_at=T0, duration_ms=1.0, pan_hash=PAN_HASH)

        # 000001: stand-in, advice delivered (00), journaled as the approved 0200.
        store.enqueue(
            saf_entry(message("000001", "0220"), "advice"),
            now=T0,
            journal_rows=[jrow(message("000001"))],
        )
        # 000002: 0200 timed out (68, journaled "unknown"); its reversal is still in flight.
        store.enqueue(
            saf_entry(
                message("000902", "0420", **{"41": "TERM0002"}), "reversal", original=key("000002")
            ),
            now=T0,
            journal_rows=[jrow(message("000002"), "68")],
        )
        # 000003: stand-in whose advice died.
        lost = message("000003", "0220")
        store.enqueue(saf_entry(lost, "advice"), now=T0)
        # 000004: approved online (journaled twice: a repeat); 000005: acquirer's own advice
        # forwarded online; an approved inquiry, which changes nothing.
        with transaction(gw, write=True) as s:
            for msg in (
                message("000004"),
                message("000004"),
                message("000005", "0220"),
                message("000007", pc="310000"),
            ):
                s.add(JournalEntry(**jrow(msg)))
        claimed = {c.idempotency_key: c for c in store.claim("gw", now=T0, limit=10, lease=30)}
        store.finish(
            claimed[key("000001")].id, "gw", Outcome(SafState.DONE, None, "00", None), now=T0
        )
        dead = Outcome(SafState.DEAD, None, None, "timeout")
        store.finish(claimed[idempotency_key(lost)].id, "gw", dead, now=T0)

        with transaction(session_factory(billing_engine), write=True) as s:
            customer = Customer(name="Test", created_at=T0)
            s.add(customer)
            s.flush()
            for stan in ("000001", "000002", "000004", "000005", "000006"):
                s.add(
                    Bill(
                        bill_number=f"B-{stan}",
                        customer_id=customer.id,
                        biller="PLN",
                        amount_due=AMOUNT,
                        status="paid",
                        created_at=T0,
                    )
                )
                s.flush()
                s.add(
                    Posting(
                        bill_number=f"B-{stan}",
                        amount=AMOUNT,
                        currency="360",
                        idempotency_key=key(stan),
                        rrn=f"6333{stan}00",
                        stan=stan,
                        terminal_id=f"TERM{stan[-4:]}",
                        acquirer_id="12345",
                        pan_masked=mask_pan(PAN),
                        pan_hash=PAN_HASH(PAN),
                        source="online",
                        status="posted",
                        created_at=T0,
                    )
                )

        facts = load_gateway_facts(gw)
        by_key = {(f.key, f.outcome): f for f in facts}
        assert len(facts) == len(by_key) == 5
        assert by_key[(key("000001"), APPROVED_STANDIN)].saf_state == "done"
        assert by_key[(key("000001"), APPROVED_STANDIN)].saf_code == "00"
        assert by_key[(key("000002"), REVERSAL)].saf_state == "in_flight"
        assert (key("000004"), APPROVED_ONLINE) in by_key
        assert (key("000005"), APPROVED_ONLINE) in by_key
        postings = load_postings(billing_engine)
        assert postings == load_postings(session_factory(billing_engine))
        assert len(postings) == 5 and {p.status for p in postings} == {"posted"}

        report = reconcile(facts, postings)
        assert report.checked == 6
        assert report.pending == 1  # 000002's reversal
        assert {(m.key, m.kind) for m in report.mismatches} == {
            (idempotency_key(lost), "standin_not_delivered"),
            (key("000006"), "orphan"),
        }
    finally:
        gw_engine.dispose()
        billing_engine.dispose()
