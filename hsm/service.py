"""The HSM mock as a service: the command processor of :mod:`hsm.commands` behind a
framed TCP listener, plus /health and /metrics.

Commands are pure CPU work of a few microseconds, so they are answered inline in the
reading task of each connection (``FramedServer(inline=)``): no thread hop, no task per
command, and the answers to one read leave in one send.

Metrics: ``paylab_hsm_commands_total{command,error}`` and
``paylab_hsm_command_duration_seconds{command}``, and the common RED set of every service
with the command code as ``mti`` and the error code as ``code`` (``00`` success, ``01``
verification failed, ``68`` unknown command), so one dashboard row and one alert rule fit
all four services. An internal error (41, a bug) also counts in
``paylab_iso_handler_errors_total``.
"""

from __future__ import annotations

import time

from prometheus_client import Counter, Histogram

from hsm.commands import ERR_INTERNAL, ERR_OK, process_with_result
from hsm.keyfile import KeyFile, load_key_file
from shared.net.tcp import InlineHandler
from shared.ops.metrics import LATENCY_BUCKETS, series
from shared.ops.settings import Settings
from shared.server.service import Service

COMMANDS = ("NC", "CA", "EC", "M6", "M8")


class HsmService(Service):
    """payShield-style command host (NC, CA, EC, M6, M8) with the configured key file."""

    name = "hsm"

    def __init__(self, settings: Settings, keys: KeyFile | None = None) -> None:
        super().__init__(settings)
        self.keys = keys or load_key_file(settings.key_file)
        r = self.metrics.registry
        self.commands = Counter(
            "paylab_hsm_commands",
            "HSM commands by command code and error code.",
            ["command", "error"],
            registry=r,
        )
        self.command_duration = Histogram(
            "paylab_hsm_command_duration_seconds",
            "Time to process one HSM command.",
            ["command"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        # Label lookups cost as much as an HSM command: each series is looked up once.
        self._commands_of = series(self.commands)
        self._command_duration_of = series(self.command_duration)
        for command in COMMANDS:
            self.commands.labels(command, ERR_OK)
            self.command_duration.labels(command)
            self.metrics.requests.labels(command, ERR_OK)
            self.metrics.duration.labels(command)

    def inline_handler(self) -> InlineHandler:
        return self.answer

    async def handle(self, payload: bytes, peer: str) -> bytes | None:
        return self.answer(payload, peer)

    def answer(self, payload: bytes, peer: str) -> bytes:
        """The response to one command (never raises; see :func:`process_with_result`)."""
        start = time.perf_counter()
        result = process_with_result(payload, self.keys)
        elapsed = time.perf_counter() - start
        record = self.record
        if record.enabled and not payload.startswith(b"H"):  # heartbeats are not recorded
            header = payload[:4].decode("ascii", "replace")
            mono, wall = time.monotonic(), time.time()
            record.hsm("in", peer, header, result.command, "", mono - elapsed, wall - elapsed)
            record.hsm(
                "out",
                peer,
                header,
                result.response[4:6].decode("ascii", "replace"),
                result.error,
                mono,
                wall,
            )
        self._commands_of(result.command, result.error).inc()
        self.metrics.requests_of(result.command, result.error).inc()
        self._command_duration_of(result.command).observe(elapsed)
        self.metrics.duration_of(result.command).observe(elapsed)
        if result.error == ERR_INTERNAL:
            self.metrics.handler_errors.inc()
        return result.response
