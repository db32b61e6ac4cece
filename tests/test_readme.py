"""The README's shell commands, run as written: the first payment of the Quick start and
every command of "Using it" (the ``paylab`` lines and the curl lines), each through
``bash -c`` with the venv's ``paylab`` on the PATH, against a network this test starts
with the README's own ``paylab up`` on free ports (never the default ones: the ports of
the curl lines are rewritten to the test's). Each command must exit as the README says:
0, or 2 for the payment it calls declined; the long-running ones (``up``, ``top``,
``gateway``) must serve and stop cleanly."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.proclab import Lab, free_ports, wait_until

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
VENV_BIN = Path(sys.executable).parent
#: The ports the README's curl lines use, by setting.
DEFAULT_PORTS = {
    8080: "PAYLAB_ACQUIRER_HTTP_PORT",
    8081: "PAYLAB_GATEWAY_HTTP_PORT",
    8082: "PAYLAB_BILLING_HTTP_PORT",
    8083: "PAYLAB_HSM_HTTP_PORT",
}
#: Commands that run until stopped.
LONG_RUNNING = ("paylab up", "paylab top", "paylab gateway")
#: Commands run by a test of their own, as the README writes them: ``paylab demo`` starts a
#: network of its own and takes most of a minute (tests/test_demo.py runs it whole).
COVERED_ELSEWHERE = {"paylab demo": "tests/test_demo.py"}


def section(markdown: str, title: str) -> str:
    """The text of the ``## title`` section, up to the next ``## `` heading."""
    start = markdown.index(f"\n## {title}\n")
    end = markdown.find("\n## ", start + 1)
    return markdown[start : end if end != -1 else None]


def shell_commands(text: str) -> list[tuple[str, str]]:
    """(command, comment) of every line of the ```sh blocks of ``text``."""
    found = []
    for block in re.findall(r"```sh\n(.*?)```", text, re.DOTALL):
        for line in block.splitlines():
            parts = re.split(r"\s+#\s", line, maxsplit=1)
            command, comment = parts[0].strip(), (parts[1].strip() if len(parts) > 1 else "")
            if command and not command.startswith("#"):
                found.append((command, comment))
    return found


def test_the_readme_sections_have_the_commands_this_test_knows() -> None:
    commands = [c for c, _ in shell_commands(section(README.read_text(), "Using it"))]
    assert commands[0] == "paylab up"
    assert any(c.startswith("curl") for c in commands)
    assert all(c.startswith(("paylab ", "curl ")) for c in commands), commands


class Shell:
    """README lines run as a trainee would (venv active), on the test's network."""

    def __init__(self, lab: Lab, workdir: Path) -> None:
        self.env = {
            **lab.env,
            "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "COLUMNS": "200",
        }
        self.workdir = workdir

    def localize(self, command: str) -> str:
        """The command with the test's ports instead of the default ones."""
        for port, key in DEFAULT_PORTS.items():
            command = command.replace(f"localhost:{port}", f"localhost:{self.env[key]}")
        return command

    def run(self, command: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["bash", "-c", self.localize(command)],
            env=self.env,
            cwd=self.workdir,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def start(self, command: str, log: Path, **env: str) -> subprocess.Popen[bytes]:
        with log.open("wb") as sink:
            return subprocess.Popen(
                ["bash", "-c", "exec " + self.localize(command)],
                env={**self.env, **env},
                cwd=self.workdir,
                stdout=sink,
                stderr=subprocess.STDOUT,
            )


def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> int:
    proc.send_signal(sig)
    try:
        return proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)
        raise


@pytest.fixture
def shell(labs: list[Lab], tmp_path: Path) -> Iterator[Shell]:
    lab = Lab(tmp_path)
    labs.append(lab)
    yield Shell(lab, tmp_path)


