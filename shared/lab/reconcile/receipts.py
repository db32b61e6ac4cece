"""Clients' receipts: what the clients kept of their answers, outside the network.

After a restore from a backup, the databases of all three services are back at the time
of the backup: a payment approved after it has left no trace in any of them, and only its
client still knows it was answered 00. A receipts file is that client-side evidence: JSON
objects one after the other, as the acquirer's API answers ``POST /payments`` (at least ``rrn``,
``kind`` and ``response_code`` or ``approved``; ``amount`` when known). ``paylab reconcile
--receipts FILE`` adds a receipt as a client fact when the acquirer's records do not know
its RRN, so a payment the restore lost is reported as ``lost`` (answered 00, no posting).

A receipt is matched to the records by RRN (the acquirer's retrieval reference): the
check belongs right after a restore, before new payments could be given the RRNs again.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from shared.errors import PaylabError
from shared.lab.reconcile.rules import ClientFact, GatewayFact, PostingFact

#: The key prefix of a client fact made from a receipt (no key is known for it).
RECEIPT_KEY = "receipt|"


class ReceiptsError(PaylabError):
    """A receipts file that cannot be read."""


def read_receipts(path: Path) -> list[dict[str, Any]]:
    """The receipts of ``path``: JSON objects one after the other (JSON lines, or the
    pretty-printed answers ``paylab pay --json >> FILE`` appends).

    Raises:
        ReceiptsError: the file cannot be read, or holds something else than JSON objects
            with an ``rrn``.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ReceiptsError(f"cannot read the receipts: {exc}") from exc
    decoder = json.JSONDecoder()
    found: list[dict[str, Any]] = []
    at = 0
    while True:
        while at < len(text) and text[at].isspace():
            at += 1
        if at == len(text):
            return found
        try:
            item, at = decoder.raw_decode(text, at)
        except ValueError as exc:
            raise ReceiptsError(f"{path}: not JSON: {exc}") from exc
        if not isinstance(item, dict) or not item.get("rrn"):
            raise ReceiptsError(
                f"{path}: receipt {len(found) + 1} is not a JSON object with an rrn"
            )
        found.append(item)


def receipt_facts(
    receipts: Iterable[Mapping[str, Any]],
    known_rrns: Iterable[str | None],
) -> list[ClientFact]:
    """Client facts for the payment receipts whose RRN is not in ``known_rrns`` (pure)."""
    known = {r for r in known_rrns if r}
    facts: list[ClientFact] = []
    for receipt in receipts:
        rrn = str(receipt["rrn"])
        if rrn in known or receipt.get("kind", "payment") != "payment":
            continue
        known.add(rrn)
        code = str(receipt.get("response_code") or "--")
        approved = bool(receipt.get("approved", code == "00"))
        amount = receipt.get("amount")
        facts.append(
            ClientFact(
                key=RECEIPT_KEY + rrn,
                kind="payment",
                approved=approved,
                codes=(code,),
                rrn=rrn,
                amount=None if amount is None else int(amount),
            )
        )
    return facts


def known_rrns(
    clients: Sequence[ClientFact] | None,
    gateway: Sequence[GatewayFact],
    postings: Sequence[PostingFact] = (),
) -> set[str]:
    """Every RRN the restored databases know (the acquirer's records, the journal)."""
    del postings  # billing's postings carry the key, not the RRN
    found = {c.rrn for c in clients or () if c.rrn}
    found |= {g.rrn for g in gateway if g.rrn}
    return found
