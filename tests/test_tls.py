"""TLS on the ISO-8583 and HSM links: the lab PKI (``paylab certs``) and a whole network
speaking mutual TLS, refusing plain TCP and certificates of another CA."""

from __future__ import annotations

import io
import json
import ssl
import stat
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from typer.testing import CliRunner

from shared.cli.app import app
from shared.iso.framing import HeaderKind, encode_frame
from shared.lab.network import Network
from shared.net.certs import CertsExist, lab_pki, make_ca, make_service_cert, write_lab_pki
from shared.net.tcp import FramedServer
from shared.net.tls import (
    TlsConfigError,
    TlsFiles,
    allowed_clients,
    client_context,
    make_client_context,
    make_server_context,
    peer_identity,
    refusal,
)
from shared.ops.log import configure_logging, get_logger
from shared.ops.metrics import ServiceMetrics
from shared.ops.settings import SERVICES
from tests.support import (
    DEMO_PAN,
    DEMO_PIN,
    RawIsoClient,
    lab_settings,
    start_network,
    terminal_builder,
)

# -- the lab PKI -----------------------------------------------------------------------------


def test_service_cert_has_sans_and_both_ekus() -> None:
    ca = make_ca()
    pair = make_service_cert(ca, "gateway", ["gw.example", "10.1.2.3", "localhost"])
    cert = x509.load_pem_x509_certificate(pair.cert)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "gateway", "gw.example"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == [
        "127.0.0.1",
        "10.1.2.3",
    ]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    ca_cert = x509.load_pem_x509_certificate(ca.cert)
    assert cert.issuer == ca_cert.subject
    cert.verify_directly_issued_by(ca_cert)
    assert ca_cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_lab_pki_files_and_writer(tmp_path: Path) -> None:
    files = lab_pki(["lab.example"])
    names = (*SERVICES, "terminal")
    expected = {"ca.crt", "ca.key"} | {f"{s}.{ext}" for s in names for ext in ("crt", "key")}
    assert set(files) == expected
    out = tmp_path / "tls"
    written = write_lab_pki(out, files)
    assert {p.name for p in written} == expected
    for name in expected:
        mode = stat.S_IMODE((out / name).stat().st_mode)
        if name.endswith(".key"):
            assert mode == 0o600, name
        assert (out / name).read_bytes() == files[name]
    # Loadable by the ssl module as it is used at run time.
    ctx = make_client_context(TlsFiles.of(out, "acquirer"), mutual=True)
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname


def test_writer_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    write_lab_pki(tmp_path, lab_pki())
    before = (tmp_path / "ca.crt").read_bytes()
    with pytest.raises(CertsExist, match="--force"):
        write_lab_pki(tmp_path, lab_pki())
    assert (tmp_path / "ca.crt").read_bytes() == before
    write_lab_pki(tmp_path, lab_pki(), force=True)
    assert (tmp_path / "ca.crt").read_bytes() != before


