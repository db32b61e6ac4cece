"""Judging a scenario's steps (sans-IO): response codes and counts against what a step
expects, and wait conditions against a snapshot of the network.

The runner (``shared/lab/scenario/runner.py``) fetches; the decisions are here.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from shared.lab.scenario.format import (
    NO_ANSWER,
    BreakerCondition,
    Condition,
    LinkCondition,
    SafCondition,
    SafDepthCondition,
    parse_count,
)

_OPS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge,
    "<=": operator.le,
    "==": operator.eq,
    "=": operator.eq,
    "!=": operator.ne,
    ">": operator.gt,
    "<": operator.lt,
}


# -- counts and codes --------------------------------------------------------------------------
def compare(value: float, op: str, target: float) -> bool:
    """``value <op> target`` for one of ``>= <= == != > <``."""
    try:
        return _OPS[op](value, target)
    except KeyError:
        raise ValueError(f"unknown comparison {op!r}") from None


def count_ok(value: float, spec: str | int) -> bool:
    """Whether ``value`` satisfies a count spec (:func:`parse_count`)."""
    op, n = parse_count(spec)
    return compare(value, op, n)


def codes_match(code: str | None, expect: Sequence[str]) -> bool:
    """Whether a response code (None: no answer) is one of ``expect`` (may hold ``no_answer``)."""
    return (NO_ANSWER if code is None else code) in expect


def check_counts(
    codes: Iterable[str | None],
    *,
    expect: Sequence[str] | None = None,
    expect_counts: Mapping[str, str | int] | None = None,
) -> tuple[bool, dict[str, int], list[str]]:
    """Judge the answers of a burst: (ok, counts by code, problems).

    ``expect``: every answer must be one of these codes. ``expect_counts``: per code (or
    ``no_answer``), a count spec its number of answers must satisfy; codes not named are
    free. Both may be given.
    """
    counts: dict[str, int] = {}
    for code in codes:
        key = NO_ANSWER if code is None else code
        counts[key] = counts.get(key, 0) + 1
    problems: list[str] = []
    if expect is not None:
        stray = {c: n for c, n in counts.items() if c not in expect}
        if stray:
            shown = ", ".join(f"{n}x {c}" for c, n in sorted(stray.items()))
            problems.append(f"unexpected answers {shown} (expected only {', '.join(expect)})")
    for code, spec in (expect_counts or {}).items():
        if not count_ok(counts.get(code, 0), spec):
            problems.append(f"{code}: {counts.get(code, 0)}, expected {spec}")
    return not problems, counts, problems


def format_counts(counts: Mapping[str, int]) -> str:
    """``"00 x12, 91 x3"``: a burst's answers for a one-line detail."""
    return ", ".join(f"{c} x{n}" for c, n in sorted(counts.items())) or "no answers"


# -- conditions against a snapshot --------------------------------------------------------------
def metric_value(text: str, name: str, labels: Mapping[str, str]) -> float:
    """The sum of the samples of ``name`` in Prometheus text whose labels include ``labels``.

    A counter may be named with or without its ``_total`` suffix. No matching sample: 0.
    """
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name != name:
                continue
            if all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def needs(condition: Condition) -> str:
    """Which part of a snapshot a condition reads: breakers, saf, links or metrics:<svc>."""
    if isinstance(condition, BreakerCondition):
        return "breakers"
    if isinstance(condition, SafDepthCondition | SafCondition):
        return "saf"
    if isinstance(condition, LinkCondition):
        return "links"
    return f"metrics:{condition.service}"


def evaluate(condition: Condition, snapshot: Mapping[str, Any]) -> tuple[bool, str]:
    """Whether ``condition`` holds on ``snapshot``, and what was seen.

    The snapshot holds what the runner fetched, under :func:`needs`'s keys:
    ``breakers``: the gateway's ``GET /breakers``; ``saf``: ``GET /saf/stats``; ``links``:
    ``GET /links``; ``metrics:<service>``: that service's ``/metrics`` text. A part that
    is missing makes the condition false (``seen`` says why).
    """
    part = snapshot.get(needs(condition))
    if part is None:
        return False, f"no {needs(condition)} data"
    if isinstance(condition, BreakerCondition):
        states = [condition.state] if isinstance(condition.state, str) else condition.state
        for b in part.get("breakers", []):
            if b.get("name") == condition.breaker:
                return b.get("state") in states, f"breaker {condition.breaker} {b.get('state')}"
        return False, f"no breaker {condition.breaker}"
    if isinstance(condition, SafDepthCondition):
        depth = int(part.get("depth", 0))
        return count_ok(depth, condition.saf_depth), f"queue depth {depth}"
    if isinstance(condition, SafCondition):
        counts = part.get("counts", {})
        seen = {s: int(counts.get(s, 0)) for s in condition.saf}
        ok = all(count_ok(seen[s], spec) for s, spec in condition.saf.items())
        return ok, "queue " + ", ".join(f"{s} {n}" for s, n in seen.items())
    if isinstance(condition, LinkCondition):
        for link in part.get("links", []):
            if link.get("name") == condition.link:
                up = int(link.get("healthy", 0))
                target = max(int(link.get("target", 1)), 1)
                healthy = link.get("breaker") == "closed" and up >= target
                ok = condition.healthy is None or healthy == condition.healthy
                if condition.connections is not None:
                    ok = ok and count_ok(up, condition.connections)
                return ok, (
                    f"link {condition.link} {up}/{link.get('target')} healthy, "
                    f"breaker {link.get('breaker')}"
                )
        return False, f"no link {condition.link}"
    value = metric_value(str(part), condition.metric, condition.labels)
    return compare(value, condition.op, condition.value), f"{condition.metric} = {value:g}"


# -- answers ------------------------------------------------------------------------
def approval_kind(approval_code: str | None) -> str | None:
    """``standin`` for ``SI`` + 4 digits, ``online`` for a biller's 6 digits, else None."""
    if approval_code is None:
        return None
    if re.fullmatch(r"SI\d{4}", approval_code):
        return "standin"
    if re.fullmatch(r"\d{6}", approval_code):
        return "online"
    return None
