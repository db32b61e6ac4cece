"""The pure rules behind the upstream links, without sockets: which connection a request
uses, the outcome window, pool configuration, which failures are retried, the health
score, and the network-management dialects of ISO and HSM links."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, cast

import pytest

from hsm import protocol
from hsm.client import HsmCommandFailed, HsmDialect, decode_hsm_keyed
from shared.errors import UpstreamError, UpstreamTimeout, UpstreamUnavailable
from shared.iso import codec
from shared.iso.codes import RC
from shared.iso.messages import (
    MTI_NETWORK,
    NMI_ECHO,
    NMI_SIGN_OFF,
    NMI_SIGN_ON,
    StanCounter,
    make_response,
    match_key,
)
from shared.net.iso_link import IsoDialect, IsoFrame, decode_iso_keyed
from shared.net.pool import Candidate, NoHealthyConnection, OutcomeWindow, PoolConfig, PoolExhausted
from shared.net.pool import choose as choose_index
from shared.net.upstream import RETRY_REASONS, CircuitOpen, Upstream, retry_reason
from shared.server.admin import health_score

MAX = 4  # max_in_flight of the choose() cases


def p(in_flight: int = 0, healthy: bool = True) -> Candidate:
    return Candidate("primary", healthy, in_flight)


def b(in_flight: int = 0, healthy: bool = True) -> Candidate:
    return Candidate("backup", healthy, in_flight)


def choose(*candidates: Candidate) -> int | None:
    return choose_index(list(candidates), MAX)


# -- choose() ---------------------------------------------------------------------------------


def test_choose_nothing_to_choose_from() -> None:
    assert choose() is None


def test_choose_prefers_a_healthy_primary_even_a_busier_one() -> None:
    assert choose(b(0), p(3)) == 1


def test_choose_takes_the_primary_with_fewest_in_flight() -> None:
    assert choose(p(3), p(1), p(2)) == 1


def test_choose_takes_the_first_of_equals() -> None:
    assert choose(p(2), p(1), p(1)) == 1


def test_choose_ignores_unhealthy_connections_however_idle() -> None:
    assert choose(p(0, healthy=False), p(3)) == 1
    assert choose(p(0, healthy=False), b(0, healthy=False), b(2)) == 2


def test_choose_uses_the_backup_only_without_a_healthy_primary() -> None:
    assert choose(p(0, healthy=False), b(2), b(1)) == 2
    assert choose(p(0, healthy=False), p(0, healthy=False), b(0)) == 2


def test_choose_a_full_primary_is_none_not_the_backup() -> None:
    assert choose(p(MAX), b(0)) is None
    assert choose(p(MAX), p(MAX), b(0)) is None


def test_choose_skips_a_full_primary_for_one_with_room() -> None:
    assert choose(p(MAX), p(MAX - 1), b(0)) == 1


def test_choose_nothing_healthy_is_none() -> None:
    assert choose(p(0, healthy=False), b(0, healthy=False)) is None


def test_choose_every_backup_full_is_none() -> None:
    assert choose(p(0, healthy=False), b(MAX), b(MAX)) is None


# -- OutcomeWindow ----------------------------------------------------------------------------


def test_outcome_window_is_empty_before_the_first_call() -> None:
    w = OutcomeWindow(size=3)
    assert (w.calls, w.error_rate) == (0, None)


def test_outcome_window_error_rate_over_its_calls() -> None:
    w = OutcomeWindow(size=4)
    w.add(True)
    w.add(False)
    assert (w.calls, w.error_rate) == (2, 0.5)
    w.add(True)
    w.add(True)
    assert (w.calls, w.error_rate) == (4, 0.25)


def test_outcome_window_slides_over_the_last_calls() -> None:
    w = OutcomeWindow(size=2)
    for ok in (False, False, True):
        w.add(ok)
    assert (w.calls, w.error_rate) == (2, 0.5)
    w.add(True)
    assert w.error_rate == 0.0


# -- PoolConfig -------------------------------------------------------------------------------


def test_pool_config_defaults_are_valid() -> None:
    cfg = PoolConfig()
    assert cfg.min_connections <= cfg.max_connections


@pytest.mark.parametrize(
    "kwargs",
    [
        {"min_connections": 0, "max_connections": 1},
        {"min_connections": 3, "max_connections": 3},
        {"max_in_flight": 1, "grow_at": 1},
    ],
)
def test_pool_config_accepts_edge_values(kwargs: dict[str, Any]) -> None:
    PoolConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"min_connections": 3, "max_connections": 2},
        {"min_connections": -1},
        {"min_connections": 0, "max_connections": 0},
        {"max_in_flight": 0},
        {"grow_at": 0},
        {"heartbeat_interval": 0},
        {"heartbeat_interval": -1},
        {"heartbeat_timeout": 0},
    ],
)
def test_pool_config_refuses_impossible_values(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        PoolConfig(**kwargs)


# -- retry_reason -----------------------------------------------------------------------------


@pytest.mark.parametrize("resend_safe", [True, False])
def test_nothing_sent_is_always_retried(resend_safe: bool) -> None:
    for exc in (
        UpstreamUnavailable("refused"),
        NoHealthyConnection("none healthy"),
        PoolExhausted("all full"),
    ):
        assert retry_reason(exc, resend_safe=resend_safe) == "no_connection"


@pytest.mark.parametrize("resend_safe", [True, False])
def test_the_open_breaker_is_never_retried(resend_safe: bool) -> None:
    assert retry_reason(CircuitOpen("open"), resend_safe=resend_safe) is None


def test_a_lost_connection_is_retried_only_when_resend_safe() -> None:
    lost = UpstreamUnavailable("closed before the answer", sent=True)
    assert retry_reason(lost, resend_safe=True) == "connection_lost"
    assert retry_reason(lost, resend_safe=False) is None


def test_a_timeout_is_retried_only_when_resend_safe() -> None:
    late = UpstreamTimeout("no answer")
    assert retry_reason(late, resend_safe=True) == "timeout"
    assert retry_reason(late, resend_safe=False) is None


@pytest.mark.parametrize("resend_safe", [True, False])
def test_other_upstream_errors_are_not_retried(resend_safe: bool) -> None:
    assert retry_reason(UpstreamError("same key in flight"), resend_safe=resend_safe) is None
    assert retry_reason(HsmCommandFailed("CA", "15"), resend_safe=resend_safe) is None


def test_every_retry_reason_has_a_metric_label() -> None:
    reasons = {
        retry_reason(UpstreamUnavailable("x"), resend_safe=True),
        retry_reason(UpstreamUnavailable("x", sent=True), resend_safe=True),
        retry_reason(UpstreamTimeout("x"), resend_safe=True),
        IsoDialect().failed_answer(_frame({"t": "0210", "39": "91"})),
        IsoDialect().failed_answer(_frame({"t": "0210", "39": "96"})),
    }
    assert reasons == set(RETRY_REASONS)


# -- health_score -----------------------------------------------------------------------------


@dataclass
class FakePool:
    healthy_count: int
    target: int

    def target_connections(self) -> int:
        return self.target


@dataclass
class FakeLink:
    pool: FakePool
    breaker_allows: bool = True
    name: str = field(default="fake")


def score(*links: FakeLink) -> int:
    return health_score(cast(list[Upstream[Any]], list(links)))


def test_health_score_without_upstreams_is_full() -> None:
    assert score() == 100


def test_health_score_is_healthy_over_target() -> None:
    assert score(FakeLink(FakePool(2, 2))) == 100
    assert score(FakeLink(FakePool(1, 2))) == 50
    assert score(FakeLink(FakePool(0, 2))) == 0


def test_health_score_caps_each_link_at_its_target() -> None:
    # Extra on-demand connections do not make up for another link's missing ones.
    assert score(FakeLink(FakePool(8, 2)), FakeLink(FakePool(0, 2))) == 50


def test_health_score_is_the_mean_over_links() -> None:
    assert score(FakeLink(FakePool(2, 2)), FakeLink(FakePool(1, 2))) == 75
    assert score(FakeLink(FakePool(1, 3)), FakeLink(FakePool(3, 3))) == 67  # rounded


def test_health_score_counts_a_refusing_breaker_as_zero() -> None:
    assert score(FakeLink(FakePool(2, 2), breaker_allows=False)) == 0
    assert score(FakeLink(FakePool(2, 2), breaker_allows=False), FakeLink(FakePool(2, 2))) == 50


def test_health_score_survives_a_zero_target() -> None:
    assert score(FakeLink(FakePool(0, 0))) == 0
    assert score(FakeLink(FakePool(1, 0))) == 100


# -- IsoDialect -------------------------------------------------------------------------------


def _frame(msg: dict[str, str]) -> IsoFrame:
    return IsoFrame(codec.encode(msg), msg)


@pytest.mark.parametrize(
    ("method", "nmi"),
    [("echo", NMI_ECHO), ("sign_on", NMI_SIGN_ON), ("sign_off", NMI_SIGN_OFF)],
)
def test_iso_network_requests_decode_to_0800(method: str, nmi: str) -> None:
    request = getattr(IsoDialect(StanCounter(start=41)), method)()
    assert request is not None
    payload, key = request
    msg = codec.decode(payload)
    assert (msg["t"], msg["70"], msg["11"]) == (MTI_NETWORK, nmi, "000042")
    assert key == match_key(msg)
    # The answer of the host finds the request by the same key.
    answer_key, frame = decode_iso_keyed(codec.encode(make_response(msg, RC.APPROVED)))
    assert answer_key == key
    assert frame.msg["t"] == "0810"


def test_iso_network_requests_get_fresh_stans() -> None:
    dialect = IsoDialect()
    keys = {dialect.echo()[1], dialect.echo()[1], dialect.sign_on()[1]}  # type: ignore[index]
    assert len(keys) == 3


def test_iso_accepted_only_on_00() -> None:
    dialect = IsoDialect()
    echo = codec.decode(dialect.echo()[0])
    assert dialect.accepted(_frame(make_response(echo, RC.APPROVED)))
    for code in (RC.ISSUER_INOPERATIVE, RC.SYSTEM_MALFUNCTION, RC.DO_NOT_HONOR):
        assert not dialect.accepted(_frame(make_response(echo, code)))
    assert not dialect.accepted(_frame({"t": "0810"}))  # no field 39 at all


@pytest.mark.parametrize(
    ("code", "reason"),
    [
        ("91", "rc_91"),
        ("96", "rc_96"),
        ("00", None),
        ("05", None),
        ("55", None),
        ("65", None),
        ("68", None),
        ("88", None),
    ],
)
def test_iso_failed_answer_only_for_transient_host_failures(code: str, reason: str | None) -> None:
    assert IsoDialect().failed_answer(_frame({"t": "0210", "39": code})) == reason


def test_iso_failed_answer_without_a_code_is_an_answer() -> None:
    assert IsoDialect().failed_answer(_frame({"t": "0210"})) is None


# -- HsmDialect -------------------------------------------------------------------------------


def test_hsm_echo_is_an_nc_keyed_by_an_h_header() -> None:
    dialect = HsmDialect()
    payload, key = dialect.echo()
    assert isinstance(key, str) and key.startswith("H") and len(key) == 4
    assert payload[:4] == key.encode() and payload[4:6] == b"NC"
    assert dialect.echo()[1] != key  # the next echo has its own header


def test_hsm_answer_finds_its_echo_by_header() -> None:
    payload, key = HsmDialect().echo()
    answer = payload[:4] + b"ND00" + b"0123456789ABCDEF"
    answer_key, response = decode_hsm_keyed(answer)
    assert answer_key == key
    assert response.error == "00"


def test_hsm_has_no_sign_on_or_off() -> None:
    dialect = HsmDialect()
    assert dialect.sign_on() is None
    assert dialect.sign_off() is None


def test_hsm_accepted_on_error_00_and_never_a_failed_answer() -> None:
    dialect = HsmDialect()
    ok = protocol.parse_response(b"H001ND00")
    bad = protocol.parse_response(b"H001ND15")
    assert dialect.accepted(ok)
    assert not dialect.accepted(bad)
    assert dialect.failed_answer(ok) is None
    assert dialect.failed_answer(bad) is None
