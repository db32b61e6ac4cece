"""Container health probe for a paylab service: ``python probe.py ready|self|live URL``.

``URL`` is the service's ``/health`` (``http://127.0.0.1:8081/health`` for the gateway),
which answers 200 when every check passes and 503 otherwise, listing each dependency (its
upstream links by name, and ``database``).

* ``ready``: exit 0 when ``/health`` answers 200: the database reachable and every upstream
  link healthy. Compose healthchecks use it, so services start in dependency order.
* ``self``: exit 0 when the service itself can work: ``/health`` answers, and its own
  database (if it has one) is reachable; upstream links do not count (as the services'
  own ``/readyz``, which Kubernetes readiness asks with ``httpGet``): when billing is down
  every gateway replica is in the same state, and taking them all out of their Service
  would turn stand-in approvals into refused connections.
* ``live``: exit 0 when ``/health`` answers at all with ``"live": true``, 200 or 503 alike.
  A service whose upstream is down is degraded, not dead: restarting it would not bring the
  upstream back (as ``/livez``, Kubernetes liveness).

Any other outcome (no answer within the timeout, another status, a body that is not the
service's) exits 1 with one line on stderr. Standard library only.
"""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request

TIMEOUT = 3.0
MODES = ("ready", "self", "live")
#: Dependencies of the service itself (the others are its upstream links).
OWN_CHECKS = ("database",)


def probe(mode: str, url: str, timeout: float = TIMEOUT) -> tuple[bool, str]:
    """(passed, reason) of one probe of ``url`` in ``mode`` (one of :data:`MODES`)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            status, body = resp.status, resp.read()
    except urllib.error.HTTPError as exc:  # 503 (degraded) arrives as an HTTPError
        status, body = exc.code, exc.read()
    except (OSError, ValueError) as exc:
        return False, f"no answer from {url}: {exc}"
    try:
        health = json.loads(body)
    except ValueError:
        return False, f"{url} answered {status} without JSON"
    if not isinstance(health, dict) or health.get("live") is not True:
        return False, f"{url} answered {status} without live: true"
    if status not in (200, 503):
        return False, f"{url} answered {status}"
    deps = health.get("dependencies") or {}
    if mode == "ready" and status != 200:
        return False, f"not ready ({status}): {deps}"
    if mode == "self":
        failing = [n for n in OWN_CHECKS if not (deps.get(n) or {"ok": True}).get("ok")]
        if failing:
            return False, f"not ready: {', '.join(failing)} failing: {deps}"
    return True, f"{mode}: {health.get('status')}"


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[1] not in MODES:
        print("usage: probe.py ready|self|live URL", file=sys.stderr)
        return 2
    ok, reason = probe(argv[1], argv[2])
    print(reason, file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
