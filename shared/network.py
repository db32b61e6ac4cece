"""Running services together: the four-service network of ``paylab up``.

Services start in dependency order (hsm, billing, gateway, acquirer) so each finds its
upstream listening, and stop in the reverse order so each drains while its upstreams are
still there to answer.
"""

from __future__ import annotations

import signal
from collections.abc import Sequence

import trio

from hsm.keyfile import KeyFile, load_key_file
from shared.service import Ports, Service
from shared.settings import SERVICES, Settings

START_ORDER = ("hsm", "billing", "gateway", "acquirer")


def make_service(name: str, settings: Settings, keys: KeyFile | None = None) -> Service:
    """Build one service by name."""
    keys = keys or load_key_file(settings.key_file)
    if name == "hsm":
        from hsm.service import HsmService

        return HsmService(settings, keys)
    if name == "billing":
        from billing.service import BillingService

        return BillingService(settings, keys)
    if name == "gateway":
        from gateway.service import GatewayService

        return GatewayService(settings, keys)
    if name == "acquirer":
        from acquirer.service import AcquirerService

        return AcquirerService(settings, keys)
    raise ValueError(f"unknown service {name!r}; choose from {', '.join(SERVICES)}")


class Network:
    """A set of services started and stopped together, in dependency order.

    Services are built as their upstreams come up, so each is pointed at the port its
    upstream really got: the network works on fixed ports and on ephemeral ones (0).
    """

    def __init__(self, settings: Settings, names: Sequence[str] = START_ORDER) -> None:
        unknown = set(names) - set(SERVICES)
        if unknown:
            raise ValueError(f"unknown service(s): {', '.join(sorted(unknown))}")
        self.settings = settings
        self.names = [n for n in START_ORDER if n in names]
        self.keys = load_key_file(settings.key_file)
        self.services: dict[str, Service] = {}
        self.ports: dict[str, Ports] = {}

    async def run(
        self, *, task_status: trio.TaskStatus[dict[str, Ports]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Start every service; report their ports; return once all have stopped."""
        settings = self.settings
        async with trio.open_nursery() as nursery:
            for name in self.names:
                svc = make_service(name, settings, self.keys)
                self.services[name] = svc
                ports: Ports = await nursery.start(svc.run)
                self.ports[name] = ports
                settings = settings.model_copy(
                    update={f"{name}_address": f"{settings.host}:{ports.iso}"}
                )
            task_status.started(dict(self.ports))

    async def stop(self) -> None:
        """Drain and stop, acquirer first."""
        for svc in reversed(list(self.services.values())):
            await svc.stop()


async def run_until_signal(
    network: Network,
    on_started: object = None,
) -> None:
    """Run ``network`` until SIGINT or SIGTERM, then drain it and return."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            ports = await nursery.start(network.run)
            if callable(on_started):
                on_started(ports)
            async for _sig in signals:
                break
            await network.stop()
