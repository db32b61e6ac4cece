"""``paylab bench`` (percentiles, CPU per request from /proc, the rate table, a short real
run), the profile summariser and ``paylab up --processes``."""

from __future__ import annotations

import itertools
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import trio

from loadtests import profile_summary
from shared.lab.bench import (
    BenchOptions,
    PhaseResult,
    SpeedSampler,
    cpu_delta,
    cpu_line,
    cpu_per_request,
    drive,
    latency_summary,
    normalise,
    parse_rates,
    parse_speed_line,
    payments,
    percentile,
    python_speed,
    rate_concurrency,
    rate_table_rows,
    read_cpu,
    serve_echo,
    speed_sample,
    window_speed,
)
from shared.lab.network import cpu_ticks_from_stat, read_cpu_seconds
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


# -- CPU per request: /proc/<pid>/stat -------------------------------------------------------

#: A real line of /proc/<pid>/stat (fields 14 and 15: utime 1234, stime 56).
STAT_LINE = (
    "4242 (python3) S 1 4242 4242 0 -1 4194560 9000 0 12 0 1234 56 0 0 20 0 3 0 "
    "110000 300000000 20000 18446744073709551615 1 1 0 0 0 0 0 16781312 16386 0 0 0 17 1 "
    "0 0 0 0 0\n"
)


def test_cpu_ticks_from_stat_reads_fields_14_and_15() -> None:
    assert cpu_ticks_from_stat(STAT_LINE) == (1234, 56)


def test_cpu_ticks_from_stat_command_with_spaces_and_parentheses() -> None:
    """The command name is counted from the last ``)``, whatever it holds."""
    tricky = STAT_LINE.replace("(python3)", "(my (odd) name) 7 8 ) x)")
    assert cpu_ticks_from_stat(tricky) == (1234, 56)
    assert cpu_ticks_from_stat(STAT_LINE.replace("(python3)", "()")) == (1234, 56)


