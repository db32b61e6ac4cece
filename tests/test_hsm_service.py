"""HsmService.answer's metrics: every command counted and timed under its own labels."""

from __future__ import annotations

from pathlib import Path

import pytest

from hsm import commands, protocol
from hsm.service import HsmService
from tests.support import lab_settings


def _value(service: HsmService, name: str, **labels: str) -> float:
    value = service.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def test_answer_counts_and_times_each_command_and_error(tmp_path: Path) -> None:
    service = HsmService(lab_settings(tmp_path))
    tak = service.keys.entry("TAK").under_lmk
    requests = [
        protocol.build_nc("0001"),  # NC 00
        protocol.build_nc("0002"),  # NC 00 again (the remembered updates)
        protocol.build_m8("0003", protocol.KEY_TYPE_TAK, tak, b"data", "0" * 16),  # M8 01
        b"0004XX",  # unknown: ?? 68
    ]
    for request in requests:
        service.answer(request, "test")

    expected = {("NC", "00"): 2, ("M8", "01"): 1, ("??", "68"): 1, ("M8", "00"): 0}
    for (command, error), count in expected.items():
        assert _value(
            service, "paylab_hsm_commands_total", command=command, error=error
        ) == pytest.approx(count)
        assert _value(
            service, "paylab_iso_requests_total", mti=command, code=error
        ) == pytest.approx(count)
    for command, count in (("NC", 2), ("M8", 1), ("??", 1), ("CA", 0)):
        for name, label in (
            ("paylab_hsm_command_duration_seconds_count", "command"),
            ("paylab_iso_request_duration_seconds_count", "mti"),
        ):
            assert _value(service, name, **{label: command}) == pytest.approx(count)
    assert _value(service, "paylab_iso_handler_errors_total") == 0


def test_an_internal_error_is_counted_as_a_handler_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    service = HsmService(lab_settings(tmp_path))

    def broken(*_: object) -> bytes:
        raise RuntimeError("a bug")

    monkeypatch.setitem(commands._HANDLERS, b"NC", broken)
    response = service.answer(protocol.build_nc("0001"), "test")
    assert response == b"0001ND41"
    assert _value(service, "paylab_hsm_commands_total", command="NC", error="41") == pytest.approx(
        1
    )
    assert _value(service, "paylab_iso_handler_errors_total") == pytest.approx(1)
