"""A lab certificate authority for paylab's TLS links (``paylab certs``).

Pure functions build PEM bytes with the ``cryptography`` package; :func:`write_lab_pki` is
the thin writer. Contract:

* :func:`make_ca` returns a self-signed CA (ECDSA P-256 key, ``CA:TRUE``, keyCertSign);
* :func:`make_service_cert` returns a key and a certificate signed by that CA whose SAN holds
  ``localhost``, the service name, ``127.0.0.1`` and every extra name or IP given, with the
  serverAuth *and* clientAuth extended key usages (each service is a server to its clients
  and, with mutual TLS, a client to its upstreams);
* every certificate's subject common name is its **identity** (the service's name, or
  ``terminal``): with mutual TLS each listener accepts only the identities configured for
  it (``PAYLAB_TLS_CLIENTS_<SERVICE>``, :mod:`shared.tls`);
* :func:`make_client_cert` returns a client-only certificate (clientAuth, no host names)
  for an identity that never listens: the terminals';
* :func:`lab_pki` returns every file of a lab as ``{file name: PEM bytes}``: ``ca.crt``,
  ``ca.key``, ``<service>.crt``, ``<service>.key`` for the four services, and
  ``terminal.crt`` / ``terminal.key`` for terminals;
* :func:`write_lab_pki` writes them into a directory (keys mode 0600) and refuses to
  overwrite an existing file unless ``force``.

These are lab certificates: unencrypted keys, a CA key on disk beside them.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from shared.ops.settings import SERVICES

DEFAULT_DAYS = 825


@dataclass(frozen=True, slots=True)
class PemPair:
    """A certificate and its private key, both PEM-encoded."""

    cert: bytes
    key: bytes


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "paylab lab"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _validity(days: int) -> tuple[datetime.datetime, datetime.datetime]:
    now = datetime.datetime.now(datetime.UTC)
    return now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)


def make_ca(common_name: str = "paylab lab CA", days: int = DEFAULT_DAYS) -> PemPair:
    """A new self-signed CA certificate and key (PEM)."""
    key = _new_key()
    name = _name(common_name)
    not_before, not_after = _validity(days)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            _key_usage(key_cert_sign=True, crl_sign=True),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return PemPair(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def _key_usage(
    *, key_cert_sign: bool = False, crl_sign: bool = False, key_agreement: bool = False
) -> x509.KeyUsage:
    """Digital signature always (ECDSA handshakes), plus what the certificate's role needs."""
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=key_agreement,
        key_cert_sign=key_cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _san_entries(names: Iterable[str]) -> list[x509.GeneralName]:
    """DNS names and IP addresses, in order, without duplicates."""
    entries: list[x509.GeneralName] = []
    seen: set[str] = set()
    for raw in names:
        name = raw.strip()
        if not name or name in seen:
            continue
        seen.add(name)
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return entries


def _leaf_cert(
    ca: PemPair,
    identity: str,
    usages: list[x509.ObjectIdentifier],
    sans: list[x509.GeneralName] | None,
    days: int,
) -> PemPair:
    """A key and a CA-signed end-entity certificate: CN ``identity``, extended key usages
    ``usages``, the subject alternative names ``sans`` (none when None)."""
    ca_cert = x509.load_pem_x509_certificate(ca.cert)
    ca_key = serialization.load_pem_private_key(ca.key, password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ValueError("the CA key must be an EC key made by make_ca")
    key = _new_key()
    not_before, not_after = _validity(days)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(identity))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(key_agreement=True), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    )
    if sans is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = (
        builder.add_extension(
            x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return PemPair(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def make_service_cert(
    ca: PemPair, service: str, extra_hosts: Iterable[str] = (), days: int = DEFAULT_DAYS
) -> PemPair:
    """A key and a CA-signed certificate for ``service``, for server and client use.

    SAN: ``localhost``, ``service``, ``127.0.0.1`` and ``extra_hosts`` (names or IPs).
    """
    sans = _san_entries(["localhost", service, "127.0.0.1", *extra_hosts])
    usages = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    return _leaf_cert(ca, service, usages, sans, days)


#: Identities that only ever connect (never listen): a client certificate each.
CLIENT_IDENTITIES = ("terminal",)


def make_client_cert(ca: PemPair, identity: str, days: int = DEFAULT_DAYS) -> PemPair:
    """A key and a CA-signed client-only certificate (clientAuth) for ``identity``."""
    return _leaf_cert(ca, identity, [ExtendedKeyUsageOID.CLIENT_AUTH], None, days)


def lab_pki(
    extra_hosts: Iterable[str] = (),
    services: Iterable[str] = SERVICES,
    days: int = DEFAULT_DAYS,
    clients: Iterable[str] = CLIENT_IDENTITIES,
) -> dict[str, bytes]:
    """Every file of a lab PKI: ``{file name: PEM bytes}`` (a new CA each call): a server
    and client certificate per service, a client certificate per identity of ``clients``."""
    hosts = list(extra_hosts)
    ca = make_ca(days=days)
    files = {"ca.crt": ca.cert, "ca.key": ca.key}
    for service in services:
        pair = make_service_cert(ca, service, hosts, days)
        files[f"{service}.crt"] = pair.cert
        files[f"{service}.key"] = pair.key
    for identity in clients:
        pair = make_client_cert(ca, identity, days)
        files[f"{identity}.crt"] = pair.cert
        files[f"{identity}.key"] = pair.key
    return files


class CertsExist(FileExistsError):
    """Files of a lab PKI are already in the output directory (and ``force`` is off)."""


def write_lab_pki(out: Path, files: Mapping[str, bytes], *, force: bool = False) -> list[Path]:
    """Write ``files`` into ``out`` (created if needed); ``*.key`` files get mode 0600.

    Raises :class:`CertsExist` naming the files already there, before writing anything,
    unless ``force``. Returns the paths written.
    """
    out.mkdir(parents=True, exist_ok=True)
    existing = sorted(name for name in files if (out / name).exists())
    if existing and not force:
        raise CertsExist(f"already in {out}: {', '.join(existing)} (use --force to replace)")
    written = []
    for name, data in files.items():
        path = out / name
        secret = name.endswith(".key")
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        fd = os.open(path, flags, 0o600 if secret else 0o644)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        if secret:
            os.chmod(path, 0o600)  # also when the file existed with looser bits
        written.append(path)
    return written
