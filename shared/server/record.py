"""The message record: every ISO-8583 message and HSM command a service received or sent,
in a bounded in-memory ring (sans-IO: no clock is read here, callers pass the times).

Contract:

* an entry is masked when it is made, exactly as the logs mask: the PAN (field 2) as first
  6 / last 4, fields 35 and 45 (tracks), 52 (PIN block), 64 and 128 (MACs) replaced by a
  marker, and every other value scrubbed of PAN-like digit runs by the log scrubber. An
  HSM command keeps its header, command code and error code only, never its fields (keys,
  PIN blocks, MAC data);
* the ring keeps the ``size`` newest entries; each entry has a sequence number that only
  grows, so a reader pages with ``since`` (entries after that number);
* HSM commands sent while a service handles a request carry that request's key
  (:data:`current_request`, a context variable set by the service skeleton), so the
  trace joins them to the payment.
"""

from __future__ import annotations

import contextvars
import json
import re
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from shared.pan import mask_pan

#: Fields never shown: tracks, PIN block, MACs.
REDACTED_FIELDS = ("35", "45", "52", "64", "128")
REDACTED = "[redacted]"

#: Kinds of entries.
ISO = "iso"
HSM = "hsm"
API = "api"


class RequestKey(NamedTuple):
    """The key of the request a service is handling: what HSM commands are tagged with."""

    rrn: str
    terminal: str
    stan: str
    tx_time: str


#: The request being handled in the current task (None outside a request).
current_request: contextvars.ContextVar[RequestKey | None] = contextvars.ContextVar(
    "paylab_current_request", default=None
)


def key_of(msg: Mapping[str, str]) -> RequestKey:
    """The request key of an ISO-8583 message (fields 37, 41, 11, 7; empty when absent)."""
    return RequestKey(msg.get("37", ""), msg.get("41", ""), msg.get("11", ""), msg.get("7", ""))


#: A PAN-like digit run: the log scrubber's pattern (:mod:`shared.ops.log`), which the
#: tests hold this module to.
_PAN_RE = re.compile(r"(?<!\d)\d{13,19}(?!\d)")


def _mask_match(match: re.Match[str]) -> str:
    return mask_pan(match.group(0))


def _scrub(value: str) -> str:
    """The log scrubber's masking of a string: every 13-19 digit run as first 6 / last 4."""
    if len(value) < 13:  # too short to hold a PAN: the common case, made cheap
        return value
    return _PAN_RE.sub(_mask_match, value)


def mask_fields(msg: Mapping[str, str]) -> dict[str, str]:
    """A copy of ``msg`` safe to show: the logs' masking, plus tracks redacted."""
    # _scrub inlined: most values are too short to hold a PAN, and a call per field is a
    # visible share of recording every message.
    return {
        k: mask_pan(v)
        if k == "2"
        else REDACTED
        if k in _REDACTED_SET
        else v
        if len(v) < 13
        else _PAN_RE.sub(_mask_match, v)
        for k, v in msg.items()
    }


_REDACTED_SET = frozenset(REDACTED_FIELDS)


@dataclass(frozen=True, slots=True)
class Entry:
    """One recorded message. Times: ``mono_us`` (monotonic clock, comparable between the
    services of one machine) and ``wall_us`` (UNIX time), both in microseconds."""

    seq: int
    service: str
    direction: str  # "in" (received) or "out" (sent)
    link: str  # the peer: a link name ("billing", "hsm") or the listener and peer address
    kind: str  # ISO, HSM or API
    code: str  # MTI, HSM command code, or the API call
    mono_us: int
    wall_us: int
    rrn: str = ""
    terminal: str = ""
    stan: str = ""
    tx_time: str = ""
    result: str = ""  # field 39, the HSM error code, or the API answer's code
    header: str = ""  # the HSM message header (joins a command to its answer)
    note: str = ""  # e.g. "undecodable"
    fields: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "service": self.service,
            "direction": self.direction,
            "link": self.link,
            "kind": self.kind,
            "code": self.code,
            "mono_us": self.mono_us,
            "wall_us": self.wall_us,
            "rrn": self.rrn,
            "terminal": self.terminal,
            "stan": self.stan,
            "tx_time": self.tx_time,
            "result": self.result,
            "header": self.header,
            "note": self.note,
            "fields": self.fields,
        }


@dataclass(frozen=True, slots=True)
class Query:
    """A filter on the record: every given criterion must match; ``since`` is a sequence
    number (entries after it), ``limit`` the page size."""

    rrn: str | None = None
    terminal: str | None = None
    stan: str | None = None
    since: int = 0
    limit: int = 500
    #: Monotonic-clock window in microseconds (inclusive; None: open).
    start_us: int | None = None
    end_us: int | None = None
    #: The newest ``limit`` matches instead of the oldest (still returned oldest first).
    newest: bool = False

    def matches(self, e: Entry) -> bool:
        return (
            e.seq > self.since
            and (self.start_us is None or e.mono_us >= self.start_us)
            and (self.end_us is None or e.mono_us <= self.end_us)
            and (self.rrn is None or e.rrn == self.rrn)
            and (self.terminal is None or e.terminal == self.terminal)
            and (self.stan is None or e.stan == self.stan)
        )


