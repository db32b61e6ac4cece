"""The lab pages print what they say: the steps of labs 1, 2 and 3 are run as written
(each command of the page's ```sh blocks through ``bash -c``, the venv's ``paylab`` on the
PATH) against ``paylab up --chaos`` with the settings of ``docs/labs/lab.env``, on free
ports; every output the page quotes in a step's text (an outcome line such as
``FAILED inquiry 91``, a JSON fragment such as ``"to_state": "open"``, a metric sample,
``database billing: DOWN``) must be found in what that step's commands printed or in the
network's log. The quoted patterns are extracted from the markdown, not copied here."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.proclab import free_ports, wait_until

ROOT = Path(__file__).resolve().parent.parent
LABS = ROOT / "docs" / "labs"
VENV_BIN = Path(sys.executable).parent
PORT_KEYS = {
    8080: "PAYLAB_ACQUIRER_HTTP_PORT",
    8081: "PAYLAB_GATEWAY_HTTP_PORT",
    8082: "PAYLAB_BILLING_HTTP_PORT",
    8083: "PAYLAB_HSM_HTTP_PORT",
    8084: "PAYLAB_CHAOS_HTTP_PORT",
}
#: What counts as a quoted output in a step's text.
OUTCOME = re.compile(r"^(APPROVED|FAILED|DECLINED) \w+ \d\d")
JSON_FRAGMENT = re.compile(r'^"\w+": ')
SWITCH = re.compile(r"^database \w+: (UP|DOWN)$")
SAMPLE = re.compile(r"^(paylab_\w+)\{([^}]*)\} ([\d.]+)$")


@dataclass
class Step:
    number: int
    commands: list[str]
    text: str  # the step without its code blocks

    def quoted(self) -> list[str]:
        spans = re.findall(r"`([^`\n]+)`", self.text)
        return [
            s
            for s in spans
            if OUTCOME.match(s) or JSON_FRAGMENT.match(s) or SWITCH.match(s) or SAMPLE.match(s)
        ]


def steps_of(page: Path) -> dict[int, Step]:
    """The numbered steps of a lab page: their commands and their text."""
    body = page.read_text().split("\n## Questions")[0]
    found: dict[int, Step] = {}
    parts = re.split(r"^(\d+)\. \*\*", body, flags=re.MULTILINE)
    for number, chunk in zip(parts[1::2], parts[2::2], strict=True):
        blocks = re.findall(r"```sh\n(.*?)```", chunk, re.DOTALL)
        commands = [line.strip() for block in blocks for line in block.splitlines() if line.strip()]
        text = re.sub(r"```sh\n.*?```", "", chunk, flags=re.DOTALL)
        found[int(number)] = Step(int(number), commands, " ".join(text.split()))
    return found


def lab_env() -> dict[str, str]:
    values = {}
    for line in (LABS / "lab.env").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


def sample_matches(pattern: str, output: str) -> bool:
    """A quoted sample ``name{a="x"} v`` is in ``output`` when a sample of that name has
    at least those labels and that value (the page leaves out labels such as service)."""
    m = SAMPLE.match(pattern)
    assert m
    name, labels, value = m.group(1), m.group(2), float(m.group(3))
    wanted = set(re.findall(r'\w+="[^"]*"', labels))
    for line in output.splitlines():
        got = SAMPLE.match(line.strip())
        if (
            got
            and got.group(1) == name
            and float(got.group(3)) == value
            and wanted <= set(re.findall(r'\w+="[^"]*"', got.group(2)))
        ):
            return True
    return False


def found(pattern: str, output: str) -> bool:
    if SAMPLE.match(pattern):
        return sample_matches(pattern, output)
    if pattern.endswith("…") or pattern.endswith('…"'):
        return pattern.split("…")[0] in output
    return pattern in output


class LabNetwork:
    """``paylab up --chaos`` with lab.env, on free ports, its log in a file."""

    def __init__(self, workdir: Path) -> None:
        ports = iter(free_ports(9))
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("PAYLAB_")}
        self.env.update(lab_env())
        for svc in ("acquirer", "gateway", "billing", "hsm"):
            for kind in ("http", "iso"):
                self.env[f"PAYLAB_{svc.upper()}_{kind.upper()}_PORT"] = str(next(ports))
        self.env["PAYLAB_CHAOS_HTTP_PORT"] = str(next(ports))
        self.env.update(
            PAYLAB_HOST="127.0.0.1",
            PAYLAB_DATA_DIR=str(workdir / "var" / "labs"),
            PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            COLUMNS="200",
        )
        self.workdir = workdir
        self.log = workdir / "up.log"
        with self.log.open("wb") as sink:
            self.proc = subprocess.Popen(
                ["bash", "-c", "exec paylab up --chaos"],
                env=self.env,
                cwd=workdir,
                stdout=sink,
                stderr=subprocess.STDOUT,
            )

    def url(self, port: int) -> str:
        return f"http://127.0.0.1:{self.env[PORT_KEYS[port]]}"

    def run(self, command: str) -> str:
        for port, key in PORT_KEYS.items():
            command = command.replace(f"localhost:{port}", f"localhost:{self.env[key]}")
        done = subprocess.run(
            ["bash", "-c", command],
            env=self.env,
            cwd=self.workdir,
            capture_output=True,
            text=True,
            timeout=120,
        )
        return done.stdout + done.stderr

    def links(self) -> dict[str, int]:
        body = httpx.get(
            self.url(8081) + "/links",
            headers={"Authorization": "Bearer paylab-lab-reader"},
            timeout=5,
        ).json()
        return {link["name"]: link["healthy"] for link in body["links"]}

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)


@pytest.fixture
def network(tmp_path: Path) -> Iterator[LabNetwork]:
    net = LabNetwork(tmp_path)
    try:
        wait_until(lambda: _ready(net), bool, timeout=60, step=0.1)
        yield net
    finally:
        net.stop()


def _ready(net: LabNetwork) -> bool:
    try:
        return httpx.get(net.url(8080) + "/health", timeout=1).status_code == 200 and all(
            n == 2 for n in net.links().values()
        )
    except (httpx.HTTPError, ValueError, KeyError):
        return False


def run_steps(net: LabNetwork, page: str, numbers: list[int]) -> int:
    """Run the steps ``numbers`` of ``page`` as written; assert each quoted output of a step
    is in what its commands printed or in the log. Returns how many patterns were checked."""
    steps = steps_of(LABS / page)
    checked = 0
    for number in numbers:
        step = steps[number]
        if page.startswith("03") and number == 3:
            # "Once billing shows 0 healthy": the page says to wait for it.
            wait_until(net.links, lambda links: links.get("billing") == 0, timeout=30, step=0.2)
        printed = "\n".join(net.run(c) for c in step.commands)
        for pattern in step.quoted():
            # The log is written by another process: wait (briefly) for its line.
            seen = wait_until(
                lambda out=printed: out + net.log.read_text(errors="replace"),  # type: ignore[misc]
                lambda text, p=pattern: found(p, text),  # type: ignore[misc]
                timeout=5,
            )
            assert found(pattern, seen), (page, number, pattern)
            checked += 1
    return checked


def test_the_pages_quote_outputs_this_test_can_check() -> None:
    quoted = {
        page: [p for s in steps_of(LABS / page).values() for p in s.quoted()]
        for page in ("01-retry-and-backoff.md", "02-circuit-breaker.md", "03-store-and-forward.md")
    }
    assert '"attempt": 1, "delay_s": 1.0' in quoted["01-retry-and-backoff.md"]
    assert '"to_state": "open"' in quoted["02-circuit-breaker.md"]
    assert all(quoted.values()), quoted
    assert lab_env()["PAYLAB_LOG_FORMAT"] == "json"


def test_lab1_prints_what_its_page_quotes(network: LabNetwork) -> None:
    assert run_steps(network, "01-retry-and-backoff.md", [1, 2, 3, 4]) >= 5
    assert "Lab 1 done" in network.run("paylab lab check 1")


def test_lab2_and_3_print_what_their_pages_quote(network: LabNetwork) -> None:
    """Lab 2's steps 1 to 4 (the breaker opens, stand-in), then billing back; lab 3's steps
    1 to 4 (a partition, stand-in, the queue), 5 (the heal) and 6 (reconcile)."""
    assert run_steps(network, "02-circuit-breaker.md", [1, 2, 3, 4]) >= 3
    assert "retry in" in network.run("paylab breaker status")
    network.run(
        "paylab chaos database billing --up && paylab chaos heal all "
        "&& paylab breaker reset billing"
    )
    wait_until(network.links, lambda links: links.get("billing") == 2, timeout=30, step=0.2)
    assert run_steps(network, "03-store-and-forward.md", [1, 2, 3, 4, 5]) >= 2
    wait_until(
        lambda: network.run("paylab saf stats"),
        lambda text: re.search(r"depth\D+0\b", text) is not None,
        timeout=30,
        step=0.5,
    )
    assert "0 mismatches" in network.run("paylab reconcile")
