"""Locust users for paylab: terminals on the gateway's ISO listener, clients of the acquirer API.

Run from the repository root (see ``loadtests/README.md``)::

    locust -f loadtests/locustfile.py --headless -u 10 -r 5 -t 1m

Users
    :class:`IsoTerminalUser` (weight 3) plays a terminal: one persistent TCP connection to
    the gateway's ISO-8583 listener (``PAYLAB_LOAD_ISO_TARGET``, ``--iso-target``, or
    ``--host tcp://host:port``; default ``127.0.0.1:9081``), its own random terminal id,
    MACed requests and PIN blocks under the shipped test keys.
    :class:`AcquirerApiUser` (weight 1) calls the acquirer's HTTP API (``--host http://...``,
    else ``PAYLAB_LOAD_API_URL``, default ``http://127.0.0.1:8080``).

Scenarios of the terminal, by weight (70/20/10):

* 70 normal: inquiry of a random demo bill (00 open, 88 paid), then its payment (00 or 88);
* 10 retry/duplicate: a payment, a deliberate 10 ms client-side timeout, the identical frame
  re-sent on the same connection; both answers must agree (a replay), except that the
  re-send may get 94 while the original is still in flight;
* 10 retry/reversal: a payment (00/88), then its 0420: 00 if it posted, 25 if it did not;
* 3 unknown bill (25), 3 wrong PIN (55), 2 invalid message (a payment without its PIN
  block: 30), 2 undecodable frame (no answer within 0.5 s by design, then an 0800 echo on
  the same connection must answer 00).

Bills: by default the 24 open demo bills. Under load they are soon all paid, and from then
on payments answer ``88`` (bill already paid): an expected outcome, not a failure (a
reversal reopens only a bill its own payment had just paid). For approvals throughout a
run, add generated bills first (``paylab bills add 20000``) and set the variable it prints,
``PAYLAB_LOAD_BILLS=LOAD:20000``: each payment then picks a random one of them. Response
codes seen are tallied per request name and printed at the end.

Every message type of every scenario is reported to locust (``events.request``) under its own
name, e.g. ``0200 payment [normal]``, with the time to the answer and the answer's length; a
failure carries the reason (unexpected code or MTI, MAC that does not verify, no answer, ...).
"""

from __future__ import annotations

import os
import random
import sys
import time
from collections import Counter
from collections.abc import Collection, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from locust import FastHttpUser, User, between, events, task
from locust.env import Environment

_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:  # locust puts loadtests/ on sys.path, the project needs its parent
    sys.path.insert(0, _ROOT)

from loadtests.isoclient import (  # noqa: E402
    Answer,
    IsoConnection,
    NoAnswer,
    UnexpectedResponse,
    bill_picker,
    check_code,
    load_terminal,
    new_terminal_id,
    parse_target,
)
from shared.iso.messages import (  # noqa: E402
    MTI_FINANCIAL_RESP,
    MTI_NETWORK_RESP,
    MTI_REVERSAL_RESP,
    NMI_ECHO,
    StanCounter,
    network_request,
)

#: Bills to pay: the generated ones of ``paylab bills add`` when PAYLAB_LOAD_BILLS is set
#: (``LOAD:10000``), else the open demo bills.
pick_bill = bill_picker(os.environ.get("PAYLAB_LOAD_BILLS"))

#: How long a terminal waits for one answer (the gateway answers within gateway_timeout).
ANSWER_TIMEOUT = float(os.environ.get("PAYLAB_LOAD_ANSWER_TIMEOUT", "10"))
#: The deliberate client-side timeout of the duplicate scenario.
DUPLICATE_CLIENT_TIMEOUT = 0.01
#: How long "no answer" is awaited after an undecodable frame.
NO_ANSWER_WAIT = float(os.environ.get("PAYLAB_LOAD_NO_ANSWER_WAIT", "0.5"))
#: Bills that do not exist (valid format, so billing answers 25, not the validator 30).
UNKNOWN_BILL_PREFIX = "NOSUCH-"

#: (request name, response code) -> count, per process (each worker has its own).
CODES: Counter[tuple[str, str]] = Counter()


@events.init_command_line_parser.add_listener
def _add_options(parser: Any, **_kwargs: Any) -> None:
    parser.add_argument(
        "--iso-target",
        default=os.environ.get("PAYLAB_LOAD_ISO_TARGET", ""),
        help="host:port of the gateway's ISO-8583 listener (default 127.0.0.1:9081, "
        "or --host when it is tcp://host:port)",
    )


@events.test_stop.add_listener
def _print_codes(environment: Environment, **_kwargs: Any) -> None:
    """Response codes per request name, for the run's log (expected declines included)."""
    if not CODES:
        return
    lines = ["response codes seen (this process):"]
    for (name, code), n in sorted(CODES.items()):
        lines.append(f"  {name:<40} {code:>3} {n:>8}")
    print("\n".join(lines), file=sys.stderr)


