"""``paylab demo`` and ``paylab top`` as a user runs them: real processes, real sockets
on ephemeral ports, real SQLite."""

from __future__ import annotations

import os
import re
import socket
import sys
from pathlib import Path

import pytest
import trio

from shared.lab.demo import Plan, Summary, Tally, caption_for, must_stop_traffic, summarize
from shared.lab.network import Network
from shared.lab.reconcile.rules import (
    APPROVED_ONLINE,
    APPROVED_STANDIN,
    REVERSAL,
    GatewayFact,
    PostingFact,
    reconcile,
)
from tests.support import lab_settings

PAYLAB = [sys.executable, "-m", "shared.cli"]
#: A wide terminal, so no line of the output is wrapped.
ENV = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}


async def paylab(
    *args: str, timeout: float = 60.0, cwd: Path | None = None
) -> tuple[int, str, str]:
    """Run one ``paylab`` command to completion (bounded in time)."""
    with trio.fail_after(timeout):
        done = await trio.run_process(
            [*PAYLAB, *args],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env=ENV,
            cwd=cwd,
        )
    return done.returncode, done.stdout.decode(), done.stderr.decode()


def figure(output: str, label: str) -> int:
    """The number after ``label:`` in the demo's summary."""
    match = re.search(rf"^\s*{re.escape(label)}:\s*(\d+)\s*$", output, re.MULTILINE)
    assert match is not None, f"{label!r} missing from:\n{output}"
    return int(match.group(1))


def closed_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- the pure parts -------------------------------------------------------------------------------
def summary_of(
    facts: list[GatewayFact], postings: list[PostingFact], depth: int | None = 0
) -> Summary:
    tally = Tally()
    tally.codes.update({"00": 3, "68": 1})
    return summarize(tally, facts, postings, reconcile(facts, postings), depth)


def test_summary_of_a_clean_run() -> None:
    facts = [
        GatewayFact("k1", APPROVED_ONLINE, amount=10),
        GatewayFact("k2", APPROVED_STANDIN, "done", "00", amount=10),
        GatewayFact("k3", APPROVED_STANDIN, "done", "00", amount=10),
        GatewayFact("k4", REVERSAL, "done", "12"),  # the 68: never reached billing
    ]
    postings = [PostingFact(k, "posted", 10, f"B{k}") for k in ("k1", "k2", "k3")]
    summary = summary_of(facts, postings)
    assert (summary.accepted, summary.approved_online, summary.approved_standin) == (3, 1, 2)
    assert (summary.posted, summary.lost, summary.duplicated) == (3, 0, 0)
    assert summary.ok
    assert "not accepted (by code):  68: 1" in summary.lines()


def test_summary_counts_lost_and_duplicated_from_the_reconciliation() -> None:
    facts = [
        GatewayFact("k1", APPROVED_ONLINE, amount=10),  # no posting: lost
        GatewayFact("k2", APPROVED_STANDIN, "dead", None, amount=10),  # never delivered: lost
        GatewayFact("k3", APPROVED_ONLINE, amount=10),
        GatewayFact("k5", APPROVED_ONLINE, amount=10),
    ]
    postings = [
        PostingFact("k3", "posted", 10, "B3"),
        PostingFact("k4", "posted", 10, "B4"),  # nobody approved it: duplicated
        PostingFact("k5", "posted", 10, "B3"),  # the same bill twice: duplicated
    ]
    summary = summary_of(facts, postings)
    assert (summary.lost, summary.duplicated) == (2, 2)
    assert not summary.ok


def test_summary_pending_or_a_queue_left_is_not_ok() -> None:
    facts = [GatewayFact("k1", APPROVED_STANDIN, "queued", None, amount=10)]
    pending = summary_of(facts, [], depth=1)
    assert (pending.lost, pending.pending, pending.queue_depth) == (0, 1, 1)
    assert not pending.ok
    assert not summary_of([], [], depth=None).ok  # the depth was never read


def test_plan_validation_and_captions() -> None:
    assert Plan().bills_needed() >= 20 * 60
    with pytest.raises(ValueError, match="--partition-at"):
        Plan(partition_at=30, heal_at=10)
    with pytest.raises(ValueError, match="no time to drain"):
        Plan(duration=30, heal_at=25)
    with pytest.raises(ValueError, match="--terminals"):
        Plan(terminals=0)
    assert caption_for("partitioned", 12).endswith("(12 waiting)")
    assert caption_for("steady", 12) == "steady traffic: billing approves every payment online"


