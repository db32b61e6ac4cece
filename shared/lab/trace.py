"""A payment's ladder from the four services' message records (pure: no sockets).

Input: the entries of ``GET /messages`` (see :mod:`shared.server.record`) of every service,
already filtered to one transaction (same RRN, or same terminal and STAN). Output: the
arrows of the ladder, oldest first. An arrow is one message seen by its sender and its
receiver: a request the acquirer sent to the gateway appears once in the acquirer's
record (``out``, link ``gateway``) and once in the gateway's (``in``); the two are joined
on the MTI and the key fields, and the arrow keeps both times. An arrow seen on one side
only (a request that never arrived, an answer nobody waited for any more) stays an arrow
with the other time missing, and is labelled.

Contract: :func:`build_ladder` never raises on odd input; it orders arrows by the time
the message left (or arrived, when only that is known), and each arrow's ``hop_us`` is
the time from the previous arrow, so a late answer minutes later shows as such.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from shared.iso.codes import describe
from shared.lab.fields import explain

#: Who is on the other end of each service's links (by link name).
LINK_PEERS = {"gateway": "gateway", "billing": "billing", "hsm": "hsm", "acquirer": "acquirer"}

#: The order of the columns of the ladder.
COLUMNS = ("terminal", "acquirer", "gateway", "billing", "hsm")

#: Each service's caller on its ISO listener.
CALLER_OF = {"acquirer": "terminal", "gateway": "acquirer", "billing": "gateway"}

_MTI_NAMES = {
    "0200": "payment/inquiry request",
    "0210": "payment/inquiry answer",
    "0220": "advice (stand-in)",
    "0230": "advice answer",
    "0420": "reversal",
    "0430": "reversal answer",
    "0800": "network management",
    "0810": "network management answer",
}

_HSM_NAMES = {
    "CA": "translate PIN (TPK to ZPK)",
    "CB": "translate PIN answer",
    "EC": "verify PIN (PVV)",
    "ED": "verify PIN answer",
    "M6": "generate MAC",
    "M7": "generate MAC answer",
    "M8": "verify MAC",
    "M9": "verify MAC answer",
    "NC": "diagnostics",
    "ND": "diagnostics answer",
}


@dataclass
class Arrow:
    """One message on the ladder: from ``src`` to ``dst``; times in microseconds (monotonic
    clock of the machine; ``None`` when that side did not record it)."""

    src: str
    dst: str
    kind: str
    code: str
    sent_us: int | None
    received_us: int | None
    wall_us: int
    result: str = ""
    note: str = ""
    header: str = ""
    fields: dict[str, str] = field(default_factory=dict)
    hop_us: int | None = None

    @property
    def at_us(self) -> int:
        """When the message left, or arrived when the sending is unknown."""
        return self.sent_us if self.sent_us is not None else (self.received_us or 0)

    @property
    def transit_us(self) -> int | None:
        """Time on the wire (and in queues) between sender and receiver."""
        if self.sent_us is None or self.received_us is None:
            return None
        return self.received_us - self.sent_us

    def label(self) -> str:
        """What the message is, for people."""
        if self.kind == "hsm":
            return f"{self.code} {_HSM_NAMES.get(self.code, '')}".strip()
        if self.kind == "api":
            return self.code
        return f"{self.code} {_MTI_NAMES.get(self.code, '')}".strip()

    def as_dict(self) -> dict[str, Any]:
        return {
            "from": self.src,
            "to": self.dst,
            "kind": self.kind,
            "code": self.code,
            "label": self.label(),
            "sent_us": self.sent_us,
            "received_us": self.received_us,
            "wall_us": self.wall_us,
            "transit_us": self.transit_us,
            "hop_us": self.hop_us,
            "result": self.result,
            "result_text": describe(self.result) if self.kind != "hsm" and self.result else "",
            "note": self.note,
            "fields": self.fields,
        }


def _ends(e: Mapping[str, Any]) -> tuple[str, str]:
    """(sender, receiver) of one entry."""
    service = str(e.get("service", "?"))
    link = str(e.get("link", ""))
    if e.get("kind") == "api":
        return ("terminal", service) if e.get("direction") == "in" else (service, "terminal")
    peer = LINK_PEERS.get(link)
    if peer is None:  # a listener entry: the peer is whoever calls this service
        peer = CALLER_OF.get(service, "client") if service != "hsm" else "?"
    return (peer, service) if e.get("direction") == "in" else (service, peer)


def _join_key(e: Mapping[str, Any], src: str, dst: str) -> tuple[Any, ...]:
    return (
        src,
        dst,
        e.get("kind"),
        e.get("code"),
        e.get("header", ""),
        e.get("stan", ""),
        e.get("terminal", ""),
        e.get("tx_time", ""),
    )


def build_ladder(entries: Iterable[Mapping[str, Any]]) -> list[Arrow]:
    """The arrows of the entries (see the module docstring)."""
    es = sorted(entries, key=lambda e: (int(e.get("mono_us", 0)), int(e.get("seq", 0))))
    # The HSM's own entries name their peer by address: they are joined to the gateway's or
    # billing's command by header and code, in time order.
    arrows: list[Arrow] = []
    open_sent: dict[tuple[Any, ...], list[Arrow]] = {}
    pending_in: dict[tuple[Any, ...], list[Arrow]] = {}
    hsm_side = [e for e in es if e.get("kind") == "hsm" and e.get("service") == "hsm"]
    for e in es:
        if e.get("kind") == "hsm" and e.get("service") == "hsm":
            continue
        src, dst = _ends(e)
        mono = int(e.get("mono_us", 0))
        key = _join_key(e, src, dst)
        if e.get("direction") == "out":
            waiting = pending_in.get(key)
            if waiting:
                a = waiting.pop(0)
                a.sent_us = mono
                continue
            a = _arrow(e, src, dst, sent=mono, received=None)
            arrows.append(a)
            open_sent.setdefault(key, []).append(a)
        else:
            candidates = open_sent.get(key)
            if candidates:
                a = candidates.pop(0)
                a.received_us = mono
                if not a.result:
                    a.result = str(e.get("result", ""))
                continue
            a = _arrow(e, src, dst, sent=None, received=mono)
            arrows.append(a)
            pending_in.setdefault(key, []).append(a)
    for e in hsm_side:  # the HSM's side: joined to the clients' arrows by header and code
        _join_hsm_side(e, arrows, int(e.get("mono_us", 0)))
    arrows.sort(key=lambda a: a.at_us)
    previous: int | None = None
    for a in arrows:
        a.hop_us = None if previous is None else a.at_us - previous
        previous = a.at_us
        if a.sent_us is None and not a.note:
            a.note = "seen by the receiver only"
        elif a.received_us is None and not a.note and a.dst not in ("terminal", "?"):
            a.note = "not seen by the receiver"
    return arrows


def _arrow(
    e: Mapping[str, Any], src: str, dst: str, sent: int | None, received: int | None
) -> Arrow:
    return Arrow(
        src=src,
        dst=dst,
        kind=str(e.get("kind", "")),
        code=str(e.get("code", "")),
        sent_us=sent,
        received_us=received,
        wall_us=int(e.get("wall_us", 0)),
        result=str(e.get("result", "")),
        note=str(e.get("note", "")) if e.get("kind") != "api" else f"transaction {e.get('note')}",
        header=str(e.get("header", "")),
        fields=dict(e.get("fields") or {}),
    )


def _join_hsm_side(e: Mapping[str, Any], arrows: Sequence[Arrow], mono: int) -> None:
    """Fill the HSM's receive (command) or send (answer) time into the client's arrow."""
    header, code = e.get("header", ""), e.get("code", "")
    for a in arrows:
        if a.kind != "hsm" or a.header != header or a.code != code:
            continue
        if (
            e.get("direction") == "in"
            and a.dst == "hsm"
            and a.received_us is None
            and (a.sent_us is None or a.sent_us <= mono)
        ):
            a.received_us = mono
            return
        if e.get("direction") == "out" and a.src == "hsm" and a.sent_us is None:
            a.sent_us = mono
            return


def render(arrows: Sequence[Arrow], *, fields: bool = False) -> str:
    """The ladder as text: one line per arrow with its times, fields underneath on request."""
    if not arrows:
        return "no messages recorded for this transaction"
    t0 = arrows[0].at_us
    width = 9
    lines = [
        "".join(c.center(width * 2) for c in COLUMNS).rstrip(),
    ]
    for a in arrows:
        lines.append(_arrow_line(a, width))
        when = (a.at_us - t0) / 1000
        transit = "" if a.transit_us is None else f" wire {a.transit_us / 1000:.2f} ms"
        hop = "" if a.hop_us is None else f" +{a.hop_us / 1000:.2f} ms"
        result = ""
        if a.result:
            text = "" if a.kind == "hsm" else f" {describe(a.result)}"
            result = f"  [{a.result}{text}]"
        note = f"  ({a.note})" if a.note else ""
        lines.append(f"    t={when:9.2f} ms{hop}{transit}  {a.label()}{result}{note}")
        if fields and a.fields:
            lines.extend(f"        {line}" for line in describe_fields(a.fields))
    return "\n".join(lines)


def _arrow_line(a: Arrow, width: int) -> str:
    cols = {c: i for i, c in enumerate(COLUMNS)}
    i, j = cols.get(a.src), cols.get(a.dst)
    if i is None or j is None or i == j:
        return f"  {a.src} -> {a.dst}"
    lo, hi = min(i, j), max(i, j)
    start = lo * width * 2 + width
    end = hi * width * 2 + width
    body = "-" * (end - start - 1)
    line = " " * start + ("<" + body if j < i else body + ">")
    return line


def describe_fields(fields: Mapping[str, str]) -> list[str]:
    """Field by field: number, name, value, meaning of codes (:mod:`shared.lab.fields`)."""
    return explain(fields)
