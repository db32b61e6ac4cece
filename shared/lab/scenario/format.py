"""The scenario format: JSON documents of steps that drive the network, break it and check
it, loaded and validated into typed steps (sans-IO).

:func:`load_scenario` turns a document into a :class:`Scenario` of typed steps and wait
conditions, or raises :class:`ScenarioError` naming the step, its kind and the field. How
a step's outcome is judged is ``shared/lab/scenario/checks.py``, the results
``shared/lab/scenario/report.py``, the trio shell that performs the steps
``shared/lab/scenario/runner.py``; the format is documented in ``docs/scenarios.md``.

A document::

    {"name": "normal flow", "description": "...", "settings": {"breaker_open_wait": 2},
     "steps": [{"do": "pay", "bill": "auto", "expect": ["00"], "as": "p1"}, ...]}

Steps are numbered from 1 in every message.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from shared.errors import PaylabError

#: The "code" of a request that got no answer at all (the connection closed, or a timeout).
NO_ANSWER = "no_answer"
#: Services whose HTTP port a scenario may read (``/metrics``) or act on.
SERVICE_NAMES = ("acquirer", "gateway", "billing", "hsm")
#: Chaos links: acquirer -> gateway, gateway -> billing, gateway and billing -> HSM.
LINK_NAMES = ("gateway", "billing", "hsm")
#: Breaker states as the gateway's ``GET /breakers`` shows them.
BREAKER_STATES = ("closed", "open", "half_open", "forced_open", "disabled")
#: SAF queue states (``GET /saf/stats`` counts).
SAF_STATES = ("queued", "in_flight", "done", "dead", "cancelled")

_CODE = re.compile(r"^(\d{2}|no_answer)$")
_COUNT = re.compile(r"^\s*(>=|<=|==|!=|>|<|=)?\s*(\d+)\s*$")


class ScenarioError(PaylabError):
    """A scenario document that cannot be used; the message names the step and field."""


# -- counts ---------------------------------------------------------------------------------------
def parse_count(spec: str | int) -> tuple[str, int]:
    """``">=1"``, ``"0"``, ``"< 5"`` or an int -> (operator, number); ValueError otherwise."""
    if isinstance(spec, bool):
        raise ValueError(f"not a count: {spec!r}")
    if isinstance(spec, int):
        if spec < 0:
            raise ValueError(f"a count cannot be negative: {spec}")
        return "==", spec
    m = _COUNT.match(spec)
    if m is None:
        raise ValueError(
            f"not a count {spec!r}: use a number, optionally after >=, <=, >, <, ==, !="
        )
    op = m.group(1) or "=="
    return ("==" if op == "=" else op), int(m.group(2))


# -- the document -------------------------------------------------------------------------------
def _check_codes(v: list[str]) -> list[str]:
    bad = [c for c in v if not _CODE.match(c)]
    if bad:
        raise ValueError(f"response codes are two digits or 'no_answer', got {bad}")
    if not v:
        raise ValueError("at least one response code")
    return v


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)


class _Step(_Model):
    name: str | None = Field(None, description="A label shown in the output.")

    @property
    def label(self) -> str:
        """The step's name, or a description made from its fields."""
        return self.name or self.describe()

    def describe(self) -> str:
        return str(getattr(self, "do", "step"))


Via = Literal["acquirer", "gateway"]
Approval = Literal["online", "standin", "any"]


class PayStep(_Step):
    """A payment: through the acquirer's HTTP API, or as a terminal to the gateway."""

    do: Literal["pay"]
    bill: str = Field("auto", description="Bill number, or 'auto' for a fresh generated bill.")
    amount: int | None = Field(None, gt=0, description="Minor units; 'auto' bills know theirs.")
    pan: str | None = None
    pin: str | None = None
    via: Via = "acquirer"
    expect: list[str] = ["00"]
    approval: Approval | None = Field(
        None, description="Field 38 must be a biller's code (online) or SI+4 (standin)."
    )
    as_: str | None = Field(None, alias="as")

    _codes = field_validator("expect")(_check_codes)

    @model_validator(mode="after")
    def _amount_needed(self) -> PayStep:
        if self.bill != "auto" and self.amount is None:
            raise ValueError("amount is required unless bill is 'auto'")
        return self

    def describe(self) -> str:
        return f"pay {self.bill} via {self.via}, expect {'/'.join(self.expect)}"


