"""The lab's alert receiver: prints every Alertmanager webhook notification, one line each.

Alertmanager (deploy/alertmanager/alertmanager.yml) posts to ``/critical`` and ``/warning``
here; ``docker compose -f deploy/docker-compose.yml logs -f alert-sink`` shows them. Standard
library only, so it runs in the paylab image (or any Python 3.11+). Not for production:
point Alertmanager at a real paging or chat integration there.

Usage: ``python webhook_sink.py [PORT]`` (default 5001). ``GET /`` answers 200 (health).
"""

from __future__ import annotations

import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

MAX_BODY = 1 << 20


def describe(route: str, payload: dict[str, Any]) -> list[str]:
    """One line per alert of an Alertmanager webhook ``payload`` received on ``route``."""
    lines = []
    for alert in payload.get("alerts", []):
        labels = alert.get("labels", {})
        annotations = alert.get("annotations", {})
        lines.append(
            f"[{route}] {alert.get('status', '?').upper()} {labels.get('alertname', '?')} "
            f"service={labels.get('service', '-')} severity={labels.get('severity', '-')}: "
            f"{annotations.get('summary', '')} (runbook: {annotations.get('runbook_url', '-')})"
        )
    return lines


class Handler(BaseHTTPRequestHandler):
    """Accepts webhook POSTs on any path; answers 204."""

    def do_POST(self) -> None:
        length = min(int(self.headers.get("Content-Length", "0") or 0), MAX_BODY)
        try:
            payload = json.loads(self.rfile.read(length) or b"{}")
        except ValueError:
            self.send_error(400, "body is not JSON")
            return
        for line in describe(self.path.strip("/") or "default", payload):
            print(line, flush=True)
        self.send_response(204)
        self.end_headers()

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.end_headers()
        self.wfile.write(b"ok\n")

    def log_message(self, format: str, *args: Any) -> None:
        """Silence the per-request access log; the alert lines are the output."""


def main() -> None:
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 5001
    server = ThreadingHTTPServer(("0.0.0.0", port), Handler)
    print(f"alert sink listening on :{port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
