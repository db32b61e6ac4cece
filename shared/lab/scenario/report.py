"""The results of a scenario run: one :class:`StepResult` per step, a :class:`Report` per
scenario, and the exit code of ``paylab scenarios run``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class StepResult:
    """The outcome of one step: ``index`` from 1, ``seconds`` it took."""

    index: int
    name: str
    ok: bool
    detail: str
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "name": self.name,
            "ok": self.ok,
            "detail": self.detail,
            "seconds": round(self.seconds, 3),
        }


@dataclass
class Report:
    """The results of one scenario run; ``skipped`` steps were not run after a failure."""

    scenario: str
    source: str
    results: list[StepResult] = field(default_factory=list)
    total_steps: int = 0
    error: str | None = None

    @property
    def passed(self) -> int:
        return sum(r.ok for r in self.results)

    @property
    def failed(self) -> int:
        return sum(not r.ok for r in self.results)

    @property
    def skipped(self) -> int:
        return max(self.total_steps - len(self.results), 0)

    @property
    def ok(self) -> bool:
        return self.error is None and self.failed == 0 and self.skipped == 0

    @property
    def seconds(self) -> float:
        return sum(r.seconds for r in self.results)

    def first_failure(self) -> StepResult | None:
        return next((r for r in self.results if not r.ok), None)

    def summary(self) -> str:
        """One line: ``PASS name: 7 steps passed`` or the failures and what was skipped."""
        verdict = "PASS" if self.ok else "FAIL"
        parts = [f"{self.passed} passed"]
        if self.failed:
            parts.append(f"{self.failed} failed")
        if self.skipped:
            parts.append(f"{self.skipped} skipped")
        line = f"{verdict} {self.scenario}: {', '.join(parts)} in {self.seconds:.1f} s"
        if self.error:
            line += f" ({self.error})"
        return line

    def as_dict(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "source": self.source,
            "ok": self.ok,
            "passed": self.passed,
            "failed": self.failed,
            "skipped": self.skipped,
            "error": self.error,
            "seconds": round(self.seconds, 3),
            "steps": [r.as_dict() for r in self.results],
        }


def exit_code(reports: Sequence[Report]) -> int:
    """0 when every scenario passed, 1 otherwise (a bad file is 2, decided before running)."""
    return 0 if all(r.ok for r in reports) else 1
