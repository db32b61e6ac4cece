"""The scenarios' sans-IO parts (``shared/lab/scenario/``: format, checks, report): loading,
validation messages, conditions, code and count checks, results. No sockets."""

from __future__ import annotations

import json
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

import pytest

from shared.lab.scenario.checks import (
    approval_kind,
    check_counts,
    codes_match,
    count_ok,
    evaluate,
    metric_value,
)
from shared.lab.scenario.files import resolve, shipped_files
from shared.lab.scenario.format import (
    NO_ANSWER,
    BreakerCondition,
    BurstStep,
    LinkCondition,
    MetricCondition,
    PayStep,
    SafCondition,
    SafDepthCondition,
    ScenarioError,
    WaitStep,
    auto_bills_needed,
    load_scenario,
    parse_count,
)
from shared.lab.scenario.report import Report, StepResult, exit_code
from shared.ops.settings import Settings

SHIPPED = shipped_files()


def doc(*steps: dict[str, Any], **extra: Any) -> str:
    return json.dumps({"name": "t", "steps": list(steps), **extra})


def error_of(text: str, **kwargs: Any) -> str:
    with pytest.raises(ScenarioError) as info:
        load_scenario(text, "f.json", **kwargs)
    return str(info.value)


# -- loading ------------------------------------------------------------------------------------
def test_a_full_document_loads_into_typed_steps() -> None:
    s = load_scenario(
        doc(
            {"do": "pay", "bill": "auto", "as": "p", "approval": "online"},
            {"do": "repeat", "of": "p"},
            {"do": "reverse", "of": "p", "expect": ["00", "25"]},
            {"do": "wait", "until": {"breaker": "billing", "state": "open"}, "timeout": 3},
            {"do": "burst", "count": 3, "expect_counts": {"00": ">=1"}},
            {"do": "fault", "link": "billing", "faults": {"latency": "300ms"}},
            {"do": "partition", "link": "billing"},
            {"do": "heal"},
            {"do": "database", "service": "billing", "down": True},
            {"do": "flood", "connections": 10, "hold": 1},
            {"do": "send", "message": "echo"},
            {"do": "send", "bytes_hex": "ffff00", "expect": ["no_answer"]},
            {"do": "breaker", "action": "reset"},
            {"do": "reconcile"},
            {"do": "inquire", "bill": "PLN-0001"},
            description="d",
            settings={"breaker_open_wait": 2},
        )
    )
    assert s.description == "d"
    assert len(s.steps) == 15
    pay = s.steps[0]
    assert isinstance(pay, PayStep) and pay.as_ == "p" and pay.expect == ["00"]
    wait = s.steps[3]
    assert isinstance(wait, WaitStep) and isinstance(wait.until[0], BreakerCondition)
    assert wait.timeout == 3
    assert s.steps[7].link == "all"  # type: ignore[union-attr]


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_scenario_is_valid_and_described(path: Traversable) -> None:
    s = load_scenario(path.read_text(), str(path), known_settings=Settings.model_fields)
    assert s.name and s.description


def test_a_shipped_scenario_is_found_by_name(tmp_path: Path) -> None:
    first = SHIPPED[0]
    assert resolve(Path(first.name)) == first
    assert resolve(Path(first.name.removesuffix(".json"))) == first
    # A file that exists wins; a name that is no shipped scenario stays as given.
    own = tmp_path / first.name
    own.write_text("{}")
    assert resolve(own) == own
    assert resolve(Path("no-such-scenario")) == Path("no-such-scenario")
    assert resolve(Path("sub") / first.name) == Path("sub") / first.name


def test_bad_json_and_non_objects_are_named() -> None:
    assert "f.json: not valid JSON" in error_of("{")
    assert "a JSON object" in error_of("[]")


def test_errors_name_the_step_index_kind_and_field() -> None:
    msg = error_of(
        doc({"do": "inquire", "bill": "X"}, {"do": "pay", "bill": "PLN-1", "expect": ["0"]})
    )
    assert msg.startswith("f.json: step 2 (pay): ")
    assert "expect" in msg and "two digits" in msg
    msg = error_of(doc({"do": "pay", "bill": "PLN-1"}))
    assert msg == "f.json: step 1 (pay): amount is required unless bill is 'auto'"


def test_unknown_and_missing_step_kinds() -> None:
    assert "step 1 (bogus): unknown step kind; choose from pay" in error_of(doc({"do": "bogus"}))
    assert 'step 1: a step needs "do"' in error_of(doc({"bill": "x"}))


def test_unknown_fields_are_refused() -> None:
    assert "step 1 (heal): colour" in error_of(doc({"do": "heal", "colour": "red"}))