def test_certs_command(tmp_path: Path) -> None:
    out = tmp_path / "tls"
    runner = CliRunner()
    result = runner.invoke(app, ["certs", "--out", str(out), "--host", "10.9.8.7"])
    assert result.exit_code == 0, result.output
    assert (out / "hsm.key").exists() and (out / "ca.crt").exists()
    cert = x509.load_pem_x509_certificate((out / "billing.crt").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "10.9.8.7" in [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    again = runner.invoke(app, ["certs", "--out", str(out)])
    assert again.exit_code == 1
    assert runner.invoke(app, ["certs", "--out", str(out), "--force"]).exit_code == 0


def test_contexts_are_off_by_default_and_missing_files_are_named(tmp_path: Path) -> None:
    assert client_context(lab_settings(tmp_path), "gateway") is None
    on = lab_settings(tmp_path, tls_enabled=True, tls_dir=tmp_path / "nothing")
    with pytest.raises(TlsConfigError, match=r"ca\.crt"):
        client_context(on, "gateway")


# -- a network on mutual TLS -------------------------------------------------------------------


def _refused_tls(net: Network) -> float:
    registry = net.services["gateway"].metrics.registry
    value = registry.get_sample_value("paylab_tcp_connections_refused_total", {"reason": "tls"})
    return value or 0.0


async def _pay(net: Network, bill: str, amount: int) -> dict[str, Any]:
    url = f"http://127.0.0.1:{net.ports['acquirer'].http}/payments"
    async with httpx.AsyncClient(timeout=15) as client:
        r = await client.post(
            url, json={"bill": bill, "amount": amount, "pan": DEMO_PAN, "pin": DEMO_PIN}
        )
    assert r.status_code == 200, r.text
    data: dict[str, Any] = r.json()
    return data


async def _tls_client(port: int, ctx: ssl.SSLContext) -> RawIsoClient:
    tcp = await trio.open_tcp_stream("127.0.0.1", port)
    stream = trio.SSLStream(tcp, ctx, server_hostname="127.0.0.1")
    with trio.fail_after(5):
        await stream.do_handshake()
    return RawIsoClient(stream)


async def test_network_on_mutual_tls_pays_and_refuses_plain_and_foreign_clients(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    tls_dir = tmp_path / "tls"
    write_lab_pki(tls_dir, lab_pki())
    rogue_dir = tmp_path / "rogue"  # another CA: same names, not trusted by the network
    write_lab_pki(rogue_dir, lab_pki())
    log = io.StringIO()
    configure_logging("info", "json", stream=log)  # before the services bind their loggers
    net = await start_network(nursery, tmp_path, tls_enabled=True, tls_mutual=True, tls_dir=tls_dir)
    try:
        # The whole payment path: acquirer -> gateway -> billing, HSM calls, all on TLS.
        body = await _pay(net, "PLN-0001", 150000)
        assert body["response_code"] == "00", body
        assert body["mac_verified"] is True
        for svc in net.services.values():
            for link in svc.links:
                assert link.pool.config.ssl_context is not None
                assert link.pool.healthy_count >= 1, (svc.name, link.name)
        port = net.ports["gateway"].iso

        # A trusted client (the acquirer's certificate) is served on the gateway's listener.
        good_ctx = make_client_context(TlsFiles.of(tls_dir, "acquirer"), mutual=True)
        good = await _tls_client(port, good_ctx)
        answer = await good.roundtrip(terminal_builder().inquiry("PLN-1008"))
        assert answer["39"] == "00"
        await good.aclose()

        # Plain TCP gets no ISO answer: the connection is closed, the refusal counted.
        refused = _refused_tls(net)
        plain = await RawIsoClient.connect(port)
        await plain.send(terminal_builder().inquiry("PLN-1008"))
        assert await plain.is_closed_by_peer()
        await plain.aclose()
        assert _refused_tls(net) == refused + 1

        # A client certificate of another CA: the gateway refuses it (with TLS 1.3 the
        # client may finish its side first; the refusal then arrives on the first read).
        rogue_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        rogue_ctx.load_verify_locations(cafile=tls_dir / "ca.crt")  # it trusts the server
        rogue_ctx.load_cert_chain(rogue_dir / "acquirer.crt", rogue_dir / "acquirer.key")
        with pytest.raises((trio.BrokenResourceError, EOFError, trio.TooSlowError)):
            rogue = await _tls_client(port, rogue_ctx)
            await rogue.roundtrip(terminal_builder().inquiry("PLN-1008"), timeout=5)
        assert _refused_tls(net) == refused + 2

        # A client that trusts another CA does not accept the gateway's certificate.
        lost_ctx = make_client_context(TlsFiles.of(rogue_dir, "acquirer"), mutual=True)
        with pytest.raises(trio.BrokenResourceError):
            await _tls_client(port, lost_ctx)

        # The network keeps serving payments over its TLS links.
        again = await _pay(net, "PLN-1001", 125000)
        assert again["response_code"] == "00", again
        events = [json.loads(line) for line in log.getvalue().splitlines() if line.strip()]
        failed = [e for e in events if e["event"] == "tls_handshake_failed"]
        assert failed and all(e["service"] == "gateway" for e in failed)
    finally:
        await net.stop()
        configure_logging("warning", "json")


async def test_silent_client_cannot_block_the_tls_listener(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    """A connection that never handshakes is closed after the handshake timeout (counted
    as reason=tls); meanwhile other clients handshake and are served."""
    write_lab_pki(tmp_path, lab_pki())
    metrics = ServiceMetrics("tlstest", ())

    async def echo(payload: bytes, peer: str) -> bytes:
        return payload

    server = FramedServer(
        "tlstest",
        echo,
        host="127.0.0.1",
        port=0,
        metrics=metrics,
        log=get_logger("tlstest"),
        ssl_context=make_server_context(TlsFiles.of(tmp_path, "gateway"), mutual=True),
        handshake_timeout=1.0,
    )
    port = await nursery.start(server.run)
    silent = await trio.open_tcp_stream("127.0.0.1", port)
    start = trio.current_time()
    client = await _tls_client(
        port, make_client_context(TlsFiles.of(tmp_path, "acquirer"), mutual=True)
    )
    await client.stream.send_all(encode_frame(b"hello", HeaderKind.BINARY2, 65535))
    with trio.fail_after(5):
        assert await client.stream.receive_some(100) == b"\x00\x05hello"
    assert trio.current_time() - start < 1.0  # served while the silent one still waits
    with trio.fail_after(5):
        while await silent.receive_some(100):
            pass
    refused = metrics.registry.get_sample_value(
        "paylab_tcp_connections_refused_total", {"reason": "tls"}
    )
    assert refused == 1
    await client.aclose()
    await silent.aclose()
    server.shutdown(0.5)


# -- per-peer authorisation ----------------------------------------------------------------------


def test_client_certificate_names_its_identity_and_is_client_only() -> None:
    files = lab_pki()
    cert = x509.load_pem_x509_certificate(files["terminal.crt"])
    common = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    assert [a.value for a in common] == ["terminal"]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    for service in SERVICES:
        served = x509.load_pem_x509_certificate(files[f"{service}.crt"])
        common = served.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
        assert [a.value for a in common] == [service]


def test_peer_identity_and_refusal() -> None:
    cert = {"subject": ((("organizationName", "paylab lab"),), (("commonName", "gateway"),))}
    assert peer_identity(cert) == "gateway"
    assert peer_identity({"subject": ((("organizationName", "x"),),)}) is None
    assert peer_identity(None) is None and peer_identity({}) is None
    allowed = frozenset({"gateway", "billing"})
    assert refusal("gateway", allowed) is None
    assert refusal("acquirer", allowed) == "identity 'acquirer' is not accepted here"
    assert refusal(None, allowed) == "no identity in the certificate"
    assert refusal("anyone", None) is None


def test_allowed_clients_per_listener(tmp_path: Path) -> None:
    mutual = lab_settings(tmp_path, tls_enabled=True, tls_mutual=True)
    assert allowed_clients(mutual, "hsm") == {"gateway", "billing"}
    assert allowed_clients(mutual, "billing") == {"gateway"}
    assert allowed_clients(mutual, "gateway") == {"acquirer", "terminal"}
    assert allowed_clients(mutual, "acquirer") == {"terminal"}
    assert allowed_clients(lab_settings(tmp_path, tls_enabled=True), "hsm") is None  # one-way
    anyone = lab_settings(tmp_path, tls_enabled=True, tls_mutual=True, tls_clients_hsm=" * ")
    assert allowed_clients(anyone, "hsm") is None
    spaced = lab_settings(tmp_path, tls_enabled=True, tls_mutual=True, tls_clients_billing="a, b,")
    assert allowed_clients(spaced, "billing") == {"a", "b"}


def _refused_peer(net: Network, service: str) -> float:
    registry = net.services[service].metrics.registry
    value = registry.get_sample_value("paylab_tcp_connections_refused_total", {"reason": "peer"})
    return value or 0.0


async def _served(net: Network, service: str, ctx: ssl.SSLContext) -> bool:
    """Whether ``service``'s listener serves a client with ``ctx``'s certificate: an echo
    (an NC on the HSM) answered, or the connection closed after the handshake."""
    client = await _tls_client(net.ports[service].iso, ctx)
    try:
        if service == "hsm":
            try:
                await client.send_raw(encode_frame(b"0001NC"))
                with trio.fail_after(5):
                    data = await client.stream.receive_some(100)
            except trio.BrokenResourceError:
                return False
            return data[2:8] == b"0001ND"
        echo = {"t": "0800", "7": "0314092653", "11": "000777", "70": "301"}
        try:
            return (await client.roundtrip(echo, timeout=5))["39"] == "00"
        except (EOFError, trio.BrokenResourceError):
            return False  # closed after the handshake
    finally:
        await client.aclose()


async def test_each_listener_accepts_only_its_configured_client_identities(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    tls_dir = tmp_path / "tls"
    write_lab_pki(tls_dir, lab_pki())
    log = io.StringIO()
    configure_logging("info", "json", stream=log)  # before the services bind their loggers
    net = await start_network(nursery, tmp_path, tls_enabled=True, tls_mutual=True, tls_dir=tls_dir)
    try:
        # The network's own links present the right identities: payments flow.
        body = await _pay(net, "PLN-0001", 150000)
        assert body["response_code"] == "00", body
        ctx = {
            name: make_client_context(TlsFiles.of(tls_dir, name), mutual=True)
            for name in (*SERVICES, "terminal")
        }
        expected = {
            "hsm": {"gateway", "billing"},
            "billing": {"gateway"},
            "gateway": {"acquirer", "terminal"},
            "acquirer": {"terminal"},
        }
        for service, accepted in expected.items():
            for identity, context in ctx.items():
                before = _refused_peer(net, service)
                served = await _served(net, service, context)
                assert served is (identity in accepted), (service, identity)
                assert _refused_peer(net, service) == before + (identity not in accepted)
        events = [json.loads(line) for line in log.getvalue().splitlines() if line.strip()]
        refused = [e for e in events if e["event"] == "tls_peer_refused"]
        # The acquirer's certificate on the HSM port: refused, logged with its identity.
        assert any(e["service"] == "hsm" and e["identity"] == "acquirer" for e in refused)
        assert len(refused) == sum(5 - len(a) for a in expected.values())
        again = await _pay(net, "PLN-1001", 125000)
        assert again["response_code"] == "00", again
    finally:
        await net.stop()
        configure_logging("warning", "json")
