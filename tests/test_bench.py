"""``paylab bench`` (percentiles, a short real run) and ``paylab up --processes``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from shared.lab.bench import latency_summary, percentile, python_speed
from tests.test_cli import PAYLAB, env, run_cli  # noqa: F401 - env is a fixture

# -- percentiles ------------------------------------------------------------------------------


def test_percentile_nearest_rank() -> None:
    samples = [float(i) for i in range(1, 101)]  # 1..100
    assert percentile(samples, 50) == 50.0
    assert percentile(samples, 95) == 95.0
    assert percentile(samples, 99) == 99.0
    assert percentile(samples, 100) == 100.0
    assert percentile(samples, 0) == 1.0


def test_percentile_is_always_a_sample() -> None:
    samples = [0.001, 0.002, 0.010]
    assert percentile(samples, 50) == 0.002
    assert percentile(samples, 99) == 0.010
    assert percentile(samples, 34) == 0.002  # ceil(0.34 * 3) = 2nd sample
    assert percentile(samples, 33) == 0.001
    assert percentile([7.0], 99) == 7.0


def test_percentile_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile([1.0], 101)
    with pytest.raises(ValueError):
        percentile([1.0], -1)


def test_python_speed_is_a_positive_rate() -> None:
    assert python_speed(0.02) > 0


def test_latency_summary_in_milliseconds() -> None:
    summary = latency_summary([0.003, 0.001, 0.002, 0.004])  # any order
    assert summary == {
        "p50_ms": pytest.approx(2.0),
        "p95_ms": pytest.approx(4.0),
        "p99_ms": pytest.approx(4.0),
        "mean_ms": pytest.approx(2.5),
        "max_ms": pytest.approx(4.0),
    }
    assert set(latency_summary([]).values()) == {None}


def test_one_encode_builder_sends_what_codec_encodes() -> None:
    """The bench's cheaper builder puts on the wire exactly the signed message's encoding."""
    from shared.iso import codec
    from shared.lab.bench import _builders

    for mac in (True, False):
        builder = _builders("BT", 1, mac=mac)[0]
        for kind in ("payment", "inquiry"):
            if kind == "payment":
                msg = builder.payment("PLN-0001", 150_000, "4761739001010010", "1234")
            else:
                msg = builder.inquiry("PLN-0001")
            assert builder.payload == codec.encode(msg)
            assert ("64" in msg) is mac
            if mac:
                assert builder.response_mac_ok(builder.payload, msg)


# -- a real, short run ------------------------------------------------------------------------


@pytest.mark.timeout(90)
def test_bench_smoke_json(tmp_path: Path) -> None:
    """Every phase answers, nothing fails, and the report parses."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("PAYLAB_")}
    args = ["--duration", "2", "--warmup", "0.5", "--concurrency", "4", "--bills", "3000"]
    r = subprocess.run(
        [*PAYLAB, "bench", *args, "--json"],
        env=base,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=80,
    )
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    report = json.loads(r.stdout)
    phases = {p["name"]: p for p in report["phases"]}
    assert set(phases) == {"echo", "billing-inquiry", "billing-payment", "chain-payment"}
    for p in phases.values():
        assert p["errors"] == 0, p
        assert p["completed"] > 0, p
        assert p["tps"] > 0
        assert p["p50_ms"] <= p["p95_ms"] <= p["p99_ms"] <= p["max_ms"]
    assert report["ratios"]["chain_vs_echo"] > 0
    assert {"hsm", "billing", "gateway", "echo"} <= set(report["rss"])
    assert report["rss"]["gateway"]["rss_mb"] > 0
    machine = report["machine"]
    assert machine["python_speed_before"] > 0 and machine["python_speed_after"] > 0


# -- paylab up --processes --------------------------------------------------------------------


def _wait_health(url: str, proc: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"paylab up --processes exited early with {proc.returncode}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"{url} not ready within {timeout} s")


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


@pytest.mark.timeout(120)
@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
def test_up_processes_pays_and_stops_cleanly(env: dict[str, str], tmp_path: Path) -> None:  # noqa: F811
    up = subprocess.Popen(
        [*PAYLAB, "up", "--processes"],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    children: list[int] = []
    try:
        _wait_health(f"http://127.0.0.1:{env['PAYLAB_ACQUIRER_HTTP_PORT']}/health", up)
        children = _children(up.pid)
        assert len(children) == 4  # one process per service
        pay = run_cli(["pay", "--bill", "PLN-0002", "--amount", "275050"], env, tmp_path)
        assert pay.returncode == 0, pay.stdout + pay.stderr
        assert "APPROVED" in pay.stdout
    finally:
        up.send_signal(signal.SIGTERM)
        try:
            _out, err = up.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            up.kill()
            raise
    assert up.returncode == 0, err.decode()[-3000:]
    assert b"Traceback" not in err
    for pid in children:  # every service process is gone
        assert (
            not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
        )
    # Each service process wrote its own JSON log file (docs/configuration.md).
    for svc in ("acquirer", "gateway", "billing", "hsm"):
        lines = (Path(env["PAYLAB_DATA_DIR"]) / "logs" / f"{svc}.log").read_text().splitlines()
        assert {json.loads(line)["service"] for line in lines} == {svc}


@pytest.mark.timeout(120)
@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
def test_up_processes_reports_a_dead_child(env: dict[str, str], tmp_path: Path) -> None:  # noqa: F811
    up = subprocess.Popen(
        [*PAYLAB, "up", "--processes"],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        _wait_health(f"http://127.0.0.1:{env['PAYLAB_ACQUIRER_HTTP_PORT']}/health", up)
        children = _children(up.pid)
        assert len(children) == 4
        billing = [
            pid for pid in children if b"billing" in Path(f"/proc/{pid}/cmdline").read_bytes()
        ]
        assert len(billing) == 1
        os.kill(billing[0], signal.SIGKILL)
        _out, err = up.communicate(timeout=60)
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
    assert up.returncode == 1
    assert b"billing process exited" in err
    assert b"Traceback" not in err
