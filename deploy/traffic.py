"""Steady demo traffic for the compose lab, so the dashboards move without any clicking.

Through the acquirer's HTTP API, about ``RATE`` requests per second, one at a time: a bill
inquiry, its payment (approved), the payment's reversal (which reopens the bill for the
next round), and now and then a decline: a wrong PIN (55), an unknown bill (25), a bill
already paid (88). Only demo bills and cards are used (``billing/demo_data.py``).

Usage: ``python traffic.py [URL] [RATE]``; defaults ``http://acquirer:8080`` and 1.
Environment: ``PAYLAB_TRAFFIC_URL``, ``PAYLAB_TRAFFIC_RATE``. Standard library only. The
compose service ``traffic`` runs it; ``docker compose -f deploy/docker-compose.yml stop
traffic`` stops it. Never point it at anything but a lab.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
import urllib.error
import urllib.request
from typing import Any

#: Demo bills that the loop pays and reverses (three billers), and the demo cards.
BILLS = ("PLN-1011", "PLN-1012", "PLN-1013", "PLN-1014", "PDAM-0001", "TELCO-0001")
CARDS = (("4761739001010010", "1234"), ("5413330089010608", "4321"), ("4111111111111111", "0000"))
PAID_BILL = "TELCO-0002"  # paid before the simulation: always 88


class Traffic:
    """One client of the acquirer's API; :meth:`round` is one inquiry-pay-reverse cycle."""

    def __init__(self, url: str, rate: float) -> None:
        self.url = url.rstrip("/")
        self.pause = 1.0 / rate if rate > 0 else 1.0
        self.rounds = 0

    def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST JSON; the JSON answer (declines are 200, failures 503/504 with JSON too)."""
        req = urllib.request.Request(
            self.url + path,
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        try:
            with urllib.request.urlopen(req, timeout=20) as resp:
                answer: dict[str, Any] = json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            answer = json.loads(exc.read() or b"{}")
        time.sleep(self.pause)
        return answer

    def round(self) -> list[str]:
        """One cycle; returns the response codes seen."""
        self.rounds += 1
        bill = random.choice(BILLS)
        pan, pin = random.choice(CARDS)
        inquiry = self.post("/inquiries", {"bill": bill})
        codes = [str(inquiry.get("response_code"))]
        amount = inquiry.get("amount_due")
        if isinstance(amount, int) and amount > 0:
            paid = self.post("/payments", {"bill": bill, "amount": amount, "pan": pan, "pin": pin})
            codes.append(str(paid.get("response_code")))
            if paid.get("response_code") == "00" and paid.get("id"):
                reversal = self.post(f"/payments/{paid['id']}/reversal", {})
                codes.append(str(reversal.get("response_code")))
        if self.rounds % 4 == 0:
            wrong = self.post(
                "/payments", {"bill": bill, "amount": 1000, "pan": pan, "pin": "9999"}
            )
            codes.append(str(wrong.get("response_code")))
        if self.rounds % 7 == 0:
            unknown = {"bill": "NOPE-0001", "amount": 1000, "pan": pan, "pin": pin}
            codes.append(str(self.post("/payments", unknown).get("response_code")))
        if self.rounds % 9 == 0:
            again = {"bill": PAID_BILL, "amount": 350_000, "pan": pan, "pin": pin}
            codes.append(str(self.post("/payments", again).get("response_code")))
        return codes


def main(argv: list[str]) -> None:
    url = argv[1] if len(argv) > 1 else os.environ.get("PAYLAB_TRAFFIC_URL", "http://acquirer:8080")
    rate = float(argv[2] if len(argv) > 2 else os.environ.get("PAYLAB_TRAFFIC_RATE", "1"))
    traffic = Traffic(url, rate)
    print(f"demo traffic to {url}, about {rate} requests/s", flush=True)
    while True:
        try:
            codes = traffic.round()
        except (OSError, ValueError) as exc:  # acquirer restarting: wait and go on
            print(f"request failed: {exc}", flush=True)
            time.sleep(5)
            continue
        if traffic.rounds % 30 == 0:
            print(f"round {traffic.rounds}: last codes {' '.join(codes)}", flush=True)


if __name__ == "__main__":
    main(sys.argv)
