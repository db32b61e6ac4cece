"""TLS contexts of paylab's ISO-8583 and HSM links: the one place they are built.

Contract:

* TLS 1.2 is the least version accepted on either side;
* a client verifies the server's certificate against the lab CA (``<tls_dir>/ca.crt``)
  and its host name (the host of the address it dials: an IP SAN or a DNS SAN);
* with ``tls_mutual`` a client presents its own service's certificate, and a server
  requires a client certificate signed by the same CA (otherwise the handshake fails);
* :func:`server_context` / :func:`client_context` return None while ``tls_enabled`` is off:
  plain TCP, the default.

Files: ``<tls_dir>/<service>.crt``, ``<tls_dir>/<service>.key``, ``<tls_dir>/ca.crt``
(``paylab certs`` makes them). A missing or unreadable file raises :class:`TlsConfigError`
at service construction, naming the file.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

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