@pytest.mark.parametrize(
    "text",
    ["", "4242 python3 S 1 2 3", "4242 (python3) S 1 4242 4242 0 -1 4194560 9000 0 12"],
)
def test_cpu_ticks_from_stat_rejects_what_is_not_a_stat_line(text: str) -> None:
    with pytest.raises(ValueError):
        cpu_ticks_from_stat(text)


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
def test_read_cpu_seconds_of_a_real_child() -> None:
    """A child burns CPU until its own clock says 0.3 s, reports it, then waits: the
    reading from /proc is at least what it reported (same accounting, read later), and
    ``None`` once the child is gone."""
    burn = (
        "import os, sys\n"
        "while sum(os.times()[:2]) < 0.3: pass\n"
        "print(sum(os.times()[:2]), flush=True)\n"
        "sys.stdin.read()\n"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", burn], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None and child.stdin is not None
        reported = float(child.stdout.readline())
        seen = read_cpu_seconds(child.pid)
        assert seen is not None
        assert reported >= 0.3
        assert seen >= reported - 1e-9  # both in clock ticks; the reading comes later
        assert read_cpu({"child": child.pid, "gone": 2**22 + 1}) == {"child": pytest.approx(seen)}
        child.stdin.close()
        assert child.wait(timeout=30) == 0
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert read_cpu_seconds(child.pid) is None


def test_cpu_per_request_and_delta() -> None:
    start = {"hsm": 1.0, "billing": 2.0, "gateway": 3.0, "echo": 0.5}
    end = {"hsm": 1.35, "billing": 2.76, "gateway": 3.83}  # echo gone: not in the delta
    delta = cpu_delta(start, end)
    assert delta == pytest.approx({"hsm": 0.35, "billing": 0.76, "gateway": 0.83})
    per = cpu_per_request(delta, 1000, ("hsm", "billing", "gateway"))
    assert per == pytest.approx({"hsm": 0.35, "billing": 0.76, "gateway": 0.83, "total": 1.94})
    # only the phase's services count; unknown ones are left out
    assert cpu_per_request(delta, 1000, ("billing", "echo")) == pytest.approx(
        {"billing": 0.76, "total": 0.76}
    )
    assert cpu_per_request(delta, 0, ("hsm",)) is None
    assert cpu_per_request({}, 10, ("hsm",)) is None


def test_normalise_gives_thousand_steps_that_do_not_move_with_the_core() -> None:
    # 2 ms at 24 million steps/s = 48,000 steps; the same work on a core twice as fast
    # takes 1 ms and gives the same figure.
    assert normalise(2.0, 24.0) == pytest.approx(48.0)
    assert normalise(1.0, 48.0) == pytest.approx(normalise(2.0, 24.0))
    assert normalise(None, 24.0) is None
    assert normalise(2.0, None) is None
    assert normalise(2.0, 0.0) is None


def test_window_speed_is_the_mean_of_the_readings_inside() -> None:
    readings = [(9.9, 99.0), (10.0, 29.0), (10.2, 16.0), (10.4, 28.0), (10.6, 27.0), (11.1, 1.0)]
    assert window_speed(readings, 10.0, 11.0) == (25.0, 4)
    assert window_speed(readings, 10.1, 10.3) == (16.0, 1)
    assert window_speed(readings, 20.0, 30.0) is None
    assert window_speed([], 0.0, 1.0) is None


def test_parse_speed_line() -> None:
    assert parse_speed_line(b"12345.6789 24.51") == (12345.6789, 24.51)
    for bad in (b"", b"12345.6", b"a b", b"1 2 3", b"Traceback (most recent call last):"):
        assert parse_speed_line(bad) is None


def test_speed_sample_is_a_positive_rate() -> None:
    assert speed_sample(steps=1000, tries=2) > 0


@pytest.mark.timeout(60)
def test_speed_sampler_child_reads_and_stops() -> None:
    """The sampler's child prints timed readings on the shared monotonic clock; ``poll``
    collects them without waiting; ``stop`` ends the child."""
    before = time.monotonic()
    sampler = SpeedSampler(interval=0.01)
    try:
        deadline = time.monotonic() + 45
        while len(sampler.poll()) < 3:
            assert time.monotonic() < deadline, "no readings from the sampler"
            assert sampler.proc.poll() is None, "the sampler died"
            time.sleep(0.05)
        readings = list(sampler.readings)
        assert all(before < t < time.monotonic() and v > 0 for t, v in readings)
        assert [t for t, _ in readings] == sorted(t for t, _ in readings)
    finally:
        sampler.stop()
    assert sampler.proc.returncode is not None
    sampler.stop()  # twice is fine


def test_phase_result_reports_cpu_and_normalised_figures() -> None:
    result = PhaseResult("chain-payment", "x", completed=990, seconds=10.0)
    result.window_answers = 1000
    result.services = ("hsm", "billing", "gateway")
    result.service_cpu_seconds = {"hsm": 0.35, "billing": 0.76, "gateway": 0.83, "echo": 9.0}
    result.python_speed = 20.0
    d = result.as_dict()
    assert d["service_cpu_ms_per_request"] == pytest.approx(
        {"hsm": 0.35, "billing": 0.76, "gateway": 0.83}
    )
    assert d["service_cpu_ms_total"] == pytest.approx(1.94)
    assert d["service_ksteps_total"] == pytest.approx(38.8)
    assert d["service_ksteps_per_request"] == pytest.approx(
        {"hsm": 7.0, "billing": 15.2, "gateway": 16.6}
    )
    assert d["python_speed"] == 20.0
    json.dumps(d)  # JSON-ready
    line = cpu_line(d)
    assert line is not None and "1.94 ms" in line and "38.8 k steps" in line
    # no speed readings in the window (a sampler that died): CPU figures, no normalised ones
    result.python_speed = None
    unsped = result.as_dict()
    assert unsped["service_cpu_ms_total"] == pytest.approx(1.94)
    assert unsped["service_ksteps_total"] is None and unsped["service_ksteps_per_request"] is None
    line = cpu_line(unsped)
    assert line is not None and "1.94 ms" in line and "k steps" not in line
    empty = PhaseResult("echo", "x").as_dict()
    assert empty["service_cpu_ms_per_request"] is None
    assert empty["service_cpu_ms_total"] is None and empty["service_ksteps_total"] is None
    assert cpu_line(empty) is None


def test_parse_rates() -> None:
    assert parse_rates("100,300,600") == (100.0, 300.0, 600.0)
    assert parse_rates(" 50 , 12.5") == (50.0, 12.5)
    for bad in ("", "100,,300", "abc", "100,-5", "0", "nan", "inf"):
        with pytest.raises(ValueError):
            parse_rates(bad)


def test_rate_concurrency_and_bills() -> None:
    assert rate_concurrency(600, 64) == 300  # 0.5 s of answers in flight
    assert rate_concurrency(100, 64) == 64
    opts = BenchOptions(duration=10, warmup=2, concurrency=64)
    assert opts.bills_per_rate(100) == math.ceil(100 * 12.1 * 1.2) + 64
    assert opts.bills_per_rate(100_000) == opts.bills_per_phase()  # capped
    assert BenchOptions(bills=500).bills_per_rate(600) == 500


def _rate_phase(rate: float, tps: float, exhausted: bool = False) -> dict[str, object]:
    result = PhaseResult(f"chain-payment@{rate:g}/s", "x", completed=int(tps * 10), seconds=10)
    result.offered_rate = rate
    result.concurrency = rate_concurrency(rate, 64)
    result.exhausted = exhausted
    result.errors = 2
    result.latencies = [0.010, 0.020, 0.030]
    result.window_answers = int(tps * 10)
    result.services = ("hsm", "billing", "gateway")
    result.service_cpu_seconds = {"hsm": 0.35, "billing": 0.76, "gateway": 0.83}
    result.python_speed = 20.0
    return result.as_dict()


def test_rate_table_rows() -> None:
    header, rows = rate_table_rows([_rate_phase(100, 100), _rate_phase(300, 290)])
    assert header[:7] == ["offered", "TPS", "p50", "p95", "p99", "max", "errors"]
    assert header[7:] == ["gateway", "billing", "hsm", "total"]
    assert rows[0][:7] == ["100", "100", "20.0", "30.0", "30.0", "30.0", "2"]
    assert rows[0][7:] == ["0.83", "0.76", "0.35", "1.94"]
    assert rows[1][:2] == ["300", "290"]
    assert rows[1][-1] == "0.67"  # 1.94 s / 2,900 answers
    assert all(len(r) == len(header) for r in rows)
    # no CPU figures (not Linux): dashes, not a crash
    bare = PhaseResult("chain-payment@5/s", "x", offered_rate=5).as_dict()
    assert rate_table_rows([bare])[1][0][-4:] == ["-", "-", "-", "-"]


def test_render_shows_cpu_lines_and_the_rate_table() -> None:
    from rich.console import Console

    report = {
        "options": asdict_options(),
        "phases": [_rate_phase(0, 350) | {"name": "chain-payment"}],
        "rates": [_rate_phase(100, 100), _rate_phase(300, 290, exhausted=True)],
        "ratios": {"chain_vs_echo": 0.08, "billing_vs_echo": None},
        "rss": {},
        "machine": {
            "cpus": 2,
            "python": "3.11",
            "platform": "Linux",
            "load_average_before": 0.5,
            "load_average_after": 1.5,
            "python_speed_before": 24.0,
            "python_speed_after": 15.0,
            "cpu_tick_ms": 10.0,
        },
    }
    from shared.lab.bench import render

    console = Console(width=80, record=True)
    for item in render(report):
        console.print(item)
    text = console.export_text()
    assert "CPU chain-payment@300/s: hsm 0.12 + billing 0.26 + gateway 0.29" in text
    assert "bills ran out at 300/s" in text
    assert "offered" in text and "…" not in text  # the tables fit 80 columns


def asdict_options() -> dict[str, object]:
    from dataclasses import asdict

    return asdict(BenchOptions(rates=(100, 300)))


async def test_drive_reads_cpu_at_the_window_edges() -> None:
    """``drive`` against an in-process echo server: the probe is read once when the window
    opens and once when it closes; their difference is the phase's service CPU, and the
    answers received in the window are counted."""
    readings: list[dict[str, float]] = []

    def probe() -> dict[str, float]:
        readings.append({"echo": float(len(readings)) * 0.5})
        return readings[-1]

    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_echo, "127.0.0.1", 0)
        bills = ((f"T-{i}", 100) for i in itertools.count())
        result = await drive(
            "127.0.0.1",
            port,
            payments("DT", 2, bills),
            PhaseResult("echo", "test"),
            concurrency=2,
            connections=1,
            warmup=0.05,
            duration=0.3,
            expect_approval=False,
            cpu_probe=probe,
        )
        nursery.cancel_scope.cancel()
    assert len(readings) == 2
    assert result.service_cpu_seconds == {"echo": 0.5}
    assert result.completed > 0 and result.window_answers > 0
    # answered in the window but sent before it: at most one per worker
    assert 0 <= result.window_answers - result.completed <= 2


