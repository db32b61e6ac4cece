"""Test helpers: settings on ephemeral ports, a raw ISO-8583 client, waiting on conditions."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from sqlalchemy import text
from sqlalchemy.engine import make_url

from acquirer.builder import RequestBuilder, StanCounter, Terminal
from hsm.keyfile import load_key_file
from shared.iso import codec
from shared.iso.framing import FrameParser, HeaderKind, encode_frame
from shared.iso.messages import Message
from shared.lab.network import Network
from shared.ops.settings import Settings

KEYS = load_key_file()
#: PostgreSQL for the tests that need it; they skip when it is not set (CI sets it).
POSTGRES_URL = os.environ.get("PAYLAB_TEST_POSTGRES_URL")
#: Parameters of a fixture that runs its tests on SQLite and, when configured, PostgreSQL.
DATABASE_BACKENDS = [
    "sqlite",
    pytest.param(
        "postgresql",
        marks=pytest.mark.skipif(not POSTGRES_URL, reason="PAYLAB_TEST_POSTGRES_URL is not set"),
    ),
]
DEMO_PAN = "4761739001010010"
#: A frame that once escaped the decoder: bit 65 set in the secondary bitmap (pyiso8583 reads
#: a tertiary bitmap naming field 132). It must be an undecodable frame, nothing else.
TERTIARY_FRAME = (
    b"0800"
    + b"8220000000000000"
    + b"8000000000000000"
    + b"1000000000000000"
    + b"0314092653"
    + b"000123"
    + b"301"
)
DEMO_PIN = "1234"


def lab_settings(data_dir: Path, **overrides: Any) -> Settings:
    """Settings for a test network: every port ephemeral, short timeouts, no .env file."""
    values: dict[str, Any] = {
        "data_dir": data_dir,
        "host": "127.0.0.1",
        "billing_timeout": 2.0,
        "gateway_timeout": 5.0,
        "hsm_timeout": 2.0,
        "connect_timeout": 1.0,
        "shutdown_grace": 2.0,
        "log_level": "warning",
    }
    for svc in ("acquirer", "gateway", "billing", "hsm"):
        values[f"{svc}_http_port"] = 0
        values[f"{svc}_iso_port"] = 0
    values["chaos_http_port"] = 0
    values.update(overrides)
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


def make_terminal(terminal_id: str = "TESTTERM", tak: bytes | None = None) -> Terminal:
    """A test terminal with the shipped test keys (or another MAC key)."""
    return Terminal(
        acquirer_id="008",
        terminal_id=terminal_id,
        merchant_id="PAYLAB-MERCH-01",
        currency="360",
        tpk=KEYS.keys["TPK"].clear,
        tak=KEYS.keys["TAK"].clear if tak is None else tak,
    )


def terminal_builder(
    terminal_id: str = "TESTTERM", stan_start: int | None = None
) -> RequestBuilder:
    """A request builder for a test terminal; ``stan_start`` makes its STANs predictable."""
    stans = None if stan_start is None else StanCounter(start=stan_start)
    return RequestBuilder(make_terminal(terminal_id), stans)


class RawIsoClient:
    """A plain framed client: send bytes or messages, read whole frames with a deadline."""

    def __init__(self, stream: trio.abc.Stream, kind: HeaderKind = HeaderKind.BINARY2) -> None:
        self.stream = stream
        self.kind = kind
        self.parser = FrameParser(kind, 65535)
        self._frames: list[bytes] = []

    @classmethod
    async def connect(cls, port: int, kind: HeaderKind = HeaderKind.BINARY2) -> RawIsoClient:
        return cls(await trio.open_tcp_stream("127.0.0.1", port), kind)

    async def send_raw(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def send(self, msg: Message | bytes) -> None:
        payload = msg if isinstance(msg, bytes) else codec.encode(msg)
        await self.stream.send_all(encode_frame(payload, self.kind, 65535))

    async def receive(self, timeout: float = 10.0) -> tuple[bytes, Message]:
        """The next frame (raw payload and decoded message); fails after ``timeout``."""
        with trio.fail_after(timeout):
            while not self._frames:
                data = await self.stream.receive_some(65536)
                if not data:
                    raise EOFError("connection closed by the server")
                self._frames.extend(self.parser.frames(data))
        raw = self._frames.pop(0)
        return raw, codec.decode(raw)

    async def roundtrip(self, msg: Message | bytes, timeout: float = 10.0) -> Message:
        await self.send(msg)
        return (await self.receive(timeout))[1]

    async def is_closed_by_peer(self, timeout: float = 5.0) -> bool:
        """True if the server closes the connection within ``timeout``."""
        with trio.move_on_after(timeout):
            try:
                while await self.stream.receive_some(65536):
                    pass
            except trio.BrokenResourceError:
                pass
            return True
        return False

    async def aclose(self) -> None:
        await self.stream.aclose()


def admin_headers(settings: Settings | None = None, *, role: str = "operator") -> dict[str, str]:
    """The ``Authorization`` header of the admin API (operator token unless ``role="read"``);
    without settings, the lab default tokens."""
    s = settings or Settings(_env_file=None)  # type: ignore[call-arg]
    token = s.admin_token_read if role == "read" else s.admin_token_operator
    return {"Authorization": f"Bearer {token}"}


async def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, step: float = 0.02) -> Any:
    """Poll ``predicate`` until it returns a truthy value or ``timeout`` passes (then fail)."""
    with trio.fail_after(timeout):
        while True:
            value = predicate()
            if value:
                return value
            await trio.sleep(step)


async def start_network(nursery: trio.Nursery, data_dir: Path, **overrides: Any) -> Network:
    """Start the four services (ephemeral ports) in ``nursery``; the caller stops them."""
    net = Network(lab_settings(data_dir, **overrides))
    await nursery.start(net.run)
    return net


@contextmanager
def postgres_schema(prefix: str) -> Iterator[str]:
    """A URL of a PostgreSQL schema of the caller's own, empty at the start and dropped at
    the end: a test neither sees nor disturbs the tables of other tests on the database."""
    from shared.store.db import make_engine

    assert POSTGRES_URL is not None
    schema = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = make_engine(POSTGRES_URL)
    try:
        with admin.begin() as conn:
            conn.execute(text(f'CREATE SCHEMA "{schema}"'))
        url = make_url(POSTGRES_URL).update_query_dict({"options": f"-csearch_path={schema}"})
        yield url.render_as_string(hide_password=False)
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
    finally:
        admin.dispose()


@contextmanager
def empty_database(backend: str, tmp_path: Path, name: str) -> Iterator[str]:
    """A URL of an empty database on ``backend`` (a :data:`DATABASE_BACKENDS` value): a
    SQLite file ``<tmp_path>/var/<name>.db``, or a PostgreSQL schema of the test's own."""
    if backend == "sqlite":
        yield f"sqlite:///{tmp_path}/var/{name}.db"
        return
    with postgres_schema(f"{name}_test") as url:
        yield url
