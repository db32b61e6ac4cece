"""Running scenarios (``paylab scenarios run``): the trio shell that performs the steps of a
:class:`~shared.lab.scenario.format.Scenario` and judges them with
``shared/lab/scenario/checks.py``.

A scenario runs against a network this module starts itself (:func:`run_self_started`: the
four services in-process with chaos proxies on every link, ephemeral ports, a temporary data
directory, the scenario's ``settings`` on top of lab defaults) or against a running one
(:func:`run_attached`). Either way the steps reach the network only through its public
interfaces: the acquirer's HTTP API, the gateway's ISO-8583 port (as a terminal of its own,
with the key file's test keys), the admin HTTP APIs and ``/metrics``, and the chaos HTTP API.
Two things read the databases directly, as ``paylab reconcile`` does: generated bills
(``"bill": "auto"``) are written into billing's database, and reconciliation reads the
gateway's and billing's. Every wait polls with a deadline.

Steps run in order; the first failure stops the scenario unless ``keep_going``. Each result
is handed to ``on_result`` as soon as it is known.
"""

from __future__ import annotations

import inspect
import secrets
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import trio

from acquirer.builder import RequestBuilder, Terminal
from billing.demo_data import DEMO_CARD
from hsm.keyfile import load_key_file
from shared.errors import PaylabError
from shared.iso import codec
from shared.iso.framing import FrameParser, encode_frame
from shared.iso.messages import Message, network_request
from shared.lab.scenario.checks import (
    approval_kind,
    check_counts,
    codes_match,
    count_ok,
    evaluate,
    format_counts,
    needs,
)
from shared.lab.scenario.format import (
    NO_ANSWER,
    BreakerStep,
    BurstStep,
    DatabaseStep,
    FaultStep,
    FloodStep,
    HealStep,
    InquireStep,
    PartitionStep,
    PayStep,
    ReconcileStep,
    RepeatStep,
    ReverseStep,
    Scenario,
    SendStep,
    WaitStep,
    auto_bills_needed,
)
from shared.lab.scenario.report import Report, StepResult
from shared.ops.settings import Settings

#: The card every generated bill's payment uses by default (its holder owns the bills).
DEMO_PAN, DEMO_PIN = DEMO_CARD.pan, DEMO_CARD.pin

#: Lab defaults of a self-started network; a scenario's ``settings`` go on top.
LAB_DEFAULTS: dict[str, Any] = {
    "host": "127.0.0.1",
    "billing_timeout": 2.0,
    "gateway_timeout": 5.0,
    "hsm_timeout": 2.0,
    "connect_timeout": 1.0,
    "shutdown_grace": 2.0,
    "log_level": "error",
    "rate_limit_terminal": 0,
}

OnResult = Callable[[StepResult], None]


class StepFailed(Exception):
    """A step's expectation did not hold; the message is the step's detail."""


@dataclass
class Endpoints:
    """Where the network's public interfaces are."""

    acquirer: str
    gateway: str
    billing: str
    hsm: str
    chaos: str | None
    gateway_iso: tuple[str, int]

    @classmethod
    def from_settings(cls, settings: Settings, chaos_port: int | None = None) -> Endpoints:
        h = settings.host
        port = chaos_port if chaos_port is not None else getattr(settings, "chaos_http_port", 8084)
        return cls(
            acquirer=f"http://{h}:{settings.acquirer_http_port}",
            gateway=f"http://{h}:{settings.gateway_http_port}",
            billing=f"http://{h}:{settings.billing_http_port}",
            hsm=f"http://{h}:{settings.hsm_http_port}",
            chaos=f"http://{h}:{port}" if port else None,
            gateway_iso=(h, settings.gateway_iso_port),
        )

    def http(self, service: str) -> str:
        return str(getattr(self, service))


@dataclass
class Sent:
    """What a named step sent and got, for ``repeat`` and ``reverse``."""

    via: str
    code: str | None
    approval: str | None = None
    tx_id: str | None = None
    payload: bytes | None = None
    msg: Message | None = None


