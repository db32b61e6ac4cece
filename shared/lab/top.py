"""``paylab top``: what the network is doing, computed from what it publishes (sans-IO).

Nothing here does I/O. A shell (``shared/lab/watch.py``) fetches, for one instant:

* the Prometheus text of each service's ``GET /metrics`` (``None`` when it did not answer);
* the JSON of the gateway's ``GET /links`` and ``GET /saf/stats``, and every service's
  ``GET /breakers`` (as one list, each breaker naming its ``service``);
* optionally the JSON of the chaos controller's ``GET /chaos``;

and hands them to :meth:`Snapshot.build` with the time it read them (any monotonic clock).
:func:`compute_view` turns two snapshots into a :class:`View`: rates over the interval
between them, totals as of the later one. A source that did not answer, or answered
something unreadable, is recorded as an error and shown as *down*; it never raises.

Definitions (the same as ``docs/metrics.md``):

* **TPS** of a service: the increase of ``paylab_iso_requests_total`` without network
  management (MTI ``0800``, HSM ``NC``) over the interval, per second;
* **approvals and declines by code**: ``paylab_iso_requests_total{mti="0200"}`` at the
  acquirer (what its clients were told; the gateway's figures when the acquirer is down),
  by response code; ``00`` is an approval, every other code a decline or a failure;
* **stand-in approvals**: ``paylab_standin_total{outcome="approved"}`` at the gateway;
* **drain rate**: the increase of ``paylab_saf_forwarded_total{state="done"}`` per second;
* a counter that went down (a restarted service) counts from zero, as Prometheus'
  ``rate()`` does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from shared.iso.codes import describe

#: Services in the order they are shown (the path of a payment).
SERVICES_SHOWN = ("acquirer", "gateway", "billing", "hsm")
#: Request "MTIs" that are network management, not traffic.
MANAGEMENT = frozenset({"0800", "NC"})
#: Breaker states, as ``paylab_breaker_state`` labels them.
BREAKER_STATES = ("closed", "open", "half_open", "forced_open", "disabled")

LabelSet = tuple[tuple[str, str], ...]
Samples = Mapping[tuple[str, LabelSet], float]


def parse_metrics(text: str) -> dict[tuple[str, LabelSet], float]:
    """Every sample of a Prometheus text exposition, keyed by (sample name, sorted labels).

    Raises ``ValueError`` when the text is not an exposition (the caller records it as an
    error of that service).
    """
    out: dict[tuple[str, LabelSet], float] = {}
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                out[(sample.name, tuple(sorted(sample.labels.items())))] = float(sample.value)
    except (ValueError, TypeError, IndexError, KeyError) as exc:
        raise ValueError(f"unreadable metrics: {exc}") from exc
    return out


def select(samples: Samples, name: str, **labels: str) -> list[tuple[dict[str, str], float]]:
    """The samples named ``name`` whose labels include ``labels``: (all labels, value)."""
    found = []
    for (sample_name, label_set), value in samples.items():
        if sample_name != name:
            continue
        as_dict = dict(label_set)
        if all(as_dict.get(k) == v for k, v in labels.items()):
            found.append((as_dict, value))
    return found


def total(samples: Samples, name: str, **labels: str) -> float:
    """Sum of the samples :func:`select` finds (0 when there is none)."""
    return sum(v for _, v in select(samples, name, **labels))


@dataclass(frozen=True)
class Snapshot:
    """The network at one instant ``at`` (seconds of a monotonic clock).

    ``metrics`` holds the parsed samples of each service that answered; ``errors`` says why
    a source is missing (``"gateway"``, ``"gateway /links"``, ``"chaos"``...). ``links``,
    ``breakers``, ``saf`` and ``chaos`` are the admin answers as JSON (None when missing or
    not asked for).
    """

    at: float
    metrics: Mapping[str, Samples]
    links: Sequence[Mapping[str, Any]] | None = None
    breakers: Sequence[Mapping[str, Any]] | None = None
    saf: Mapping[str, Any] | None = None
    chaos: Mapping[str, Any] | None = None
    errors: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def build(
        cls,
        at: float,
        metrics_text: Mapping[str, str | None],
        *,
        links: Any = None,
        breakers: Any = None,
        saf: Any = None,
        chaos: Any = None,
        errors: Mapping[str, str] | None = None,
    ) -> Snapshot:
        """A snapshot from raw inputs; never raises.

        ``metrics_text`` maps a service name to its ``/metrics`` text, or None when it did
        not answer (then ``errors[name]`` should say why; "not answering" otherwise).
        ``links``, ``breakers``, ``saf`` and ``chaos`` are the decoded JSON bodies of
        ``/links``, ``/breakers``, ``/saf/stats`` and ``/chaos``; a body of the wrong shape
        is recorded as an error and dropped.
        """
        errs = dict(errors or {})
        parsed: dict[str, Samples] = {}
        for name, text in metrics_text.items():
            if text is None:
                errs.setdefault(name, "not answering")
                continue
            try:
                parsed[name] = parse_metrics(text)
            except ValueError as exc:
                errs[name] = str(exc)
        link_list = _list_of(links, "links", "gateway /links", errs)
        breaker_list = _list_of(breakers, "breakers", "gateway /breakers", errs)
        saf_stats = _mapping(saf, "counts", "gateway /saf/stats", errs)
        chaos_view = _mapping(chaos, "links", "chaos", errs)
        return cls(at, parsed, link_list, breaker_list, saf_stats, chaos_view, errs)


def _list_of(body: Any, key: str, source: str, errs: dict[str, str]) -> list[Mapping[str, Any]]:
    if body is None:
        return []
    items = body.get(key) if isinstance(body, Mapping) else None
    if not isinstance(items, list) or not all(isinstance(i, Mapping) for i in items):
        errs.setdefault(source, f"unexpected answer (no {key!r} list)")
        return []
    return items


def _mapping(body: Any, key: str, source: str, errs: dict[str, str]) -> Mapping[str, Any] | None:
    if body is None:
        return None
    if not isinstance(body, Mapping) or key not in body:
        errs.setdefault(source, f"unexpected answer (no {key!r})")
        return None
    return body


# -- the view ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class CodeRow:
    """One response code: its meaning, count in the interval, count in total."""

    code: str
    meaning: str
    interval: int
    total: int

    @property
    def approved(self) -> bool:
        return self.code == "00"


@dataclass(frozen=True)
class LinkRow:
    """One upstream link of one service: connections and breaker, plus any chaos on it.

    ``healthy``/``target`` are connections (``target`` None when only metrics were read);
    ``breaker`` the breaker's state (None when unknown); ``open_remaining`` seconds left
    before a half-open probe (OPEN only).
    """

    owner: str
    upstream: str
    healthy: int | None
    target: int | None
    breaker: str | None
    in_flight: int | None = None
    open_remaining: float | None = None
    rejected: int | None = None


@dataclass(frozen=True)
class ChaosRow:
    """Faults active on one chaos link (``faults`` as short text; empty when none)."""

    link: str
    partitioned: bool
    faults: str
    connections: int | None


@dataclass(frozen=True)
class SafRow:
    """The store-and-forward queue: entries by state, and delivered entries per second."""

    queued: int
    in_flight: int
    dead: int
    done: int
    drain_rate: float | None
    oldest_age: float | None

    @property
    def depth(self) -> int:
        return self.queued + self.in_flight


@dataclass(frozen=True)
class View:
    """What ``paylab top`` shows: one frame, computed by :func:`compute_view`.

    Rates are None when they cannot be computed (a service down at either end, or an
    interval of zero).
    """

    interval: float
    services: Mapping[str, bool]
    tps: Mapping[str, float | None]
    codes_source: str | None
    codes: Sequence[CodeRow]
    standin_interval: int | None
    standin_total: int | None
    links: Sequence[LinkRow]
    saf: SafRow | None
    chaos: Sequence[ChaosRow] | None
    errors: Mapping[str, str]
    latency: Sequence[LatencyRow] = ()

    @property
    def all_down(self) -> bool:
        """No service answered at all."""
        return not any(self.services.values())

    def approvals(self, *, interval: bool) -> int:
        return sum((r.interval if interval else r.total) for r in self.codes if r.approved)

    def declines(self, *, interval: bool) -> int:
        return sum((r.interval if interval else r.total) for r in self.codes if not r.approved)


@dataclass(frozen=True)
class LatencyRow:
    """p50 and p95 of one histogram, in seconds, over the interval (``interval`` True) or,
    when the interval saw no request, over the whole run; None when there was none at all."""

    label: str
    p50: float | None
    p95: float | None
    count: int
    interval: bool


#: The latencies ``paylab top`` shows: (label, service, histogram, labels).
LATENCIES: tuple[tuple[str, str, str, dict[str, str]], ...] = (
    ("0200 at the gateway", "gateway", "paylab_iso_request_duration_seconds", {"mti": "0200"}),
    (
        "acquirer → gateway",
        "acquirer",
        "paylab_upstream_call_duration_seconds",
        {"upstream": "gateway"},
    ),
)


def _buckets(samples: Samples, name: str, **labels: str) -> dict[float, float]:
    """Cumulative bucket counts of histogram ``name`` by upper bound, summed over the
    series matching ``labels``."""
    out: dict[float, float] = {}
    for found, value in select(samples, f"{name}_bucket", **labels):
        bound = float(found.get("le", "+Inf"))
        out[bound] = out.get(bound, 0.0) + value
    return out


def histogram_quantile(q: float, buckets: Mapping[float, float]) -> float | None:
    """The ``q`` quantile (0..1) of cumulative ``buckets`` ({upper bound: count}), linearly
    interpolated inside its bucket as Prometheus does; the highest finite bound when it
    falls in the +Inf bucket; None when the buckets count nothing."""
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] <= 0:
        return None
    rank = q * buckets[bounds[-1]]
    lower, below = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if bound == float("inf"):
                return lower
            if count == below:
                return bound
            return lower + (bound - lower) * (rank - below) / (count - below)
        lower, below = bound, count
    return lower


def latency_row(
    label: str, now: Mapping[float, float], before: Mapping[float, float]
) -> LatencyRow:
    """The row of one histogram from its buckets now and at the start of the interval."""
    delta = {b: _increase(v, before.get(b)) for b, v in now.items()}
    top = max(delta) if delta else None
    if top is not None and delta[top] > 0:
        buckets, interval = delta, True
    else:
        buckets, interval = dict(now), False
    count = int(buckets[max(buckets)]) if buckets else 0
    return LatencyRow(
        label,
        histogram_quantile(0.5, buckets),
        histogram_quantile(0.95, buckets),
        count,
        interval,
    )


def _increase(now: float, before: float | None) -> float:
    """Counter increase; a counter that went down restarted, so it counts from zero."""
    if before is None or now < before:
        return now
    return now - before


def _traffic(samples: Samples) -> float:
    return sum(
        v
        for labels, v in select(samples, "paylab_iso_requests_total")
        if labels.get("mti") not in MANAGEMENT
    )


def _codes(samples: Samples) -> dict[str, float]:
    by_code: dict[str, float] = {}
    for labels, v in select(samples, "paylab_iso_requests_total", mti="0200"):
        code = labels.get("code", "??")
        by_code[code] = by_code.get(code, 0.0) + v
    return by_code


def _links_from_metrics(owner: str, samples: Samples) -> dict[str, LinkRow]:
    rows: dict[str, LinkRow] = {}
    upstreams = sorted(
        {labels["upstream"] for labels, _ in select(samples, "paylab_upstream_connections")}
        | {labels["upstream"] for labels, _ in select(samples, "paylab_breaker_state")}
    )
    for up in upstreams:
        healthy = select(samples, "paylab_upstream_connections", upstream=up, state="healthy")
        states = [
            labels["state"]
            for labels, v in select(samples, "paylab_breaker_state", upstream=up)
            if v >= 1
        ]
        rejected = select(samples, "paylab_upstream_rejected_total", upstream=up)
        rows[up] = LinkRow(
            owner=owner,
            upstream=up,
            healthy=int(healthy[0][1]) if healthy else None,
            target=None,
            breaker=states[0] if states else None,
            rejected=int(sum(v for _, v in rejected)) if rejected else None,
        )
    return rows


def _breakers_of(breakers: Sequence[Any], owner: str) -> list[Mapping[str, Any]]:
    """The breakers ``owner`` answered (one without ``service`` is the gateway's)."""
    return [
        b for b in breakers if isinstance(b, Mapping) and (b.get("service") or "gateway") == owner
    ]


def _with_breakers(
    owner: str, rows: dict[str, LinkRow], breakers: Sequence[Mapping[str, Any]]
) -> dict[str, LinkRow]:
    """``owner``'s rows, completed with what its ``/breakers`` says."""
    out = dict(rows)
    for b in breakers:
        name = str(b.get("name", "?"))
        base = out.get(name, LinkRow(owner, name, None, None, None))
        state = b.get("state") or base.breaker
        out[name] = LinkRow(
            owner=owner,
            upstream=name,
            healthy=base.healthy,
            target=base.target,
            breaker=str(state) if state is not None else None,
            in_flight=base.in_flight,
            open_remaining=_float_or_none(b.get("open_remaining")) if state == "open" else None,
            rejected=_int_or_none(b.get("rejected")) if "rejected" in b else base.rejected,
        )
    return out


def _int_or_none(value: Any) -> int | None:
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _float_or_none(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _gateway_links(
    rows: dict[str, LinkRow], links: Sequence[Mapping[str, Any]], breakers: Sequence[Any]
) -> dict[str, LinkRow]:
    """The gateway's rows, completed with what ``/links`` and ``/breakers`` say."""
    by_breaker = {b.get("name"): b for b in breakers}
    out = dict(rows)
    for link in links:
        name = str(link.get("name", "?"))
        base = out.get(name, LinkRow("gateway", name, None, None, None))
        b = by_breaker.get(name, {})
        state = b.get("state") or link.get("breaker") or base.breaker
        out[name] = LinkRow(
            owner="gateway",
            upstream=name,
            healthy=_int_or_none(link.get("healthy")) if "healthy" in link else base.healthy,
            target=_int_or_none(link.get("target")),
            breaker=str(state) if state is not None else None,
            in_flight=_int_or_none(link.get("in_flight")),
            open_remaining=_float_or_none(b.get("open_remaining")) if state == "open" else None,
            rejected=_int_or_none(b.get("rejected")) if "rejected" in b else base.rejected,
        )
    return out


#: Each fault's "no fault" value (``GET /chaos`` shows every key of a link's faults).
_FAULT_DEFAULTS: Mapping[str, Any] = {
    "latency": 0.0,
    "jitter": 0.0,
    "blackhole": 0.0,
    "reset": 0.0,
    "close_after": None,
    "bandwidth": None,
    "probability": 1.0,
}


def _fault_value(key: str, value: Any) -> str:
    if key in ("latency", "jitter") and isinstance(value, int | float):
        return f"{value * 1000:.0f}ms"
    if key in ("blackhole", "reset", "probability") and isinstance(value, int | float):
        return f"{value:.0%}"
    if key == "bandwidth":
        return f"{value}B/s"
    if key == "close_after":
        return f"{value}B"
    return str(value)


def fault_text(faults: Any, *, partitioned: bool = False) -> str:
    """The active faults of a link as short text (``"latency 300ms, reset 10%"``).

    Keys at their "no fault" value are left out; so is ``probability`` when nothing else
    is set, and ``blackhole`` when the link is partitioned (said separately).
    """
    if not isinstance(faults, Mapping):
        return ""
    parts = []
    for key, value in faults.items():
        if key in _FAULT_DEFAULTS and value == _FAULT_DEFAULTS[key]:
            continue
        if key == "blackhole" and partitioned:
            continue
        if value in (None, False, "", 0) and key not in _FAULT_DEFAULTS:
            continue
        parts.append((key, _fault_value(key, value)))
    if all(key == "probability" for key, _ in parts):
        return ""
    return ", ".join(f"{key} {text}" for key, text in parts)


def _chaos_rows(chaos: Mapping[str, Any]) -> list[ChaosRow]:
    rows = []
    for link in chaos.get("links") or []:
        if not isinstance(link, Mapping):
            continue
        rows.append(
            ChaosRow(
                link=str(link.get("name", "?")),
                partitioned=bool(link.get("partitioned")),
                faults=fault_text(link.get("faults"), partitioned=bool(link.get("partitioned"))),
                connections=_int_or_none(link.get("connections")),
            )
        )
    database = chaos.get("database")
    if isinstance(database, Mapping):
        for service, state in database.items():
            if isinstance(state, Mapping) and state.get("down"):
                rows.append(ChaosRow(f"{service} db", False, "down", None))
    return rows


def _saf_row(now: Snapshot, before: Snapshot, dt: float) -> SafRow | None:
    gw = now.metrics.get("gateway")
    counts: Mapping[str, Any] | None = None
    oldest: float | None = None
    if now.saf is not None and isinstance(now.saf.get("counts"), Mapping):
        counts = now.saf["counts"]
        oldest = _float_or_none(now.saf.get("oldest_queued_age_seconds"))
    elif gw is not None:
        counts = {labels.get("state", "?"): v for labels, v in select(gw, "paylab_saf_entries")}
        if not counts:
            return None
        oldest = total(gw, "paylab_saf_oldest_queued_age_seconds") or None
    if counts is None:
        return None
    drain: float | None = None
    gw_before = before.metrics.get("gateway")
    if gw is not None and gw_before is not None and dt > 0:
        done_now = total(gw, "paylab_saf_forwarded_total", state="done")
        done_before = total(gw_before, "paylab_saf_forwarded_total", state="done")
        drain = _increase(done_now, done_before) / dt
    return SafRow(
        queued=int(counts.get("queued", 0) or 0),
        in_flight=int(counts.get("in_flight", 0) or 0),
        dead=int(counts.get("dead", 0) or 0),
        done=int(counts.get("done", 0) or 0),
        drain_rate=drain,
        oldest_age=oldest,
    )


def compute_view(before: Snapshot, now: Snapshot, *, chaos_expected: bool = False) -> View:
    """The view of the interval from ``before`` to ``now`` (``now.at`` > ``before.at``).

    ``chaos_expected``: a chaos controller was asked for, so its absence is an error to
    show rather than a network run without one. Never raises on missing or odd inputs.
    """
    dt = now.at - before.at
    services = {name: name in now.metrics for name in SERVICES_SHOWN}
    for name in now.metrics:
        services.setdefault(name, True)

    tps: dict[str, float | None] = {}
    for name in ("acquirer", "gateway"):
        a, b = now.metrics.get(name), before.metrics.get(name)
        tps[name] = (
            _increase(_traffic(a), _traffic(b)) / dt
            if a is not None and b is not None and dt > 0
            else None
        )

    source = next((n for n in ("acquirer", "gateway") if n in now.metrics), None)
    code_rows: list[CodeRow] = []
    if source is not None:
        now_codes = _codes(now.metrics[source])
        prev = before.metrics.get(source)
        before_codes = _codes(prev) if prev is not None else {}
        for code in sorted(now_codes):
            count = now_codes[code]
            delta = _increase(count, before_codes.get(code)) if prev is not None else 0.0
            if count or delta:
                code_rows.append(CodeRow(code, describe(code), int(delta), int(count)))

    gw_now, gw_before = now.metrics.get("gateway"), before.metrics.get("gateway")
    standin_total: int | None = None
    standin_interval: int | None = None
    if gw_now is not None:
        s_now = total(gw_now, "paylab_standin_total", outcome="approved")
        standin_total = int(s_now)
        if gw_before is not None:
            s_before = total(gw_before, "paylab_standin_total", outcome="approved")
            standin_interval = int(_increase(s_now, s_before))

    links: list[LinkRow] = []
    for owner in SERVICES_SHOWN:
        samples = now.metrics.get(owner)
        rows = _links_from_metrics(owner, samples) if samples is not None else {}
        owned = _breakers_of(now.breakers or [], owner)
        if owner == "gateway" and (now.links or owned):
            rows = _gateway_links(rows, now.links or [], owned)
        elif owned:
            rows = _with_breakers(owner, rows, owned)
        links.extend(rows[k] for k in sorted(rows))

    chaos_rows: list[ChaosRow] | None = None
    if now.chaos is not None:
        chaos_rows = _chaos_rows(now.chaos)
    errors = dict(now.errors)
    if not chaos_expected:
        errors.pop("chaos", None)

    latency = []
    for label, service, name, labels in LATENCIES:
        samples = now.metrics.get(service)
        if samples is not None:
            prev = before.metrics.get(service) or {}
            latency.append(
                latency_row(
                    label, _buckets(samples, name, **labels), _buckets(prev, name, **labels)
                )
            )

    return View(
        latency=latency,
        interval=dt,
        services=services,
        tps=tps,
        codes_source=source,
        codes=code_rows,
        standin_interval=standin_interval,
        standin_total=standin_total,
        links=links,
        saf=_saf_row(now, before, dt),
        chaos=chaos_rows,
        errors=errors,
    )


def parse_seconds(text: str) -> float:
    """A duration as ``"1s"``, ``"500ms"``, ``"2m"`` or a bare number of seconds.

    Raises ``ValueError`` with a readable message for anything else, or a value <= 0.
    """
    raw = text.strip().lower()
    scale = 1.0
    for suffix, factor in (("ms", 0.001), ("s", 1.0), ("m", 60.0)):
        if raw.endswith(suffix):
            raw, scale = raw[: -len(suffix)].strip(), factor
            break
    try:
        value = float(raw) * scale
    except ValueError:
        raise ValueError(f"{text!r} is not a duration (e.g. 1s, 500ms, 2)") from None
    if not value > 0 or value != value or value == float("inf"):
        raise ValueError(f"{text!r}: a duration must be more than zero")
    return value
