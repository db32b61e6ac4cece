"""Admin access control, security headers, the audit stream and the slowloris guard."""

from __future__ import annotations

import contextlib
import io
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from typer.testing import CliRunner

from shared.cli import app as cli
from shared.lab.network import Network
from shared.net.tcp import FramedServer, read_deadline
from shared.ops.log import configure_logging, get_logger
from shared.ops.metrics import ServiceMetrics
from shared.ops.settings import Settings
from shared.server.auth import DEFAULT_OPERATOR_TOKEN, DEFAULT_READ_TOKEN, public
from shared.server.http import serve_http, service_app
from tests.support import (
    DEMO_PAN,
    DEMO_PIN,
    RawIsoClient,
    admin_headers,
    start_network,
    terminal_builder,
    wait_for,
)

READ = {"Authorization": f"Bearer {DEFAULT_READ_TOKEN}"}
OPERATE = {"Authorization": f"Bearer {DEFAULT_OPERATOR_TOKEN}"}
SECURITY_HEADERS = {
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
}


@pytest.fixture
def log_buffer() -> Iterator[io.StringIO]:
    """JSON logs at info level into a buffer (for loggers bound from now on)."""
    buf = io.StringIO()
    configure_logging("info", "json", stream=buf)
    yield buf
    configure_logging("warning", "json")


def records(buf: io.StringIO, **match: Any) -> list[dict[str, Any]]:
    out = []
    for line in buf.getvalue().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if all(rec.get(k) == v for k, v in match.items()):
            out.append(rec)
    return out


# -- the middleware on a small app ------------------------------------------------------------
async def _echo(request: Request) -> Response:
    return JSONResponse({"method": request.method, "role": request.state.admin_role})


async def _open(_request: Request) -> Response:
    return JSONResponse({"open": True})


async def _boom(_request: Request) -> Response:
    raise RuntimeError("bug")


async def small_app(nursery: trio.Nursery, tokens: tuple[str, str] | None = None) -> str:
    routes = [
        Route("/things", _echo, methods=["GET", "POST"]),
        Route("/boom", _boom, methods=["GET"]),
        public(Route("/customer/{id}", _open, methods=["GET", "POST"])),
    ]
    kwargs: dict[str, Any] = {} if tokens is None else {"admin_tokens": tokens}
    app = service_app("test", ServiceMetrics("test"), routes=routes, **kwargs)
    port = await nursery.start(serve_http, app, "127.0.0.1", 0)
    return f"http://127.0.0.1:{port}"


async def test_admin_routes_need_a_token_and_the_right_role(
    nursery: trio.Nursery, log_buffer: io.StringIO
) -> None:
    base = await small_app(nursery)
    async with httpx.AsyncClient(base_url=base, timeout=10) as http:
        for headers in ({}, {"Authorization": "Bearer wrong-token"}, {"Authorization": "Basic x"}):
            r = await http.get("/things", headers=headers)
            assert r.status_code == 401
            assert r.json() == {"error": "missing or invalid admin token"}
            assert r.headers["www-authenticate"].startswith("Bearer")
            assert r.headers["cache-control"] == "no-store"
        r = await http.get("/things", headers=READ)
        assert (r.status_code, r.json()) == (200, {"method": "GET", "role": "reader"})
        r = await http.post("/things", headers=READ)
        assert r.status_code == 403
        assert r.json()["error"] == "the read-only token cannot change state"
        r = await http.post("/things", headers=OPERATE)
        assert (r.status_code, r.json()) == (200, {"method": "POST", "role": "operator"})
        # /health, /metrics and public routes need nothing
        for path in ("/health", "/metrics", "/customer/7"):
            r = await http.get(path)
            assert r.status_code == 200, path
            assert "cache-control" not in r.headers
        assert (await http.post("/customer/7")).status_code == 200
        # an unknown path is not an open door either
        assert (await http.get("/nope")).status_code == 401
        assert (await http.get("/nope", headers=READ)).status_code == 404

    denied = records(log_buffer, stream="audit", event="admin_denied")
    assert [(d["actor"], d["action"], d["outcome"]) for d in denied[:4]] == [
        ("anonymous", "GET", "denied:401"),
        ("anonymous", "GET", "denied:401"),
        ("anonymous", "GET", "denied:401"),
        ("reader", "POST", "denied:403"),
    ]
    done = records(log_buffer, stream="audit", event="admin_request")
    assert [(d["actor"], d["action"], d["target"], d["outcome"]) for d in done] == [
        ("operator", "POST", "/things", "ok")
    ]
    assert "wrong-token" not in log_buffer.getvalue()
    assert DEFAULT_OPERATOR_TOKEN not in log_buffer.getvalue()


