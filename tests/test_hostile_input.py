"""Garbage on the wire: every listener keeps serving, nothing crashes a handler.

A few hundred mutations of valid requests (flipped bytes, truncations, insertions, random
frames) go to each ISO listener over a real socket; afterwards an echo on the same
connection is still answered, and no handler failed. The frame with a tertiary bitmap that
once escaped the decoder is counted as undecodable and logged once per connection, without a
traceback; connections that send nothing but keep-alives are closed at their idle time, so
they cannot hold the connection cap.
"""

from __future__ import annotations

import contextlib
import io
import json
import random
import zlib
from pathlib import Path
from typing import Any

import pytest
import trio

from shared.iso import codec
from shared.iso.messages import MTI_NETWORK, NMI_ECHO, transmission_datetime
from shared.lab.network import Network
from shared.ops.log import configure_logging
from tests.support import (
    DEMO_PAN,
    DEMO_PIN,
    TERTIARY_FRAME,
    RawIsoClient,
    start_network,
    terminal_builder,
    wait_for,
)

MUTATIONS = 300


def mutations(seed: int, valid: list[bytes]) -> list[bytes]:
    rnd = random.Random(seed)
    out: list[bytes] = []
    for _ in range(MUTATIONS):
        base = bytearray(rnd.choice(valid))
        kind = rnd.randrange(5)
        if kind == 0:  # flip bytes
            for _ in range(rnd.randint(1, 4)):
                base[rnd.randrange(len(base))] = rnd.randrange(256)
        elif kind == 1:  # truncate
            del base[rnd.randrange(1, len(base)) :]
        elif kind == 2:  # insert
            pos = rnd.randrange(len(base))
            base[pos:pos] = bytes(rnd.randrange(256) for _ in range(rnd.randint(1, 8)))
        elif kind == 3:  # printable garbage of the same length
            base = bytearray(rnd.choice(b"0123456789ABCDEF") for _ in range(len(base)))
        else:  # random bytes
            base = bytearray(rnd.randbytes(rnd.randint(1, 300)))
        out.append(bytes(base))
    return out


@pytest.mark.parametrize("service", ["gateway", "billing", "acquirer"])
async def test_mutated_requests_never_break_a_listener(network: Network, service: str) -> None:
    builder = terminal_builder()
    valid = [
        codec.encode(builder.payment("PLN-1015", 250000, DEMO_PAN, DEMO_PIN)),
        codec.encode(builder.inquiry("PLN-1016")),
        codec.encode(builder.reversal(builder.payment("PLN-1017", 305500, DEMO_PAN, DEMO_PIN))),
    ]
    client = await RawIsoClient.connect(network.ports[service].iso)
    for payload in mutations(zlib.crc32(service.encode()), valid):
        await client.send(payload)
    echo = {"t": MTI_NETWORK, "7": transmission_datetime(), "11": "999999", "70": NMI_ECHO}
    await client.send(echo)
    with trio.fail_after(60):
        while True:  # answers to mutations that were still decodable come first
            _raw, answer = await client.receive(timeout=60)
            if answer.get("11") == "999999" and answer["t"] == "0810":
                break
    assert answer["39"] == "00"
    svc = network.services[service]
    registry = svc.metrics.registry
    assert registry.get_sample_value("paylab_iso_handler_errors_total") == 0
    rejected = sum(
        registry.get_sample_value("paylab_iso_frames_rejected_total", {"reason": r}) or 0
        for r in ("undecodable", "invalid")
    )
    assert rejected > MUTATIONS / 2
    await client.aclose()


def _echo(stan: str) -> dict[str, str]:
    return {"t": MTI_NETWORK, "7": transmission_datetime(), "11": stan, "70": NMI_ECHO}


async def _until_echo(client: RawIsoClient, stan: str) -> dict[str, str]:
    with trio.fail_after(20):
        while True:
            _raw, answer = await client.receive(timeout=20)
            if answer.get("11") == stan and answer["t"] == "0810":
                return answer


def _log_records(buf: io.StringIO) -> list[dict[str, Any]]:
    out = []
    for line in buf.getvalue().splitlines():
        with contextlib.suppress(ValueError):
            out.append(json.loads(line))
    return out


