"""The command line as a user runs it: real processes, real signals."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.proclab import free_ports

PAYLAB = [sys.executable, "-m", "shared.cli"]


def run_cli(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run one ``paylab`` command to completion (bounded in time)."""
    return subprocess.run(
        [*PAYLAB, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=60
    )


def billing_postings(workdir: Path, bill: str) -> int:
    """Postings of ``bill`` in the billing SQLite file a ``paylab`` process left behind."""
    db = sqlite3.connect(workdir / "var" / "billing.db")
    try:
        (count,) = db.execute(
            "SELECT count(*) FROM postings WHERE bill_number = ?", (bill,)
        ).fetchone()
    finally:
        db.close()
    return int(count)


def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"paylab exited early with {proc.returncode}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"{url} not ready within {timeout} s")


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    ports = free_ports(8)
    e = {k: v for k, v in os.environ.items() if not k.startswith("PAYLAB_")}
    for i, svc in enumerate(("acquirer", "gateway", "billing", "hsm")):
        e[f"PAYLAB_{svc.upper()}_HTTP_PORT"] = str(ports[i])
        e[f"PAYLAB_{svc.upper()}_ISO_PORT"] = str(ports[4 + i])
    e["PAYLAB_DATA_DIR"] = str(tmp_path / "var")
    return e


def test_up_pay_and_sigterm(env: dict[str, str], tmp_path: Path) -> None:
    up = subprocess.Popen(
        [*PAYLAB, "up"], env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        api = f"http://127.0.0.1:{env['PAYLAB_ACQUIRER_HTTP_PORT']}"
        wait_ready(api + "/health", up)
        pay = run_cli(["pay", "--bill", "PLN-0001", "--amount", "150000"], env, tmp_path)
        assert pay.returncode == 0, pay.stdout + pay.stderr
        assert "APPROVED" in pay.stdout
        again = run_cli(["pay", "--bill", "PLN-0001", "--amount", "150000"], env, tmp_path)
        assert again.returncode == 2
        assert "88" in again.stdout
        # A reader that goes away (`| head -1`) must not change the exit code: the pipe is
        # closed before the command (still importing and asking the API) writes anything.
        piped = subprocess.Popen(
            [*PAYLAB, "inquire", "--bill", "PLN-0001"],
            env=env,
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        assert piped.stdout is not None
        piped.stdout.close()
        assert piped.wait(timeout=60) == 2  # declined 88: the bill is paid
    finally:
        up.send_signal(signal.SIGTERM)
        try:
            _out, err = up.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            up.kill()
            raise
    assert up.returncode == 0, err.decode()[-2000:]
    assert b"service_stopped" in err
    assert billing_postings(tmp_path, "PLN-0001") == 1
    # No PAN in clear in the logs or in any database file.
    assert b"4761739001010010" not in err
    for f in (tmp_path / "var").rglob("*"):
        if f.is_file():
            assert b"4761739001010010" not in f.read_bytes(), f.name
    # Each service's log, as JSON lines, in its rotating file (docs/operations.md).
    for svc in ("acquirer", "gateway", "billing", "hsm"):
        lines = (tmp_path / "var" / "logs" / f"{svc}.log").read_text().splitlines()
        events = [json.loads(line) for line in lines]
        assert {e["service"] for e in events} == {svc}
        assert "service_stopped" in {e["event"] for e in events}, svc


def test_pay_with_nothing_listening_is_one_clear_line(env: dict[str, str], tmp_path: Path) -> None:
    r = run_cli(["pay", "--bill", "PLN-0001", "--amount", "1"], env, tmp_path)
    assert r.returncode == 1
    assert "nothing is listening" in r.stderr
    assert "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) <= 2


def test_port_in_use_is_one_clear_line(env: dict[str, str], tmp_path: Path) -> None:
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", int(env["PAYLAB_HSM_ISO_PORT"])))
    blocker.listen()
    try:
        r = run_cli(["up"], env, tmp_path)
    finally:
        blocker.close()
    assert r.returncode == 1
    assert "already in use" in r.stderr
    assert "Traceback" not in r.stderr


def test_bad_key_file_is_one_clear_line(env: dict[str, str], tmp_path: Path) -> None:
    bad = tmp_path / "keys.json"
    bad.write_text("{not json")
    env = dict(env, PAYLAB_KEY_FILE=str(bad))
    r = run_cli(["hsm"], env, tmp_path)
    assert r.returncode == 1
    assert "key file" in r.stderr
    assert "Traceback" not in r.stderr


def test_db_upgrade_creates_every_schema(env: dict[str, str], tmp_path: Path) -> None:
    r = run_cli(["db", "upgrade"], env, tmp_path)
    assert r.returncode == 0, r.stderr
    for name in ("acquirer", "gateway", "billing"):
        assert (tmp_path / "var" / f"{name}.db").exists()
        assert f"{name}: schema up to date" in r.stdout
    assert run_cli(["db", "upgrade"], env, tmp_path).returncode == 0  # idempotent


def test_sigkill_loses_no_posting_and_a_replay_posts_nothing(
    env: dict[str, str], tmp_path: Path
) -> None:
    """A payment approved before a crash is on disk after it; its replay is answered the same."""
    import trio

    from shared.iso import codec
    from shared.iso.framing import FrameParser, encode_frame
    from tests.support import DEMO_PAN, DEMO_PIN, terminal_builder

    request = terminal_builder("KILLTEST").payment("PDAM-0001", 89900, DEMO_PAN, DEMO_PIN)
    gateway_port = int(env["PAYLAB_GATEWAY_ISO_PORT"])

    async def send() -> dict[str, str]:
        stream = await trio.open_tcp_stream("127.0.0.1", gateway_port)
        await stream.send_all(encode_frame(codec.encode(request)))
        parser = FrameParser()
        with trio.fail_after(20):
            while not (frames := parser.frames(await stream.receive_some(65536))):
                pass
        await stream.aclose()
        return codec.decode(frames[0])

    def run_network() -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            [*PAYLAB, "up"],
            env=env,
            cwd=tmp_path,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_ready(f"http://127.0.0.1:{env['PAYLAB_ACQUIRER_HTTP_PORT']}/health", proc)
        return proc

    first = run_network()
    try:
        answer = trio.run(send)
    finally:
        first.kill()  # SIGKILL: no drain, no clean close
        first.wait(timeout=20)
    assert answer["39"] == "00"

    second = run_network()
    try:
        replay = trio.run(send)
    finally:
        second.send_signal(signal.SIGTERM)
        second.wait(timeout=20)
    assert replay["39"] == "00"
    assert replay["38"] == answer["38"]
    assert billing_postings(tmp_path, "PDAM-0001") == 1


# -- the command's own layout ----------------------------------------------------------------
#: What ``paylab --help`` must not load: each command imports these when it runs.
HEAVY = (
    "shared.ops.settings",
    "pydantic",
    "sqlalchemy",
    "trio",
    "httpx",
    "shared.lab",
    "shared.net",
    "shared.server",
    "shared.store",
    "gateway",
    "acquirer",
    "hsm",
    "billing.models",
)


def test_help_loads_no_command_body(tmp_path: Path) -> None:
    probe = (
        "import sys\n"
        "sys.argv = ['paylab', '--help']\n"
        "from shared.cli.app import main\n"
        "try:\n"
        "    main()\n"
        "except SystemExit:\n"
        "    pass\n"
        f"heavy = {HEAVY!r}\n"
        "loaded = sorted(m for m in sys.modules if m.startswith(heavy))\n"
        "print('LOADED', loaded, file=sys.stderr)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert "Usage: paylab" in done.stdout
    assert "LOADED []" in done.stderr, done.stderr


def test_every_service_has_its_command() -> None:
    from shared.cli import up
    from shared.ops.settings import SERVICES

    assert up.SERVICES == SERVICES
