"""A short smoke profile: 10 users spawned in 2 s, stop at 20 s.

    locust -f loadtests/locustfile.py,loadtests/shape_smoke.py --headless ...

``PAYLAB_LOAD_SMOKE_USERS`` / ``_RAMP`` / ``_SECONDS`` override the three numbers.
"""

from __future__ import annotations

from loadtests.shapes import RampHoldShape


class SmokeShape(RampHoldShape):
    """10 users at 5 per second, until 20 s of run time."""

    users = 10
    ramp_seconds = 2.0
    end_seconds = 20.0
    env_prefix = "PAYLAB_LOAD_SMOKE"