class MessageRecord:
    """A bounded ring of :class:`Entry` for one service. ``size`` 0 turns recording off.

    Recording is on every message's path, so it only appends a tuple (the masked fields
    are computed at once; the :class:`Entry` and the times in microseconds when read)."""

    def __init__(self, service: str, size: int) -> None:
        self.service = service
        self.size = size
        self._ring: deque[tuple[Any, ...]] = deque(maxlen=max(size, 1))
        self._seq = 0

    @property
    def enabled(self) -> bool:
        return self.size > 0

    @property
    def last_seq(self) -> int:
        """The sequence number of the newest entry ever recorded (0: none)."""
        return self._seq

    def __len__(self) -> int:
        return len(self._ring) if self.enabled else 0

    def __iter__(self) -> Iterator[Entry]:
        return (self._entry(t) for t in list(self._ring))

    def _entry(self, t: tuple[Any, ...]) -> Entry:
        seq, direction, link, kind, code, mono, wall, rrn, term, stan, tx, result, hdr, note, f = t
        return Entry(
            seq,
            self.service,
            direction,
            link,
            kind,
            code,
            int(mono * 1e6),
            int(wall * 1e6),
            rrn,
            term,
            stan,
            tx,
            result,
            hdr,
            note,
            f,
        )

    def iso(
        self,
        direction: str,
        link: str,
        msg: Mapping[str, str],
        mono: float,
        wall: float,
        note: str = "",
    ) -> None:
        """Record a decoded ISO-8583 message (masked here)."""
        if not self.enabled:
            return
        self._seq += 1
        get = msg.get
        self._ring.append(
            (
                self._seq,
                direction,
                link,
                ISO,
                get("t", ""),
                mono,
                wall,
                get("37", ""),
                get("41", ""),
                get("11", ""),
                get("7", ""),
                get("39", ""),
                "",
                note,
                mask_fields(msg),
            )
        )

    def undecodable(self, direction: str, link: str, size: int, mono: float, wall: float) -> None:
        """Record a frame that could not be decoded (its size only, never its content)."""
        if not self.enabled:
            return
        self._seq += 1
        note = f"undecodable frame of {size} bytes"
        self._ring.append(
            (self._seq, direction, link, ISO, "????", mono, wall, "", "", "", "", "", "", note, {})
        )

    def hsm(
        self,
        direction: str,
        link: str,
        header: str,
        command: str,
        error: str,
        mono: float,
        wall: float,
        key: RequestKey | None = None,
        note: str = "",
    ) -> None:
        """Record an HSM command or answer: header, command code and error code only."""
        if not self.enabled:
            return
        self._seq += 1
        rrn, term, stan, tx = key or _NO_KEY
        self._ring.append(
            (
                self._seq,
                direction,
                link,
                HSM,
                command,
                mono,
                wall,
                rrn,
                term,
                stan,
                tx,
                error,
                header,
                note,
                _NO_FIELDS,
            )
        )

    def api(
        self,
        direction: str,
        link: str,
        call: str,
        key: RequestKey,
        result: str,
        mono: float,
        wall: float,
        note: str = "",
    ) -> None:
        """Record an HTTP API call that became (or answered) an ISO-8583 request
        (``note``: the acquirer's transaction id)."""
        if not self.enabled:
            return
        self._seq += 1
        rrn, term, stan, tx = key
        self._ring.append(
            (
                self._seq,
                direction,
                link,
                API,
                call,
                mono,
                wall,
                rrn,
                term,
                stan,
                tx,
                result,
                "",
                note,
                _NO_FIELDS,
            )
        )

    def query(self, q: Query) -> tuple[list[Entry], int]:
        """The entries matching ``q``, oldest first, at most ``q.limit``; and the cursor of
        the next page (the last returned entry's number, or the newest number when the page
        is not full; with ``q.newest``, always the newest number)."""
        out: list[Entry] = []
        if not self.enabled:
            return out, self._seq
        ring = list(self._ring)
        if q.newest:
            for t in reversed(ring):
                e = self._entry(t)
                if q.matches(e):
                    out.append(e)
                    if len(out) >= q.limit:
                        break
            out.reverse()
            return out, self._seq
        for t in ring:
            e = self._entry(t)
            if q.matches(e):
                out.append(e)
                if len(out) >= q.limit:
                    return out, e.seq
        return out, self._seq


_NO_FIELDS: dict[str, str] = {}
_NO_KEY = RequestKey("", "", "", "")


def json_lines(entries: list[Entry]) -> str:
    """The entries as JSON lines (one object per line, each line ended), for the file."""
    return "".join(json.dumps(e.as_dict(), separators=(",", ":")) + "\n" for e in entries)
