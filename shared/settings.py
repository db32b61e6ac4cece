"""Configuration: one pydantic-settings model, read from ``PAYLAB_*`` variables and ``.env``.

Every key has a default that works out of the box: the whole network on 127.0.0.1 with
SQLite files under ``./var`` and the shipped test keys. ``paylab config`` prints every key,
its value and its description; ``docs/configuration.md`` lists them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.framing import DEFAULT_MAX_FRAME, HeaderKind

SERVICES = ("acquirer", "gateway", "billing", "hsm")


class Settings(BaseSettings):
    """All of paylab's configuration. Environment: ``PAYLAB_<KEY>`` (upper case)."""

    model_config = SettingsConfigDict(
        env_prefix="PAYLAB_", env_file=".env", extra="ignore", validate_default=True
    )

    # -- where things live ---------------------------------------------------------------
    host: str = Field("127.0.0.1", description="Address every listener binds to.")
    data_dir: Path = Field(Path("var"), description="Directory of the embedded SQLite files.")
    acquirer_db_url: str | None = Field(
        None, description="SQLAlchemy URL of the acquirer's database (default: SQLite in data_dir)."
    )
    gateway_db_url: str | None = Field(
        None, description="SQLAlchemy URL of the gateway's journal (default: SQLite in data_dir)."
    )
    billing_db_url: str | None = Field(
        None, description="SQLAlchemy URL of billing's database (default: SQLite in data_dir)."
    )

    # -- ports (0 = any free port) -------------------------------------------------------
    acquirer_http_port: int = Field(8080, ge=0, le=65535, description="Acquirer HTTP API port.")
    gateway_http_port: int = Field(8081, ge=0, le=65535, description="Gateway HTTP port.")
    billing_http_port: int = Field(8082, ge=0, le=65535, description="Billing HTTP port.")
    hsm_http_port: int = Field(8083, ge=0, le=65535, description="HSM HTTP port.")
    acquirer_iso_port: int = Field(9080, ge=0, le=65535, description="Acquirer terminal listener.")
    gateway_iso_port: int = Field(9081, ge=0, le=65535, description="Gateway ISO-8583 listener.")
    billing_iso_port: int = Field(9082, ge=0, le=65535, description="Billing ISO-8583 listener.")
    hsm_iso_port: int = Field(9083, ge=0, le=65535, description="HSM command listener.")

    # -- upstream addresses (a service's peers; default: this host and the ports above) ---
    gateway_address: str | None = Field(
        None,
        description="host:port of the gateway, for the acquirer (default host:gateway_iso_port).",
    )
    billing_address: str | None = Field(
        None, description="host:port of billing, for the gateway (default host:billing_iso_port)."
    )
    hsm_address: str | None = Field(
        None,
        description="host:port of the HSM, for gateway and billing (default host:hsm_iso_port).",
    )

    # -- wire ----------------------------------------------------------------------------
    framing: HeaderKind = Field(
        HeaderKind.BINARY2, description="Length header: binary2 (2-byte big-endian) or ascii4."
    )
    max_frame: int = Field(
        DEFAULT_MAX_FRAME, ge=64, le=65535, description="Largest accepted frame, in bytes."
    )
    max_in_flight_per_connection: int = Field(
        256, ge=1, description="Requests one connection may have in progress at once."
    )

    # -- timeouts (seconds) ---------------------------------------------------------------
    hsm_timeout: float = Field(2.0, gt=0, description="Deadline of one HSM command.")
    billing_timeout: float = Field(
        5.0, gt=0, description="Gateway's deadline for billing's answer; then 68 to the acquirer."
    )
    gateway_timeout: float = Field(
        15.0,
        gt=0,
        description="Acquirer's deadline for the gateway's answer; keep it above the gateway's "
        "worst case (3 HSM commands + billing_timeout).",
    )
    connect_timeout: float = Field(2.0, gt=0, description="Deadline of one TCP connect.")
    shutdown_grace: float = Field(
        5.0, ge=0, description="On Ctrl-C/SIGTERM, time to finish in-flight requests."
    )

    # -- identity of the acquirer ----------------------------------------------------------
    acquirer_institution: str = Field(
        "008", pattern=r"^\d{1,11}$", description="Acquirer institution id (field 32)."
    )
    terminal_id: str = Field(
        "PAYLAB01",
        min_length=8,
        max_length=8,
        description="Terminal id (field 41) of API payments.",
    )
    merchant_id: str = Field(
        "PAYLAB-MERCH-01", min_length=15, max_length=15, description="Merchant id (field 42)."
    )
    currency: str = Field("360", pattern=r"^\d{3}$", description="Currency (field 49), ISO 4217.")

    # -- keys and secrets -------------------------------------------------------------------
    key_file: Path | None = Field(
        None,
        description="HSM key file (JSON); default: the shipped TEST keys (hsm/test-keys.json).",
    )
    pan_hash_key: str = Field(
        "paylab-test-pan-hash-key",
        min_length=16,
        description="Secret for keyed PAN hashes in the databases. Change it outside a lab.",
    )

    # -- logging ------------------------------------------------------------------------------
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="Lowest level written."
    )
    log_format: Literal["auto", "json", "console"] = Field(
        "auto",
        description="json (one object a line), console (for people), or auto: console on a "
        "terminal, json otherwise.",
    )

    def db_url(self, service: str) -> str:
        """The database URL of ``service``: the configured one or SQLite in ``data_dir``."""
        url: str | None = getattr(self, f"{service}_db_url")
        if url:
            return url
        return f"sqlite:///{(self.data_dir / f'{service}.db').resolve()}"

    def http_port(self, service: str) -> int:
        return int(getattr(self, f"{service}_http_port"))

    def iso_port(self, service: str) -> int:
        return int(getattr(self, f"{service}_iso_port"))

    def address(self, service: str) -> tuple[str, int]:
        """Where ``service``'s ISO/TCP listener is reached by its clients."""
        explicit: str | None = getattr(self, f"{service}_address", None)
        if explicit:
            host, _, port = explicit.rpartition(":")
            return host or self.host, int(port)
        return self.host, self.iso_port(service)


def load_settings(**overrides: object) -> Settings:
    """Read the settings (environment and ``.env``), with explicit ``overrides`` on top."""
    return Settings(**overrides)  # type: ignore[arg-type]