def iso_target(environment: Environment) -> tuple[str, int]:
    """Where terminals connect: --iso-target / PAYLAB_LOAD_ISO_TARGET, a tcp:// --host, or
    127.0.0.1:9081."""
    opts = environment.parsed_options
    explicit = getattr(opts, "iso_target", "") if opts is not None else ""
    explicit = explicit or os.environ.get("PAYLAB_LOAD_ISO_TARGET", "")
    if explicit:
        return parse_target(explicit)
    host = environment.host or ""
    if host.startswith("tcp://"):
        return parse_target(host)
    return parse_target("127.0.0.1")


class IsoTerminalUser(User):
    """A terminal speaking framed ISO-8583 to the gateway; see the module docstring."""

    weight = 3
    wait_time = between(0.5, 1.5)

    def __init__(self, environment: Environment) -> None:
        super().__init__(environment)
        host, port = iso_target(environment)
        self.conn = IsoConnection(host, port)
        self.builder = load_terminal(new_terminal_id())
        self.network_stans = StanCounter()  # 08xx match on their own MTI class

    def on_stop(self) -> None:
        self.conn.close()

    # -- reporting -------------------------------------------------------------------------
    def _fire(self, name: str, start: float, length: int, exc: Exception | None) -> None:
        self.environment.events.request.fire(
            request_type="ISO",
            name=name,
            response_time=(time.perf_counter() - start) * 1000.0,
            response_length=length,
            exception=exc,
            context={"terminal": self.builder.terminal.terminal_id},
        )

    @contextmanager
    def _measure(self, name: str) -> Iterator[list[int]]:
        """Time the block and fire one request event; the block appends the answer length.

        Any exception fails the request (and the connection is reset unless it was an
        :class:`UnexpectedResponse`, after which the stream is still in step); it is not
        re-raised, but the scenario stops: the block's exception ends the task via
        :class:`_Stop`.
        """
        start = time.perf_counter()
        length: list[int] = []
        try:
            yield length
        except Exception as exc:
            if not isinstance(exc, UnexpectedResponse):
                self.conn.close()
            self._fire(name, start, sum(length), exc)
            raise _Stop from exc
        self._fire(name, start, sum(length), None)

    def _exchange(
        self, name: str, msg: dict[str, str], mti: str, codes: Collection[str], mac: bool = True
    ) -> str:
        """Send ``msg``, check its answer (and its MAC unless ``mac`` is False: network
        management answers carry none); returns the code (raises _Stop on failure)."""
        with self._measure(name) as length:
            answer = self.conn.roundtrip(msg, ANSWER_TIMEOUT)
            length.append(answer.length)
            CODES[(name, answer.code)] += 1
            return check_code(answer, mti, codes, self.builder if mac else None)
        raise AssertionError("unreachable")  # pragma: no cover - _measure raises or returns

    # -- scenarios -------------------------------------------------------------------------
    def _pay_random_bill(self, scenario: str) -> tuple[dict[str, str], str]:
        """Pay an open-at-seed demo bill with its customer's card: (payment, 00 or 88)."""
        bill = pick_bill()
        card = bill.card
        msg = self.builder.payment(bill.bill_number, bill.amount_due, card.pan, card.pin)
        code = self._exchange(f"0200 payment [{scenario}]", msg, MTI_FINANCIAL_RESP, ("00", "88"))
        return msg, code

    @task(70)
    def normal_flow(self) -> None:
        """Inquiry (00 open / 88 paid), then the payment (00, or 88 if paid meanwhile)."""
        with suppress(_Stop):
            bill = pick_bill()
            card = bill.card
            inquiry = self.builder.inquiry(bill.bill_number)
            self._exchange("0200 inquiry [normal]", inquiry, MTI_FINANCIAL_RESP, ("00", "88"))
            pay = self.builder.payment(bill.bill_number, bill.amount_due, card.pan, card.pin)
            self._exchange("0200 payment [normal]", pay, MTI_FINANCIAL_RESP, ("00", "88"))

    @task(10)
    def retry_duplicate(self) -> None:
        """A payment re-sent after a deliberate client timeout: the answers must agree."""
        name = "0200 payment x2 [duplicate]"
        with suppress(_Stop):
            bill = pick_bill()
            card = bill.card
            msg = self.builder.payment(bill.bill_number, bill.amount_due, card.pan, card.pin)
            with self._measure(name) as length:
                payload = self.conn.send(msg)
                answers: list[Answer] = []
                with suppress(NoAnswer):  # expected: the terminal gives up, then repeats
                    answers.append(self.conn.receive_for(msg, DUPLICATE_CLIENT_TIMEOUT))
                self.conn.send_payload(payload)
                while len(answers) < 2:
                    answers.append(self.conn.receive_for(msg, ANSWER_TIMEOUT))
                length.extend(a.length for a in answers)
                codes = sorted(
                    check_code(a, MTI_FINANCIAL_RESP, ("00", "88", "94"), self.builder)
                    for a in answers
                )
                CODES[(name, "+".join(codes))] += 1
                if not _agree(codes):
                    raise UnexpectedResponse(f"original and repeat disagree: {'/'.join(codes)}")

    @task(10)
    def retry_reversal(self) -> None:
        """A payment (00/88), then its reversal: 00 when it posted, 25 when it did not."""
        with suppress(_Stop):
            payment, code = self._pay_random_bill("reversal")
            reversal = self.builder.reversal(payment)
            expected = "00" if code == "00" else "25"
            self._exchange("0420 reversal [reversal]", reversal, MTI_REVERSAL_RESP, (expected,))

    @task(3)
    def error_unknown_bill(self) -> None:
        """Inquiry of a bill that does not exist: 25."""
        bill = UNKNOWN_BILL_PREFIX + str(random.randrange(10**6))
        with suppress(_Stop):
            inquiry = self.builder.inquiry(bill)
            self._exchange("0200 inquiry [unknown-bill]", inquiry, MTI_FINANCIAL_RESP, ("25",))

    @task(3)
    def error_wrong_pin(self) -> None:
        """A payment with a wrong PIN: 55 (billing checks the PIN before the bill)."""
        bill = pick_bill()
        card = bill.card
        wrong = next(p for p in ("9999", "1111", "0001") if p != card.pin)
        with suppress(_Stop):
            msg = self.builder.payment(bill.bill_number, bill.amount_due, card.pan, wrong)
            self._exchange("0200 payment [wrong-pin]", msg, MTI_FINANCIAL_RESP, ("55",))

    @task(2)
    def error_invalid_message(self) -> None:
        """A decodable but invalid request (payment without its PIN block, MACed): 30."""
        bill = pick_bill()
        card = bill.card
        msg = self.builder.payment(bill.bill_number, bill.amount_due, card.pan, card.pin)
        del msg["52"]
        self.builder.sign(msg)  # a valid MAC over the invalid content
        with suppress(_Stop):
            self._exchange("0200 invalid [format-error]", msg, MTI_FINANCIAL_RESP, ("30",))

    @task(2)
    def error_undecodable(self) -> None:
        """An undecodable frame gets no answer (by design); the connection stays usable."""
        with suppress(_Stop):
            with self._measure("garbage [undecodable]") as length:
                self.conn.connect()
                length.append(self.conn.send_payload(b"0200\xff not an ISO-8583 message"))
                try:
                    answer = self.conn.receive(NO_ANSWER_WAIT)
                except NoAnswer:
                    CODES[("garbage [undecodable]", "no answer")] += 1
                else:
                    CODES[("garbage [undecodable]", answer.code or "--")] += 1
                    raise UnexpectedResponse(f"an undecodable frame got an answer: {answer.msg}")
            echo = network_request(NMI_ECHO, self.network_stans.next())
            self._exchange("0800 echo [undecodable]", echo, MTI_NETWORK_RESP, ("00",), mac=False)


