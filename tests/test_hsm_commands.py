"""Tests for the HSM mock: key file, command processor and client-side protocol helpers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives.ciphers import Cipher, modes
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hsm import protocol
from hsm.commands import KNOWN_COMMANDS, UNKNOWN_COMMAND, process, process_with_result
from hsm.errors import HsmCommandError, HsmProtocolError, KeyFileError, KeyReferenceError
from hsm.keyfile import (
    DEMO_KEY_NAMES,
    KeyFile,
    decrypt_under_lmk,
    encrypt_under_lmk,
    generate_key_file,
    load_key_file,
    parse_key_file,
)

KEYS = load_key_file()
TPK = KEYS.entry("TPK")
ZPK = KEYS.entry("ZPK")
TAK = KEYS.entry("TAK")
PVK = KEYS.entry("PVK")

PAN = "4000001234567899"
ACCOUNT = "000123456789"  # 12 rightmost PAN digits excluding the check digit
PIN = "1234"

# A reference that is well formed but decrypts to a key with bad parity (all-zero key bytes
# would have even parity; the LMK-encryption of 16 zero bytes decrypts to exactly that).
BAD_PARITY_REF = (
    "U"
    + Cipher(TripleDES(KEYS.lmk + KEYS.lmk[:8]), modes.ECB())
    .encryptor()
    .update(bytes(16))
    .hex()
    .upper()
)


# ---------------------------------------------------------------------------------------------
# Independent references built from `cryptography`
# ---------------------------------------------------------------------------------------------


def _ecb(key: bytes) -> Cipher[modes.ECB]:
    return Cipher(TripleDES(key + key[:8]), modes.ECB())


def ref_encrypt(key: bytes, data: bytes) -> bytes:
    return _ecb(key).encryptor().update(data)


def ref_decrypt(key: bytes, data: bytes) -> bytes:
    return _ecb(key).decryptor().update(data)


def clear_block(nibbles: str, account12: str = ACCOUNT) -> bytes:
    pan_field = bytes.fromhex("0000" + account12)
    return bytes(a ^ b for a, b in zip(bytes.fromhex(nibbles), pan_field, strict=True))


def pin_block_under(key: bytes, pin: str, account12: str = ACCOUNT) -> str:
    nibbles = f"0{len(pin):X}{pin}".ljust(16, "F")
    return ref_encrypt(key, clear_block(nibbles, account12)).hex().upper()


def ref_pvv(pvk: bytes, account12: str, pvki: str, pin: str) -> str:
    result = ref_encrypt(pvk, bytes.fromhex(account12[-11:] + pvki + pin[:4])).hex().upper()
    digits = [c for c in result if c.isdigit()]
    letters = [str("ABCDEF".index(c)) for c in result if not c.isdigit()]
    return "".join((digits + letters)[:4])


def ref_mac(key16: bytes, data: bytes, padding: int = 1) -> str:
    if padding == 1:
        padded = data + b"\x00" * (-len(data) % 8) if data else b"\x00" * 8
    else:
        padded = data + b"\x80" + b"\x00" * (-(len(data) + 1) % 8)
    k1, k2 = key16[:8], key16[8:]
    last = Cipher(TripleDES(k1 * 3), modes.CBC(b"\x00" * 8)).encryptor().update(padded)[-8:]
    k1_ecb = Cipher(TripleDES(k1 * 3), modes.ECB())
    k2_ecb = Cipher(TripleDES(k2 * 3), modes.ECB())
    return k1_ecb.encryptor().update(k2_ecb.decryptor().update(last)).hex().upper()


# ---------------------------------------------------------------------------------------------
# Request builders for the tests (explicit layouts, independent of hsm.protocol)
# ---------------------------------------------------------------------------------------------


def ca_request(
    *,
    header: bytes = b"0001",
    tpk: str = TPK.under_lmk,
    zpk: str = ZPK.under_lmk,
    max_len: str = "12",
    block: str | None = None,
    src: str = "01",
    dst: str = "01",
    account: str = ACCOUNT,
) -> bytes:
    block = pin_block_under(TPK.clear, PIN) if block is None else block
    return header + b"CA" + (tpk + zpk + max_len + block + src + dst + account).encode("latin-1")


def ec_request(
    *,
    zpk: str = ZPK.under_lmk,
    pvk: str = PVK.under_lmk,
    block: str | None = None,
    fmt: str = "01",
    account: str = ACCOUNT,
    pvki: str = "1",
    pvv: str | None = None,
) -> bytes:
    block = pin_block_under(ZPK.clear, PIN) if block is None else block
    pvv = ref_pvv(PVK.clear, ACCOUNT, "1", PIN) if pvv is None else pvv
    return b"0002EC" + (zpk + pvk + block + fmt + account + pvki + pvv).encode("latin-1")


def mac_request(
    code: str = "M6",
    *,
    message: bytes = b"0200 bill payment",
    mode: str = "0",
    in_fmt: str = "0",
    size: str = "1",
    alg: str = "3",
    padding: str = "1",
    key_type: str = "003",
    key: str = TAK.under_lmk,
    length: str | None = None,
    mac: str = "",
) -> bytes:
    length = f"{len(message):04X}" if length is None else length
    head = (mode + in_fmt + size + alg + padding + key_type + key + length).encode("latin-1")
    return b"0003" + code.encode() + head + message + mac.encode("latin-1")


def parsed(response: bytes) -> tuple[bytes, bytes, bytes, bytes]:
    return response[:4], response[4:6], response[6:8], response[8:]


# ---------------------------------------------------------------------------------------------
# Key file
# ---------------------------------------------------------------------------------------------


def test_shipped_key_file_is_valid_and_complete() -> None:
    assert isinstance(KEYS, KeyFile)
    assert set(DEMO_KEY_NAMES) <= set(KEYS.keys)
    assert len(KEYS.lmk) == 16
    for name in DEMO_KEY_NAMES:
        entry = KEYS.entry(name)
        assert len(entry.clear) == 16
        assert entry.under_lmk.startswith("U") and len(entry.under_lmk) == 33
        assert ref_decrypt(KEYS.lmk, bytes.fromhex(entry.under_lmk[1:])) == entry.clear
        assert ref_encrypt(entry.clear, bytes(8)).hex().upper()[:6] == entry.kcv
    # All keys differ from each other and from the LMK.
    assert len({KEYS.lmk, *(KEYS.entry(n).clear for n in DEMO_KEY_NAMES)}) == 5


def test_shipped_json_shape() -> None:
    path = Path(__file__).resolve().parents[1] / "hsm" / "test-keys.json"
    data = json.loads(path.read_text())
    assert "TEST ONLY" in data["comment"]
    assert set(data["keys"]) == set(DEMO_KEY_NAMES)
    assert load_key_file(path) == KEYS


def test_key_entry_repr_hides_key_material() -> None:
    assert TPK.clear.hex().upper() not in repr(TPK)
    assert KEYS.lmk.hex().upper() not in repr(KEYS)
    assert TPK.under_lmk not in repr(KEYS)


def test_unknown_key_name() -> None:
    with pytest.raises(KeyFileError):
        KEYS.entry("NOPE")


def _shipped() -> dict[str, Any]:
    data = generate_key_file()
    parse_key_file(data)
    return data


def _flip_hex(text: str) -> str:
    return text[:-1] + ("0" if text[-1] != "0" else "1")


@pytest.mark.parametrize(
    "tamper",
    [
        lambda d: d["keys"]["TPK"].__setitem__("kcv", _flip_hex(d["keys"]["TPK"]["kcv"])),
        lambda d: d["keys"]["ZPK"].__setitem__("under_lmk", d["keys"]["TPK"]["under_lmk"]),
        lambda d: d["keys"]["TAK"].__setitem__("under_lmk", d["keys"]["TAK"]["under_lmk"][1:]),
        lambda d: d["keys"]["PVK"].__setitem__("clear", "00" * 16),
        lambda d: d["keys"]["PVK"].__setitem__("clear", "ZZ" * 16),
        lambda d: d.__setitem__("lmk", "01" * 15),
        lambda d: d.__setitem__("lmk_kcv", _flip_hex(d["lmk_kcv"])),
        lambda d: d["keys"].pop("PVK"),
        lambda d: d.pop("keys"),
        lambda d: d["keys"].__setitem__("TAK", "not an object"),
    ],
)
def test_key_file_validation_rejects_tampering(tamper: Any) -> None:
    data = _shipped()
    tamper(data)
    with pytest.raises(KeyFileError):
        parse_key_file(data)


def test_key_file_error_messages_hide_key_material() -> None:
    data = _shipped()
    data["keys"]["TPK"]["kcv"] = _flip_hex(data["keys"]["TPK"]["kcv"])
    with pytest.raises(KeyFileError) as info:
        parse_key_file(data)
    assert data["keys"]["TPK"]["clear"] not in str(info.value)


def test_load_key_file_from_path(tmp_path: Path) -> None:
    data = _shipped()
    path = tmp_path / "keys.json"
    path.write_text(json.dumps(data))
    loaded = load_key_file(path)
    assert loaded.lmk.hex().upper() == data["lmk"]
    assert loaded.entry("TPK").under_lmk == data["keys"]["TPK"]["under_lmk"]

    path.write_text("{not json")
    with pytest.raises(KeyFileError):
        load_key_file(path)
    with pytest.raises(KeyFileError):
        load_key_file(tmp_path / "missing.json")
    path.write_text("[]")
    with pytest.raises(KeyFileError):
        load_key_file(path)


def test_generated_key_files_are_random_and_valid() -> None:
    first, second = generate_key_file(), generate_key_file()
    assert first["lmk"] != second["lmk"]
    keys = parse_key_file(first)
    for name in DEMO_KEY_NAMES:
        clear = keys.entry(name).clear
        assert all(b.bit_count() % 2 == 1 for b in clear)
        assert clear[:8] != clear[8:]
    assert json.loads(json.dumps(first)) == first


def test_encrypt_and_decrypt_under_lmk() -> None:
    ref = encrypt_under_lmk(KEYS.lmk, TPK.clear)
    assert ref == TPK.under_lmk
    assert decrypt_under_lmk(KEYS.lmk, ref) == TPK.clear
    assert decrypt_under_lmk(KEYS.lmk, ref.lower().replace("u", "U", 1)) == TPK.clear
    with pytest.raises(KeyReferenceError):
        encrypt_under_lmk(KEYS.lmk, TPK.clear[:8])


@pytest.mark.parametrize(
    "ref",
    [
        "",
        "U",
        TPK.under_lmk[1:],
        "X" + TPK.under_lmk[1:],
        TPK.under_lmk + "0",
        TPK.under_lmk[:-1] + "G",
        "u" + TPK.under_lmk[1:],
        BAD_PARITY_REF,
    ],
)
def test_decrypt_under_lmk_rejects_bad_references(ref: str) -> None:
    with pytest.raises(KeyReferenceError):
        decrypt_under_lmk(KEYS.lmk, ref)


def test_decrypt_under_lmk_parity_check_can_be_skipped() -> None:
    assert decrypt_under_lmk(KEYS.lmk, BAD_PARITY_REF, check_parity=False) == bytes(16)


# ---------------------------------------------------------------------------------------------
# Framing, header echo, response codes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_", "expected"),
    [
        (b"", b"    ZZ15"),
        (b"ab", b"ab  ZZ15"),
        (b"abcd", b"abcdZZ15"),
        (b"abcdN", b"abcdZZ15"),
    ],
)
def test_short_input(request_: bytes, expected: bytes) -> None:
    result = process_with_result(request_, KEYS)
    assert result.response == expected
    assert (result.command, result.error) == (UNKNOWN_COMMAND, "15")


@pytest.mark.parametrize(
    ("code", "reply"),
    [
        (b"A0", b"A1"),
        (b"XY", b"XZ"),
        (b"AZ", b"AA"),
        (b"A9", b"A0"),
        (b"az", b"aa"),
        (b"nc", b"nd"),
        (b"A!", b"ZZ"),
        (b"\xffA", b"ZZ"),
        (b"  ", b"ZZ"),
    ],
)
def test_unknown_command(code: bytes, reply: bytes) -> None:
    result = process_with_result(b"HDR1" + code + b"whatever", KEYS)
    assert result.response == b"HDR1" + reply + b"68"
    assert (result.command, result.error) == (UNKNOWN_COMMAND, "68")


@pytest.mark.parametrize(
    ("request_", "reply"),
    [
        (b"0000NC", b"ND"),
        (ca_request(), b"CB"),
        (ec_request(), b"ED"),
        (mac_request("M6"), b"M7"),
        (mac_request("M8", mac="0" * 16), b"M9"),
    ],
)
def test_response_code_advances_and_header_echoes(request_: bytes, reply: bytes) -> None:
    for header in [b"0000", b"\x00\xff\r\n", b"ZZZZ"]:
        result = process_with_result(header + request_[4:], KEYS)
        assert result.response[:4] == header
        assert result.response[4:6] == reply
        assert result.command == request_[4:6].decode()
        assert result.command in KNOWN_COMMANDS


def test_process_accepts_bytearray_and_memoryview() -> None:
    assert process(bytearray(b"0000NC"), KEYS) == process(b"0000NC", KEYS)
    assert process(memoryview(b"0000NC"), KEYS) == process(b"0000NC", KEYS)


# ---------------------------------------------------------------------------------------------
# NC
# ---------------------------------------------------------------------------------------------


def test_nc_diagnostics() -> None:
    header, code, error, fields = parsed(process(b"1234NC", KEYS))
    assert (header, code, error) == (b"1234", b"ND", b"00")
    assert fields == ref_encrypt(KEYS.lmk, bytes(8)).hex().upper().encode() + b"0007-E000"


def test_nc_rejects_trailing_bytes() -> None:
    assert process(b"1234NCX", KEYS) == b"1234ND15"


# ---------------------------------------------------------------------------------------------
# CA
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pin", ["1234", "98765", "000000", "123456789012"])
def test_ca_translates_and_round_trips(pin: str) -> None:
    request = ca_request(block=pin_block_under(TPK.clear, pin))
    header, code, error, fields = parsed(process(request, KEYS))
    assert (header, code, error) == (b"0001", b"CB", b"00")
    assert len(fields) == 20
    assert fields[:2] == f"{len(pin):02d}".encode()
    assert fields[18:] == b"01"
    out_block = bytes.fromhex(fields[2:18].decode())
    # Decrypt under the ZPK independently and check it is the same PIN in format 0.
    assert ref_decrypt(ZPK.clear, out_block) == clear_block(f"0{len(pin):X}{pin}".ljust(16, "F"))
    assert fields[2:18] == fields[2:18].upper()


def test_ca_accepts_lower_case_hex_pin_block() -> None:
    lower = ca_request(block=pin_block_under(TPK.clear, PIN).lower())
    assert process(lower, KEYS) == process(ca_request(), KEYS)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"tpk": "X" + TPK.under_lmk[1:]}, b"10"),
        ({"tpk": TPK.under_lmk[:-1] + "G"}, b"10"),
        ({"tpk": BAD_PARITY_REF}, b"10"),
        ({"zpk": BAD_PARITY_REF}, b"10"),
        ({"max_len": "03"}, b"15"),
        ({"max_len": "13"}, b"15"),
        ({"max_len": "1A"}, b"15"),
        ({"block": "0123456789ABCDEG"}, b"15"),
        ({"src": "02"}, b"23"),
        ({"dst": "46"}, b"23"),
        ({"src": "0A"}, b"15"),
        ({"account": "00012345678X"}, b"15"),
        ({"account": "00012345678"}, b"15"),
        ({"header": b"\x00\x01\x02\x03"}, b"00"),
    ],
)
def test_ca_errors(kwargs: dict[str, Any], error: bytes) -> None:
    _, code, err, fields = parsed(process(ca_request(**kwargs), KEYS))
    assert code == b"CB"
    assert err == error
    if error != b"00":
        assert fields == b""


@pytest.mark.parametrize(
    ("nibbles", "error"),
    [
        ("141234FFFFFFFFFF", b"20"),  # control nibble is not 0
        ("04123AFFFFFFFFFF", b"20"),  # non-decimal PIN digit
        ("041234FFFFFFFFF0", b"20"),  # filler is not F
        ("03123FFFFFFFFFFF", b"24"),  # 3-digit PIN
        ("0D1234567890123F", b"24"),  # 13-digit PIN
    ],
)
def test_ca_rejects_invalid_pin_blocks(nibbles: str, error: bytes) -> None:
    block = ref_encrypt(TPK.clear, clear_block(nibbles)).hex().upper()
    assert process(ca_request(block=block), KEYS) == b"0001CB" + error


def test_ca_pin_longer_than_maximum() -> None:
    request = ca_request(max_len="05", block=pin_block_under(TPK.clear, "123456"))
    assert process(request, KEYS) == b"0001CB24"
    request = ca_request(max_len="06", block=pin_block_under(TPK.clear, "123456"))
    assert parsed(process(request, KEYS))[2] == b"00"


def test_ca_length_errors() -> None:
    good = ca_request()
    assert process(good + b"0", KEYS) == b"0001CB15"
    assert process(good[:-1], KEYS) == b"0001CB15"
    assert process(b"0001CA", KEYS) == b"0001CB15"


def test_ca_key_error_wins_over_later_value_errors() -> None:
    # Values are checked in field order once the layout parses.
    request = ca_request(tpk=BAD_PARITY_REF, src="02")
    assert process(request, KEYS) == b"0001CB10"


# ---------------------------------------------------------------------------------------------
# EC
# ---------------------------------------------------------------------------------------------


def test_ec_correct_pin_verifies() -> None:
    assert process(ec_request(), KEYS) == b"0002ED00"


def test_ec_wrong_pin_fails() -> None:
    block = pin_block_under(ZPK.clear, "4321")
    assert process(ec_request(block=block), KEYS) == b"0002ED01"


def test_ec_wrong_pvv_fails() -> None:
    good = ref_pvv(PVK.clear, ACCOUNT, "1", PIN)
    wrong = f"{(int(good) + 1) % 10000:04d}"
    assert process(ec_request(pvv=wrong), KEYS) == b"0002ED01"


def test_ec_pvki_is_part_of_the_tsp() -> None:
    pvv2 = ref_pvv(PVK.clear, ACCOUNT, "2", PIN)
    assert process(ec_request(pvki="2", pvv=pvv2), KEYS) == b"0002ED00"


def test_ec_long_pin_uses_first_four_digits() -> None:
    block = pin_block_under(ZPK.clear, "1234987")
    assert process(ec_request(block=block), KEYS) == b"0002ED00"


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"zpk": BAD_PARITY_REF}, b"10"),
        ({"pvk": "U" + "0" * 31}, b"15"),  # one byte short: the layout no longer fits
        ({"pvk": "V" + PVK.under_lmk[1:]}, b"10"),
        ({"fmt": "02"}, b"23"),
        ({"fmt": "x1"}, b"15"),
        ({"pvki": "A"}, b"15"),
        ({"pvv": "12A4"}, b"15"),
        ({"pvv": "123"}, b"15"),
        ({"block": pin_block_under(ZPK.clear, PIN)[:-1] + "Z"}, b"15"),
        ({"block": ref_encrypt(ZPK.clear, clear_block("031234FFFFFFFFFF")).hex()}, b"24"),
        ({"block": ref_encrypt(ZPK.clear, clear_block("2412F4FFFFFFFFFF")).hex()}, b"20"),
    ],
)
def test_ec_errors(kwargs: dict[str, Any], error: bytes) -> None:
    assert process(ec_request(**kwargs), KEYS) == b"0002ED" + error


def test_ec_trailing_bytes() -> None:
    assert process(ec_request() + b"9", KEYS) == b"0002ED15"


# ---------------------------------------------------------------------------------------------
# M6 / M8
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("padding", ["1", "2"])
@pytest.mark.parametrize("key_type", ["003", "008"])
@pytest.mark.parametrize("message", [b"", b"12345678", b"\x00\xff binary \r\n payload" * 5])
def test_m6_binary(padding: str, key_type: str, message: bytes) -> None:
    response = process(mac_request(message=message, padding=padding, key_type=key_type), KEYS)
    assert response == b"0003M700" + ref_mac(TAK.clear, message, int(padding)).encode()


def test_m6_hex_input_and_short_mac() -> None:
    message = b"\x01\x02 payment \xfe"
    hex_text = message.hex().encode()
    full = ref_mac(TAK.clear, message)
    assert process(mac_request(message=hex_text, in_fmt="1"), KEYS) == b"0003M700" + full.encode()
    upper = message.hex().upper().encode()
    assert process(mac_request(message=upper, in_fmt="1"), KEYS) == b"0003M700" + full.encode()
    short = process(mac_request(message=message, size="0"), KEYS)
    assert short == b"0003M700" + full[:8].encode()


def test_m6_length_field_is_hexadecimal() -> None:
    message = b"x" * 26
    assert process(mac_request(message=message, length="001A"), KEYS)[6:8] == b"00"
    assert process(mac_request(message=message, length="001a"), KEYS)[6:8] == b"00"
    assert process(mac_request(message=message, length="0026"), KEYS)[6:8] == b"15"


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"key_type": "001"}, b"04"),
        ({"key_type": "009"}, b"04"),
        ({"key_type": "00G"}, b"15"),
        ({"key": BAD_PARITY_REF}, b"10"),
        ({"key": "T" + TAK.under_lmk[1:]}, b"10"),
        ({"mode": "1"}, b"15"),
        ({"mode": "A"}, b"15"),
        ({"in_fmt": "2"}, b"15"),
        ({"size": "2"}, b"15"),
        ({"alg": "1"}, b"15"),
        ({"padding": "3"}, b"15"),
        ({"padding": "0"}, b"15"),
        ({"length": "00ZZ"}, b"15"),
        ({"length": "FFFF"}, b"15"),
        ({"message": b"abc", "in_fmt": "1"}, b"15"),  # odd-length hex text
        ({"message": b"zz", "in_fmt": "1"}, b"15"),  # not hex
    ],
)
def test_m6_errors(kwargs: dict[str, Any], error: bytes) -> None:
    assert process(mac_request(**kwargs), KEYS) == b"0003M7" + error


def test_m6_trailing_bytes() -> None:
    assert process(mac_request(message=b"abc", length="0002"), KEYS) == b"0003M715"


def test_m8_verifies_and_detects_tampering() -> None:
    message = b"0200|4000001234567899|000000012500"
    mac = ref_mac(TAK.clear, message)
    assert process(mac_request("M8", message=message, mac=mac), KEYS) == b"0003M900"
    assert process(mac_request("M8", message=message, mac=mac.lower()), KEYS) == b"0003M900"
    tampered_mac = mac[:-1] + ("0" if mac[-1] != "0" else "1")
    assert process(mac_request("M8", message=message, mac=tampered_mac), KEYS) == b"0003M901"
    tampered_msg = message.replace(b"125", b"126")
    assert process(mac_request("M8", message=tampered_msg, mac=mac), KEYS) == b"0003M901"
    # Right MAC under a different key fails.
    other = mac_request("M8", message=message, mac=mac, key=ZPK.under_lmk, key_type="008")
    assert process(other, KEYS) == b"0003M901"


def test_m8_short_mac_and_padding_2() -> None:
    message = b"hello"
    mac8 = ref_mac(TAK.clear, message, 2)[:8]
    request = mac_request("M8", message=message, size="0", padding="2", mac=mac8)
    assert process(request, KEYS) == b"0003M900"


@pytest.mark.parametrize(
    ("mac", "error"),
    [("", b"15"), ("0" * 15, b"15"), ("0" * 17, b"15"), ("G" * 16, b"15")],
)
def test_m8_mac_field_errors(mac: str, error: bytes) -> None:
    assert process(mac_request("M8", mac=mac), KEYS) == b"0003M9" + error


def test_m8_key_type_error() -> None:
    assert process(mac_request("M8", key_type="002", mac="0" * 16), KEYS) == b"0003M904"


# ---------------------------------------------------------------------------------------------
# Client-side protocol helpers
# ---------------------------------------------------------------------------------------------


def test_protocol_nc() -> None:
    request = protocol.build_nc("HB01")
    assert request == b"HB01NC"
    resp = protocol.parse_response(process(request, KEYS))
    assert (resp.header, resp.code, resp.error, resp.ok) == ("HB01", "ND", "00", True)
    check, firmware = protocol.nd_result(resp)
    assert check == ref_encrypt(KEYS.lmk, bytes(8)).hex().upper()
    assert firmware == "0007-E000"


def test_protocol_ca_round_trip() -> None:
    block = pin_block_under(TPK.clear, "55667788")
    request = protocol.build_ca("0042", TPK.under_lmk, ZPK.under_lmk, block, ACCOUNT)
    assert request == ca_request(header=b"0042", block=block)
    length, out = protocol.ca_result(protocol.parse_response(process(request, KEYS)))
    assert length == 8
    assert ref_decrypt(ZPK.clear, bytes.fromhex(out)) == clear_block("0855667788FFFFFF")


def test_protocol_ca_error_raises_command_error() -> None:
    request = protocol.build_ca("0042", BAD_PARITY_REF, ZPK.under_lmk, "0" * 16, ACCOUNT)
    with pytest.raises(HsmCommandError) as info:
        protocol.ca_result(protocol.parse_response(process(request, KEYS)))
    assert (info.value.code, info.value.error) == ("CB", "10")


def test_protocol_ec() -> None:
    block = pin_block_under(ZPK.clear, PIN)
    good = ref_pvv(PVK.clear, ACCOUNT, "1", PIN)
    request = protocol.build_ec("0007", ZPK.under_lmk, PVK.under_lmk, block, ACCOUNT, "1", good)
    assert protocol.ec_verified(protocol.parse_response(process(request, KEYS))) is True
    bad = "0000" if good != "0000" else "1111"
    request = protocol.build_ec("0007", ZPK.under_lmk, PVK.under_lmk, block, ACCOUNT, "1", bad)
    assert protocol.ec_verified(protocol.parse_response(process(request, KEYS))) is False


def test_protocol_m6_m8() -> None:
    data = b"\x02\x00 message bytes \xff"
    m6 = protocol.build_m6("0009", protocol.KEY_TYPE_TAK, TAK.under_lmk, data)
    assert m6 == b"0009" + mac_request(message=data)[4:]
    mac = protocol.m7_mac(protocol.parse_response(process(m6, KEYS)))
    assert mac == ref_mac(TAK.clear, data)
    m8 = protocol.build_m8("0009", protocol.KEY_TYPE_TAK, TAK.under_lmk, data, mac)
    assert protocol.m9_verified(protocol.parse_response(process(m8, KEYS))) is True
    m8 = protocol.build_m8("0009", protocol.KEY_TYPE_TAK, TAK.under_lmk, data + b"!", mac)
    assert protocol.m9_verified(protocol.parse_response(process(m8, KEYS))) is False


@pytest.mark.parametrize(
    "build",
    [
        lambda: protocol.build_nc("123"),
        lambda: protocol.build_nc("12\n4"),
        lambda: protocol.build_ca("0001", "U" + "0" * 31, ZPK.under_lmk, "0" * 16, ACCOUNT),
        lambda: protocol.build_ca("0001", TPK.under_lmk, ZPK.under_lmk, "0" * 15, ACCOUNT),
        lambda: protocol.build_ca("0001", TPK.under_lmk, ZPK.under_lmk, "0" * 16, "123"),
        lambda: protocol.build_ca(
            "0001", TPK.under_lmk, ZPK.under_lmk, "0" * 16, ACCOUNT, max_pin_length=13
        ),
        lambda: protocol.build_ec(
            "0001", ZPK.under_lmk, PVK.under_lmk, "0" * 16, ACCOUNT, "12", "1234"
        ),
        lambda: protocol.build_ec(
            "0001", ZPK.under_lmk, PVK.under_lmk, "0" * 16, ACCOUNT, "1", "12345"
        ),
        lambda: protocol.build_m6("0001", "001", TAK.under_lmk, b""),
        lambda: protocol.build_m6("0001", "003", TAK.under_lmk, b"x" * 0x10000),
        lambda: protocol.build_m8("0001", "003", TAK.under_lmk, b"", "0" * 8),
    ],
)
def test_protocol_builders_validate(build: Any) -> None:
    with pytest.raises(HsmProtocolError):
        build()


@pytest.mark.parametrize(
    "data",
    [b"", b"0001CB0", b"0001C!00", b"0001CBx0", b"0001\xffB00"],
)
def test_parse_response_rejects_malformed(data: bytes) -> None:
    with pytest.raises(HsmProtocolError):
        protocol.parse_response(data)


@pytest.mark.parametrize(
    ("data", "accessor", "error"),
    [
        (b"0001CB00041234", protocol.ca_result, HsmProtocolError),
        (b"0001CB0004ABCDEF0123456789", protocol.ca_result, HsmProtocolError),
        (b"0001CA0004ABCDEF012345678901", protocol.ca_result, HsmProtocolError),
        (b"0001CB15", protocol.ca_result, HsmCommandError),
        (b"0001ZZ15", protocol.m7_mac, HsmCommandError),
        (b"0001M700ABC", protocol.m7_mac, HsmProtocolError),
        (b"0001M700abcdef01", protocol.m7_mac, HsmProtocolError),
        (b"0001ED0012", protocol.ec_verified, HsmProtocolError),
        (b"0001ED10", protocol.ec_verified, HsmCommandError),
        (b"0001M900", protocol.ec_verified, HsmProtocolError),
        (b"0001M968", protocol.m9_verified, HsmCommandError),
        (b"0001ND00XYZ", protocol.nd_result, HsmProtocolError),
    ],
)
def test_accessors_reject_unexpected_responses(
    data: bytes, accessor: Any, error: type[Exception]
) -> None:
    with pytest.raises(error):
        accessor(protocol.parse_response(data))


# ---------------------------------------------------------------------------------------------
# Robustness: process() never raises
# ---------------------------------------------------------------------------------------------

VALID_REQUESTS = [
    b"0000NC",
    ca_request(),
    ec_request(),
    mac_request("M6"),
    mac_request("M6", message=b"abcd", in_fmt="1", size="0", padding="2"),
    mac_request("M8", mac=ref_mac(TAK.clear, b"0200 bill payment")),
]


def _check_response(request: bytes, response: bytes) -> None:
    assert isinstance(response, bytes)
    assert len(response) >= 8
    assert response[:4] == request[:4].ljust(4, b" ")
    assert response[6:8].isdigit()


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_process_never_raises_on_random_bytes(data: bytes) -> None:
    _check_response(data, process(data, KEYS))


@st.composite
def mutated_requests(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(VALID_REQUESTS)))
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        op = draw(st.sampled_from(["replace", "insert", "delete", "truncate"]))
        pos = draw(st.integers(min_value=0, max_value=max(len(data) - 1, 0)))
        if op == "replace" and data:
            data[pos] = draw(st.integers(min_value=0, max_value=255))
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=4))
        elif op == "delete" and data:
            del data[pos]
        else:
            del data[pos:]
    return bytes(data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_requests())
def test_process_never_raises_on_mutated_requests(data: bytes) -> None:
    result = process_with_result(data, KEYS)
    _check_response(data, result.response)
    assert result.error == result.response[6:8].decode()
    assert result.error != "41"
    assert result.command in KNOWN_COMMANDS | {UNKNOWN_COMMAND}


def test_valid_requests_succeed() -> None:
    for request in VALID_REQUESTS:
        assert process(request, KEYS)[6:8] == b"00", request[4:6]
