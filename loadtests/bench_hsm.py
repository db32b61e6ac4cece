"""CPU per HSM command: the command processor alone and the service's answer path.

Run it from the repository root::

    python -m loadtests.bench_hsm                  # 20,000 commands per row, 5 rounds
    python -m loadtests.bench_hsm -n 5000 -r 3     # fewer

Everything runs in one process without sockets: for each command of a chain payment (NC,
CA, EC, M6, M8, built with :mod:`hsm.protocol` and the demo key file) it times, with
``time.process_time``, ``n`` calls of

* ``process``: :func:`hsm.commands.process_with_result` (parsing, key lookup, cryptography);
* ``answer``: :meth:`hsm.service.HsmService.answer` (the above plus the metrics and the
  message record, as the inline server calls it for each frame).

Each row is run ``rounds`` times, interleaved, and the median is printed in µs of CPU per
command. Nothing is asserted: the machine's speed varies, so compare rows of one run, or
alternate runs of two versions and take medians.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from collections.abc import Callable

from hsm import protocol
from hsm.commands import ERR_OK, process_with_result
from hsm.keyfile import load_key_file
from hsm.service import HsmService
from shared.crypto import encrypt_pin_block, mac_alg3, pvv
from shared.ops.settings import load_settings

PAN = "4000001234567899"
ACCOUNT = "000123456789"
PIN = "1234"


def requests() -> dict[str, bytes]:
    """One well-formed request per command, each answered with error 00."""
    keys = load_key_file()
    tpk, zpk, tak, pvk = (keys.entry(n) for n in ("TPK", "ZPK", "TAK", "PVK"))
    data = bytes(range(256)) * 2  # about the size of a MACed authorisation request
    mac = mac_alg3(tak.clear, data).hex().upper()
    return {
        "NC": protocol.build_nc("0001"),
        "CA": protocol.build_ca(
            "0002", tpk.under_lmk, zpk.under_lmk, encrypt_pin_block(PIN, PAN, tpk.clear), ACCOUNT
        ),
        "EC": protocol.build_ec(
            "0003",
            zpk.under_lmk,
            pvk.under_lmk,
            encrypt_pin_block(PIN, PAN, zpk.clear),
            ACCOUNT,
            "1",
            pvv(pvk.clear, PAN, "1", PIN),
        ),
        "M6": protocol.build_m6("0004", protocol.KEY_TYPE_TAK, tak.under_lmk, data),
        "M8": protocol.build_m8("0005", protocol.KEY_TYPE_TAK, tak.under_lmk, data, mac),
    }


def _time(call: Callable[[], object], n: int) -> float:
    """µs of CPU per call over ``n`` calls."""
    start = time.process_time()
    for _ in range(n):
        call()
    return (time.process_time() - start) / n * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=20_000, help="commands per row and round")
    parser.add_argument("-r", "--rounds", type=int, default=5, help="rounds (median printed)")
    args = parser.parse_args(argv)

    keys = load_key_file()
    service = HsmService(load_settings(), keys)
    cases: dict[str, Callable[[], object]] = {}
    for code, request in requests().items():
        result = process_with_result(request, keys)
        if result.error != ERR_OK:
            raise SystemExit(f"{code}: error {result.error}")
        cases[f"process {code}"] = functools.partial(process_with_result, request, keys)
        cases[f"answer  {code}"] = functools.partial(service.answer, request, "bench")
    figures: dict[str, list[float]] = {name: [] for name in cases}
    for call in cases.values():  # warm-up
        _time(call, max(1, args.n // 10))
    for _ in range(args.rounds):
        for name, call in cases.items():
            figures[name].append(_time(call, args.n))
    record = "on" if service.record.enabled else "off"
    print(f"µs of CPU per command (median of {args.rounds}, n={args.n}, message record {record})")
    for name, values in figures.items():
        print(f"{name}  {statistics.median(values):7.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