def test_traffic_stops_when_the_queue_would_not_drain_in_time() -> None:
    assert must_stop_traffic(0, None, 10.0)  # drained
    assert not must_stop_traffic(100, None, 10.0)  # no estimate yet
    assert not must_stop_traffic(100, 20.0, 10.0)  # 5 s of 10
    assert must_stop_traffic(300, 20.0, 10.0)  # 15 s of 10
    assert must_stop_traffic(5, 20.0, 0.0)  # out of time


# -- the commands ----------------------------------------------------------------------------------
async def test_demo_tells_the_outage_and_recovery_with_nothing_lost(tmp_path: Path) -> None:
    data = tmp_path / "demo"
    code, out, err = await paylab(
        "demo",
        "--duration", "40",
        "--tps", "10",
        "--partition-at", "3",
        "--heal-at", "9",
        "--data-dir", str(data),
        timeout=90,
    )  # fmt: skip
    assert code == 0, out + err
    # Not a terminal: a line per second, with the story in the captions.
    assert "steady traffic" in out
    assert "billing partitioned: payments approved in stand-in and queued" in out
    assert "healed: queue draining" in out
    accepted = figure(out, "payments accepted")
    standin = figure(out, "approved in stand-in")
    assert standin > 0
    assert figure(out, "approved online") + standin == accepted
    assert figure(out, "posted by billing") == accepted
    assert figure(out, "lost") == 0
    assert figure(out, "duplicated") == 0
    assert figure(out, "queue depth at the end") == 0
    # --data-dir keeps the databases, and the reconciliation agrees with the demo.
    assert (data / "billing.db").exists() and (data / "demo-services.log").exists()
    code, rec, err = await paylab("reconcile", "--data-dir", str(data))
    assert code == 0, rec + err
    assert "; 0 pending" in rec
    assert "lost 0, duplicated 0, orphans 0, 0 mismatches" in rec
    assert f"posted {accepted}," in rec


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--partition-at", "20", "--heal-at", "10"], "--partition-at"),
        (["--heal-at", "55"], "no time to drain"),
        (["--tps", "0"], "--tps"),
    ],
)
async def test_demo_refuses_a_schedule_that_cannot_work(args: list[str], message: str) -> None:
    code, _, err = await paylab("demo", *args)
    assert code == 1
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


async def test_demo_refuses_a_data_dir_in_use(tmp_path: Path) -> None:
    (tmp_path / "billing.db").write_bytes(b"")
    code, _, err = await paylab("demo", "--data-dir", str(tmp_path))
    assert code == 1 and "must be a new or empty directory" in err


async def test_top_once_against_a_running_network(tmp_path: Path, nursery: trio.Nursery) -> None:
    net = Network(lab_settings(tmp_path, chaos_http_port=0), chaos=True)
    await nursery.start(net.run)
    try:
        assert net.chaos is not None
        net.chaos.set("hsm", {"latency": "20ms"})
        url = {name: f"http://127.0.0.1:{p.http}" for name, p in net.ports.items()}
        code, out, err = await paylab(
            "top", "--once", "--interval", "300ms",
            "--acquirer-url", url["acquirer"], "--gateway-url", url["gateway"],
            "--billing-url", url["billing"], "--hsm-url", url["hsm"],
            "--chaos-url", f"http://127.0.0.1:{net.chaos_port}",
        )  # fmt: skip
        assert code == 0, out + err
        for needle in ("paylab top", "TPS", "gateway → billing", "closed", "queue 0 waiting",
                       "latency 20ms"):  # fmt: skip
            assert needle in out, needle
        assert "down" not in out
        # Billing stopped: shown as down, the others still drawn.
        await net.services["billing"].stop()
        code, out, err = await paylab(
            "top", "--once", "--interval", "200ms",
            "--acquirer-url", url["acquirer"], "--gateway-url", url["gateway"],
            "--billing-url", url["billing"], "--hsm-url", url["hsm"],
        )  # fmt: skip
        assert code == 0, out + err
        assert "billing down" in out and "! not answering: billing" in out
    finally:
        await net.stop()


async def test_top_with_nothing_listening_says_so_in_one_line() -> None:
    urls = [f"http://127.0.0.1:{closed_port()}" for _ in range(4)]
    code, _, err = await paylab(
        "top", "--once", "--interval", "100ms",
        "--acquirer-url", urls[0], "--gateway-url", urls[1],
        "--billing-url", urls[2], "--hsm-url", urls[3],
    )  # fmt: skip
    assert code == 1
    assert "no service answers" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [(["--interval", "fast"], "--interval"), (["--gateway-url", "localhost:1"], "http://")],
)
async def test_top_refuses_bad_options(args: list[str], message: str) -> None:
    code, _, err = await paylab("top", "--once", *args)
    assert code == 1 and message in err and "Traceback" not in err