# -- the profile summariser (loadtests/profile_summary.py) ------------------------------------

RUN = "_run_module_as_main (<frozen runpy>:198);run (trio/_core/_run.py:2532)"


def test_profile_summary_buckets() -> None:
    b = profile_summary.bucket_of
    assert b([*RUN.split(";"), "unrolled_run (trio/_core/_run.py:2866)"]) == (
        "trio scheduling and socket I/O"
    )
    # a generic helper counts for its caller
    lead = "GroupCommit._lead (shared/store/group_commit.py:89)"
    helper = "_GeneratorContextManager.__exit__ (contextlib.py:144)"
    assert b([*RUN.split(";"), lead, helper]) == "paylab link layers"
    # the innermost frame that belongs to a bucket decides
    handle = "GatewayService.dispatch (gateway/service.py:222)"
    codec_ = "decode (shared/iso/codec.py:10)"
    assert b([*RUN.split(";"), handle, codec_]) == "ISO codec"
    assert b([*RUN.split(";"), handle]) == "the rest"
    sa = "Connection.execute (sqlalchemy/engine/base.py:1416)"
    assert b([*RUN.split(";"), handle, sa, "JSONEncoder.encode (json/encoder.py:1)"]) == (
        "the rest"
    )
    assert b([handle, sa]) == "SQLAlchemy"
    assert b(["__init__ (<attrs generated methods trio._core._run.Task>:16)"]) == (
        "trio scheduling and socket I/O"
    )
    assert b([sa, "__init__ (<string>:3)"]) == "SQLAlchemy"  # a dataclass __init__
    assert b(["Histogram.observe (prometheus_client/metrics.py:1)"]) == "metrics"
    assert b(["mac (shared/crypto.py:40)", "x (cryptography/hazmat/a.py:1)"]) == "crypto"
    assert b(["info (structlog/_native.py:1)"]) == "logging"
    assert b([]) == "the rest"
    assert b(["<frozen runpy>"]) == "the rest"


