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

from shared.errors import ConfigError
from shared.iso.framing import DEFAULT_MAX_FRAME, HeaderKind

SERVICES = ("acquirer", "gateway", "billing", "hsm")

#: Lab defaults of the two admin tokens: they work out of the box and are public (in the
#: documentation): change them (PAYLAB_ADMIN_TOKEN_READ / _OPERATOR) outside a lab.
DEFAULT_READ_TOKEN = "paylab-lab-reader"
DEFAULT_OPERATOR_TOKEN = "paylab-lab-operator"


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
    chaos_http_port: int = Field(
        8084,
        ge=0,
        le=65535,
        description="HTTP port of the fault-injection controller (paylab up --chaos).",
    )

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

    billing_backup_address: str | None = Field(
        None,
        description="host:port of a second billing instance: the gateway's backup endpoint, "
        "used while no primary connection is healthy.",
    )
    hsm_backup_address: str | None = Field(
        None, description="host:port of a second HSM: the backup endpoint of the HSM pools."
    )

    # -- connection pools and heartbeats (every upstream link) ----------------------------
    pool_min_connections: int = Field(
        2, ge=1, le=64, description="Connections each pool keeps open to its primary endpoint."
    )
    pool_max_connections: int = Field(
        8,
        ge=1,
        le=64,
        description="Most connections per endpoint; extra ones open when the least busy "
        "connection has pool_grow_at requests in flight.",
    )
    pool_grow_at: int = Field(
        32, ge=1, description="Requests in flight on the least busy connection that open another."
    )
    pool_idle_close: float = Field(
        60.0, gt=0, description="Seconds an extra (above the minimum) connection may idle."
    )
    heartbeat_interval: float = Field(
        30.0,
        gt=0,
        description="Seconds of silence on a connection before an echo (0800/301; NC to the "
        "HSM). Labs use 1-2 s.",
    )
    heartbeat_timeout: float = Field(
        5.0, gt=0, description="Deadline of an echo; a miss replaces the connection."
    )
    reconnect_base_delay: float = Field(
        0.5, gt=0, description="First delay before reconnecting; doubles with jitter."
    )
    reconnect_max_delay: float = Field(16.0, gt=0, description="Cap of the reconnect delay.")

    # -- retry (gateway to billing and HSM; course: retry.*) -------------------------------
    retry_max_attempts: int = Field(
        3, ge=1, le=10, description="Attempts of one call, the first included (retry.max-attempts)."
    )
    retry_base_delay: float = Field(
        1.0, gt=0, description="Delay before the first retry (retry.backoff-delay)."
    )
    retry_factor: float = Field(2.0, ge=1, description="Growth of the delay per retry.")
    retry_max_delay: float = Field(
        16.0, gt=0, description="Longest delay between attempts (1, 2, 4, 8, 16 s)."
    )
    retry_jitter: bool = Field(
        False, description="Full jitter: each delay uniform between 0 and its value."
    )
    retry_deadline: float = Field(
        30.0,
        gt=0,
        description="Bound of one call, attempts and delays included (retry.max-timeout).",
    )
    online_deadline: float = Field(
        10.0,
        gt=0,
        description="Bound of the gateway's work on one online request, retries included "
        "(never more than 80 % of gateway_timeout, so the acquirer gets the answer).",
    )

    # -- circuit breaker (one per upstream) ------------------------------------------------
    breaker_window: int = Field(20, ge=1, description="Calls in the sliding window.")
    breaker_minimum_calls: int = Field(
        10, ge=1, description="Calls needed in the window before the failure rate counts."
    )
    breaker_failure_rate: float = Field(
        0.5, gt=0, le=1, description="Failure share of the window that opens the breaker."
    )
    breaker_consecutive_failures: int = Field(
        5, ge=0, description="Failures in a row that open the breaker (0: rule off)."
    )
    breaker_slow_call: float = Field(
        0.0, ge=0, description="Seconds after which a successful call counts as a failure (0: off)."
    )
    breaker_open_wait: float = Field(
        30.0, gt=0, description="Seconds open (failing fast) before a half-open probe."
    )
    breaker_half_open_calls: int = Field(
        1, ge=1, description="Trial calls let through half-open; all must succeed to close."
    )

    # -- store-and-forward and stand-in (gateway; course: queue.*) -----------------------
    standin_policy: Literal["standin", "decline"] = Field(
        "standin",
        description="Payments while billing is unavailable: approve in stand-in within the "
        "limits below and queue an advice, or decline with 91.",
    )
    standin_max_amount: int = Field(
        5_000_000, ge=0, description="Largest payment approved in stand-in (minor units)."
    )
    standin_customer_daily_amount: int = Field(
        20_000_000,
        ge=0,
        description="Most a card may pay in stand-in per UTC day (minor units).",
    )
    saf_max_size: int = Field(
        10_000, ge=1, description="Entries waiting (queued or in flight) at most (queue.max-size)."
    )
    saf_retry_interval: float = Field(
        5.0,
        ge=0,
        description="Least delay before an entry is forwarded again (queue.retry-interval); "
        "the retry_* schedule applies above it.",
    )
    saf_max_attempts: int = Field(
        20, ge=1, description="Forwarding attempts before an entry is dead (operator retry)."
    )
    saf_max_age: float = Field(
        86_400.0, gt=0, description="Seconds after which an undelivered entry is dead."
    )
    saf_lease: float = Field(
        30.0,
        gt=0,
        description="Seconds a replica holds a claimed entry; a crashed replica's claims are "
        "taken over after it.",
    )
    saf_concurrency: int = Field(
        32, ge=1, description="Entries forwarded at once (each terminal's in order)."
    )
    saf_retention: float = Field(
        7 * 86_400.0, gt=0, description="Age (s) of done entries removed by `paylab saf purge`."
    )
    replica_id: str = Field(
        "gateway-1",
        min_length=1,
        max_length=64,
        description="Name of this gateway replica: the owner of its queue claims. Give each "
        "replica sharing a PostgreSQL queue its own.",
    )
    data_key: str = Field(
        "paylab-test-data-key-change-me",
        min_length=16,
        description="Secret from which the AES-256-GCM key for data at rest (queued "
        "messages) is derived. Change it outside a lab.",
    )
    data_key_id: str = Field(
        "k1", min_length=1, max_length=16, description="Id stored beside each ciphertext."
    )
    data_key_file: Path | None = Field(
        None,
        description="File holding the data key secret (first line); when set it replaces "
        "data_key, so the secret stays out of the environment.",
    )
    data_keys_retired: str = Field(
        "",
        description="Earlier data keys, still able to open what they sealed: "
        "'id:secret,id:secret'. Rotation: move the old key here, set a new data_key and "
        "data_key_id.",
    )

    # -- rate limits (gateway's ISO listener) ----------------------------------------------
    rate_limit_institution: float = Field(
        0.0, ge=0, description="Requests per second per acquirer institution (field 32; 0: off)."
    )
    rate_limit_terminal: float = Field(
        200.0, ge=0, description="Requests per second per terminal (field 41; 0: off)."
    )
    rate_limit_burst: float = Field(
        2.0, ge=1, description="Bucket size as a multiple of the per-second rate."
    )
    rate_limit_customer_payments: int = Field(
        0, ge=0, description="Payments per card (customer) per window (0: off)."
    )
    rate_limit_customer_window: float = Field(
        3600.0, gt=0, description="Window of rate_limit_customer_payments, in seconds."
    )
    max_connections_per_source: int = Field(
        256,
        ge=0,
        description="Concurrent connections from one address to an ISO listener (0: off).",
    )
    max_connections: int = Field(
        4096, ge=0, description="Concurrent connections to one ISO listener (0: off)."
    )

    # -- admin access and abuse limits ----------------------------------------------------
    admin_token_read: str = Field(
        DEFAULT_READ_TOKEN,
        min_length=8,
        description="Bearer token of the read-only admin role (GET on /links, /breakers, "
        "/saf, /transactions). The default is a public lab value: change it outside a lab.",
    )
    admin_token_operator: str = Field(
        DEFAULT_OPERATOR_TOKEN,
        min_length=8,
        description="Bearer token of the operator role (read + POST actions); the CLI sends "
        "it. The default is a public lab value: change it outside a lab.",
    )
    frame_timeout: float = Field(
        10.0,
        ge=0,
        description="Seconds a started frame may take to arrive whole on an ISO listener; "
        "then the connection is closed (slowloris guard; 0: off).",
    )
    idle_timeout: float = Field(
        300.0,
        ge=0,
        description="Seconds an ISO connection may send nothing at all before it is closed "
        "(keep it above heartbeat_interval; 0: off).",
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
    message_record_size: int = Field(
        20000,
        ge=0,
        description="Messages each service keeps in its message record (GET /messages, "
        "paylab trace): the newest ones, masked; 0 turns the record off.",
    )
    message_record_file: bool = Field(
        False,
        description="Also append each service's message record, masked, to "
        "data_dir/messages-<service>.jsonl (JSON lines, written once a second; never rotated).",
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

    # -- TLS on the ISO-8583 and HSM links (docs/security.md) ------------------------------
    tls_enabled: bool = Field(
        False,
        description="TLS on every ISO-8583 and HSM link (listeners and pools); files from "
        "`paylab certs` in tls_dir. Off: plain TCP. See docs/security.md.",
    )
    tls_dir: Path = Field(
        Path("var/tls"),
        description="Directory of `ca.crt` and each service's `<service>.crt` and "
        "`<service>.key` (made by `paylab certs`).",
    )
    tls_mutual: bool = Field(
        False,
        description="Mutual TLS: listeners require a client certificate signed by the lab "
        "CA, and pools present their own service's certificate.",
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

    def data_keys(self) -> dict[str, str]:
        """Every data key secret by id: the retired ones and the current one (which wins).

        Raises:
            ConfigError: data_key_file cannot be read, or data_keys_retired is malformed.
        """
        keys: dict[str, str] = {}
        for item in filter(None, (part.strip() for part in self.data_keys_retired.split(","))):
            key_id, sep, secret = item.partition(":")
            if not sep or not key_id or not secret:
                raise ConfigError("data_keys_retired must read 'id:secret,id:secret'")
            keys[key_id] = secret
        secret = self.data_key
        if self.data_key_file is not None:
            try:
                secret = self.data_key_file.read_text(encoding="utf-8").splitlines()[0].strip()
            except (OSError, IndexError) as exc:
                raise ConfigError(f"cannot read data_key_file {self.data_key_file}") from exc
        keys[self.data_key_id] = secret
        return keys

    @property
    def online_budget(self) -> float:
        """Seconds the gateway may spend on one online request: online_deadline, but never so
        long that the acquirer (waiting gateway_timeout) gives up first."""
        return min(self.online_deadline, 0.8 * self.gateway_timeout)

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

    def backup_address(self, service: str) -> tuple[str, int] | None:
        """The backup endpoint of ``service``'s pools, when one is configured."""
        value: str | None = getattr(self, f"{service}_backup_address", None)
        return None if not value else _split_address(value, self.host)

    def address(self, service: str) -> tuple[str, int]:
        """Where ``service``'s ISO/TCP listener is reached by its clients."""
        explicit: str | None = getattr(self, f"{service}_address", None)
        if explicit:
            return _split_address(explicit, self.host)
        return self.host, self.iso_port(service)


def _split_address(value: str, default_host: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return host or default_host, int(port)


def load_settings(**overrides: object) -> Settings:
    """Read the settings (environment and ``.env``), with explicit ``overrides`` on top."""
    return Settings(**overrides)  # type: ignore[arg-type]
