"""The command line as a user runs it: real processes, real signals."""

from __future__ import annotations

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

PAYLAB = [sys.executable, "-m", "shared.cli"]


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def run_cli(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run one ``paylab`` command to completion (bounded in time)."""
    return subprocess.run(
        [*PAYLAB, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=60
    )


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
    finally:
        up.send_signal(signal.SIGTERM)
        try:
            _out, err = up.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            up.kill()
            raise
    assert up.returncode == 0, err.decode()[-2000:]
    assert b"service_stopped" in err
    db = sqlite3.connect(tmp_path / "var" / "billing.db")
    try:
        (count,) = db.execute(
            "SELECT count(*) FROM postings WHERE bill_number = 'PLN-0001'"
        ).fetchone()
    finally:
        db.close()
    assert count == 1
    # No PAN in clear in the logs or in any database file.
    assert b"4761739001010010" not in err
    for f in (tmp_path / "var").iterdir():
        assert b"4761739001010010" not in f.read_bytes(), f.name


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