def _answered(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code in (200, 503)
    except httpx.HTTPError:
        return False


def test_every_command_of_the_readme_runs_as_written(shell: Shell, tmp_path: Path) -> None:
    readme = README.read_text()
    using = shell_commands(section(readme, "Using it"))
    quick = [c for c, _ in shell_commands(section(readme, "Quick start"))]
    assert "paylab pay --bill PLN-0001" in quick
    assert using[0][0] == "paylab up"
    acquirer = f"http://127.0.0.1:{shell.env['PAYLAB_ACQUIRER_HTTP_PORT']}"
    up = shell.start("paylab up", tmp_path / "up.log")
    ran: list[str] = []
    try:
        wait_until(lambda: _answered(acquirer + "/health"), bool, timeout=60)
        # The Quick start's first payment, as printed (the venv is on the PATH).
        first = shell.run("paylab pay --bill PLN-0001")
        assert first.returncode == 0, first.stdout + first.stderr
        assert "APPROVED payment 00" in first.stdout
        last_id = last_rrn = ""
        for command, comment in using[1:]:
            if "<" in command:
                assert last_id, f"{command}: no payment to refer to yet"
                command = re.sub(r"<transaction id>|<id>", last_id, command)
                command = re.sub(r"<RRN or transaction id>|<rrn>", last_rrn, command)
            if "…" in command:
                # An abridged message (`paylab decode 0200F23C…`): a whole one in its place.
                command = re.sub(r"\S+…", a_message_in_hex(), command)
            if command in COVERED_ELSEWHERE:
                assert (ROOT / COVERED_ELSEWHERE[command]).is_file()
                ran.append(command)
                continue
            if command in LONG_RUNNING:
                _long_running(shell, command, tmp_path)
                ran.append(command)
                continue
            done = shell.run(command)
            expected = 2 if "declined" in comment else 0
            assert done.returncode == expected, (command, done.stdout, done.stderr)
            ran.append(command)
            if command.startswith("paylab pay") and done.returncode == 0:
                id_ = re.search(r"^\s+id\s+(\w+)$", done.stdout, re.MULTILINE)
                rrn = re.search(r"^\s+rrn\s+(\w+)$", done.stdout, re.MULTILINE)
                assert id_ and rrn, done.stdout
                last_id, last_rrn = id_.group(1), rrn.group(1)
            _check_answer(command, done.stdout)
    finally:
        code = stop(up)
    assert code == 0, (tmp_path / "up.log").read_text()[-3000:]
    assert len(ran) == len(using) - 1


def a_message_in_hex() -> str:
    """A real 0200 (an inquiry of a demo terminal), as the hex ``paylab decode`` reads."""
    from shared.iso import codec
    from tests.support import terminal_builder

    return codec.encode(terminal_builder().inquiry("PLN-0002")).hex()


def _check_answer(command: str, stdout: str) -> None:
    """What the README's comments promise of some answers."""
    if command.startswith("curl -s localhost") and "/payments " in command + " ":
        # The README's curl pays a bill no earlier example paid: approved.
        assert json.loads(stdout)["response_code"] == "00", stdout
    if "/reversal" in command and command.startswith("curl"):
        assert "already reversed" in json.loads(stdout)["error"], stdout
    if command.startswith("paylab txn"):
        assert "gateway journal" in stdout, stdout
    if command == "paylab links":
        # An error rate in %, as the other views show rates.
        rates = re.findall(r"error rate (\S+)", stdout)
        assert rates and all(re.fullmatch(r"\d+%|-", r) for r in rates), stdout
    if command.startswith("paylab breaker status"):
        assert "retry in" in stdout and "open for" not in stdout, stdout


def _long_running(shell: Shell, command: str, tmp_path: Path) -> None:
    """``top`` draws frames until Ctrl-C; ``gateway`` serves (on ports of its own, the
    network holds the others) until SIGTERM. Both stop with exit code 0."""
    name = command.split()[1]
    log = tmp_path / f"{name}.log"
    if name == "top":
        proc = shell.start(command, log)
        try:
            wait_until(lambda: log.read_bytes(), lambda b: b"p95" in b, timeout=30)
        finally:
            code = stop(proc, signal.SIGINT)
        assert code == 0, log.read_text()[-2000:]
        assert re.search(rb"tps [\d.]+ .* p50 [\d.]+ms p95 [\d.]+ms", log.read_bytes())
    elif name == "gateway":
        http, iso = free_ports(2)
        proc = shell.start(
            command,
            log,
            PAYLAB_GATEWAY_HTTP_PORT=str(http),
            PAYLAB_GATEWAY_ISO_PORT=str(iso),
            PAYLAB_DATA_DIR=str(tmp_path / "gateway-alone"),
        )
        try:
            wait_until(
                lambda: _answered(f"http://127.0.0.1:{http}/health"), bool, timeout=30, step=0.1
            )
        finally:
            code = stop(proc)
        assert code == 0, log.read_text()[-2000:]
    else:  # pragma: no cover - the list above names every long-running command
        raise AssertionError(command)
