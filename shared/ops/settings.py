"""Configuration: one pydantic-settings model, read from ``PAYLAB_*`` variables and ``.env``.

Every key has a default that works out of the box: the whole network on 127.0.0.1 with
SQLite files under ``./var`` and the shipped test keys. ``paylab config`` prints every key,
its value and its description; ``docs/configuration.md`` lists them.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, TypeAdapter, ValidationError, model_validator
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
    reconnect_max_delay: float = Field(
        4.0,
        gt=0,
        description="Cap of the reconnect delay: an upstream that returns is found within "
        "about this long (also the pace of an open breaker's connection probes).",
    )

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
        30.0,
        gt=0,
        description="Longest a breaker stays open (failing fast) when no probe succeeds; a "
        "probe (connection attempt or echo) that succeeds makes it half-open at once.",
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
        description="Seconds an ISO connection may send no message before it is closed; "
        "zero-length keep-alive frames do not count (keep it above heartbeat_interval; 0: off).",
    )
    db_failure_hold: float = Field(
        10.0,
        ge=0,
        description="Seconds a service's /health keeps reporting its database as failing "
        "after a database call failed (besides the write probe of every /health).",
    )
    undecodable_log_interval: float = Field(
        60.0,
        ge=0,
        description="An ISO listener logs at most one undecodable_frame line per connection "
        "in this many seconds (each line says how many were held back); every frame is "
        "counted. 0: log every one.",
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
    tls_clients_acquirer: str = Field(
        "terminal",
        description="With mutual TLS: client identities (certificate CN, comma-separated) "
        "the acquirer's terminal listener accepts; * for any certificate of the CA.",
    )
    tls_clients_gateway: str = Field(
        "acquirer,terminal",
        description="With mutual TLS: client identities the gateway's listener accepts.",
    )
    tls_clients_billing: str = Field(
        "gateway",
        description="With mutual TLS: client identities billing's listener accepts.",
    )
    tls_clients_hsm: str = Field(
        "gateway,billing",
        description="With mutual TLS: client identities the HSM's listener accepts.",
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
    log_files: bool = Field(
        True,
        description="Also write every service's log, as JSON lines, to rotating files "
        "<data_dir>/logs/<service>.log (paylab up and each service), whatever the console "
        "shows.",
    )
    log_file_max_bytes: int = Field(
        10_000_000, ge=10_000, description="Size at which a log file is rotated (bytes)."
    )
    log_file_backups: int = Field(
        5, ge=1, le=100, description="Rotated log files kept per service (<service>.log.1 ..)."
    )

    # -- per-upstream overrides of the link settings (docs/configuration.md) -------------
    upstream_hsm: dict[str, float | int | bool] = Field(
        default_factory=dict,
        description="Pool, heartbeat, reconnect, retry and breaker settings for the links to "
        "the HSM (gateway and billing), overriding the keys above, as JSON: "
        '\'{"retry_max_attempts": 2, "breaker_open_wait": 5}\'.',
    )
    upstream_billing: dict[str, float | int | bool] = Field(
        default_factory=dict,
        description="The same overrides for the gateway's link to billing (and its "
        "store-and-forward retry schedule).",
    )
    upstream_gateway: dict[str, float | int | bool] = Field(
        default_factory=dict,
        description="The same overrides for the acquirer's link to the gateway.",
    )

    # -- the configuration itself ----------------------------------------------------------
    allow_unknown_keys: bool = Field(
        False,
        description="Start even when the environment or .env holds PAYLAB_* keys paylab does "
        "not know (a newer version's keys). Off: an unknown key (a typo) stops the start.",
    )

    @model_validator(mode="after")
    def _check_upstream_overrides(self) -> Settings:
        for name in UPSTREAMS:
            link_overrides(self, name)
        return self

    def for_upstream(self, name: str) -> Settings:
        """These settings with ``upstream_<name>``'s overrides applied (validated)."""
        found = link_overrides(self, name)
        return self.model_copy(update=found) if found else self

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

    def tls_clients(self, service: str) -> frozenset[str] | None:
        """The client identities ``service``'s listener accepts with mutual TLS; None for
        any certificate of the CA (``*``)."""
        raw: str = getattr(self, f"tls_clients_{service}", "*")
        names = frozenset(part.strip() for part in raw.split(",") if part.strip())
        return None if "*" in names else names

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


