"""M8 and CA in one HSM round trip: the link's grouped call, the HSM client's combined
command, and the gateway's answers, which must be those of the one-after-the-other order
(a wrong MAC is 63 whatever the PIN block; the translated block never leaves with it)."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from acquirer.builder import RequestBuilder
from gateway.service import GatewayService
from hsm.client import HsmClient, HsmCommandFailed, HsmDialect, decode_hsm_keyed
from hsm.keyfile import KeyFile, load_key_file
from hsm.protocol import KEY_TYPE_TAK, HsmResponse, build_nc
from hsm.service import HsmService
from shared import crypto
from shared.iso.codes import RC
from shared.net.pool import PoolConfig, UpstreamPool
from shared.net.upstream import Upstream
from shared.ops.log import get_logger
from shared.ops.metrics import ServiceMetrics
from shared.pan import account_number_12
from shared.resilience.breaker import BreakerConfig
from tests.proclab import free_ports
from tests.support import DEMO_PAN, DEMO_PIN, RawIsoClient, lab_settings, make_terminal
from tests.test_store_and_forward import FakeBilling, start_gateway_with_fake


def _keys(tmp_path: Path) -> KeyFile:
    return load_key_file(lab_settings(tmp_path).key_file)


async def _hsm_link(
    nursery: trio.Nursery, tmp_path: Path
) -> tuple[Upstream[HsmResponse], HsmService, ServiceMetrics]:
    """An HSM service listening in this process and an upstream to it, connected."""
    settings = lab_settings(tmp_path)
    hsm = HsmService(settings)
    port = await nursery.start(hsm.server.run)
    metrics = ServiceMetrics("test")
    pool: UpstreamPool[HsmResponse] = UpstreamPool(
        "hsm",
        ("127.0.0.1", port),
        decode_hsm_keyed,
        HsmDialect(),
        metrics=metrics,
        log=get_logger("test"),
        config=PoolConfig(min_connections=1, max_connections=1),
    )
    link: Upstream[HsmResponse] = Upstream(
        pool, HsmDialect(), metrics=metrics, log=get_logger("test"), breaker=BreakerConfig()
    )
    await nursery.start(link.run)
    with trio.fail_after(5):
        while not link.available:
            await trio.sleep(0.01)
    return link, hsm, metrics


async def test_call_many_answers_in_order_with_one_breaker_permit(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    link, _hsm, metrics = await _hsm_link(nursery, tmp_path)
    answers = await link.call_many(
        [(build_nc(f"{i:04d}"), f"{i:04d}") for i in range(5)], timeout=5.0, resend_safe=True
    )
    assert [a.header for a in answers] == [f"{i:04d}" for i in range(5)]
    assert all(a.error == "00" for a in answers)
    assert link.breaker.snapshot().total_calls == 1  # one attempt for the group
    ok = metrics.upstream_calls.labels("hsm", "ok")._value.get()
    assert ok == 5  # each command counts as a call


def _mac_and_pin(
    client: HsmClient, keys: KeyFile, *, mac_ok: bool, pin_block: str
) -> tuple[bytes, str, object]:
    data = b"some message bytes"
    mac = crypto.mac_alg3(keys.keys["TAK"].clear, data).hex().upper()
    if not mac_ok:
        mac = "0123456789ABCDEF"
    requests = client.mac_and_pin_requests(
        KEY_TYPE_TAK,
        keys.keys["TAK"].under_lmk,
        data,
        mac,
        tpk=keys.keys["TPK"].under_lmk,
        zpk=keys.keys["ZPK"].under_lmk,
        pin_block=pin_block,
        account12=account_number_12(DEMO_PAN),
    )
    return data, mac, requests


async def test_hsm_client_mac_verdict_first(nursery: trio.Nursery, tmp_path: Path) -> None:
    link, _hsm, _metrics = await _hsm_link(nursery, tmp_path)
    keys = _keys(tmp_path)
    client = HsmClient(link, 5.0)
    good_block = crypto.encrypt_pin_block(DEMO_PIN, DEMO_PAN, keys.keys["TPK"].clear)

    _d, _m, requests = _mac_and_pin(client, keys, mac_ok=True, pin_block=good_block)
    both = await client.verify_mac_and_translate_pin(requests)  # type: ignore[arg-type]
    assert both.mac_ok
    translated = both.pin_block()
    assert translated != good_block
    # The same translation as the one-command call gives.
    alone = await client.translate_pin(
        keys.keys["TPK"].under_lmk,
        keys.keys["ZPK"].under_lmk,
        good_block,
        account_number_12(DEMO_PAN),
    )
    assert translated == alone

    _d, _m, requests = _mac_and_pin(client, keys, mac_ok=False, pin_block=good_block)
    wrong = await client.verify_mac_and_translate_pin(requests)  # type: ignore[arg-type]
    assert not wrong.mac_ok and wrong.pin_response is None
    with pytest.raises(ValueError):
        wrong.pin_block()  # a block behind a wrong MAC is never handed out

    _d, _m, requests = _mac_and_pin(client, keys, mac_ok=True, pin_block="0" * 16)
    bad_pin = await client.verify_mac_and_translate_pin(requests)  # type: ignore[arg-type]
    assert bad_pin.mac_ok
    with pytest.raises(HsmCommandFailed) as caught:
        bad_pin.pin_block()
    assert caught.value.command == "CA" and caught.value.error in {"20", "23", "24"}


async def test_an_m8_error_other_than_01_fails_the_pair(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    link, _hsm, _metrics = await _hsm_link(nursery, tmp_path)
    keys = _keys(tmp_path)
    client = HsmClient(link, 5.0)
    good_block = crypto.encrypt_pin_block(DEMO_PIN, DEMO_PAN, keys.keys["TPK"].clear)
    requests = client.mac_and_pin_requests(
        KEY_TYPE_TAK,
        "U" + "0" * 32,  # a key that is no key under the LMK: an error about the command
        b"data",
        "0123456789ABCDEF",
        tpk=keys.keys["TPK"].under_lmk,
        zpk=keys.keys["ZPK"].under_lmk,
        pin_block=good_block,
        account12=account_number_12(DEMO_PAN),
    )
    with pytest.raises(HsmCommandFailed) as caught:
        await client.verify_mac_and_translate_pin(requests)
    assert caught.value.command == "M8" and caught.value.error not in ("00", "01")


# -- the gateway --------------------------------------------------------------------------------
def _signed(msg: dict[str, str]) -> dict[str, str]:
    return RequestBuilder(make_terminal()).sign({k: v for k, v in msg.items() if k != "64"})


async def test_gateway_answers_as_before_and_forwards_only_after_a_good_mac(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    fake = FakeBilling(free_ports(1)[0], lambda msg: "00")  # approves everything
    await fake.start(nursery)
    net = await start_gateway_with_fake(nursery, tmp_path / "data", fake.port)
    assert isinstance(net.services["gateway"], GatewayService)
    client = await RawIsoClient.connect(net.ports["gateway"].iso)
    builder = RequestBuilder(make_terminal())

    good = builder.payment("PLN-2001", 1000, DEMO_PAN, DEMO_PIN)
    assert (await client.roundtrip(good))["39"] == RC.APPROVED
    assert len(fake.seen) == 1
    forwarded = fake.seen[0]
    assert forwarded["52"] != good["52"]  # under billing's ZPK now
    assert "64" not in forwarded and "128" not in forwarded

    # A wrong MAC: 63, and nothing reaches billing, with a good or a garbage PIN block.
    wrong_mac = dict(builder.payment("PLN-2002", 1000, DEMO_PAN, DEMO_PIN), **{"64": "0" * 16})
    assert (await client.roundtrip(wrong_mac))["39"] == RC.SECURITY_VIOLATION
    both_bad = dict(wrong_mac, **{"52": "0" * 16, "11": "000777"})
    assert (await client.roundtrip(both_bad))["39"] == RC.SECURITY_VIOLATION
    assert len(fake.seen) == 1

    # A good MAC over a PIN block that is not a PIN: 55, nothing forwarded.
    bad_pin = _signed(
        dict(builder.payment("PLN-2003", 1000, DEMO_PAN, DEMO_PIN), **{"52": "0" * 16})
    )
    assert (await client.roundtrip(bad_pin))["39"] == RC.WRONG_PIN
    assert len(fake.seen) == 1
    await client.aclose()
