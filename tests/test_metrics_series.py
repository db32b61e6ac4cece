"""``shared.ops.metrics.series``: remembered label lookups count into the same series."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

from shared.ops.metrics import series


def test_a_remembered_child_is_the_metric_child() -> None:
    registry = CollectorRegistry()
    counter = Counter("paylab_test_things", "Things.", ["kind", "code"], registry=registry)
    things_of = series(counter)
    assert things_of("a", "00") is things_of("a", "00")
    assert things_of("a", "00") is counter.labels("a", "00")
    things_of("a", "00").inc()
    counter.labels("a", "00").inc()
    things_of("b", "05").inc(3)
    assert registry.get_sample_value("paylab_test_things_total", {"kind": "a", "code": "00"}) == 2
    assert registry.get_sample_value("paylab_test_things_total", {"kind": "b", "code": "05"}) == 3


def test_histograms_and_keyword_labels() -> None:
    registry = CollectorRegistry()
    histogram = Histogram("paylab_test_seconds", "Time.", ["step"], registry=registry)
    seconds_of = series(histogram)
    seconds_of("mac").observe(0.5)
    seconds_of(step="mac").observe(1.5)
    assert registry.get_sample_value("paylab_test_seconds_sum", {"step": "mac"}) == 2.0
    assert registry.get_sample_value("paylab_test_seconds_count", {"step": "mac"}) == 2
