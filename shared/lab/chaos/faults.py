"""Fault policy of the chaos proxy, sans-IO: what to do with one chunk of bytes.

:class:`Faults` describes the faults of one link (latency, jitter, black hole, resets,
close after N bytes, a bandwidth cap); :func:`plan` decides, for one chunk read from one
side of a proxied connection, how long to hold it, whether to drop it, whether to reset
the connection, and how much of it to deliver before closing. :class:`Pacer` spreads
chunks over time under a bandwidth cap. Nothing here does I/O; randomness comes from an
injected :class:`random.Random` and time from the caller, so every decision is testable
without sockets (see ``tests/test_faults.py``). The trio shell is
:mod:`shared.lab.chaos.proxy`.

Human forms accepted by :meth:`Faults.from_dict`: durations ``"300ms"``, ``"1.5s"``,
``"2m"``, ``"0"`` or a number of seconds; rates ``"10kB/s"``, ``"1MB/s"``, ``"512B/s"``
or an integer of bytes per second (``k`` = 1000, ``Ki`` = 1024); probabilities ``0.3`` or
``"30%"``.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Final

from shared.errors import PaylabError

__all__ = [
    "NONE",
    "ChunkPlan",
    "FaultSpecError",
    "Faults",
    "Pacer",
    "parse_duration",
    "parse_probability",
    "parse_rate",
    "plan",
]


class FaultSpecError(PaylabError, ValueError):
    """A fault specification that cannot be applied (unknown key, bad value, out of range)."""


_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m)?\s*$", re.IGNORECASE)
_DURATION_UNITS: Final = {"ms": 0.001, "s": 1.0, "m": 60.0}
_RATE = re.compile(
    r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(b|kb|mb|gb|kib|mib|gib)?\s*(?:/\s*s|ps)?\s*$", re.IGNORECASE
)
_RATE_UNITS: Final = {
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
}
#: Longest latency (or jitter) accepted: beyond it a test would simply hang.
MAX_DELAY: Final = 600.0


def parse_duration(text: str | float | int) -> float:
    """Seconds from ``"300ms"``, ``"1.5s"``, ``"2m"``, ``"0"`` or a number of seconds.

    Raises :class:`FaultSpecError` for anything else, a negative or non-finite value.
    """
    if isinstance(text, bool):
        raise FaultSpecError(f"not a duration: {text!r}")
    if isinstance(text, int | float):
        value = float(text)
    else:
        m = _DURATION.match(str(text))
        if m is None:
            raise FaultSpecError(f"not a duration: {text!r} (try 300ms, 1.5s, 0)")
        value = float(m.group(1)) * _DURATION_UNITS[(m.group(2) or "s").lower()]
    if not math.isfinite(value) or value < 0:
        raise FaultSpecError(f"a duration must be finite and >= 0, got {text!r}")
    return value


def parse_rate(text: str | int | float) -> int:
    """Bytes per second from ``"10kB/s"``, ``"1MB/s"``, ``"64KiB/s"``, ``"512B/s"`` or a
    number of bytes per second (rounded down). Raises :class:`FaultSpecError` for anything
    else or for a rate below 1 byte per second."""
    if isinstance(text, bool):
        raise FaultSpecError(f"not a rate: {text!r}")
    if isinstance(text, int | float):
        if not math.isfinite(text):
            raise FaultSpecError(f"a rate must be finite, got {text!r}")
        value = int(text)
    else:
        m = _RATE.match(str(text))
        if m is None:
            raise FaultSpecError(f"not a rate: {text!r} (try 10kB/s, 1MB/s, 4096)")
        value = int(float(m.group(1)) * _RATE_UNITS[(m.group(2) or "b").lower()])
    if value < 1:
        raise FaultSpecError(f"a rate must be at least 1 byte/s, got {text!r}")
    return value


def parse_probability(text: str | float | int) -> float:
    """A probability from ``0.3``, ``"0.3"`` or ``"30%"``; :class:`FaultSpecError` unless it
    lies in [0, 1]."""
    if isinstance(text, bool):
        raise FaultSpecError(f"not a probability: {text!r}")
    try:
        if isinstance(text, str) and text.strip().endswith("%"):
            value = float(text.strip()[:-1]) / 100.0
        else:
            value = float(text)
    except ValueError:
        raise FaultSpecError(f"not a probability: {text!r} (try 0.3 or 30%)") from None
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise FaultSpecError(f"a probability must lie in [0, 1], got {text!r}")
    return value


def _parse_count(text: str | int | float) -> int:
    if isinstance(text, bool):
        raise FaultSpecError(f"not a byte count: {text!r}")
    try:
        value = int(text)
        if isinstance(text, float) and text != value:
            raise ValueError
    except ValueError:
        raise FaultSpecError(f"not a byte count: {text!r}") from None
    if value < 0:
        raise FaultSpecError(f"a byte count must be >= 0, got {text!r}")
    return value


@dataclass(frozen=True, slots=True)
class Faults:
    """The faults applied to every chunk crossing one link, in both directions.

    * ``latency``: seconds each chunk is held before it is forwarded;
    * ``jitter``: a uniform extra in [-jitter, +jitter] seconds (the total never < 0);
    * ``probability``: the chance that latency and jitter apply to a given chunk;
    * ``blackhole``: the chance that a chunk is read and silently discarded (1.0 is a
      network partition: the peer sees a silent link, not a closed one);
    * ``reset``: the chance per chunk that the connection is reset (RST on both sides);
    * ``close_after``: bytes forwarded in one direction of a connection after which it is
      closed (the chunk crossing the mark is cut at it); None: never;
    * ``bandwidth``: bytes per second per direction per connection; None: no cap.

    Construction validates every value and raises :class:`FaultSpecError`.
    """

    latency: float = 0.0
    jitter: float = 0.0
    blackhole: float = 0.0
    reset: float = 0.0
    close_after: int | None = None
    bandwidth: int | None = None
    probability: float = 1.0

    def __post_init__(self) -> None:
        for name in ("latency", "jitter"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value)):
                raise FaultSpecError(f"{name} must be a finite number of seconds, got {value!r}")
            if not 0.0 <= value <= MAX_DELAY:
                raise FaultSpecError(f"{name} must lie in [0, {MAX_DELAY:g}] s, got {value!r}")
        for name in ("blackhole", "reset", "probability"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and 0.0 <= value <= 1.0):
                raise FaultSpecError(f"{name} must be a probability in [0, 1], got {value!r}")
        if self.close_after is not None and (
            isinstance(self.close_after, bool)
            or not isinstance(self.close_after, int)
            or self.close_after < 0
        ):
            raise FaultSpecError(f"close_after must be bytes >= 0, got {self.close_after!r}")
        if self.bandwidth is not None and (
            isinstance(self.bandwidth, bool)
            or not isinstance(self.bandwidth, int)
            or self.bandwidth < 1
        ):
            raise FaultSpecError(f"bandwidth must be bytes/s >= 1, got {self.bandwidth!r}")

    @classmethod
    def clear(cls) -> Faults:
        """No fault at all (same as :data:`NONE`)."""
        return NONE

    @property
    def active(self) -> bool:
        """True when any fault is set."""
        return self != NONE

    @property
    def drops(self) -> bool:
        """True when chunks may be discarded (the byte stream may be corrupted)."""
        return self.blackhole > 0

    def as_dict(self) -> dict[str, Any]:
        """JSON-able form; :meth:`from_dict` of it gives an equal value."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Faults:
        """Faults from a mapping of the field names to numbers or human strings (see the
        module docstring); missing keys keep their defaults, ``None`` clears
        ``close_after``/``bandwidth``. Unknown keys raise :class:`FaultSpecError`."""
        return NONE.merge(data)

    def merge(self, update: dict[str, Any] | Faults) -> Faults:
        """These faults with the keys of ``update`` replaced (a :class:`Faults` replaces all)."""
        if isinstance(update, Faults):
            return update
        if not isinstance(update, dict):
            raise FaultSpecError("a fault specification is a JSON object")
        known = {f.name for f in fields(Faults)}
        unknown = sorted(set(update) - known)
        if unknown:
            raise FaultSpecError(
                f"unknown fault(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})"
            )
        values: dict[str, Any] = {}
        for key, raw in update.items():
            if key in ("latency", "jitter"):
                values[key] = parse_duration(raw)
            elif key in ("blackhole", "reset", "probability"):
                values[key] = parse_probability(raw)
            elif key == "close_after":
                values[key] = None if raw is None else _parse_count(raw)
            else:  # bandwidth
                values[key] = None if raw is None else parse_rate(raw)
        return replace(self, **values)