async def test_security_headers_on_every_answer(nursery: trio.Nursery) -> None:
    base = await small_app(nursery, ("reader-token-1", "operator-token-1"))
    async with httpx.AsyncClient(base_url=base, timeout=10) as http:
        answers = {
            "health": await http.get("/health"),
            "metrics": await http.get("/metrics"),
            "public": await http.get("/customer/1"),
            "denied": await http.get("/things"),
            "default token refused": await http.get("/things", headers=READ),
            "admin": await http.get("/things", headers={"Authorization": "Bearer reader-token-1"}),
            "500": await http.get("/boom", headers={"Authorization": "Bearer reader-token-1"}),
        }
    assert answers["default token refused"].status_code == 401
    assert answers["admin"].status_code == 200
    assert answers["500"].status_code == 500
    for name, r in answers.items():
        for header, value in SECURITY_HEADERS.items():
            assert r.headers.get(header) == value, (name, header)
    for name in ("admin", "denied", "500"):
        assert answers[name].headers["cache-control"] == "no-store", name


def test_token_settings_and_defaults() -> None:
    s = Settings(_env_file=None)  # type: ignore[call-arg]
    assert (s.admin_token_read, s.admin_token_operator) == (
        DEFAULT_READ_TOKEN,
        DEFAULT_OPERATOR_TOKEN,
    )
    assert admin_headers(s) == OPERATE
    assert admin_headers(s, role="read") == READ
    with pytest.raises(ValueError):
        Settings(_env_file=None, admin_token_operator="short")  # type: ignore[call-arg]


# -- the whole network ---------------------------------------------------------------------
async def test_network_admin_api_is_protected_and_audited(
    tmp_path: Path, nursery: trio.Nursery, log_buffer: io.StringIO
) -> None:
    import shared.server.service

    shared.server.service._warned["admin_token_default"] = False  # warned once per process
    net = await start_network(nursery, tmp_path, log_level="info")
    try:
        gw = f"http://127.0.0.1:{net.ports['gateway'].http}"
        acq = f"http://127.0.0.1:{net.ports['acquirer'].http}"
        async with httpx.AsyncClient(timeout=15) as http:
            for path in ("/links", "/breakers", "/saf", "/saf/stats", "/transactions"):
                assert (await http.get(gw + path)).status_code == 401, path
                assert (await http.get(gw + path, headers=READ)).status_code == 200, path
            r = await http.post(gw + "/breakers/billing/force-open", headers=READ)
            assert r.status_code == 403
            r = await http.post(gw + "/breakers/billing/force-open", headers=OPERATE)
            assert r.status_code == 200
            r = await http.post(gw + "/breakers/billing/reset", headers=OPERATE)
            assert r.status_code == 200
            # the customer API of the acquirer stays open
            body = {"bill": "PLN-0001", "amount": 150000, "pan": DEMO_PAN, "pin": DEMO_PIN}
            r = await http.post(acq + "/payments", json=body)
            assert r.status_code == 200 and r.json()["response_code"] == "00", r.text
            r = await http.get(f"{acq}/transactions/{r.json()['id']}")
            assert r.status_code == 200
            assert r.headers["x-content-type-options"] == "nosniff"
            # ... but its operator routes do not
            assert (await http.get(acq + "/links")).status_code == 401
        # the CLI sends the operator token from the settings, or --token
        runner = CliRunner()
        ok = await trio.to_thread.run_sync(
            lambda: runner.invoke(cli.app, ["breaker", "status", "--url", gw, "--json"])
        )
        assert ok.exit_code == 0, ok.output
        assert "billing" in ok.output
        bad = await trio.to_thread.run_sync(
            lambda: runner.invoke(
                cli.app, ["breaker", "reset", "billing", "--url", gw, "--token", "wrong-1234"]
            )
        )
        assert bad.exit_code == 1
        assert "missing or invalid admin token" in bad.output
    finally:
        await net.stop()
    actions = records(log_buffer, stream="audit", event="breaker_operator_action")
    assert [(a["actor"], a["action"], a["target"], a["outcome"]) for a in actions] == [
        ("operator", "breaker.force-open", "billing", "ok"),
        ("operator", "breaker.reset", "billing", "ok"),
    ]
    # One warning for the whole network (the first service to start), naming both tokens.
    (warning,) = records(log_buffer, event="admin_token_default")
    assert set(warning["settings"]) == {"admin_token_read", "admin_token_operator"}


# -- slowloris ----------------------------------------------------------------------------
HALF_OPEN = 300


