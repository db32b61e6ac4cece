"""The HSM mock as a service: the command processor of :mod:`hsm.commands` behind a
framed TCP listener, plus /health and /metrics.

Commands are pure CPU work of a few microseconds, so they run inline on the trio
thread; a thread hop would cost more than the cryptography.

Metrics: ``paylab_hsm_commands_total{command,error}`` and
``paylab_hsm_command_duration_seconds{command}``, and the common RED set of every service
with the command code as ``mti`` and the error code as ``code`` (``00`` success, ``01``
verification failed, ``68`` unknown command), so one dashboard row and one alert rule fit
all four services. An internal error (41, a bug) also counts in
``paylab_iso_handler_errors_total``.
"""

from __future__ import annotations

import trio
from prometheus_client import Counter, Histogram

from hsm.commands import ERR_INTERNAL, ERR_OK, process_with_result
from hsm.keyfile import KeyFile, load_key_file
from shared.metrics import LATENCY_BUCKETS
from shared.service import Service
from shared.settings import Settings

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
        for command in COMMANDS:
            self.commands.labels(command, ERR_OK)
            self.command_duration.labels(command)
            self.metrics.requests.labels(command, ERR_OK)
            self.metrics.duration.labels(command)

    async def handle(self, payload: bytes, peer: str) -> bytes | None:
        start = trio.current_time()
        self.metrics.in_progress.inc()
        try:
            result = process_with_result(payload, self.keys)
        finally:
            self.metrics.in_progress.dec()
        elapsed = trio.current_time() - start
        self.commands.labels(result.command, result.error).inc()
        self.command_duration.labels(result.command).observe(elapsed)
        self.metrics.requests.labels(result.command, result.error).inc()
        self.metrics.duration.labels(result.command).observe(elapsed)
        if result.error == ERR_INTERNAL:
            self.metrics.handler_errors.inc()
        return result.response