class _Stop(Exception):
    """Internal: a step failed (already reported); the scenario ends here."""


def _agree(codes: list[str]) -> bool:
    """Original and repeat answers of one payment: the same code, or one of them 94."""
    first, second = codes
    return first == second != "94" or (second == "94" and first in ("00", "88"))


class AcquirerApiUser(FastHttpUser):
    """A client of the acquirer's HTTP API: inquiry then payment, now and then a bad bill."""

    weight = 1
    wait_time = between(0.5, 1.5)
    host = os.environ.get("PAYLAB_LOAD_API_URL", "http://127.0.0.1:8080")

    def on_start(self) -> None:
        if not self.host or not self.host.startswith(("http://", "https://")):
            # --host tcp://... targets the terminals; the API stays on its own address.
            self.host = os.environ.get("PAYLAB_LOAD_API_URL", "http://127.0.0.1:8080")
            self.client.base_url = self.host

    def _post(self, path: str, name: str, body: dict[str, Any], codes: Collection[str]) -> None:
        with self.client.post(path, json=body, name=name, catch_response=True) as resp:
            try:
                data = resp.json()
            except Exception:
                resp.failure(f"HTTP {resp.status_code}, not JSON")
                return
            code = str(data.get("response_code", "--")) if isinstance(data, dict) else "--"
            CODES[(name, code)] += 1
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code} (code {code})")
            elif code not in codes:
                resp.failure(f"expected {'/'.join(sorted(codes))}, got {code}")
            else:
                resp.success()

    @task(9)
    def inquiry_then_payment(self) -> None:
        bill = pick_bill()
        card = bill.card
        self._post("/inquiries", "POST /inquiries", {"bill": bill.bill_number}, ("00", "88"))
        body = {
            "bill": bill.bill_number,
            "amount": bill.amount_due,
            "pan": card.pan,
            "pin": card.pin,
        }
        self._post("/payments", "POST /payments", body, ("00", "88"))

    @task(1)
    def unknown_bill(self) -> None:
        bill = UNKNOWN_BILL_PREFIX + str(random.randrange(10**6))
        self._post("/inquiries", "POST /inquiries [unknown-bill]", {"bill": bill}, ("25",))