def test_conditions_are_validated() -> None:
    msg = error_of(doc({"do": "wait", "until": {"breaker": "billing", "state": "ajar"}}))
    assert "step 1 (wait)" in msg and "unknown breaker state" in msg
    assert "exactly one of the keys" in error_of(doc({"do": "wait", "until": {"colour": 1}}))
    assert "not a count" in error_of(doc({"do": "wait", "until": {"saf_depth": "lots"}}))
    assert "unknown queue state" in error_of(doc({"do": "wait", "until": {"saf": {"lost": 0}}}))
    assert "healthy" in error_of(doc({"do": "wait", "until": {"link": "billing"}}))
    assert "timeout" in error_of(doc({"do": "wait", "until": {"saf_depth": 0}, "timeout": 0}))


def test_references_must_name_earlier_steps() -> None:
    assert "step 1 (repeat): of: no earlier step is named 'p'" in error_of(
        doc({"do": "repeat", "of": "p"}, {"do": "pay", "as": "p"})
    )
    assert "used twice" in error_of(doc({"do": "pay", "as": "p"}, {"do": "pay", "as": "p"}))
    assert "is not a payment" in error_of(
        doc({"do": "inquire", "bill": "B", "as": "i"}, {"do": "reverse", "of": "i"})
    )


def test_burst_and_send_rules() -> None:
    assert "expect_counts" in error_of(doc({"do": "burst", "count": 2}))
    assert "needs a bill" in error_of(
        doc({"do": "burst", "count": 2, "kind": "inquire", "expect": ["00"]})
    )
    assert "exactly one of" in error_of(doc({"do": "send"}))
    assert "not hexadecimal" in error_of(doc({"do": "send", "frame_hex": "zz"}))


def test_settings_must_be_known_when_asked() -> None:
    text = doc({"do": "heal"}, settings={"breaker_open_wiat": 2})
    assert "unknown setting(s) breaker_open_wiat" in error_of(text, known_settings={"x"})
    assert load_scenario(text).settings == {"breaker_open_wiat": 2}


def test_no_steps_is_an_error() -> None:
    assert "steps" in error_of(json.dumps({"name": "t", "steps": []}))


def test_auto_bills_needed_counts_every_generated_bill() -> None:
    s = load_scenario(
        doc(
            {"do": "pay"},
            {"do": "pay", "bill": "PLN-1001", "amount": 5},
            {"do": "burst", "count": 7, "expect": ["00"]},
            {"do": "burst", "count": 3, "kind": "inquire", "bill": "B", "expect": ["00"]},
            {"do": "send", "message": "payment"},
        )
    )
    assert auto_bills_needed(s) == 9


def test_labels() -> None:
    s = load_scenario(
        doc({"do": "pay", "name": "first"}, {"do": "burst", "count": 2, "expect": ["00"]})
    )
    assert s.steps[0].label == "first"
    assert isinstance(s.steps[1], BurstStep)
    assert s.steps[1].label == "burst of 2 pay (4 at once)"


# -- counts and codes ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("spec", "parsed"),
    [(">=1", (">=", 1)), ("0", ("==", 0)), (3, ("==", 3)), ("< 5", ("<", 5)), ("=2", ("==", 2))],
)
def test_parse_count(spec: str | int, parsed: tuple[str, int]) -> None:
    assert parse_count(spec) == parsed


@pytest.mark.parametrize("spec", ["", "x", ">=", "1.5", -1, True, "=>1"])
def test_parse_count_refuses(spec: Any) -> None:
    with pytest.raises(ValueError):
        parse_count(spec)


def test_count_ok() -> None:
    assert count_ok(2, ">=1") and not count_ok(0, ">=1")
    assert count_ok(0, 0) and count_ok(3, "!=0") and not count_ok(5, "<5")


def test_codes_match_no_answer() -> None:
    assert codes_match("00", ["00", "91"])
    assert not codes_match("05", ["00"])
    assert codes_match(None, [NO_ANSWER]) and not codes_match(None, ["00"])


def test_check_counts() -> None:
    ok, counts, problems = check_counts(["00", "00", "91"], expect=["00", "91"])
    assert ok and counts == {"00": 2, "91": 1} and not problems
    ok, _, problems = check_counts(["00", None], expect=["00"])
    assert not ok and "1x no_answer" in problems[0]
    ok, _, problems = check_counts(["00", "65", "65"], expect_counts={"00": ">=1", "65": "<2"})
    assert not ok and problems == ["65: 2, expected <2"]
    assert check_counts([], expect_counts={"00": 0})[0]


