"""Load profiles as locust ``LoadTestShape`` classes (the concrete ones live one per file).

Locust uses the first shape class it finds in the files given with ``-f``, so each profile has
its own file to add to the locustfile: ``-f loadtests/locustfile.py,loadtests/shape_course.py``.
With a shape, ``-u``/``-r``/``-t`` are ignored: the shape decides users, spawn rate and the end.
"""

from __future__ import annotations

import os
from typing import ClassVar

from locust import LoadTestShape


def _env_number(name: str, default: float) -> float:
    """A positive number from the environment, or ``default`` (a bad value raises)."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    value = float(raw)
    if value <= 0:
        raise ValueError(f"{name} must be positive, not {raw!r}")
    return value


class RampHoldShape(LoadTestShape):
    """Ramp linearly to ``users`` over ``ramp_seconds``, hold, stop at ``end_seconds``.

    Contract of :meth:`tick`: ``(users, spawn_rate)`` with ``spawn_rate = users /
    ramp_seconds`` until ``end_seconds`` of run time, then ``None`` (locust stops the test).
    Subclasses set the three numbers; each may be overridden from the environment by the
    variable named in ``env_prefix`` + ``_USERS`` / ``_RAMP`` / ``_SECONDS``.
    """

    abstract: ClassVar[bool] = True
    users: ClassVar[int] = 10
    ramp_seconds: ClassVar[float] = 2.0
    end_seconds: ClassVar[float] = 20.0
    env_prefix: ClassVar[str] = ""

    def __init__(self) -> None:
        super().__init__()
        prefix = self.env_prefix
        self.target_users = (
            int(_env_number(f"{prefix}_USERS", self.users)) if prefix else self.users
        )
        self.ramp = (
            _env_number(f"{prefix}_RAMP", self.ramp_seconds) if prefix else self.ramp_seconds
        )
        self.end = (
            _env_number(f"{prefix}_SECONDS", self.end_seconds) if prefix else self.end_seconds
        )

    def tick(self) -> tuple[int, float] | None:
        if self.get_run_time() >= self.end:
            return None
        return self.target_users, self.target_users / self.ramp