#: No faults: the proxy forwards every byte at once.
NONE: Final = Faults()


@dataclass(frozen=True, slots=True)
class ChunkPlan:
    """What to do with one chunk of ``size`` bytes.

    Apply in this order: if ``reset``, reset the connection and forward nothing; if
    ``drop``, discard the chunk; else wait ``delay`` seconds, forward the first
    ``deliver`` bytes, then close the connection if ``close``.
    """

    delay: float = 0.0
    drop: bool = False
    reset: bool = False
    deliver: int = 0
    close: bool = False


def _chance(rng: random.Random, p: float) -> bool:
    # Exact at the ends: 0 never draws true, 1 always does (random() lies in [0, 1)).
    if p <= 0.0:
        return False
    if p >= 1.0:
        return True
    return rng.random() < p


def plan(faults: Faults, rng: random.Random, forwarded: int, size: int) -> ChunkPlan:
    """Decide the fate of a chunk of ``size`` bytes on a direction that has already
    forwarded ``forwarded`` bytes.

    Guarantees: never raises for ``forwarded, size >= 0``; ``0 <= deliver <= size``;
    ``delay >= 0``; a dropped or reset chunk delivers nothing; ``close`` is set exactly
    when ``close_after`` is reached by this chunk (or was already reached).
    """
    size = max(size, 0)
    forwarded = max(forwarded, 0)
    if _chance(rng, faults.reset):
        return ChunkPlan(reset=True)
    if _chance(rng, faults.blackhole):
        return ChunkPlan(drop=True)
    delay = 0.0
    if (faults.latency > 0 or faults.jitter > 0) and _chance(rng, faults.probability):
        spread = rng.uniform(-faults.jitter, faults.jitter) if faults.jitter > 0 else 0.0
        delay = max(0.0, faults.latency + spread)
    deliver, close = size, False
    if faults.close_after is not None:
        room = max(faults.close_after - forwarded, 0)
        if size >= room:
            deliver, close = room, True
    return ChunkPlan(delay=delay, deliver=deliver, close=close)


class Pacer:
    """A bandwidth cap for one direction of one connection: each chunk occupies the link
    for ``size / rate`` seconds, and a chunk waits until the ones before it are through.

    ``delay(now, size)`` returns how long to wait before sending ``size`` bytes at ``now``
    (seconds of the caller's clock) and books the link for them. ``rate`` None: no cap,
    always 0. Time going backwards is treated as no time passing.
    """

    __slots__ = ("_free_at", "rate")

    def __init__(self, rate: int | None, now: float) -> None:
        self.rate = rate
        self._free_at = now

    def delay(self, now: float, size: int) -> float:
        if self.rate is None or size <= 0:
            return 0.0
        start = max(now, self._free_at)
        self._free_at = start + size / self.rate
        # The chunk leaves when the link is free; it then takes size/rate to cross, which
        # the next chunk waits for. Waiting for the whole crossing here makes the first
        # chunk of a burst pay too, so a 10 kB/s link never forwards 64 KiB in no time.
        return self._free_at - now
