"""``paylab send``: build a message from a template or fields, send it to an ISO port, print
the request and the answer decoded (``shared/lab/wire/tool.py``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from shared.cli.console import fail, load_settings, out
from shared.cli.options import JsonOpt


def send(
    template: Annotated[
        str | None,
        typer.Argument(help="A shipped template (inquiry, payment, advice, reversal, echo)."),
    ] = None,
    file: Annotated[
        Path | None, typer.Option("--file", "-f", help="A JSON template of your own.")
    ] = None,
    field: Annotated[
        list[str] | None,
        typer.Option("--field", help="N=VALUE (repeatable; mti=0200; N= removes field N)."),
    ] = None,
    to: Annotated[
        str | None,
        typer.Option("--to", help="host:port of an ISO listener (default: the acquirer's)."),
    ] = None,
    mac: Annotated[
        bool | None,
        typer.Option("--mac/--no-mac", help="Add the MAC (test TAK); default: the template's."),
    ] = None,
    raw: Annotated[
        str | None,
        typer.Option("--raw", help="Send these bytes (hex) as the payload instead, unchecked."),
    ] = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the answer.")] = 10.0,
    list_templates: Annotated[
        bool, typer.Option("--list", help="List the shipped templates and exit.")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Send one ISO-8583 message and print it and its answer, field by field (masked).

    STAN, field 7, RRN and the terminal's fields are filled in when absent; the PIN block
    and the MAC are made with the test keys. Exit code 0 when an answer came, 2 when none
    did within --timeout (an undecodable frame gets no answer), 1 on bad input.
    """
    import json
    import secrets

    import trio

    from hsm.keyfile import load_key_file
    from shared.errors import PaylabError
    from shared.lab.fields import explain, field_rows
    from shared.lab.wire.exchange import NoAnswer, exchange
    from shared.lab.wire.tool import (
        Identity,
        WireInputError,
        build_message,
        decode_payload,
        encode_message,
        parse_field_options,
        parse_template,
        read_bytes,
        shipped_templates,
    )
    from shared.server.record import mask_fields

    shipped = shipped_templates()
    if list_templates:
        for name, t in sorted(shipped.items()):
            out.print(f"{name:<10} {t.description}", highlight=False, markup=False)
        return
    settings = load_settings()
    try:
        if raw is not None:
            payload = read_bytes(raw.encode(), "hex")
            request = None
        else:
            if file is not None:
                try:
                    tpl = parse_template(file.name, json.loads(file.read_text()))
                except (OSError, ValueError) as exc:
                    fail(f"cannot read template {file}: {exc}")
            elif template is not None:
                if template not in shipped:
                    fail(f"no template {template!r}; shipped: {', '.join(sorted(shipped))}")
                tpl = shipped[template]
            else:
                fail("name a template (paylab send --list), --file or --raw")
            keys = load_key_file(settings.key_file)
            ident = Identity(
                settings.acquirer_institution,
                settings.terminal_id,
                settings.merchant_id,
                settings.currency,
                keys.keys["TPK"].clear,
                keys.keys["TAK"].clear,
            )
            stan = f"{secrets.randbelow(999_999) + 1:06d}"
            request = build_message(tpl, parse_field_options(field or []), ident, stan, mac=mac)
            payload = encode_message(request)
    except PaylabError as exc:
        fail(str(exc))
    host, port = settings.address("acquirer") if to is None else _address(to, settings.host)
    try:
        answer_raw, elapsed = trio.run(exchange, host, port, payload, settings.framing, timeout)
    except NoAnswer as exc:
        answer_raw, elapsed, no_answer = None, timeout, str(exc)
    except PaylabError as exc:
        fail(str(exc))
    answer = None
    problem = None
    if answer_raw is not None:
        try:
            answer = decode_payload(answer_raw)
        except WireInputError as exc:
            problem = f"the answer cannot be decoded: {exc}"
    if as_json:
        doc = {
            "to": f"{host}:{port}",
            "request": field_rows(mask_fields(request)) if request else {"raw_size": len(payload)},
            "answer": field_rows(mask_fields(answer)) if answer else None,
            "elapsed_ms": round(elapsed * 1000, 2),
            "problem": problem or (no_answer if answer_raw is None else None),
        }
        print(json.dumps(doc, indent=2))
    else:
        out.print(f"-> {host}:{port}  {len(payload)} bytes", highlight=False)
        if request:
            for line in explain(mask_fields(request)):
                out.print(line, markup=False, highlight=False)
        if answer_raw is None:
            out.print(f"<- {no_answer}", highlight=False, markup=False)
        elif answer is None:
            out.print(f"<- {problem}", highlight=False, markup=False)
        else:
            out.print(f"<- answer in {elapsed * 1000:.1f} ms", highlight=False)
            for line in explain(mask_fields(answer)):
                out.print(line, markup=False, highlight=False)
    if answer_raw is None:
        raise typer.Exit(2)


def _address(value: str, default_host: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    if not port.isdigit() or not 0 < int(port) < 65536:
        fail(f"--to must be host:port (got {value!r})")
    return host or default_host, int(port)
