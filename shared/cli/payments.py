"""``paylab pay``, ``inquire`` and ``reverse``: transactions through the running acquirer's
HTTP API. ``pay`` exits 0 only when the payment is approved (2 for any other answer)."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.markup import escape

from billing.demo_data import DEMO_CARD
from shared.cli.console import err, fail, load_settings, out
from shared.cli.options import JsonOpt, Url

DEMO_PAN, DEMO_PIN = DEMO_CARD.pan, DEMO_CARD.pin


def _api(url: str | None) -> str:
    if url:
        return url.rstrip("/")
    s = load_settings()
    return f"http://{s.host}:{s.acquirer_http_port}"


def _post(
    url: str, path: str, body: dict[str, Any] | None = None, as_json: bool = False
) -> dict[str, Any]:
    """POST to the acquirer; its answer. A refusal (400, 404, 422) fails with one line; a
    conflict (409: a reversal already done, or of a declined payment) is printed as what it
    is, and the command exits 2, as for any answer that is not an approval."""
    import httpx

    settings = load_settings()
    try:
        r = httpx.post(url + path, json=body or {}, timeout=settings.gateway_timeout + 5)
    except httpx.ConnectError:
        fail(f"nothing is listening on {url} (start the network with `paylab up`)")
    except httpx.HTTPError as exc:
        fail(f"request to {url} failed: {exc}")
    try:
        data: dict[str, Any] = r.json()
    except ValueError:
        fail(f"{url} answered HTTP {r.status_code} without JSON")
    if r.status_code in (400, 404, 422):
        detail = "; ".join(f"{d['field']}: {d['problem']}" for d in data.get("details", []))
        fail(f"{data.get('error', r.status_code)}" + (f" ({detail})" if detail else ""))
    if r.status_code == 409:
        if as_json:
            out.print_json(json.dumps(data))
        else:
            label = "ALREADY REVERSED" if data.get("already_reversed") else "NOT SENT"
            out.print(f"[bold yellow]{label}[/] {escape(str(data.get('error', '')))}")
        raise typer.Exit(2)
    return data


def _show(data: dict[str, Any], as_json: bool) -> None:
    """Print an outcome; exit 0 only when approved (2 otherwise), even if stdout is closed."""
    if as_json:
        out.print_json(json.dumps(data))
    else:
        code = data.get("response_code") or "--"
        colour = "green" if data.get("approved") else "red"
        out.print(
            f"[bold {colour}]{data.get('status', '?').upper()}[/] "
            f"{data.get('kind', '')} {code} {data.get('message', '')}"
        )
        shown = ["bill", "amount", "amount_due", "biller", "customer", "rrn", "stan", "id"]
        if data.get("kind") == "inquiry":
            shown.remove("amount")  # an inquiry carries no amount; amount_due is the answer
        for key in shown:
            if data.get(key) not in (None, "") and not (key == "amount_due" and not data[key]):
                out.print(f"  {key:<10} {data[key]}")
    if not data.get("approved"):  # a 00 that could not be authenticated is no success
        raise typer.Exit(2)


def pay(
    bill: Annotated[str, typer.Option(help="Bill number, e.g. PLN-0001.")],
    amount: Annotated[
        int | None,
        typer.Option(
            help="Amount in minor units (must match the bill); by default the amount due, "
            "asked by an inquiry first.",
            show_default=False,
        ),
    ] = None,
    pan: Annotated[str, typer.Option(help="Card number (demo card by default).")] = DEMO_PAN,
    pin: Annotated[str, typer.Option(help="PIN (the demo card's PIN by default).")] = DEMO_PIN,
    url: Url = None,
    as_json: JsonOpt = False,
) -> None:
    """Pay a bill through the running acquirer. Exit code 0 only when approved.

    Without ``--amount`` an inquiry asks the amount due first and a line says what it found
    (on stderr with ``--json``, so that stdout stays JSON); an inquiry that finds nothing to
    pay is shown as the outcome (exit 2) and no payment is sent."""
    api = _api(url)
    if amount is None:
        due = _post(api, "/inquiries", {"bill": bill})
        if not due.get("approved") or not due.get("amount_due"):
            err.print(f"the inquiry of {bill} found no amount due; nothing was paid")
            _show(due, as_json)  # exits 2: not approved (88 paid, 25 unknown, 91...)
            raise typer.Exit(2)  # approved but nothing due
        amount = int(due["amount_due"])
        (err if as_json else out).print(
            f"amount due {amount} for {bill} (from an inquiry, RRN {due.get('rrn')}); paying it"
        )
    _show(
        _post(api, "/payments", {"bill": bill, "amount": amount, "pan": pan, "pin": pin}),
        as_json,
    )


def inquire(
    bill: Annotated[str, typer.Option(help="Bill number, e.g. PLN-0001.")],
    url: Url = None,
    as_json: JsonOpt = False,
) -> None:
    """Ask for a bill's amount due through the running acquirer."""
    _show(_post(_api(url), "/inquiries", {"bill": bill}), as_json)


def reverse(
    transaction_id: Annotated[str, typer.Argument(help="Id of the payment to reverse.")],
    url: Url = None,
    as_json: JsonOpt = False,
) -> None:
    """Reverse a payment made through the acquirer (a 0420). A payment already reversed,
    or declined (nothing posted), is not sent again: the command says so and exits 2."""
    _show(_post(_api(url), f"/payments/{transaction_id}/reversal", as_json=as_json), as_json)
