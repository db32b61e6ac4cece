"""The course profile: ramp to 100 users over 2 minutes, hold, stop at 10 minutes.

    locust -f loadtests/locustfile.py,loadtests/shape_course.py --headless ...

``PAYLAB_LOAD_COURSE_USERS`` / ``_RAMP`` / ``_SECONDS`` override the three numbers.
"""

from __future__ import annotations

from loadtests.shapes import RampHoldShape


class CourseShape(RampHoldShape):
    """100 users, spawned at 100/120 per second (2-minute ramp), until 600 s of run time."""

    users = 100
    ramp_seconds = 120.0
    end_seconds = 600.0
    env_prefix = "PAYLAB_LOAD_COURSE"
