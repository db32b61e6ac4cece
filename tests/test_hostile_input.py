"""Garbage on the wire: every listener keeps serving, nothing crashes a handler.

A few hundred mutations of valid requests (flipped bytes, truncations, insertions, random
frames) go to each ISO listener over a real socket; afterwards an echo on the same
connection is still answered, and no handler failed.
"""

from __future__ import annotations

import random
import zlib

import pytest
import trio

from shared.iso import codec
from shared.iso.messages import MTI_NETWORK, NMI_ECHO, transmission_datetime
from shared.lab.network import Network
from tests.support import DEMO_PAN, DEMO_PIN, RawIsoClient, terminal_builder

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