def test_profile_summary_parses_raw_and_prints_shares(tmp_path: Path) -> None:
    raw = tmp_path / "gateway.raw"
    raw.write_text(
        f"{RUN} 6\n"
        f"{RUN};Pool.acquire (shared/net/pool.py:50) 3\n"
        "\n"
        f"{RUN};GatewayService.dispatch (gateway/service.py:222) 1\n"
    )
    stacks = profile_summary.parse_raw(raw.read_text().splitlines())
    assert [n for _, n in stacks] == [6, 3, 1]
    summary = profile_summary.summarise(stacks)
    order = list(summary)
    assert order[0] == "trio scheduling and socket I/O" and order[-1] == "the rest"
    assert summary["trio scheduling and socket I/O"] == 6
    assert summary["paylab link layers"] == 3 and summary["the rest"] == 1
    assert sum(profile_summary.shares(summary).values()) == pytest.approx(100.0)
    table = profile_summary.format_table({"gateway": summary}, markdown=True)
    assert "| paylab link layers | 30.0 % |" in table
    assert "| samples | 10 |" in table
    with pytest.raises(ValueError):
        profile_summary.parse_raw(["no count here"])
    r = subprocess.run(
        [sys.executable, "-m", "loadtests.profile_summary", str(raw)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert "gateway" in r.stdout and "60.0 %" in r.stdout


# -- a real, short run ------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_bench_smoke_json(tmp_path: Path) -> None:
    """Every phase answers, nothing fails, and the report parses; it carries each phase's
    CPU per request, normalised, and the rate phases."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("PAYLAB_")}
    args = ["--duration", "2", "--warmup", "0.5", "--concurrency", "4", "--bills", "3000"]
    args += ["--rates", "20,40"]
    r = subprocess.run(
        [*PAYLAB, "bench", *args, "--json"],
        env=base,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=110,
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
    if sys.platform != "linux":
        return
    # CPU per request: positive for every process that did the phase's work
    busy = {
        "echo": {"echo"},
        "billing-inquiry": {"billing"},
        "billing-payment": {"hsm", "billing"},
        "chain-payment": {"hsm", "billing", "gateway"},
    }
    for name, p in phases.items():
        per = p["service_cpu_ms_per_request"]
        assert set(p["services"]) == set(per) >= busy[name], p
        assert all(per[s] > 0 for s in busy[name]), p
        assert p["service_cpu_ms_total"] == pytest.approx(sum(per.values()), abs=0.01)
        assert p["python_speed"] > 0 and p["python_speed_samples"] > 0
        assert p["service_ksteps_total"] == pytest.approx(
            p["service_cpu_ms_total"] * p["python_speed"], rel=0.01
        )
        assert p["window_answers"] > 0
    # the rate phases: one per rate, in order, paced, with CPU figures
    assert report["options"]["rates"] == [20, 40]
    rates = report["rates"]
    assert [p["offered_rate"] for p in rates] == [20, 40]
    for p in rates:
        assert p["errors"] == 0 and p["completed"] > 0 and not p["exhausted"], p
        assert p["concurrency"] >= 4
        assert p["tps"] <= p["offered_rate"] * 1.2  # paced (the 50 ms catch-up at most)
        assert all(p["service_cpu_ms_per_request"][s] > 0 for s in busy["chain-payment"])
        assert p["service_ksteps_total"] > 0


def test_bench_rejects_bad_rates(tmp_path: Path) -> None:
    base = {k: v for k, v in os.environ.items() if not k.startswith("PAYLAB_")}
    r = run_cli(["bench", "--rates", "100,fast"], base, tmp_path)
    assert r.returncode == 1
    assert "--rates" in r.stderr and "fast" in r.stderr


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