class InquireStep(_Step):
    do: Literal["inquire"]
    bill: str
    via: Via = "acquirer"
    expect: list[str] = ["00"]
    as_: str | None = Field(None, alias="as")

    _codes = field_validator("expect")(_check_codes)

    def describe(self) -> str:
        return f"inquire {self.bill}, expect {'/'.join(self.expect)}"


class BurstStep(_Step):
    """``count`` requests, ``concurrency`` at once; judged by :func:`check_counts`."""

    do: Literal["burst"]
    count: int = Field(gt=0, le=10_000)
    concurrency: int = Field(4, gt=0, le=500)
    kind: Literal["pay", "inquire"] = "pay"
    bill: str = "auto"
    amount: int | None = Field(None, gt=0)
    via: Via = "acquirer"
    expect: list[str] | None = None
    expect_counts: dict[str, str | int] | None = None

    _codes = field_validator("expect")(_check_codes)

    @field_validator("expect_counts")
    @classmethod
    def _counts(cls, v: dict[str, str | int] | None) -> dict[str, str | int] | None:
        for code, spec in (v or {}).items():
            _check_codes([code])
            parse_count(spec)
        return v

    @model_validator(mode="after")
    def _judged(self) -> BurstStep:
        if self.expect is None and self.expect_counts is None:
            raise ValueError("give expect (allowed codes) or expect_counts (code: count)")
        if self.kind == "pay" and self.bill != "auto" and self.amount is None:
            raise ValueError("amount is required unless bill is 'auto'")
        if self.kind == "inquire" and self.bill == "auto":
            raise ValueError("an inquiry burst needs a bill number")
        return self

    def describe(self) -> str:
        return f"burst of {self.count} {self.kind} ({self.concurrency} at once)"


