"""A long fuzz run of the properties in ``tests/test_fuzz.py``, and of the four listeners.

The test suite runs each property with a few hundred examples; this script runs the same
properties with many more (default 20 000 each), for a soak before a release or after a
change to a parser::

    python -m tests.fuzz_long                      # 20 000 examples per target
    python -m tests.fuzz_long --examples 100000 --seed 7 iso_pipeline hsm

Targets: frame_stream (shared/iso/framing.py), iso_pipeline (frame -> shared/iso/codec.py ->
shared/iso/validation.py), validator (shared/iso/validation.py on generated dicts), hsm
(hsm/commands.py). A failure prints hypothesis' minimal failing example and exits 1.
``tests/test_fuzz.py::test_long_fuzz_runner_runs_briefly`` runs it in CI with 30 examples.

``--listeners N`` instead starts a whole network (in a temporary directory, on free ports)
and sends N mutated frames over real sockets, spread evenly over the four listeners
(acquirer, gateway and billing: mutations of valid ISO-8583 requests; HSM: mutations of
valid host commands), on a few connections each, reading every answer. Then each
connection must still answer an echo, and the run prints, per listener, the frames sent,
answers received, frames counted undecodable or invalid, ``handler_failed`` (the
``paylab_iso_handler_errors_total`` counter and the log lines) and tracebacks logged. It
exits 1 unless every handler error count is zero::

    python -m tests.fuzz_long --listeners 100000 --seed 3
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import seed as fixed_seed

from tests.test_fuzz import TARGETS


def run(
    examples: int = 20_000,
    seed: int | None = None,
    targets: list[str] | None = None,
    *,
    verbose: bool = False,
) -> dict[str, int]:
    """Run ``targets`` (default: all) with ``examples`` examples each; raises on a failure.
    Returns the number of examples asked per target."""
    done: dict[str, int] = {}
    for name in targets or list(TARGETS):
        check, strategy = TARGETS[name]
        test = settings(
            max_examples=examples,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )(given(strategy)(check))
        if seed is not None:
            test = fixed_seed(seed)(test)
        started = time.monotonic()
        test()
        done[name] = examples
        if verbose:
            print(f"{name}: {examples} examples in {time.monotonic() - started:.1f} s")
    return done


# -- the listeners, over real sockets -----------------------------------------------------------

LISTENERS = ("acquirer", "gateway", "billing", "hsm")
#: Connections per listener: frames are spread over them.
CONNECTIONS = 4


def _iso_seeds() -> list[bytes]:
    from shared.iso import codec
    from tests.support import DEMO_PAN, DEMO_PIN, terminal_builder

    builder = terminal_builder("FUZZLIST", stan_start=500_000)
    payment = builder.payment("PLN-1015", 250000, DEMO_PAN, DEMO_PIN)
    return [
        codec.encode(payment),
        codec.encode(builder.inquiry("PLN-1016")),
        codec.encode(builder.reversal(payment)),
        codec.encode(_echo("000001")),
        # a secondary bitmap: mutations of it reach bit 65 and the fields above 64
        b"0800" + b"8220000000000000" + b"0400000000000000" + b"0314092653000123301",
    ]


def _hsm_seeds() -> list[bytes]:
    from hsm import protocol
    from tests.support import KEYS

    keys = {name: key.under_lmk for name, key in KEYS.keys.items()}
    data = b"0200 some bytes to MAC"
    return [
        protocol.build_nc("0001"),
        protocol.build_ca("0002", keys["TPK"], keys["ZPK"], "DF24F9EB2BD1D5BE", "173900101001"),
        protocol.build_ec(
            "0003", keys["ZPK"], keys["PVK"], "3CD72F51D6F40031", "173900101001", "1", "1366"
        ),
        protocol.build_m6("0004", protocol.KEY_TYPE_TAK, keys["TAK"], data),
        protocol.build_m8("0005", protocol.KEY_TYPE_TAK, keys["TAK"], data, "F81DC1EA0F1BEE92"),
    ]


def _echo(stan: str) -> dict[str, str]:
    from shared.iso.messages import MTI_NETWORK, NMI_ECHO, transmission_datetime

    return {"t": MTI_NETWORK, "7": transmission_datetime(), "11": stan, "70": NMI_ECHO}


def mutate(rnd: random.Random, seed: bytes, max_len: int = 4000) -> bytes:
    """One to six random edits of ``seed``: bytes flipped or set to hex digits, bytes
    inserted, deleted, duplicated, the tail cut; now and then random bytes instead."""
    if rnd.random() < 0.05:
        return rnd.randbytes(rnd.randint(0, 300))
    data = bytearray(seed)
    # Mostly one or two edits, so that many frames still decode and reach deeper checks.
    for _ in range(rnd.choice((1, 1, 1, 1, 2, 2, 3, 4, 5, 6))):
        pos = rnd.randrange(max(len(data), 1))
        op = rnd.randrange(6)
        if op == 0 and data:
            data[pos] = rnd.randrange(256)
        elif op == 1 and data:
            data[pos] = rnd.choice(b"0123456789ABCDEF")  # bitmaps and lengths stay plausible
        elif op == 2:
            data[pos:pos] = rnd.randbytes(rnd.randint(1, 8))
        elif op == 3 and data:
            del data[pos : pos + rnd.randint(1, 8)]
        elif op == 4 and data:
            data[pos:pos] = data[pos : pos + rnd.randint(1, 16)]
        else:
            del data[pos:]
    return bytes(data[:max_len])


@dataclass
class ListenerFigures:
    """What one listener got and gave during a listener run."""

    sent: int = 0
    answers: int = 0
    reconnects: int = 0
    echoes_answered: int = 0
    counters: dict[str, float] = field(default_factory=dict)
    handler_failed_logged: int = 0
    tracebacks_logged: int = 0
    undecodable_logged: int = 0

    @property
    def handler_failed(self) -> int:
        return int(self.counters.get("handler_errors", 0)) + self.handler_failed_logged


async def _drive(
    port: int, frames: list[bytes], figures: ListenerFigures, *, hsm: bool, stan: str
) -> None:
    """Send ``frames`` on one connection while reading every answer; then an echo, which
    must be answered. A connection the server closes is opened again."""
    from shared.iso.framing import FrameParser, encode_frame

    echo = b"E000NC" if hsm else _encode(_echo(stan))
    done = trio.Event()
    while True:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        parser = FrameParser(max_frame=65535)
        echoed = trio.Event()

        async def read(
            stream: trio.SocketStream = stream, parser: Any = parser, echoed: trio.Event = echoed
        ) -> None:
            try:
                async for data in stream:
                    for frame in parser.frames(data):
                        figures.answers += 1
                        if (hsm and frame[:6] == b"E000ND") or (
                            not hsm and frame[:4] == b"0810" and stan.encode() in frame
                        ):
                            echoed.set()
            except trio.BrokenResourceError:
                pass

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(read)
                while frames:
                    payload = frames.pop()
                    await stream.send_all(encode_frame(payload, max_frame=65535))
                    figures.sent += 1
                    if figures.sent % 64 == 0:
                        await trio.lowlevel.checkpoint()
                await stream.send_all(encode_frame(echo))
                with trio.fail_after(60):
                    await echoed.wait()
                figures.echoes_answered += 1
                done.set()
                nursery.cancel_scope.cancel()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            figures.reconnects += 1
        finally:
            await stream.aclose()
        if done.is_set():
            return


def _encode(msg: dict[str, str]) -> bytes:
    from shared.iso import codec

    return codec.encode(msg)


async def _listener_run(frames: int, seed: int, log: io.StringIO) -> dict[str, ListenerFigures]:
    from shared.lab.network import Network
    from tests.support import lab_settings

    rnd = random.Random(seed)
    iso, hsm = _iso_seeds(), _hsm_seeds()
    figures = {name: ListenerFigures() for name in LISTENERS}
    with tempfile.TemporaryDirectory(prefix="paylab-fuzz-") as tmp:
        net = Network(lab_settings(Path(tmp), log_level="warning", gateway_timeout=15.0))
        async with trio.open_nursery() as nursery:
            await nursery.start(net.run)
            try:
                async with trio.open_nursery() as drivers:
                    for i, name in enumerate(LISTENERS):
                        seeds = hsm if name == "hsm" else iso
                        share = frames // len(LISTENERS) + (i < frames % len(LISTENERS))
                        batch = [mutate(rnd, rnd.choice(seeds)) for _ in range(share)]
                        for c in range(CONNECTIONS):
                            drivers.start_soon(
                                functools.partial(
                                    _drive,
                                    net.ports[name].iso,
                                    batch[c::CONNECTIONS],
                                    figures[name],
                                    hsm=name == "hsm",
                                    stan=f"9999{c:02d}",
                                )
                            )
                for name in LISTENERS:
                    registry = net.services[name].metrics.registry

                    def value(metric: str, labels: dict[str, str] | None = None) -> float:
                        return registry.get_sample_value(metric, labels or {}) or 0.0  # noqa: B023

                    figures[name].counters = {
                        "handler_errors": value("paylab_iso_handler_errors_total"),
                        **{
                            f"rejected_{r}": value(
                                "paylab_iso_frames_rejected_total", {"reason": r}
                            )
                            for r in ("undecodable", "invalid", "framing")
                        },
                    }
            finally:
                await net.stop()
    for line in log.getvalue().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        service = record.get("service")
        if service not in figures:
            continue
        if record.get("event") == "handler_failed":
            figures[service].handler_failed_logged += 1
        if record.get("event") == "undecodable_frame":
            figures[service].undecodable_logged += 1
        if "Traceback" in line:
            figures[service].tracebacks_logged += 1
    return figures


def run_listeners(
    frames: int = 100_000, seed: int = 0, *, verbose: bool = False
) -> dict[str, ListenerFigures]:
    """Send ``frames`` mutated frames over the four listeners of a fresh network (see the
    module docstring) and return each listener's figures. Does not raise on handler
    failures: the caller judges the figures."""
    from shared.ops.log import configure_logging

    log = io.StringIO()
    configure_logging("warning", "json", stream=log)  # before the services bind their loggers
    started = time.monotonic()
    try:
        figures = trio.run(_listener_run, frames, seed, log)
    finally:
        configure_logging("warning", "json")
    if verbose:
        took = time.monotonic() - started
        print(f"{frames} mutated frames over {len(LISTENERS)} listeners in {took:.1f} s")
        header = (
            "listener", "sent", "answers", "undecodable", "invalid", "framing",
            "handler_failed", "tracebacks", "undecodable lines", "echoes", "reconnects",
        )  # fmt: skip
        print("  ".join(f"{h:>11}" for h in header))
        for name, f in figures.items():
            row = (
                name, f.sent, f.answers, int(f.counters.get("rejected_undecodable", 0)),
                int(f.counters.get("rejected_invalid", 0)),
                int(f.counters.get("rejected_framing", 0)), f.handler_failed,
                f.tracebacks_logged, f.undecodable_logged, f.echoes_answered, f.reconnects,
            )  # fmt: skip
            print("  ".join(f"{v!s:>11}" for v in row))
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("targets", nargs="*", help=f"some of: {', '.join(TARGETS)}")
    parser.add_argument("--examples", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument(
        "--listeners",
        type=int,
        metavar="N",
        default=None,
        help="send N mutated frames over the four listeners of a network instead",
    )
    args = parser.parse_args(argv)
    if args.listeners is not None:
        figures = run_listeners(args.listeners, args.seed or 0, verbose=True)
        failed = sum(f.handler_failed + f.tracebacks_logged for f in figures.values())
        alive = all(f.echoes_answered == CONNECTIONS for f in figures.values())
        if failed or not alive:
            print(f"FAILED: {failed} handler failures or tracebacks; every echo answered: {alive}")
            return 1
        print("no handler failed")
        return 0
    unknown = set(args.targets) - set(TARGETS)
    if unknown:
        parser.error(f"unknown target(s): {', '.join(sorted(unknown))}")
    run(args.examples, args.seed, args.targets or None, verbose=True)
    print("no failure")
    return 0


if __name__ == "__main__":
    sys.exit(main())