async def test_tertiary_bitmap_frame_is_undecodable_and_logged_once_per_connection(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    log = io.StringIO()
    configure_logging("info", "json", stream=log)  # before the services bind their loggers
    net = await start_network(nursery, tmp_path, log_level="info")
    try:
        for service in ("acquirer", "gateway", "billing"):
            registry = net.services[service].metrics.registry
            before = registry.get_sample_value(
                "paylab_iso_frames_rejected_total", {"reason": "undecodable"}
            )
            peers = []
            for n in range(2):  # two connections: one line each
                client = await RawIsoClient.connect(net.ports[service].iso)
                host, port = client.stream.socket.getsockname()[:2]
                peers.append(f"{host}:{port}")
                for _ in range(25):
                    await client.send(TERTIARY_FRAME)
                assert (await _until_echo_after(client, f"00009{n}"))["39"] == "00"
                await client.aclose()
            assert (
                registry.get_sample_value(
                    "paylab_iso_frames_rejected_total", {"reason": "undecodable"}
                )
                == (before or 0) + 50
            )
            assert registry.get_sample_value("paylab_iso_handler_errors_total") == 0
            lines = [
                r
                for r in _log_records(log)
                if r.get("event") == "undecodable_frame" and r.get("service") == service
            ]
            assert sorted(r["peer"] for r in lines) == sorted(peers), lines
            assert all("bit 65" in r["reason"] and r["size"] == len(TERTIARY_FRAME) for r in lines)
        text = log.getvalue()
        assert "handler_failed" not in text
        assert "Traceback" not in text and "KeyError" not in text
    finally:
        await net.stop()
        configure_logging("warning", "json")


async def _until_echo_after(client: RawIsoClient, stan: str) -> dict[str, str]:
    await client.send(_echo(stan))
    return await _until_echo(client, stan)


async def test_keepalive_only_connections_cannot_hold_the_connection_cap(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    """Sockets sending only zero-length frames are closed at the idle timeout and counted;
    the cap they filled frees up and a fresh terminal is served (issue 16, finding 2)."""
    net = await start_network(
        nursery,
        tmp_path,
        idle_timeout=1.5,
        heartbeat_interval=0.3,  # the acquirer's pooled links echo: messages, kept open
        max_connections=12,
        max_connections_per_source=64,
    )
    try:
        gateway = net.services["gateway"]
        port = net.ports["gateway"].iso
        idle = gateway.metrics.connections_timed_out.labels("idle")
        refused = gateway.metrics.connections_refused.labels("total")
        acquirer_link = net.services["acquirer"].links[0]
        await wait_for(lambda: acquirer_link.pool.healthy_count >= 2, timeout=10)
        held = [await RawIsoClient.connect(port) for _ in range(12 - 2)]

        async def keep_alive(client: RawIsoClient) -> None:
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                while True:  # a zero-length frame every 0.2 s, nothing else
                    await client.send_raw(b"\x00\x00")
                    await trio.sleep(0.2)

        async with trio.open_nursery() as senders:
            for client in held:
                senders.start_soon(keep_alive, client)
            # The cap is full: a fresh connection is refused at accept.
            await wait_for(lambda: gateway.metrics.connections._value.get() >= 12, timeout=5)
            extra = await RawIsoClient.connect(port)
            assert await extra.is_closed_by_peer(timeout=5)
            assert refused._value.get() >= 1
            # Then every keep-alive-only socket is closed at its idle time, and counted.
            closed = 0
            with trio.fail_after(10):
                for client in held:
                    closed += await client.is_closed_by_peer(timeout=10)
            assert closed == len(held)
            senders.cancel_scope.cancel()
        assert idle._value.get() >= len(held)
        # A fresh terminal is served, and the acquirer's links were never dropped as idle.
        fresh = await RawIsoClient.connect(port)
        answer = await fresh.roundtrip(terminal_builder("FRESHTRM").inquiry("PLN-0002"))
        assert answer["39"] == "00"
        assert acquirer_link.pool.healthy_count >= 2
        for client in [*held, extra, fresh]:
            await client.aclose()
    finally:
        await net.stop()
