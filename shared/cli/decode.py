"""``paylab decode``: one ISO-8583 message, field by field (``shared/lab/wire/tool.py``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from shared.cli.console import fail, load_settings, out
from shared.cli.options import JsonOpt


def decode(
    message: Annotated[
        str | None,
        typer.Argument(help="The message as hex or base64; '-' or nothing: standard input."),
    ] = None,
    file: Annotated[
        Path | None, typer.Option("--file", "-f", help="Read the message from this file.")
    ] = None,
    fmt: Annotated[
        str, typer.Option("--format", help="auto, hex, base64 or raw (bytes as they are).")
    ] = "auto",
    header: Annotated[
        str, typer.Option("--header", help="Length header: auto, none, binary2 or ascii4.")
    ] = "auto",
    verify_mac: Annotated[
        bool, typer.Option("--verify-mac", help="Check the MAC with the test TAK (key file).")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Decode a message: field number, name, format, value (masked) and meaning of codes.

    Accepts the message with or without its length header. Input that is not a message
    is explained (which field, which byte), exit code 1.
    """
    import json
    import sys

    from shared.lab.fields import explain, field_rows
    from shared.lab.wire.tool import WireInputError, decode_payload, read_bytes, strip_header
    from shared.server.record import mask_fields

    if fmt not in ("auto", "hex", "base64", "raw"):
        fail(f"--format must be auto, hex, base64 or raw (got {fmt!r})")
    if header not in ("auto", "none", "binary2", "ascii4"):
        fail(f"--header must be auto, none, binary2 or ascii4 (got {header!r})")
    if file is not None:
        try:
            data = file.read_bytes()
        except OSError as exc:
            fail(f"cannot read {file}: {exc.strerror or exc}")
    elif message is None or message == "-":
        data = sys.stdin.buffer.read()
    else:
        data = message.encode("utf-8", "replace")
    try:
        raw = read_bytes(data, fmt if file is None or fmt != "auto" else "auto")
        payload, found = strip_header(raw, header)
        msg = decode_payload(payload)
    except WireInputError as exc:
        fail(str(exc))
    mac_ok: bool | None = None
    if verify_mac:
        from hsm.keyfile import load_key_file
        from shared.errors import PaylabError
        from shared.lab.wire.tool import verify_mac as check

        try:
            keys = load_key_file(load_settings().key_file)
        except PaylabError as exc:
            fail(f"cannot read the key file: {exc}")
        mac_ok = check(payload, msg, keys.keys["TAK"].clear)
    masked = mask_fields(msg)
    if as_json:
        print(
            json.dumps(
                {
                    "header": found,
                    "size": len(payload),
                    "mac_ok": mac_ok,
                    "fields": field_rows(masked),
                },
                indent=2,
            )
        )
        return
    out.print(f"{len(payload)} bytes, length header: {found}", highlight=False)
    for line in explain(masked):
        out.print(line, markup=False, highlight=False)
    if verify_mac:
        text = {None: "no MAC in this message", True: "MAC verified (test TAK)", False: "MAC WRONG"}
        out.print(text[mac_ok], highlight=False)
