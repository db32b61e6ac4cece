"""``paylab decode`` and ``paylab send``: every shipped template round-trips through
decode; malformed input is explained, never a traceback; send gets the documented answers
from a real network (approved payment, echo, 30 for a missing field, none for garbage) and
the trace shows what the listener saw."""

from __future__ import annotations

import base64
import os
import sys
from pathlib import Path

import pytest
import trio

from billing.demo_data import DEMO_CARDS
from shared.iso import codec
from shared.iso.framing import HeaderKind, encode_frame
from shared.lab.network import Network
from shared.lab.wire.tool import (
    Identity,
    WireInputError,
    build_message,
    decode_payload,
    read_bytes,
    shipped_templates,
    strip_header,
    verify_mac,
)
from tests.support import KEYS

PAYLAB = [sys.executable, "-m", "shared.cli"]
IDENT = Identity(
    "008", "PAYLAB01", "PAYLAB-MERCH-01", "360", KEYS.keys["TPK"].clear, KEYS.keys["TAK"].clear
)
PANS = [card.pan for card in DEMO_CARDS]


def test_every_shipped_template_round_trips() -> None:
    templates = shipped_templates()
    assert set(templates) == {"inquiry", "payment", "advice", "reversal", "echo"}
    for name, t in templates.items():
        msg = build_message(t, {}, IDENT, "000123")
        payload = codec.encode(msg)
        for kind in HeaderKind:
            framed = encode_frame(payload, kind)
            for text in (framed.hex(), base64.b64encode(framed).decode()):
                raw = read_bytes(text.encode())
                body, found = strip_header(raw)
                assert found == kind.value, name
                assert decode_payload(body) == msg, name
        assert decode_payload(payload) == msg
        assert verify_mac(payload, msg, IDENT.tak) is (True if t.mac else None), name
        assert msg["11"] == "000123" and "7" in msg


@pytest.mark.parametrize(
    ("text", "fmt", "header", "expected"),
    [
        ("0200F23", "hex", "auto", "odd number of digits"),
        ("zz", "hex", "auto", "not hex: character 1"),
        ("0005303230", "hex", "binary2", "binary2 header says 5 bytes, 3 follow"),
        ("30323030ff", "hex", "none", r"byte 4 \(0xff\) is not printable ASCII"),
        ("4142434445", "hex", "none", "4-digit MTI"),
        ("", "auto", "none", "empty input"),
    ],
)
def test_malformed_input_is_explained(text: str, fmt: str, header: str, expected: str) -> None:
    with pytest.raises(WireInputError, match=expected):
        body, _ = strip_header(read_bytes(text.encode(), fmt), header)
        decode_payload(body)


def test_truncated_message_names_the_field() -> None:
    msg = build_message(shipped_templates()["payment"], {}, IDENT, "000124")
    payload = codec.encode(msg)
    with pytest.raises(WireInputError, match="field"):
        decode_payload(payload[:-20])


async def _paylab(*args: str, stdin: bytes = b"") -> trio.CompletedProcess[bytes]:
    env = {**os.environ, "PAYLAB_LOG_LEVEL": "warning"}
    with trio.fail_after(60):
        return await trio.run_process(
            [*PAYLAB, *args],
            stdin=stdin,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env=env,
        )


async def test_decode_cli_masks_and_explains(tmp_path: Path) -> None:
    msg = build_message(shipped_templates()["payment"], {}, IDENT, "000125")
    framed = encode_frame(codec.encode(msg))
    ok = await _paylab("decode", framed.hex(), "--verify-mac")
    assert ok.returncode == 0, ok.stderr
    text = ok.stdout.decode()
    assert "bill payment" in text and "MAC verified" in text and "binary2" in text
    assert not any(pan in text for pan in PANS) and "[redacted]" in text
    (tmp_path / "m.bin").write_bytes(framed)
    from_file = await _paylab("decode", "--file", str(tmp_path / "m.bin"), "--json")
    assert from_file.returncode == 0 and b'"bill payment"' in from_file.stdout
    piped = await _paylab("decode", stdin=base64.b64encode(framed))
    assert piped.returncode == 0 and b"Processing Code" in piped.stdout
    bad = await _paylab("decode", framed.hex()[:-30], "--header", "none")
    assert bad.returncode == 1
    assert b"Traceback" not in bad.stderr and b"error" in bad.stderr.lower()


async def test_send_gets_the_documented_answers(network: Network) -> None:
    to = f"127.0.0.1:{network.ports['acquirer'].iso}"
    paid = await _paylab("send", "payment", "--to", to, "--json")
    assert paid.returncode == 0, paid.stderr
    assert b'"approved"' in paid.stdout
    assert not any(pan.encode() in paid.stdout for pan in PANS)
    echo = await _paylab("send", "echo", "--to", to)
    assert echo.returncode == 0 and b"0810" in echo.stdout, echo.stdout
    missing = await _paylab("send", "inquiry", "--to", to, "--field", "48=")
    assert missing.returncode == 0 and b"format error" in missing.stdout.lower(), missing.stdout
    garbage = await _paylab("send", "--raw", "30323030" + "41" * 20, "--to", to, "--timeout", "1")
    assert garbage.returncode == 2 and b"no answer" in garbage.stdout
    assert b"Traceback" not in garbage.stderr
    listed = await _paylab("send", "--list")
    assert listed.returncode == 0 and b"reversal" in listed.stdout
    acquirer = network.services["acquirer"]
    assert any(e.note.startswith("undecodable") for e in acquirer.record)
