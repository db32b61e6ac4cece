"""The shell of ``paylab trace``: read the message records of the four services over HTTP
(so it works with ``paylab up``, ``--processes``, docker compose and Kubernetes alike) and
hand them to :func:`shared.lab.trace.build_ladder`."""

from __future__ import annotations

from typing import Any

import httpx
import trio

from shared.errors import PaylabError
from shared.lab.watch import Targets

#: Entries per page read from a service.
PAGE = 2000
#: Slack around the transaction's time window when reading the HSM's own record (µs).
HSM_SLACK_US = 1_000_000


class TraceError(PaylabError):
    """The trace could not be made (a service refused, the transaction is unknown)."""


async def _get(client: httpx.AsyncClient, url: str, targets: Targets, **params: Any) -> Any:
    try:
        r = await client.get(url, params=params, headers=dict(targets.headers))
    except httpx.HTTPError as exc:
        raise TraceError(f"{url}: not answering ({type(exc).__name__})") from exc
    if r.status_code == 404:
        return None
    if r.status_code != 200:
        raise TraceError(f"{url}: HTTP {r.status_code} {r.text[:200]}")
    return r.json()


async def _messages(
    client: httpx.AsyncClient, targets: Targets, service: str, **params: Any
) -> list[dict[str, Any]]:
    """Every matching entry of one service's record (all pages); [] when it does not answer."""
    base = targets.services[service]
    out: list[dict[str, Any]] = []
    since = 0
    while True:
        try:
            body = await _get(
                client, f"{base}/messages", targets, since=since, limit=PAGE, **params
            )
        except TraceError:
            return out
        if not body:
            return out
        page = body.get("messages", [])
        out.extend(page)
        if len(page) < PAGE:
            return out
        since = int(body["next"])


async def rrn_of_transaction(client: httpx.AsyncClient, targets: Targets, tx_id: str) -> str:
    """The RRN of the acquirer's transaction ``tx_id``."""
    body = await _get(client, f"{targets.services['acquirer']}/transactions/{tx_id}", targets)
    if not body or not body.get("rrn"):
        raise TraceError(f"the acquirer knows no transaction {tx_id!r}")
    return str(body["rrn"])


async def last_rrn(client: httpx.AsyncClient, targets: Targets) -> str:
    """The RRN of the newest financial request the acquirer received or sent."""
    for service in ("acquirer", "gateway"):
        body = await _get(
            client, f"{targets.services[service]}/messages", targets, newest=1, limit=PAGE
        )
        for e in reversed((body or {}).get("messages", [])):
            if e.get("rrn") and str(e.get("code", "")).startswith(("02", "04", "POST")):
                return str(e["rrn"])
    raise TraceError("no payment recorded yet (the acquirer's and gateway's records are empty)")


async def collect(targets: Targets, rrn: str, timeout: float = 10.0) -> list[dict[str, Any]]:
    """Every entry of the transaction ``rrn`` in the four records, the HSM's own entries of
    the same commands included (joined later by header and code)."""
    found: dict[str, list[dict[str, Any]]] = {}
    async with httpx.AsyncClient(timeout=timeout) as client:

        async def one(service: str) -> None:
            found[service] = await _messages(client, targets, service, rrn=rrn)

        async with trio.open_nursery() as nursery:
            for service in ("acquirer", "gateway", "billing"):
                if service in targets.services:
                    nursery.start_soon(one, service)
        entries = [e for es in found.values() for e in es]
        hsm_sent = [e for e in entries if e.get("kind") == "hsm"]
        if hsm_sent and "hsm" in targets.services:
            start = min(int(e["mono_us"]) for e in hsm_sent) - HSM_SLACK_US
            end = max(int(e["mono_us"]) for e in hsm_sent) + HSM_SLACK_US
            headers = {e.get("header") for e in hsm_sent}
            hsm = await _messages(client, targets, "hsm", start_us=start, end_us=end)
            entries += [e for e in hsm if e.get("header") in headers]
    return entries


async def resolve_rrn(
    targets: Targets, rrn: str | None, tx_id: str | None, last: bool, timeout: float = 10.0
) -> str:
    """The RRN named by exactly one of ``rrn``, ``tx_id`` and ``last``."""
    if rrn:
        return rrn
    async with httpx.AsyncClient(timeout=timeout) as client:
        if tx_id:
            return await rrn_of_transaction(client, targets, tx_id)
        if last:
            return await last_rrn(client, targets)
    raise TraceError("name a transaction: an RRN, --id TRANSACTION_ID or --last")