@dataclass
class Runner:
    """Runs one scenario's steps against ``endpoints``."""

    scenario: Scenario
    endpoints: Endpoints
    settings: Settings
    bills: list[tuple[str, int]] = field(default_factory=list)
    keep_going: bool = False
    on_result: OnResult | None = None
    named: dict[str, Sent] = field(default_factory=dict)
    builder: RequestBuilder = field(init=False)
    http: httpx.AsyncClient = field(init=False)

    def __post_init__(self) -> None:
        keys = load_key_file(self.settings.key_file)
        s = self.settings
        self.builder = RequestBuilder(
            Terminal(
                acquirer_id=s.acquirer_institution,
                terminal_id=f"SCN{secrets.randbelow(100_000):05d}",
                merchant_id=s.merchant_id,
                currency=s.currency,
                tpk=keys.keys["TPK"].clear,
                tak=keys.keys["TAK"].clear,
            )
        )
        self.http = httpx.AsyncClient(
            timeout=s.gateway_timeout + 5,
            headers={"Authorization": f"Bearer {s.admin_token_operator}"},
        )

    # -- running ------------------------------------------------------------------------------
    async def run(self, source: str) -> Report:
        steps = self.scenario.steps
        report = Report(self.scenario.name, source, total_steps=len(steps))
        try:
            for index, step in enumerate(steps, 1):
                start = time.monotonic()
                try:
                    detail = await self._perform(step)
                    ok = True
                except StepFailed as exc:
                    detail, ok = str(exc), False
                except (httpx.HTTPError, OSError, PaylabError) as exc:
                    detail, ok = f"{type(exc).__name__}: {exc}", False
                result = StepResult(index, step.label, ok, detail, time.monotonic() - start)
                report.results.append(result)
                if self.on_result is not None:
                    self.on_result(result)
                if not ok and not self.keep_going:
                    break
        finally:
            await self.http.aclose()
        return report

    async def _perform(self, step: Any) -> str:
        handlers: dict[type[Any], Callable[[Any], Awaitable[str]]] = {
            PayStep: self._pay,
            InquireStep: self._inquire,
            BurstStep: self._burst,
            SendStep: self._send,
            RepeatStep: self._repeat,
            ReverseStep: self._reverse,
            FaultStep: self._fault,
            PartitionStep: self._partition,
            HealStep: self._heal,
            DatabaseStep: self._database,
            FloodStep: self._flood,
            BreakerStep: self._breaker,
            WaitStep: self._wait,
            ReconcileStep: self._reconcile,
        }
        return await handlers[type(step)](step)

    # -- helpers ------------------------------------------------------------------------------
    def _bill(self, bill: str, amount: int | None) -> tuple[str, int]:
        if bill != "auto":
            assert amount is not None  # the format requires it
            return bill, amount
        if not self.bills:
            raise StepFailed("no generated bill left (more 'auto' payments than seeded)")
        number, due = self.bills.pop(0)
        return number, amount if amount is not None else due

    async def _json(self, method: str, url: str, body: Any = None) -> tuple[int, Any]:
        r = await self.http.request(method, url, json=body)
        try:
            data = r.json()
        except ValueError:
            data = {"error": r.text[:200]}
        return r.status_code, data

    async def _admin(self, method: str, url: str, body: Any = None) -> Any:
        status, data = await self._json(method, url, body)
        if status >= 400:
            error = data.get("error") if isinstance(data, dict) else data
            raise StepFailed(f"{method} {url} answered HTTP {status}: {error}")
        return data

    async def _api(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """The acquirer's API; a 4xx other than 429 (rate limited: an answer) fails the step."""
        status, data = await self._json("POST", self.endpoints.acquirer + path, body)
        if (400 <= status < 500 and status != 429) or not isinstance(data, dict):
            raise StepFailed(f"acquirer answered HTTP {status}: {data}")
        return data

    async def _iso(self, data: bytes, timeout: float, *, framed: bool = True) -> Message | None:
        """Send to the gateway's ISO port on a connection of its own; the answer, or None."""
        host, port = self.endpoints.gateway_iso
        stream = await trio.open_tcp_stream(host, port)
        parser = FrameParser(max_frame=65535)
        try:
            await stream.send_all(encode_frame(data, max_frame=65535) if framed else data)
            with trio.move_on_after(timeout):
                while True:
                    chunk = await stream.receive_some(65536)
                    if not chunk:
                        return None
                    frames = parser.frames(chunk)
                    if frames:
                        return codec.decode(frames[0])
            return None
        except (trio.BrokenResourceError, trio.ClosedResourceError, PaylabError):
            return None
        finally:
            await stream.aclose()

    def _expect(self, what: str, code: str | None, expect: list[str]) -> None:
        if not codes_match(code, expect):
            raise StepFailed(f"{what}: got {code or NO_ANSWER}, expected {'/'.join(expect)}")

    # -- payments and inquiries ---------------------------------------------------------------
    async def _payment(self, bill: str, amount: int, pan: str, pin: str, via: str) -> Sent:
        if via == "acquirer":
            body = {"bill": bill, "amount": amount, "pan": pan, "pin": pin}
            data = await self._api("/payments", body)
            return Sent(via, data.get("response_code"), data.get("approval_code"), data.get("id"))
        msg = self.builder.payment(bill, amount, pan, pin)
        payload = codec.encode(msg)
        answer = await self._iso(payload, self.settings.gateway_timeout)
        code = None if answer is None else answer.get("39")
        approval = None if answer is None else answer.get("38")
        return Sent(via, code, approval, payload=payload, msg=msg)

    async def _inquiry(self, bill: str, via: str) -> Sent:
        if via == "acquirer":
            data = await self._api("/inquiries", {"bill": bill})
            return Sent(via, data.get("response_code"), tx_id=data.get("id"))
        msg = self.builder.inquiry(bill)
        payload = codec.encode(msg)
        answer = await self._iso(payload, self.settings.gateway_timeout)
        return Sent(via, None if answer is None else answer.get("39"), payload=payload, msg=msg)

    async def _pay(self, step: PayStep) -> str:
        bill, amount = self._bill(step.bill, step.amount)
        sent = await self._payment(
            bill, amount, step.pan or DEMO_PAN, step.pin or DEMO_PIN, step.via
        )
        if step.as_:
            self.named[step.as_] = sent
        self._expect(f"payment of {bill}", sent.code, step.expect)
        kind = approval_kind(sent.approval)
        if step.approval in ("online", "standin") and kind != step.approval:
            raise StepFailed(
                f"payment of {bill}: {sent.code}, approval code {sent.approval!r} is not "
                f"{'a biller approval' if step.approval == 'online' else 'a stand-in (SI)'}"
            )
        extra = f", approval {sent.approval}" if sent.approval else ""
        return f"{bill}: {sent.code or NO_ANSWER}{extra}"

    async def _inquire(self, step: InquireStep) -> str:
        sent = await self._inquiry(step.bill, step.via)
        if step.as_:
            self.named[step.as_] = sent
        self._expect(f"inquiry of {step.bill}", sent.code, step.expect)
        return f"{step.bill}: {sent.code}"

    async def _burst(self, step: BurstStep) -> str:
        codes: list[str | None] = []
        limiter = trio.Semaphore(step.concurrency)
        requests = []
        for _ in range(step.count):
            if step.kind == "pay":
                requests.append(self._bill(step.bill, step.amount))
            else:
                requests.append((step.bill, 0))

        async def one(bill: str, amount: int) -> None:
            async with limiter:
                try:
                    if step.kind == "pay":
                        sent = await self._payment(bill, amount, DEMO_PAN, DEMO_PIN, step.via)
                    else:
                        sent = await self._inquiry(bill, step.via)
                    codes.append(sent.code)
                except (httpx.HTTPError, OSError, StepFailed):
                    codes.append(None)

        async with trio.open_nursery() as nursery:
            for bill, amount in requests:
                nursery.start_soon(one, bill, amount)
        ok, counts, problems = check_counts(
            codes, expect=step.expect, expect_counts=step.expect_counts
        )
        if not ok:
            raise StepFailed(f"{format_counts(counts)}: " + "; ".join(problems))
        return format_counts(counts)

    async def _send(self, step: SendStep) -> str:
        framed = step.bytes_hex is None
        msg: Message | None = None
        if step.message is not None:
            msg = self._template(step)
            try:
                payload = codec.encode(msg)
            except (PaylabError, ValueError, KeyError, TypeError) as exc:
                raise StepFailed(f"cannot encode the message: {exc}") from None
        else:
            payload = bytes.fromhex(step.frame_hex or step.bytes_hex or "")
        answer = await self._iso(payload, step.timeout, framed=framed)
        code = None if answer is None else answer.get("39")
        if step.as_:
            approval = None if answer is None else answer.get("38")
            self.named[step.as_] = Sent("gateway", code, approval, payload=payload, msg=msg)
        self._expect("answer", code, step.expect)
        return f"answer {code or NO_ANSWER}"

    def _template(self, step: SendStep) -> Message:
        if step.message == "payment":
            bill, amount = self._bill(step.bill, step.amount)
            msg = self.builder.payment(bill, amount, DEMO_PAN, DEMO_PIN)
        elif step.message == "inquiry":
            msg = self.builder.inquiry("PLN-0001" if step.bill == "auto" else step.bill)
        else:
            msg = network_request("301", f"{secrets.randbelow(999_999) + 1:06d}")
        for key, value in step.fields.items():
            if value is None:
                msg.pop(key, None)
            else:
                msg[key] = value
        for mac_field in ("64", "128"):
            msg.pop(mac_field, None)
        if step.mac != "none" and step.message != "echo":
            msg = self.builder.sign(msg)
            if step.mac == "bad":
                f = "128" if "128" in msg else "64"
                msg[f] = ("0" if msg[f][0] != "0" else "1") + msg[f][1:]
        return msg

    async def _repeat(self, step: RepeatStep) -> str:
        first = self.named[step.of]
        if first.payload is None:
            raise StepFailed(
                f"{step.of} went through the acquirer's API; only a request sent to the "
                "gateway (via: gateway, or send) can be repeated exactly"
            )
        answer = await self._iso(first.payload, self.settings.gateway_timeout)
        code = None if answer is None else answer.get("39")
        approval = None if answer is None else answer.get("38")
        if step.expect == "same":
            if code != first.code or approval != first.approval:
                raise StepFailed(
                    f"repeat got {code or NO_ANSWER} (approval {approval}), the first "
                    f"{first.code} (approval {first.approval})"
                )
        else:
            self._expect("repeat", code, step.expect)
        return f"{code or NO_ANSWER}, approval {approval}, same as the first"

    async def _reverse(self, step: ReverseStep) -> str:
        first = self.named[step.of]
        if first.via == "acquirer":
            if first.tx_id is None:
                raise StepFailed(f"{step.of} has no transaction id")
            data = await self._api(f"/payments/{first.tx_id}/reversal", {})
            code = data.get("response_code")
        else:
            assert first.msg is not None
            msg = self.builder.reversal(first.msg)
            answer = await self._iso(codec.encode(msg), self.settings.gateway_timeout)
            code = None if answer is None else answer.get("39")
        self._expect(f"reversal of {step.of}", code, step.expect)
        return f"reversal: {code}"

    # -- chaos ----------------------------------------------------------------------------------
    def _chaos(self) -> str:
        if self.endpoints.chaos is None:
            raise StepFailed("no chaos API (set chaos_http_port, or start a network with chaos)")
        return self.endpoints.chaos

    async def _fault(self, step: FaultStep) -> str:
        view = await self._admin("POST", f"{self._chaos()}/chaos/{step.link}", step.faults)
        faults = view.get("faults", step.faults) if isinstance(view, dict) else step.faults
        return f"{step.link}: {faults}"

    async def _partition(self, step: PartitionStep) -> str:
        await self._admin("POST", f"{self._chaos()}/chaos/{step.link}/partition", {})
        return f"{step.link} partitioned"

    async def _heal(self, step: HealStep) -> str:
        await self._admin("POST", f"{self._chaos()}/chaos/{step.link}/heal", {})
        return f"{step.link} healed"

    async def _database(self, step: DatabaseStep) -> str:
        url = f"{self._chaos()}/chaos/database/{step.service}"
        await self._admin("POST", url, {"down": step.down})
        return f"{step.service} database {'down' if step.down else 'up'}"

    async def _flood(self, step: FloodStep) -> str:
        body = {"target": step.target, "connections": step.connections, "hold": step.hold}
        await self._admin("POST", f"{self._chaos()}/chaos/flood", body)
        return f"{step.connections} connections to {step.target} for {step.hold:g} s"

    async def _breaker(self, step: BreakerStep) -> str:
        url = f"{self.endpoints.gateway}/breakers/{step.upstream}/{step.action}"
        view = await self._admin("POST", url, {})
        return f"breaker {step.upstream} {view.get('state')}"

    # -- waiting and checking -----------------------------------------------------------------
    async def _snapshot(self, parts: set[str]) -> dict[str, Any]:
        snap: dict[str, Any] = {}
        gw = self.endpoints.gateway
        paths = {"breakers": "/breakers", "saf": "/saf/stats", "links": "/links"}
        for part in parts:
            try:
                if part in paths:
                    status, data = await self._json("GET", gw + paths[part])
                    if status == 200:
                        snap[part] = data
                else:
                    service = part.partition(":")[2]
                    r = await self.http.get(self.endpoints.http(service) + "/metrics")
                    if r.status_code == 200:
                        snap[part] = r.text
            except httpx.HTTPError:
                pass  # not there this time: the condition is false, the next poll may see it
        return snap

    async def _wait(self, step: WaitStep) -> str:
        parts = {needs(c) for c in step.until}
        seen: list[str] = []
        with trio.move_on_after(step.timeout):
            while True:
                snap = await self._snapshot(parts)
                verdicts = [evaluate(c, snap) for c in step.until]
                seen = [s for _, s in verdicts]
                if all(ok for ok, _ in verdicts):
                    return "; ".join(seen)
                await trio.sleep(step.interval)
        raise StepFailed(f"not within {step.timeout:g} s; last seen: {'; '.join(seen)}")

    async def _reconcile(self, step: ReconcileStep) -> str:
        last = "no report"
        with trio.move_on_after(step.timeout):
            while True:
                ok, last = await trio.to_thread.run_sync(self._reconcile_once, step)
                if ok:
                    return last
                await trio.sleep(0.2)
        raise StepFailed(f"not within {step.timeout:g} s: {last}")

    def _reconcile_once(self, step: ReconcileStep) -> tuple[bool, str]:
        from shared.lab.reconcile.sources import reconcile_databases

        report = reconcile_databases(
            self.settings.db_url("gateway"),
            self.settings.db_url("billing"),
            self.settings.db_url("acquirer"),
        )
        kinds = sorted({m.kind for m in report.mismatches})
        detail = (
            f"checked {report.checked}, pending {report.pending}, "
            f"{len(report.mismatches)} mismatches{' (' + ', '.join(kinds) + ')' if kinds else ''}, "
            f"{report.duplicated} bills posted twice"
        )
        ok = True
        if step.expect_clean and report.mismatches:
            ok = False
        if step.pending is not None and not count_ok(report.pending, step.pending):
            ok = False
        return ok, detail


# -- the two modes ----------------------------------------------------------------------------
def lab_settings_for(scenario: Scenario, data_dir: Path, base: Settings | None = None) -> Settings:
    """Settings of a self-started network: ephemeral ports, ``data_dir``, lab defaults, then
    the scenario's ``settings``."""
    values: dict[str, Any] = dict(LAB_DEFAULTS)
    for svc in ("acquirer", "gateway", "billing", "hsm"):
        values[f"{svc}_http_port"] = 0
        values[f"{svc}_iso_port"] = 0
    if "chaos_http_port" in Settings.model_fields:
        values["chaos_http_port"] = 0
    values["data_dir"] = data_dir
    values.update(scenario.settings)
    if base is not None:
        return base.model_copy(update=values)
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


def seed(settings: Settings, scenario: Scenario) -> list[tuple[str, int]]:
    """The generated bills the scenario needs, written into billing's database."""
    count = auto_bills_needed(scenario)
    if not count:
        return []
    from shared.lab.bench import seed_bills

    return seed_bills(settings, count, f"SCN{secrets.token_hex(3).upper()}")


@contextmanager
def _data_dir(keep: Path | None) -> Iterator[Path]:
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        yield keep
        return
    with tempfile.TemporaryDirectory(prefix="paylab-scenario-") as tmp:
        yield Path(tmp)


def _network(factory: Any, settings: Settings) -> Any:
    """A network with chaos proxies; without them where this build has none (chaos steps
    then fail with a clear message)."""
    if "chaos" in inspect.signature(factory).parameters:
        return factory(settings, chaos=True)
    return factory(settings)


async def run_self_started(
    scenario: Scenario,
    source: str,
    *,
    keep_going: bool = False,
    on_result: OnResult | None = None,
    data_dir: Path | None = None,
    base: Settings | None = None,
) -> Report:
    """Start a network with chaos in-process, run ``scenario`` on it, stop it."""
    from shared.lab.network import Network

    with _data_dir(data_dir) as where:
        settings = lab_settings_for(scenario, where, base)
        bills = await trio.to_thread.run_sync(seed, settings, scenario)
        async with trio.open_nursery() as nursery:
            network = _network(Network, settings)
            ports = await nursery.start(network.run)
            try:
                chaos_port = getattr(network, "chaos_port", None)
                endpoints = Endpoints(
                    acquirer=f"http://{settings.host}:{ports['acquirer'].http}",
                    gateway=f"http://{settings.host}:{ports['gateway'].http}",
                    billing=f"http://{settings.host}:{ports['billing'].http}",
                    hsm=f"http://{settings.host}:{ports['hsm'].http}",
                    chaos=f"http://{settings.host}:{chaos_port}" if chaos_port else None,
                    gateway_iso=(settings.host, ports["gateway"].iso),
                )
                runner = Runner(
                    scenario, endpoints, settings, bills, keep_going=keep_going, on_result=on_result
                )
                return await runner.run(source)
            finally:
                with trio.move_on_after(settings.shutdown_grace + 10) as scope:
                    scope.shield = True
                    await network.stop()
                nursery.cancel_scope.cancel()
    raise AssertionError("unreachable")  # pragma: no cover


async def run_attached(
    scenario: Scenario,
    source: str,
    settings: Settings,
    *,
    keep_going: bool = False,
    on_result: OnResult | None = None,
    endpoints: Endpoints | None = None,
) -> Report:
    """Run ``scenario`` on a running network found through ``settings`` (its ``settings``
    overrides are not applied: the network is already configured)."""
    bills = await trio.to_thread.run_sync(seed, settings, scenario)
    runner = Runner(
        scenario,
        endpoints or Endpoints.from_settings(settings),
        settings,
        bills,
        keep_going=keep_going,
        on_result=on_result,
    )
    return await runner.run(source)
