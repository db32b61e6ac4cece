"""The link micro-benchmark runs and prints its rows (its figures are never asserted)."""

from __future__ import annotations

import pytest

from loadtests import bench_link


def test_bench_link_prints_a_row_per_case(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench_link.main(["-n", "40", "-c", "4", "--warmup", "8"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line[:1].isalpha()}
    assert set(bench_link.CASES) <= set(rows)
    for case in bench_link.CASES:
        cpu, rate, _ratio = rows[case]
        assert float(cpu) > 0 and float(rate) > 0


def test_bench_link_refuses_an_unknown_case() -> None:
    with pytest.raises(SystemExit):
        bench_link.main(["--only", "nonsense"])
