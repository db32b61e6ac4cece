"""TLS contexts of paylab's ISO-8583 and HSM links: the one place they are built.

Contract:

* TLS 1.2 is the least version accepted on either side;
* a client verifies the server's certificate against the lab CA (``<tls_dir>/ca.crt``)
  and its host name (the host of the address it dials: an IP SAN or a DNS SAN);
* with ``tls_mutual`` a client presents its own service's certificate, and a server
  requires a client certificate signed by the same CA (otherwise the handshake fails);
  each listener then also accepts only the client identities configured for it
  (``tls_clients_<service>``): the identity of a certificate is its subject's common name
  (:func:`peer_identity`), which ``paylab certs`` sets to the service's name (or
  ``terminal``). The listener checks it after the handshake (:func:`allowed_clients`);
* :func:`server_context` / :func:`client_context` return None while ``tls_enabled`` is off:
  plain TCP, the default.

Files: ``<tls_dir>/<service>.crt``, ``<tls_dir>/<service>.key``, ``<tls_dir>/ca.crt``
(``paylab certs`` makes them). A missing or unreadable file raises :class:`TlsConfigError`
at service construction, naming the file.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.errors import PaylabError
from shared.ops.settings import Settings


class TlsConfigError(PaylabError):
    """A TLS file is missing or unusable."""


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """Where one service's TLS material lives."""

    cert: Path
    key: Path
    ca: Path

    @classmethod
    def of(cls, tls_dir: Path, service: str) -> TlsFiles:
        return cls(tls_dir / f"{service}.crt", tls_dir / f"{service}.key", tls_dir / "ca.crt")


def _load_chain(ctx: ssl.SSLContext, files: TlsFiles) -> None:
    try:
        ctx.load_cert_chain(files.cert, files.key)
    except (OSError, ssl.SSLError) as exc:
        raise TlsConfigError(
            f"cannot load TLS certificate {files.cert} / key {files.key}: {exc}; "
            "run `paylab certs` or set PAYLAB_TLS_DIR"
        ) from exc


def _load_ca(ctx: ssl.SSLContext, files: TlsFiles) -> None:
    try:
        ctx.load_verify_locations(cafile=files.ca)
    except (OSError, ssl.SSLError) as exc:
        raise TlsConfigError(f"cannot load the TLS CA {files.ca}: {exc}") from exc


def make_server_context(files: TlsFiles, *, mutual: bool) -> ssl.SSLContext:
    """A server context presenting ``files.cert``; with ``mutual``, client certs required."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_chain(ctx, files)
    if mutual:
        _load_ca(ctx, files)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def make_client_context(files: TlsFiles, *, mutual: bool) -> ssl.SSLContext:
    """A client context verifying the peer (and its host name) against ``files.ca``;
    with ``mutual``, presenting ``files.cert``."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED + check_hostname
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_ca(ctx, files)
    if mutual:
        _load_chain(ctx, files)
    return ctx


def server_context(settings: Settings, service: str) -> ssl.SSLContext | None:
    """The listener context of ``service``, or None when TLS is off."""
    if not settings.tls_enabled:
        return None
    return make_server_context(TlsFiles.of(settings.tls_dir, service), mutual=settings.tls_mutual)


def client_context(settings: Settings, service: str) -> ssl.SSLContext | None:
    """The context ``service`` dials its upstreams with, or None when TLS is off."""
    if not settings.tls_enabled:
        return None
    return make_client_context(TlsFiles.of(settings.tls_dir, service), mutual=settings.tls_mutual)


def allowed_clients(settings: Settings, service: str) -> frozenset[str] | None:
    """The client identities ``service``'s listener accepts, or None when any peer may
    connect (TLS or mutual TLS off, or ``*`` configured)."""
    if not (settings.tls_enabled and settings.tls_mutual):
        return None
    return settings.tls_clients(service)


def client_check(
    settings: Settings, service: str
) -> Callable[[Any], tuple[str | None, str | None]] | None:
    """The listener's judge of a client certificate (``FramedServer(client_check=)``): its
    identity and why it is refused; None when every client of the CA is accepted."""
    allowed = allowed_clients(settings, service)
    if allowed is None:
        return None

    def check(cert: Any) -> tuple[str | None, str | None]:
        identity = peer_identity(cert)
        return identity, refusal(identity, allowed)

    return check


def peer_identity(cert: Mapping[str, Any] | None) -> str | None:
    """The identity of a verified peer certificate (``SSLObject.getpeercert()``): the common
    name of its subject, or None when there is no certificate or no common name.

    Not a DNS name of the SAN: those name hosts (``paylab certs --host`` puts the same
    extra names in every certificate), not the peer."""
    if not cert:
        return None
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None


def refusal(identity: str | None, allowed: frozenset[str] | None) -> str | None:
    """Why a client of this identity is refused (None: it is accepted)."""
    if allowed is None or (identity is not None and identity in allowed):
        return None
    if identity is None:
        return "no identity in the certificate"
    return f"identity {identity!r} is not accepted here"
