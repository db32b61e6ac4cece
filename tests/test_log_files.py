"""The rotating JSON log files (shared.ops.log.LogFiles): one file per service, one JSON
object per line, scrubbed like the console, rotated at their size."""

from __future__ import annotations

import io
import json
from pathlib import Path

import structlog

from shared.ops.log import LogFiles, configure_logging, get_logger

PAN = "4761739001010010"


def test_each_service_gets_its_own_json_file_whatever_the_console(tmp_path: Path) -> None:
    files = LogFiles(tmp_path / "logs")
    console = io.StringIO()
    configure_logging("info", "console", stream=console, files=files)
    try:
        get_logger("gateway").info("payment", pan=PAN, pin="1234", amount=5)
        get_logger("billing").warning("slow", seconds=2.5)
        get_logger("billing").debug("hidden")  # below the level: in no file either
        structlog.get_logger().info("no_service")
    finally:
        files.close()
        configure_logging("warning", "json")
    gateway = [json.loads(x) for x in files.path("gateway").read_text().splitlines()]
    assert len(gateway) == 1
    event = gateway[0]
    assert (event["event"], event["service"], event["level"], event["amount"]) == (
        "payment",
        "gateway",
        "info",
        5,
    )
    assert event["pan"] == "476173******0010" and event["pin"] == "[redacted]"
    assert "timestamp" in event
    billing = [json.loads(x) for x in files.path("billing").read_text().splitlines()]
    assert [e["event"] for e in billing] == ["slow"]
    assert json.loads(files.path("paylab").read_text())["event"] == "no_service"
    assert "payment" in console.getvalue()  # the console still shows it, its own way
    assert not console.getvalue().lstrip().startswith("{")
    for f in (tmp_path / "logs").iterdir():
        assert PAN not in f.read_text()


def test_files_rotate_at_their_size(tmp_path: Path) -> None:
    files = LogFiles(tmp_path / "logs", max_bytes=2_000, backups=2)
    configure_logging("info", "json", stream=io.StringIO(), files=files)
    try:
        log = get_logger("hsm")
        for i in range(200):
            log.info("command", n=i, padding="x" * 40)
    finally:
        files.close()
        configure_logging("warning", "json")
    names = sorted(p.name for p in (tmp_path / "logs").iterdir())
    assert names == ["hsm.log", "hsm.log.1", "hsm.log.2"]
    for name in names:
        path = tmp_path / "logs" / name
        assert path.stat().st_size <= 2_000
        for line in path.read_text().splitlines():
            assert json.loads(line)["event"] == "command"
    last = json.loads(files.path("hsm").read_text().splitlines()[-1])
    assert last["n"] == 199
