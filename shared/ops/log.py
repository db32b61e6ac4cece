"""structlog setup: JSON lines, PANs masked, secrets dropped.

Masking is a processor, so no call site can forget it: every string value that contains
13-19 consecutive digits has them masked (first 6 and last 4 kept), and keys that name a
secret (pin, pin_block, key, mac...) are replaced by a marker whatever their value.

:class:`LogFiles` also writes every event, scrubbed, as one JSON line into a rotating
file per service (``<dir>/<service>.log``), whatever the console shows: what a log
shipper (promtail, Alloy) reads.
"""

from __future__ import annotations

import logging
import logging.handlers
import re
import sys
import threading
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

import structlog

from shared.pan import mask_pan

_PAN_RE = re.compile(r"(?<!\d)\d{13,19}(?!\d)")
_SECRET_KEYS = frozenset(
    {"pin", "pin_block", "key", "keys", "mac", "mac_key", "pvk", "lmk", "password", "token"}
)


def _mask_text(text: str) -> str:
    return _PAN_RE.sub(lambda m: mask_pan(m.group(0)), text)


def _is_secret(key: object) -> bool:
    return isinstance(key, str) and key.lower() in _SECRET_KEYS


def _scrub(value: Any) -> Any:
    if isinstance(value, str):
        return _mask_text(value)
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**12:
        return _mask_text(str(value))  # a PAN passed as a number
    if isinstance(value, dict):
        return {_scrub(k): ("[redacted]" if _is_secret(k) else _scrub(v)) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_scrub(v) for v in value]
    return value


def scrub_processor(
    _logger: Any, _name: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor: mask PAN-like digit runs and drop secret-named keys.

    Key names are matched case-insensitively; numbers of 13 digits or more are masked as
    text; dictionary keys are scrubbed like values.
    """
    for k in list(event_dict):
        if _is_secret(k):
            event_dict[k] = "[redacted]"
        else:
            event_dict[k] = _scrub(event_dict[k])
    return event_dict


class LogFiles:
    """A structlog processor writing each event as one JSON line into the rotating file of
    its service, ``<directory>/<service>.log`` (``paylab.log`` for an event of no service);
    the event goes on unchanged to the console renderer.

    A file is rotated at ``max_bytes`` into ``.1`` .. ``.<backups>`` (the oldest dropped).
    Safe from several threads (the services' database threads log too). Processes sharing
    one directory (two gateway replicas on one data directory) should not share a file:
    give each its own data directory.
    """

    def __init__(self, directory: Path, max_bytes: int = 10_000_000, backups: int = 5) -> None:
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self.backups = backups
        self._handlers: dict[str, logging.handlers.RotatingFileHandler] = {}
        self._lock = threading.Lock()
        self._render = structlog.processors.JSONRenderer()

    def path(self, service: str) -> Path:
        return self.directory / f"{service}.log"

    def _handler(self, service: str) -> logging.handlers.RotatingFileHandler:
        with self._lock:
            found = self._handlers.get(service)
            if found is None:
                self.directory.mkdir(parents=True, exist_ok=True)
                found = logging.handlers.RotatingFileHandler(
                    self.path(service),
                    maxBytes=self.max_bytes,
                    backupCount=self.backups,
                    encoding="utf-8",
                )
                found.setFormatter(logging.Formatter("%(message)s"))
                self._handlers[service] = found
            return found

    def __call__(
        self, logger: Any, method: str, event_dict: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        service = str(event_dict.get("service") or "paylab")
        if not re.fullmatch(r"[A-Za-z0-9_.#-]{1,64}", service) or service.startswith("."):
            service = "paylab"
        line = self._render(logger, method, dict(event_dict))
        record = logging.makeLogRecord({"msg": line, "levelno": logging.INFO})
        self._handler(service).handle(record)
        return event_dict

    def close(self) -> None:
        with self._lock:
            for handler in self._handlers.values():
                handler.close()
            self._handlers.clear()


def configure_logging(
    level: str = "info", fmt: str = "auto", stream: Any = None, files: LogFiles | None = None
) -> None:
    """Configure structlog (and the stdlib root logger it may receive records from).

    ``fmt`` is ``json`` for machines, ``console`` for people, or ``auto`` (console when
    the stream is a terminal, json otherwise); the scrubbing runs before rendering in every
    format, including on exception text. With ``files``, every event is also written, as
    JSON, to its service's rotating file (:class:`LogFiles`).
    """
    lvl = getattr(logging, level.upper(), logging.INFO)
    out = stream or sys.stderr
    if fmt == "auto":
        fmt = "console" if out.isatty() else "json"
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=out.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            scrub_processor,
            *([files] if files is not None else []),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=False,
    )
    logging.basicConfig(level=max(lvl, logging.WARNING), stream=out, format="%(name)s %(message)s")


def get_logger(service: str) -> Any:
    """A logger bound to a service name."""
    return structlog.get_logger().bind(service=service)
