"""A long fuzz run of the properties in ``tests/test_fuzz.py``.

The test suite runs each property with a few hundred examples; this script runs the same
properties with many more (default 20 000 each), for a soak before a release or after a
change to a parser::

    python -m tests.fuzz_long                      # 20 000 examples per target
    python -m tests.fuzz_long --examples 100000 --seed 7 iso_pipeline hsm

Targets: frame_stream (shared/iso/framing.py), iso_pipeline (frame -> shared/iso/codec.py ->
shared/iso/validation.py), validator (shared/iso/validation.py on generated dicts), hsm
(hsm/commands.py). A failure prints hypothesis' minimal failing example and exits 1.
``tests/test_fuzz.py::test_long_fuzz_runner_runs_briefly`` runs it in CI with 30 examples.
"""

from __future__ import annotations

import argparse
import sys
import time

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("targets", nargs="*", help=f"some of: {', '.join(TARGETS)}")
    parser.add_argument("--examples", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args(argv)
    unknown = set(args.targets) - set(TARGETS)
    if unknown:
        parser.error(f"unknown target(s): {', '.join(sorted(unknown))}")
    run(args.examples, args.seed, args.targets or None, verbose=True)
    print("no failure")
    return 0


if __name__ == "__main__":
    sys.exit(main())