class SendStep(_Step):
    """A raw ISO-8583 request to the gateway's port, or bytes that are no request at all.

    ``message``: a template (payment, inquiry, echo) with ``fields`` replacing or (null)
    removing fields, MACed unless ``mac`` is ``"bad"`` or ``"none"``. ``frame_hex``: the
    payload of one frame, as is. ``bytes_hex``: bytes sent unframed (e.g. a bad length).
    """

    do: Literal["send"]
    message: Literal["payment", "inquiry", "echo"] | None = None
    bill: str = "auto"
    amount: int | None = Field(None, gt=0)
    fields: dict[str, str | None] = {}
    mac: Literal["valid", "bad", "none"] = "valid"
    frame_hex: str | None = None
    bytes_hex: str | None = None
    expect: list[str] = ["00"]
    timeout: float = Field(5.0, gt=0, le=120)
    as_: str | None = Field(None, alias="as")

    _codes = field_validator("expect")(_check_codes)

    @model_validator(mode="after")
    def _one_payload(self) -> SendStep:
        given = [k for k in ("message", "frame_hex", "bytes_hex") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of message, frame_hex, bytes_hex")
        for k in ("frame_hex", "bytes_hex"):
            raw = getattr(self, k)
            if raw is not None:
                try:
                    bytes.fromhex(raw)
                except ValueError:
                    raise ValueError(f"{k} is not hexadecimal") from None
        if self.message == "payment" and self.bill != "auto" and self.amount is None:
            raise ValueError("amount is required unless bill is 'auto'")
        return self

    def describe(self) -> str:
        what = self.message or ("a frame" if self.frame_hex is not None else "raw bytes")
        return f"send {what} to the gateway, expect {'/'.join(self.expect)}"


class RepeatStep(_Step):
    """The exact request of an earlier step sent again (same STAN, RRN, time, MAC)."""

    do: Literal["repeat"]
    of: str
    expect: Literal["same"] | list[str] = "same"

    @field_validator("expect")
    @classmethod
    def _expect(cls, v: Literal["same"] | list[str]) -> Literal["same"] | list[str]:
        return v if v == "same" else _check_codes(list(v))

    def describe(self) -> str:
        return f"repeat {self.of}"


class ReverseStep(_Step):
    do: Literal["reverse"]
    of: str
    expect: list[str] = ["00"]

    _codes = field_validator("expect")(_check_codes)

    def describe(self) -> str:
        return f"reverse {self.of}, expect {'/'.join(self.expect)}"


class FaultStep(_Step):
    """Faults merged into a chaos link's (latency, jitter, blackhole, reset, ...)."""

    do: Literal["fault"]
    link: Literal["gateway", "billing", "hsm"]
    faults: dict[str, Any]

    @field_validator("faults")
    @classmethod
    def _non_empty(cls, v: dict[str, Any]) -> dict[str, Any]:
        if not v:
            raise ValueError("at least one fault")
        return v

    def describe(self) -> str:
        return f"fault on {self.link}: {json.dumps(self.faults, sort_keys=True)}"


class PartitionStep(_Step):
    do: Literal["partition"]
    link: Literal["gateway", "billing", "hsm", "all"]

    def describe(self) -> str:
        return f"partition {self.link}"


class HealStep(_Step):
    do: Literal["heal"]
    link: Literal["gateway", "billing", "hsm", "all"] = "all"

    def describe(self) -> str:
        return f"heal {self.link}"


class DatabaseStep(_Step):
    do: Literal["database"]
    service: Literal["acquirer", "gateway", "billing"]
    down: bool

    def describe(self) -> str:
        return f"{self.service} database {'down' if self.down else 'up'}"


class FloodStep(_Step):
    do: Literal["flood"]
    target: Literal["acquirer", "gateway", "billing", "hsm"] = "gateway"
    connections: int = Field(300, gt=0, le=100_000)
    hold: float = Field(10.0, gt=0, le=3600)

    def describe(self) -> str:
        return f"flood {self.target} with {self.connections} connections for {self.hold:g} s"


class BreakerStep(_Step):
    """An operator action on one of the gateway's breakers."""

    do: Literal["breaker"]
    upstream: Literal["billing", "hsm"] = "billing"
    action: Literal["reset", "force-open", "disable"]

    def describe(self) -> str:
        return f"breaker {self.action} {self.upstream}"


# -- wait conditions --------------------------------------------------------------------------
CountSpec = str | int


class BreakerCondition(_Model):
    breaker: Literal["billing", "hsm"]
    state: str | list[str]

    @field_validator("state")
    @classmethod
    def _states(cls, v: str | list[str]) -> str | list[str]:
        bad = [s for s in ([v] if isinstance(v, str) else v) if s not in BREAKER_STATES]
        if bad:
            raise ValueError(f"unknown breaker state(s) {bad}; choose from {BREAKER_STATES}")
        return v

    def describe(self) -> str:
        states = self.state if isinstance(self.state, str) else " or ".join(self.state)
        return f"breaker {self.breaker} {states}"


class SafDepthCondition(_Model):
    saf_depth: CountSpec

    @field_validator("saf_depth")
    @classmethod
    def _spec(cls, v: CountSpec) -> CountSpec:
        parse_count(v)
        return v

    def describe(self) -> str:
        return f"queue depth {self.saf_depth}"


class SafCondition(_Model):
    saf: dict[str, CountSpec]

    @field_validator("saf")
    @classmethod
    def _states(cls, v: dict[str, CountSpec]) -> dict[str, CountSpec]:
        if not v:
            raise ValueError("name at least one queue state")
        for state, spec in v.items():
            if state not in SAF_STATES:
                raise ValueError(f"unknown queue state {state!r}; choose from {SAF_STATES}")
            parse_count(spec)
        return v

    def describe(self) -> str:
        return "queue " + ", ".join(f"{s} {c}" for s, c in self.saf.items())


class MetricCondition(_Model):
    """The sum of a metric's samples matching ``labels``, on ``service``'s ``/metrics``."""

    metric: str = Field(pattern=r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
    labels: dict[str, str] = {}
    service: Literal["acquirer", "gateway", "billing", "hsm"] = "gateway"
    op: Literal[">=", "<=", "==", "!=", ">", "<"] = ">="
    value: float = 1

    def describe(self) -> str:
        labels = ",".join(f'{k}="{v}"' for k, v in self.labels.items())
        return f"{self.service} {self.metric}{{{labels}}} {self.op} {self.value:g}"


class LinkCondition(_Model):
    """One of the gateway's upstream links (``GET /links``).

    ``healthy: true``: every target connection up and the breaker closed (``false``: not
    so). ``connections``: a count spec on the healthy connections (``0``: the link is down).
    """

    link: Literal["billing", "hsm"]
    healthy: bool | None = None
    connections: CountSpec | None = None

    @model_validator(mode="after")
    def _something(self) -> LinkCondition:
        if self.healthy is None and self.connections is None:
            raise ValueError("give healthy (true/false) or connections (a count)")
        if self.connections is not None:
            parse_count(self.connections)
        return self

    def describe(self) -> str:
        parts = []
        if self.healthy is not None:
            parts.append("healthy" if self.healthy else "unhealthy")
        if self.connections is not None:
            parts.append(f"{self.connections} healthy connections")
        return f"link {self.link} " + ", ".join(parts)


Condition = BreakerCondition | SafDepthCondition | SafCondition | MetricCondition | LinkCondition
_CONDITION_KEYS: dict[str, type[BaseModel]] = {
    "breaker": BreakerCondition,
    "saf_depth": SafDepthCondition,
    "saf": SafCondition,
    "metric": MetricCondition,
    "link": LinkCondition,
}


def _condition(v: Any) -> Any:
    """Pick the condition model by its distinguishing key, for a clear error message."""
    if isinstance(v, BaseModel):
        return v
    if not isinstance(v, dict):
        raise ValueError('a condition is an object such as {"breaker": "billing", ...}')
    kinds = [k for k in _CONDITION_KEYS if k in v]
    if len(kinds) != 1:
        raise ValueError(f"a condition has exactly one of the keys {', '.join(_CONDITION_KEYS)}")
    return _CONDITION_KEYS[kinds[0]].model_validate(v)


class WaitStep(_Step):
    """Poll until ``until`` holds (all of them, for a list), at most ``timeout`` seconds."""

    do: Literal["wait"]
    until: list[Condition]
    timeout: float = Field(10.0, gt=0, le=600)
    interval: float = Field(0.1, gt=0, le=10)

    @field_validator("until", mode="before")
    @classmethod
    def _conditions(cls, v: Any) -> list[Any]:
        items = v if isinstance(v, list) else [v]
        if not items:
            raise ValueError("at least one condition")
        return [_condition(c) for c in items]

    def describe(self) -> str:
        return "wait for " + " and ".join(c.describe() for c in self.until)


class ReconcileStep(_Step):
    """Gateway journal and queue against billing's postings; polls up to ``timeout``."""

    do: Literal["reconcile"]
    expect_clean: bool = True
    pending: CountSpec | None = Field(0, description="Transactions still being delivered.")
    timeout: float = Field(10.0, gt=0, le=600)

    @field_validator("pending")
    @classmethod
    def _pending(cls, v: CountSpec | None) -> CountSpec | None:
        if v is not None:
            parse_count(v)
        return v

    def describe(self) -> str:
        return "reconcile" + (", expect clean" if self.expect_clean else "")


Step = Annotated[
    PayStep
    | InquireStep
    | BurstStep
    | SendStep
    | RepeatStep
    | ReverseStep
    | FaultStep
    | PartitionStep
    | HealStep
    | DatabaseStep
    | FloodStep
    | BreakerStep
    | WaitStep
    | ReconcileStep,
    Field(discriminator="do"),
]
STEP_KINDS = (
    "pay",
    "inquire",
    "burst",
    "send",
    "repeat",
    "reverse",
    "fault",
    "partition",
    "heal",
    "database",
    "flood",
    "breaker",
    "wait",
    "reconcile",
)


class Scenario(_Model):
    name: str = Field(min_length=1)
    description: str = ""
    settings: dict[str, Any] = {}
    steps: list[Step] = Field(min_length=1)

    @model_validator(mode="after")
    def _references(self) -> Scenario:
        """Every ``of`` names an earlier step's ``as``; names are unique."""
        seen: dict[str, str] = {}
        for i, step in enumerate(self.steps, 1):
            ref = getattr(step, "of", None)
            if ref is not None:
                if ref not in seen:
                    raise ValueError(f"step {i} ({step.do}): of: no earlier step is named {ref!r}")
                if isinstance(step, ReverseStep) and seen[ref] != "pay":
                    raise ValueError(f"step {i} (reverse): of: {ref!r} is not a payment")
            alias = getattr(step, "as_", None)
            if alias is not None:
                if alias in seen:
                    raise ValueError(f"step {i} ({step.do}): as: {alias!r} is used twice")
                payment = isinstance(step, SendStep) and step.message == "payment"
                seen[alias] = "pay" if payment else step.do
        return self


_SCENARIO = TypeAdapter(Scenario)


def _where(loc: Sequence[int | str], doc: Any) -> str:
    """``step 3 (pay): amount`` from a pydantic error location."""
    parts = list(loc)
    if len(parts) >= 2 and parts[0] == "steps" and isinstance(parts[1], int):
        index = parts[1]
        rest = parts[2:]
        kind = None
        steps = doc.get("steps") if isinstance(doc, dict) else None
        if isinstance(steps, list) and index < len(steps) and isinstance(steps[index], dict):
            kind = steps[index].get("do")
        if rest and rest[0] == kind:
            rest = rest[1:]  # the discriminator's own level
        head = f"step {index + 1}" + (f" ({kind})" if isinstance(kind, str) else "")
        tail = ".".join(str(p) for p in rest if not str(p).startswith("function-"))
        return f"{head}: {tail}" if tail else head
    return ".".join(str(p) for p in parts) or "document"


def load_scenario(
    text: str | bytes,
    source: str = "scenario",
    *,
    known_settings: Iterable[str] | None = None,
) -> Scenario:
    """Parse and validate a scenario document.

    ``known_settings``: the setting names ``settings`` may override (unknown ones are an
    error). Raises :class:`ScenarioError` with ``source``, the step (numbered from 1), its
    kind and the field for every problem found.
    """
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise ScenarioError(f"{source}: not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise ScenarioError(f"{source}: a scenario is a JSON object with name and steps")
    try:
        scenario = _SCENARIO.validate_python(doc)
    except ValidationError as exc:
        problems = []
        for e in exc.errors(include_url=False, include_input=False):
            msg = e["msg"].removeprefix("Value error, ")
            if e["type"] == "union_tag_invalid":
                msg = f"unknown step kind; choose from {', '.join(STEP_KINDS)}"
            elif e["type"] == "union_tag_not_found":
                msg = f'a step needs "do": one of {", ".join(STEP_KINDS)}'
            where = _where(e["loc"], doc) if e["loc"] else ""
            problems.append(f"{where}: {msg}" if where else msg)
        raise ScenarioError(f"{source}: " + "; ".join(problems)) from None
    if known_settings is not None:
        unknown = sorted(set(scenario.settings) - set(known_settings))
        if unknown:
            raise ScenarioError(f"{source}: settings: unknown setting(s) {', '.join(unknown)}")
    return scenario


def auto_bills_needed(scenario: Scenario) -> int:
    """How many generated bills the steps with ``bill: "auto"`` use, at most."""
    n = 0
    for step in scenario.steps:
        if isinstance(step, PayStep) and step.bill == "auto":
            n += 1
        elif isinstance(step, BurstStep) and step.kind == "pay" and step.bill == "auto":
            n += step.count
        elif isinstance(step, SendStep) and step.message == "payment" and step.bill == "auto":
            n += 1
    return n
