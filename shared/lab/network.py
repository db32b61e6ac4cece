"""Running services together: the four-service network of ``paylab up``.

Services start in dependency order (hsm, billing, gateway, acquirer) so each finds its
upstream listening, and stop in the reverse order so each drains while its upstreams are
still there to answer.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from typing import IO, TYPE_CHECKING

import trio

from hsm.keyfile import KeyFile, load_key_file
from shared.ops.settings import SERVICES, Settings
from shared.server.service import Ports, Service

if TYPE_CHECKING:
    from starlette.routing import BaseRoute

    from shared.lab.chaos.controller import ChaosController

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

    With ``chaos=True`` a :class:`shared.lab.chaos.proxy.ChaosProxy` is started in front of
    the ISO port of the gateway, billing and the HSM as each comes up, and the services
    after it are pointed at the proxy; the
    :class:`shared.lab.chaos.controller.ChaosController` (:attr:`chaos`) serves its HTTP API
    on ``settings.chaos_http_port`` (:attr:`chaos_port`).
    """

    def __init__(
        self, settings: Settings, names: Sequence[str] = START_ORDER, *, chaos: bool = False
    ) -> None:
        unknown = set(names) - set(SERVICES)
        if unknown:
            raise ValueError(f"unknown service(s): {', '.join(sorted(unknown))}")
        self.settings = settings
        self.names = [n for n in START_ORDER if n in names]
        self.keys = load_key_file(settings.key_file)
        self.services: dict[str, Service] = {}
        self.ports: dict[str, Ports] = {}
        self.chaos: ChaosController | None = None
        self.chaos_port: int | None = None
        if chaos:
            from shared.lab.chaos.controller import ChaosController

            self.chaos = ChaosController(settings)

    async def run(
        self, *, task_status: trio.TaskStatus[dict[str, Ports]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Start every service; report their ports; return once all have stopped."""
        settings = self.settings
        async with trio.open_nursery() as nursery:
            if self.chaos is not None:
                self.chaos_port = await nursery.start(self.chaos.run)
            for name in self.names:
                svc = make_service(name, settings, self.keys)
                if name == "gateway":
                    svc.extra_routes.extend(self._console_routes())
                self.services[name] = svc
                ports: Ports = await nursery.start(svc.run)
                self.ports[name] = ports
                address = f"{settings.host}:{ports.iso}"
                if self.chaos is not None:
                    address = await self._chaos_link(nursery, name, svc, settings.host, ports)
                settings = settings.model_copy(update={f"{name}_address": address})
            task_status.started(dict(self.ports))

    def _console_routes(self) -> Sequence[BaseRoute]:
        """The browser console on the gateway's HTTP port (``/console``): it reads the
        services at the ports they really got, or the settings' for those run elsewhere."""
        from shared.lab.console.routes import console_routes

        s = self.settings

        def urls() -> dict[str, str]:
            return {
                n: f"http://{s.host}:{self.ports[n].http if n in self.ports else s.http_port(n)}"
                for n in SERVICES
            }

        return console_routes(urls, s.admin_token_read)

    async def _chaos_link(
        self, nursery: trio.Nursery, name: str, svc: Service, host: str, ports: Ports
    ) -> str:
        """Register ``svc`` with the chaos controller; the address its clients should use
        (its proxy's for a proxied link, else its own)."""
        from shared.lab.chaos.controller import LINKS

        assert self.chaos is not None
        self.chaos.iso_targets[name] = (host, ports.iso)
        if svc.migrations is not None:
            self.chaos.databases[name] = svc.db_fault
        if name not in LINKS:
            return f"{host}:{ports.iso}"
        proxy = self.chaos.proxy(name, (host, ports.iso))
        port = await nursery.start(proxy.run)
        return f"{host}:{port}"

    async def stop(self) -> None:
        """Drain and stop, acquirer first; then the chaos proxies and controller."""
        for svc in reversed(list(self.services.values())):
            await svc.stop()
        if self.chaos is not None:
            await self.chaos.close()


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


# -- one process per service (``paylab up --processes``, ``paylab bench``) -------------------


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now (the OS's choice; another program may take it)."""
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def read_rss(pid: int) -> tuple[int, int] | None:
    """``(VmRSS, VmHWM)`` of process ``pid`` in bytes, from ``/proc/<pid>/status``.

    VmHWM is the peak resident size. ``None`` when the process is gone or ``/proc`` is not
    there (not Linux).
    """
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    values: dict[str, int] = {}
    for line in lines:
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) * 1024
    if "VmRSS" not in values:
        return None
    return values["VmRSS"], values.get("VmHWM", values["VmRSS"])


def cpu_ticks_from_stat(stat: str) -> tuple[int, int]:
    """``(utime, stime)`` in clock ticks from the text of ``/proc/<pid>/stat``.

    Those are fields 14 and 15 (user and system CPU time of all the process's threads). The
    second field, the command name in parentheses, may itself hold spaces and parentheses,
    so the fields are counted from the *last* ``)``. Raises ``ValueError`` for text that is
    not such a line.
    """
    close = stat.rfind(")")
    if close < 0 or "(" not in stat[:close]:
        raise ValueError("no (command name) in /proc/<pid>/stat text")
    fields = stat[close + 1 :].split()  # fields 3 (state) onwards
    if len(fields) < 13:
        raise ValueError(f"/proc/<pid>/stat text too short: {len(fields) + 2} fields")
    return int(fields[11]), int(fields[12])


def read_cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds used so far by process ``pid`` (all its threads).

    From ``/proc/<pid>/stat``, so in clock ticks (``os.sysconf("SC_CLK_TCK")``, usually 100:
    10 ms steps). ``None`` when the process is gone or ``/proc`` is not there (not Linux).
    """
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError:
        return None
    utime, stime = cpu_ticks_from_stat(text)
    return (utime + stime) / os.sysconf("SC_CLK_TCK")


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: the child gets SIGTERM when the process that started it dies (no orphans)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class ChildDied(RuntimeError):
    """A service process exited while it should have been running."""

    def __init__(self, name: str, returncode: int) -> None:
        super().__init__(f"the {name} process exited with code {returncode}")
        self.name = name
        self.returncode = returncode


class ProcessNetwork:
    """The services, each in its own OS process (``python -m shared.cli <service>``).

    Contract:

    * :meth:`start` launches them in :data:`START_ORDER`, each with its own ports and the
      ``PAYLAB_<UPSTREAM>_ADDRESS`` of the ones before it in its environment, and waits for
      each one's ``/health`` to answer 200 before starting the next. A port set to 0 in
      ``settings`` is replaced by a free port chosen here (a child must know its
      upstreams' ports before they start). On failure (a child exits, or is not healthy
      within ``timeout``) every child already started is stopped and :class:`ChildDied`
      or :class:`TimeoutError` is raised.
    * :meth:`dead` names the children that have exited; :meth:`stop` sends SIGTERM in the
      reverse order, waiting for each (SIGKILL after ``grace``), and returns the exit codes.
    * Children run in their own session, so a Ctrl-C on the terminal reaches only this
      process, which then stops them in order; on Linux they also get SIGTERM if this
      process dies.

    ``env`` adds variables to every child's environment (on top of ``os.environ``);
    ``output`` receives the children's stdout and stderr (default: inherited).
    """

    def __init__(
        self,
        settings: Settings,
        names: Sequence[str] = START_ORDER,
        *,
        env: Mapping[str, str] | None = None,
        output: IO[bytes] | int | None = None,
    ) -> None:
        unknown = set(names) - set(SERVICES)
        if unknown:
            raise ValueError(f"unknown service(s): {', '.join(sorted(unknown))}")
        self.settings = settings
        self.names = [n for n in START_ORDER if n in names]
        self.extra_env = dict(env or {})
        self.output = output
        self.ports: dict[str, Ports] = {}
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def _ports_of(self, name: str) -> Ports:
        host = self.settings.host
        http = self.settings.http_port(name) or free_port(host)
        iso = self.settings.iso_port(name) or free_port(host)
        return Ports(iso=iso, http=http)

    def _env_of(self, name: str, ports: Ports) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.extra_env)
        s = self.settings
        env["PAYLAB_HOST"] = s.host
        env["PAYLAB_DATA_DIR"] = str(s.data_dir.resolve())
        env[f"PAYLAB_{name.upper()}_HTTP_PORT"] = str(ports.http)
        env[f"PAYLAB_{name.upper()}_ISO_PORT"] = str(ports.iso)
        for upstream, p in self.ports.items():
            env[f"PAYLAB_{upstream.upper()}_ADDRESS"] = f"{s.host}:{p.iso}"
        return env

    def start(self, timeout: float = 60.0) -> dict[str, Ports]:
        """Start every service in order, each healthy before the next; return their ports."""
        try:
            for name in self.names:
                ports = self._ports_of(name)
                proc = subprocess.Popen(
                    [sys.executable, "-m", "shared.cli", name],
                    env=self._env_of(name, ports),
                    stdin=subprocess.DEVNULL,
                    stdout=self.output,
                    stderr=self.output,
                    start_new_session=True,
                    preexec_fn=_die_with_parent if sys.platform == "linux" else None,
                )
                self.procs[name] = proc
                self.ports[name] = ports
                self._wait_healthy(name, timeout)
        except BaseException:
            self.stop()
            raise
        return dict(self.ports)

    def _wait_healthy(self, name: str, timeout: float) -> None:
        import httpx

        url = f"http://{self.settings.host}:{self.ports[name].http}/health"
        proc = self.procs[name]
        deadline = time.monotonic() + timeout
        while True:
            code = proc.poll()
            if code is not None:
                raise ChildDied(name, code)
            try:
                if httpx.get(url, timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name} not healthy within {timeout:.0f} s ({url})")
            time.sleep(0.1)

    def pids(self) -> dict[str, int]:
        """Process id of each started service."""
        return {name: p.pid for name, p in self.procs.items()}

    def dead(self) -> dict[str, int]:
        """Exit code of every child that has exited (empty while all run)."""
        return {n: code for n, p in self.procs.items() if (code := p.poll()) is not None}

    def stop(self, grace: float | None = None) -> dict[str, int]:
        """SIGTERM each child in reverse start order and wait for it; return the exit codes.

        A child still running ``grace`` seconds (default: shutdown_grace + 10) after its
        SIGTERM is killed. Safe to call more than once.
        """
        wait = self.settings.shutdown_grace + 10.0 if grace is None else grace
        codes: dict[str, int] = {}
        for name in reversed(list(self.procs)):
            proc = self.procs[name]
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=wait)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            codes[name] = proc.returncode
        return codes
