"""The inline path of the framed server (``FramedServer(inline=)``), used by the HSM.

Frames are answered in the reading task, in arrival order, and the answers to one read
leave in one send. The wire rules are those of the task-per-frame path: a handler error is
counted and the connection lives on, a framing error still answers the whole frames
before it, and the HSM answers many pipelined commands on one connection.
"""

from __future__ import annotations

from pathlib import Path

import trio

from hsm.service import HsmService
from shared.iso.framing import DEFAULT_MAX_FRAME, HeaderKind, encode_frame
from shared.net.tcp import FramedServer
from shared.ops.log import get_logger
from shared.ops.metrics import ServiceMetrics
from tests.support import RawIsoClient, lab_settings


def _unused(payload: bytes, _peer: str) -> bytes:
    raise AssertionError("the task-per-frame handler must not run with inline=")


async def _never(payload: bytes, peer: str) -> bytes:
    return _unused(payload, peer)


def _answer(payload: bytes, _peer: str) -> bytes | None:
    if payload == b"boom":
        raise RuntimeError("handler bug")
    if payload == b"quiet":
        return None
    return payload.upper()


def _inline_server(metrics: ServiceMetrics, max_frame: int = DEFAULT_MAX_FRAME) -> FramedServer:
    return FramedServer(
        "test",
        _never,
        host="127.0.0.1",
        port=0,
        metrics=metrics,
        log=get_logger("test"),
        max_frame=max_frame,
        inline=_answer,
    )


async def _read_exactly(client: RawIsoClient, n: int) -> bytes:
    data = b""
    with trio.fail_after(5):
        while len(data) < n:
            chunk = await client.stream.receive_some(65536)
            assert chunk, f"closed after {len(data)} of {n} bytes"
            data += chunk
    return data


async def test_pipelined_frames_are_answered_in_order(nursery: trio.Nursery) -> None:
    metrics = ServiceMetrics("test")
    server = _inline_server(metrics)
    port = await nursery.start(server.run)
    client = await RawIsoClient.connect(port)
    words = [f"frame-{i:03d}".encode() for i in range(200)]
    # One send: the server reads many frames at once and must answer every one, in order.
    await client.send_raw(b"".join(encode_frame(w, HeaderKind.BINARY2) for w in words))
    expected = b"".join(encode_frame(w.upper(), HeaderKind.BINARY2) for w in words)
    assert await _read_exactly(client, len(expected)) == expected
    server.shutdown(0)


async def test_a_handler_error_is_counted_and_the_connection_lives(
    nursery: trio.Nursery,
) -> None:
    metrics = ServiceMetrics("test")
    server = _inline_server(metrics)
    port = await nursery.start(server.run)
    client = await RawIsoClient.connect(port)
    frames = [b"first", b"boom", b"quiet", b"", b"last"]  # b"": a keep-alive
    await client.send_raw(b"".join(encode_frame(f, HeaderKind.BINARY2) for f in frames))
    expected = encode_frame(b"FIRST", HeaderKind.BINARY2) + encode_frame(
        b"LAST", HeaderKind.BINARY2
    )
    assert await _read_exactly(client, len(expected)) == expected
    assert metrics.handler_errors._value.get() == 1
    await client.send(b"again")
    assert await _read_exactly(client, 7) == encode_frame(b"AGAIN", HeaderKind.BINARY2)
    server.shutdown(0)


async def test_a_framing_error_answers_the_whole_frames_before_it(
    nursery: trio.Nursery,
) -> None:
    metrics = ServiceMetrics("test")
    server = _inline_server(metrics, max_frame=64)
    port = await nursery.start(server.run)
    client = await RawIsoClient.connect(port)
    good = encode_frame(b"whole", HeaderKind.BINARY2)
    await client.send_raw(good + b"\xff\xff" + b"x" * 10)  # then a length above max_frame
    assert await _read_exactly(client, len(good)) == encode_frame(b"WHOLE", HeaderKind.BINARY2)
    assert await client.is_closed_by_peer(timeout=5)
    assert metrics.frames_rejected.labels("framing")._value.get() == 1
    server.shutdown(0)


async def test_the_hsm_answers_many_pipelined_commands(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    service = HsmService(lab_settings(tmp_path))
    ports = await nursery.start(service.run)
    client = await RawIsoClient.connect(ports.iso)
    # 300 echo (NC) commands with distinct headers, sent in one write.
    headers = [f"{i:04d}".encode() for i in range(300)]
    await client.send_raw(b"".join(encode_frame(h + b"NC", HeaderKind.BINARY2) for h in headers))
    data = await _read_exactly(client, 1)
    answers: list[bytes] = []
    with trio.fail_after(10):
        while len(answers) < len(headers):
            while len(data) >= 2 and len(data) >= 2 + int.from_bytes(data[:2], "big"):
                size = int.from_bytes(data[:2], "big")
                answers.append(data[2 : 2 + size])
                data = data[2 + size :]
            if len(answers) < len(headers):
                data += await client.stream.receive_some(65536)
    assert [a[:4] for a in answers] == headers
    assert all(a[4:8] == b"ND00" for a in answers)
    requests = service.metrics.requests.labels("NC", "00")._value.get()
    assert requests == len(headers)
    await service.stop()