async def test_half_frames_are_closed_after_the_frame_timeout_and_payments_go_on(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    net: Network = await start_network(
        nursery, tmp_path, frame_timeout=2.0, max_connections_per_source=HALF_OPEN + 64
    )
    try:
        port = net.ports["gateway"].iso
        gateway = net.services["gateway"]
        timed_out = gateway.metrics.connections_timed_out.labels("frame")
        half = (100).to_bytes(2, "big") + b"0200" + b"\x00" * 6  # 100 announced, 10 sent
        clients = []
        for _ in range(HALF_OPEN):
            client = await RawIsoClient.connect(port)
            await client.send_raw(half)
            clients.append(client)
        opened = trio.current_time()

        # meanwhile a normal payment is approved, through the gateway's ISO listener too
        builder = terminal_builder("SLOWTERM")
        payer = await RawIsoClient.connect(port)
        answer = await payer.roundtrip(builder.payment("PLN-0001", 150000, DEMO_PAN, DEMO_PIN))
        assert answer["39"] == "00"
        assert trio.current_time() - opened < 2.0  # answered before any half frame timed out

        closed = 0
        with trio.fail_after(15):
            for client in clients:
                closed += await client.is_closed_by_peer(timeout=10)
        assert closed == HALF_OPEN
        assert trio.current_time() - opened >= 2.0
        await wait_for(lambda: timed_out._value.get() >= HALF_OPEN, timeout=5)
        # the payer's connection completed its frames: not closed by the frame timeout
        echo = await payer.roundtrip(builder.inquiry("PLN-0002"))
        assert echo["39"] == "00"
        for client in [*clients, payer]:
            await client.aclose()
    finally:
        await net.stop()


async def test_idle_connections_are_closed_and_keepalives_do_not_keep_them(
    nursery: trio.Nursery, log_buffer: io.StringIO
) -> None:
    metrics = ServiceMetrics("test")

    async def echo(payload: bytes, _peer: str) -> bytes:
        return payload

    server = FramedServer(
        "test",
        echo,
        host="127.0.0.1",
        port=0,
        metrics=metrics,
        log=get_logger("test"),
        frame_timeout=0.3,
        idle_timeout=0.6,
    )
    port = await nursery.start(server.run)
    silent = await RawIsoClient.connect(port)
    keepalive = await RawIsoClient.connect(port)
    talker = await RawIsoClient.connect(port)
    started = trio.current_time()
    idle = metrics.connections_timed_out.labels("idle")
    # The client's pace: a keep-alive every 0.1 s from both, a message every 0.2 s from one.
    for tick in range(12):
        with contextlib.suppress(trio.BrokenResourceError):
            await keepalive.send_raw(b"\x00\x00")
        await talker.send_raw(b"\x00\x00")
        if tick % 2 == 0:
            await talker.send(b"hi")
        await trio.sleep(0.1)
    assert await silent.is_closed_by_peer(timeout=2)
    assert await keepalive.is_closed_by_peer(timeout=2)
    assert trio.current_time() - started >= 0.6
    assert idle._value.get() == 2
    # the sender of messages is still served
    await talker.send(b"hello")
    with trio.fail_after(2):
        data = b""
        while not data.endswith(b"\x00\x05hello"):
            data += await talker.stream.receive_some(100)
    assert metrics.connections_timed_out.labels("frame")._value.get() == 0
    timed_out = records(log_buffer, event="connection_timed_out", reason="idle")
    assert sorted(r["keepalives"] for r in timed_out)[-1] >= 5  # the keep-alive sender
    # a frame split in two parts in time is fine; one left half-done is not
    await talker.send_raw(b"\x00\x03a")
    await trio.sleep(0.1)
    await talker.send_raw(b"bc")
    with trio.fail_after(2):
        assert await talker.stream.receive_some(100) == b"\x00\x03abc"
    await talker.send_raw(b"\x00\x03a")
    assert await talker.is_closed_by_peer(timeout=2)
    assert metrics.connections_timed_out.labels("frame")._value.get() == 1
    server.shutdown(0)


@pytest.mark.parametrize(
    ("last_message", "frame_started", "expected"),
    [
        (0.0, None, (10.0, "idle")),  # nothing in progress: idle from the last message
        (0.0, 1.0, (4.0, "frame")),  # a frame in progress: its own timeout comes first
        (0.0, 9.0, (12.0, "frame")),  # begun before the idle time was up: it may finish
        (0.0, 10.5, (10.0, "idle")),  # begun after: no extension, the idle time is up
    ],
)
def test_read_deadline(
    last_message: float, frame_started: float | None, expected: tuple[float, str]
) -> None:
    assert (
        read_deadline(last_message, frame_started, idle_timeout=10.0, frame_timeout=3.0) == expected
    )


def test_read_deadline_with_timeouts_off() -> None:
    assert read_deadline(5.0, 6.0, idle_timeout=0, frame_timeout=0) == (math.inf, "idle")
    assert read_deadline(5.0, 6.0, idle_timeout=0, frame_timeout=2.0) == (8.0, "frame")
    assert read_deadline(5.0, 6.0, idle_timeout=3.0, frame_timeout=0) == (8.0, "idle")