def test_approval_kind() -> None:
    assert approval_kind("SI0042") == "standin"
    assert approval_kind("123456") == "online"
    assert approval_kind(None) is None and approval_kind("X") is None


# -- conditions ---------------------------------------------------------------------------------
METRICS = """\
# HELP paylab_upstream_retries_total Retries.
# TYPE paylab_upstream_retries_total counter
paylab_upstream_retries_total{upstream="billing",reason="rc_91"} 2.0
paylab_upstream_retries_total{upstream="billing",reason="timeout"} 1.0
paylab_upstream_retries_total{upstream="hsm",reason="rc_91"} 5.0
"""
SNAPSHOT: dict[str, Any] = {
    "breakers": {"breakers": [{"name": "billing", "state": "open"}]},
    "saf": {"depth": 3, "counts": {"queued": 2, "in_flight": 1, "done": 7}},
    "links": {"links": [{"name": "billing", "healthy": 2, "target": 2, "breaker": "closed"}]},
    "metrics:gateway": METRICS,
}


def test_metric_value_sums_matching_samples() -> None:
    assert metric_value(METRICS, "paylab_upstream_retries_total", {"upstream": "billing"}) == 3
    assert metric_value(METRICS, "paylab_upstream_retries_total", {"reason": "rc_91"}) == 7
    assert metric_value(METRICS, "paylab_upstream_retries", {}) == 0  # the sample's own name
    assert metric_value(METRICS, "paylab_nothing", {}) == 0


@pytest.mark.parametrize(
    ("condition", "ok", "seen"),
    [
        (BreakerCondition(breaker="billing", state="open"), True, "breaker billing open"),
        (BreakerCondition(breaker="billing", state=["closed", "half_open"]), False, "open"),
        (BreakerCondition(breaker="hsm", state="open"), False, "no breaker hsm"),
        (SafDepthCondition(saf_depth=3), True, "queue depth 3"),
        (SafDepthCondition(saf_depth=">=4"), False, "queue depth 3"),
        (SafCondition(saf={"queued": 0}), False, "queue queued 2"),
        (SafCondition(saf={"done": ">=7", "dead": 0}), True, "done 7, dead 0"),
        (LinkCondition(link="billing", healthy=True), True, "2/2 healthy"),
        (LinkCondition(link="billing", connections=0), False, "2/2"),
        (LinkCondition(link="hsm", healthy=True), False, "no link hsm"),
        (
            MetricCondition(
                metric="paylab_upstream_retries_total", labels={"reason": "rc_91"}, value=7
            ),
            True,
            "= 7",
        ),
        (MetricCondition(metric="paylab_upstream_retries_total", op="<", value=3), False, "= 8"),
        (MetricCondition(metric="paylab_x", service="billing"), False, "no metrics:billing data"),
    ],
)
def test_evaluate(condition: Any, ok: bool, seen: str) -> None:
    got, detail = evaluate(condition, SNAPSHOT)
    assert got is ok
    assert seen in detail


def test_evaluate_without_data_is_false() -> None:
    assert evaluate(SafDepthCondition(saf_depth=0), {}) == (False, "no saf data")


def test_unhealthy_link_when_the_breaker_is_not_closed() -> None:
    snap = {"links": {"links": [{"name": "billing", "healthy": 2, "target": 2, "breaker": "open"}]}}
    assert evaluate(LinkCondition(link="billing", healthy=False), snap)[0]


# -- results ------------------------------------------------------------------------------------
def test_report_summary_and_exit_code() -> None:
    good = Report("a", "a.json", [StepResult(1, "x", True, "fine", 0.5)], total_steps=1)
    assert good.ok and good.summary() == "PASS a: 1 passed in 0.5 s"
    bad = Report(
        "b",
        "b.json",
        [StepResult(1, "x", True, "", 0.1), StepResult(2, "y", False, "got 91", 1.0)],
        total_steps=4,
    )
    assert not bad.ok and bad.failed == 1 and bad.skipped == 2
    assert bad.summary() == "FAIL b: 1 passed, 1 failed, 2 skipped in 1.1 s"
    assert bad.first_failure() == bad.results[1]
    assert exit_code([good]) == 0 and exit_code([good, bad]) == 1
    d = bad.as_dict()
    assert d["ok"] is False and d["steps"][1] == {
        "index": 2,
        "name": "y",
        "ok": False,
        "detail": "got 91",
        "seconds": 1.0,
    }


def test_a_report_with_an_error_fails() -> None:
    r = Report("c", "c.json", total_steps=0, error="cannot run: port in use")
    assert not r.ok and "cannot run" in r.summary()