#: The upstreams whose link settings can be overridden: ``upstream_<name>``.
UPSTREAMS = ("hsm", "billing", "gateway")
#: The link settings an ``upstream_<name>`` may override.
LINK_PREFIXES = ("pool_", "heartbeat_", "reconnect_", "retry_", "breaker_")
LINK_KEYS = ("connect_timeout", "max_in_flight_per_connection")
#: PAYLAB_* variables of the tools around paylab (load tests, test suite, traffic
#: generator), never settings: not reported as unknown.
TOOL_PREFIXES = ("PAYLAB_LOAD_", "PAYLAB_TEST_", "PAYLAB_TRAFFIC_", "PAYLAB_OUTAGE_")


def is_link_key(key: str) -> bool:
    return key in Settings.model_fields and (key.startswith(LINK_PREFIXES) or key in LINK_KEYS)


def link_overrides(settings: Settings, name: str) -> dict[str, Any]:
    """The validated overrides of ``upstream_<name>``.

    Raises:
        ConfigError: a key that is not a link setting, or a value its setting refuses.
    """
    raw: Mapping[str, Any] = getattr(settings, f"upstream_{name}")
    found: dict[str, Any] = {}
    for key, value in raw.items():
        if not is_link_key(key):
            hint = _suggest(key, [k for k in Settings.model_fields if is_link_key(k)])
            raise ConfigError(
                f"upstream_{name}: {key!r} is not a pool, heartbeat, reconnect, retry or "
                f"breaker setting{hint}"
            )
        field = Settings.model_fields[key]
        try:
            found[key] = TypeAdapter(Annotated[field.annotation, *field.metadata]).validate_python(  # type: ignore[arg-type]
                value
            )
        except ValidationError as exc:
            message = exc.errors()[0]["msg"]
            raise ConfigError(f"upstream_{name}: {key}={value!r}: {message}") from None
    return found


def _suggest(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"; did you mean {close[0]}?" if close else ""


def unknown_keys(names: Iterable[str]) -> list[str]:
    """The ``PAYLAB_*`` names among ``names`` that are no setting (pure): one message each,
    with the closest known key ("did you mean ..."). Case-insensitive, as the settings are;
    the tools' prefixes (:data:`TOOL_PREFIXES`) are not settings and not reported."""
    known = {f"PAYLAB_{key.upper()}" for key in Settings.model_fields}
    found = []
    for name in names:
        upper = name.upper()
        if not upper.startswith("PAYLAB_") or upper in known or upper.startswith(TOOL_PREFIXES):
            continue
        found.append(f"{name}{_suggest(upper, known)}")
    return found


def _env_file_names(env_file: object) -> list[str]:
    if env_file is None:
        return []
    from dotenv import dotenv_values

    files = env_file if isinstance(env_file, (list, tuple)) else [env_file]
    names: list[str] = []
    for f in files:
        path = Path(str(f))
        if path.is_file():
            names.extend(k for k in dotenv_values(path) if k)
    return names


def load_settings(**overrides: object) -> Settings:
    """Read the settings (environment and ``.env``), with explicit ``overrides`` on top.

    Raises:
        ConfigError: the environment or the ``.env`` file holds a ``PAYLAB_*`` key that is no
            setting (a typo), unless ``allow_unknown_keys`` is set.
        pydantic.ValidationError: a value is invalid.
    """
    settings = Settings(**overrides)  # type: ignore[arg-type]
    if not settings.allow_unknown_keys:
        env_file = overrides.get("_env_file", Settings.model_config.get("env_file"))
        problems = [f"{m} (environment)" for m in unknown_keys(os.environ)]
        problems += [f"{m} (.env)" for m in unknown_keys(_env_file_names(env_file))]
        if problems:
            raise ConfigError(
                "unknown setting " + "; ".join(problems) + ". Fix the name (paylab config "
                "lists every key), or set PAYLAB_ALLOW_UNKNOWN_KEYS=true to start anyway"
            )
    return settings
