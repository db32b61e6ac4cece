"""Tests for shared.crypto: published known answers, plus references built from `cryptography`."""

from __future__ import annotations

import random
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor

import pytest
from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives.ciphers import Cipher, modes
from hypothesis import given, settings
from hypothesis import strategies as st

from shared import crypto
from shared.crypto import (
    CryptoError,
    InvalidKeyError,
    PinBlockError,
    decode_pin_block_format0,
    decode_pin_block_format0_account,
    decrypt_pin_block,
    ecb_decrypt,
    ecb_encrypt,
    encrypt_pin_block,
    has_odd_parity,
    kcv,
    mac_alg3,
    pan_field_12,
    pin_block_format0,
    pin_block_format0_account,
    pvv,
    pvv_from_account,
    with_odd_parity,
)

# Classic test key K1 = 0123456789ABCDEF, K2 = FEDCBA9876543210.
K1 = bytes.fromhex("0123456789ABCDEF")
K2 = bytes.fromhex("FEDCBA9876543210")
K12 = K1 + K2


# ---------------------------------------------------------------------------------------------
# Independent references (only `cryptography`, never the code under test)
# ---------------------------------------------------------------------------------------------


def _ref_key24(key: bytes) -> bytes:
    return {8: key * 3, 16: key + key[:8], 24: key}[len(key)]


def ref_encrypt(key: bytes, data: bytes) -> bytes:
    return Cipher(TripleDES(_ref_key24(key)), modes.ECB()).encryptor().update(data)


def ref_decrypt(key: bytes, data: bytes) -> bytes:
    return Cipher(TripleDES(_ref_key24(key)), modes.ECB()).decryptor().update(data)


def ref_mac_alg3(key16: bytes, data: bytes, padding: int) -> bytes:
    if padding == 1:
        padded = data + b"\x00" * (-len(data) % 8) if data else b"\x00" * 8
    else:
        padded = data + b"\x80" + b"\x00" * (-(len(data) + 1) % 8)
    k1, k2 = key16[:8], key16[8:]
    cbc = Cipher(TripleDES(k1 * 3), modes.CBC(b"\x00" * 8)).encryptor()
    last = (cbc.update(padded) + cbc.finalize())[-8:]
    return ref_encrypt(k1, ref_decrypt(k2, last))


def ref_pvv(pvk: bytes, pan: str, pvki: str, pin: str) -> str:
    tsp = pan[:-1][-11:] + pvki + pin[:4]
    result = ref_encrypt(pvk, bytes.fromhex(tsp)).hex().upper()
    digits = [c for c in result if c.isdigit()]
    letters = [str("ABCDEF".index(c)) for c in result if not c.isdigit()]
    return "".join((digits + letters)[:4])


# ---------------------------------------------------------------------------------------------
# DES / 3DES
# ---------------------------------------------------------------------------------------------


def test_des_known_answer_now_is_t() -> None:
    # FIPS 81 / classic DES vector: key 0123456789ABCDEF, plaintext "Now is t".
    assert ecb_encrypt(K1, b"Now is t").hex().upper() == "3FA40E8A984D4815"
    assert ecb_decrypt(K1, bytes.fromhex("3FA40E8A984D4815")) == b"Now is t"


@pytest.mark.parametrize("length", [8, 16, 24])
def test_ecb_matches_reference_for_every_key_length(length: int) -> None:
    key = bytes(range(1, length + 1))
    data = b"0123456789abcdef" * 2
    assert ecb_encrypt(key, data) == ref_encrypt(key, data)
    assert ecb_decrypt(key, ecb_encrypt(key, data)) == data


def test_double_length_with_equal_halves_is_single_des() -> None:
    assert ecb_encrypt(K1 + K1, b"Now is t") == ecb_encrypt(K1, b"Now is t")


def test_short_keys_emit_no_deprecation_warning() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ecb_encrypt(bytes.fromhex("1111111111111111"), b"\x00" * 8)
        ecb_encrypt(bytes.fromhex("22222222222222223333333333333333"), b"\x00" * 8)


@pytest.mark.parametrize("length", [0, 7, 9, 15, 17, 23, 25, 32])
def test_bad_key_length_is_rejected(length: int) -> None:
    with pytest.raises(InvalidKeyError):
        ecb_encrypt(b"\x01" * length, b"\x00" * 8)


@pytest.mark.parametrize("data", [b"", b"1234567", b"123456789"])
def test_data_must_be_whole_blocks(data: bytes) -> None:
    with pytest.raises(CryptoError):
        ecb_encrypt(K12, data)
    with pytest.raises(CryptoError):
        ecb_decrypt(K12, data)


def test_kcv_known_answer() -> None:
    # Widely published check value of the double-length key 0123456789ABCDEF FEDCBA9876543210.
    assert kcv(K12) == "08D7B4"
    assert kcv(K12, 16) == "08D7B4FB629D0885"
    with pytest.raises(CryptoError):
        kcv(K12, 0)
    with pytest.raises(CryptoError):
        kcv(K12, 17)


def test_parity_helpers() -> None:
    assert has_odd_parity(K12)
    assert not has_odd_parity(bytes.fromhex("0023456789ABCDEF"))
    fixed = with_odd_parity(bytes(range(256)))
    assert has_odd_parity(fixed)
    # Only the low bit of each byte may change.
    assert all((a ^ b) in (0, 1) for a, b in zip(fixed, range(256), strict=True))
    assert with_odd_parity(K12) == K12


# ---------------------------------------------------------------------------------------------
# ISO 9564-1 format 0
# ---------------------------------------------------------------------------------------------


def test_pin_block_format0_worked_example() -> None:
    # PIN 1234, PAN 43219876543210987:
    # PIN field 041234FFFFFFFFFF xor PAN field 0000987654321098 = 0412AC89ABCDEF67.
    assert pan_field_12("43219876543210987") == "987654321098"
    block = pin_block_format0("1234", "43219876543210987")
    assert block.hex().upper() == "0412AC89ABCDEF67"
    assert decode_pin_block_format0(block, "43219876543210987") == "1234"


def test_pan_field_pads_short_pans_and_rejects_garbage() -> None:
    assert pan_field_12("1234567890") == "000123456789"
    assert pan_field_12("4000001234567899") == "000123456789"
    fullwidth = "\uff14\uff10\uff10\uff10\uff11\uff12\uff13\uff14"
    for bad in ["", "1", "12345678901234567890", "40000012345678X9", fullwidth]:
        with pytest.raises(CryptoError):
            pan_field_12(bad)


@pytest.mark.parametrize(
    ("pin", "reason"),
    [
        ("123", "pin_length"),
        ("1234567890123", "pin_length"),
        ("", "pin_length"),
        ("12a4", "pin_digits"),
        ("12 4", "pin_digits"),
        ("12²4", "pin_digits"),
    ],
)
def test_pin_block_rejects_bad_pins(pin: str, reason: str) -> None:
    with pytest.raises(PinBlockError) as info:
        pin_block_format0(pin, "4000001234567899")
    assert info.value.reason == reason


def _xor_account(nibbles: str, account12: str) -> bytes:
    pan = bytes.fromhex("0000" + account12)
    return bytes(a ^ b for a, b in zip(bytes.fromhex(nibbles), pan, strict=True))


@pytest.mark.parametrize(
    ("clear_nibbles", "reason"),
    [
        ("141234FFFFFFFFFF", "control"),
        ("F41234FFFFFFFFFF", "control"),
        ("03123FFFFFFFFFFF", "pin_length"),
        ("0D1234567890123F", "pin_length"),
        ("00FFFFFFFFFFFFFF", "pin_length"),
        ("04123AFFFFFFFFFF", "pin_digits"),
        ("041234FFFFFFFFFE", "filler"),
        ("0412340FFFFFFFFF", "filler"),
    ],
)
def test_decode_rejects_bad_blocks(clear_nibbles: str, reason: str) -> None:
    account = "000123456789"
    with pytest.raises(PinBlockError) as info:
        decode_pin_block_format0_account(_xor_account(clear_nibbles, account), account)
    assert info.value.reason == reason


def test_decode_rejects_wrong_size_and_bad_account() -> None:
    with pytest.raises(PinBlockError) as info:
        decode_pin_block_format0_account(b"\x00" * 7, "000123456789")
    assert info.value.reason == "size"
    with pytest.raises(CryptoError):
        decode_pin_block_format0_account(b"\x00" * 8, "12345")
    with pytest.raises(CryptoError):
        pin_block_format0_account("1234", "00012345678X")


def test_twelve_digit_pin_fills_the_block() -> None:
    account = "000000000000"
    block = pin_block_format0_account("123456789012", account)
    assert block.hex().upper() == "0C123456789012FF"
    assert decode_pin_block_format0_account(block, account) == "123456789012"


def test_encrypt_and_decrypt_pin_block_match_reference() -> None:
    pan = "4000001234567899"
    encrypted = encrypt_pin_block("9876", pan, K12)
    assert encrypted == encrypted.upper() and len(encrypted) == 16
    clear = ref_decrypt(K12, bytes.fromhex(encrypted))
    assert clear == pin_block_format0("9876", pan)
    assert decrypt_pin_block(encrypted, pan, K12) == "9876"
    assert decrypt_pin_block(encrypted.lower(), pan, K12) == "9876"


@pytest.mark.parametrize("block_hex", ["", "0123", "0123456789ABCDEG", "0123456789ABCDEF00"])
def test_decrypt_pin_block_rejects_malformed_hex(block_hex: str) -> None:
    with pytest.raises(PinBlockError) as info:
        decrypt_pin_block(block_hex, "4000001234567899", K12)
    assert info.value.reason == "size"


def test_errors_do_not_reveal_the_pin() -> None:
    with pytest.raises(PinBlockError) as info:
        pin_block_format0("98765432109876", "4000001234567899")
    assert "98765432109876" not in str(info.value)


@settings(max_examples=150, deadline=None)
@given(
    pin=st.text(alphabet="0123456789", min_size=4, max_size=12),
    pan=st.text(alphabet="0123456789", min_size=12, max_size=19),
)
def test_pin_block_round_trip(pin: str, pan: str) -> None:
    block = pin_block_format0(pin, pan)
    assert decode_pin_block_format0(block, pan) == pin
    assert decrypt_pin_block(encrypt_pin_block(pin, pan, K12), pan, K12) == pin


# ---------------------------------------------------------------------------------------------
# Retail MAC
# ---------------------------------------------------------------------------------------------


def test_retail_mac_ansi_x9_19_known_answer() -> None:
    # ANSI X9.19 example: key 0123456789ABCDEF FEDCBA9876543210, "Now is the time for all ".
    mac = mac_alg3(K12, b"Now is the time for all ")
    assert mac.hex().upper() == "A1C72E74EA3FA9B6"


def test_mac_padding_rules() -> None:
    # Method 1: empty data is one zero block; a whole block gets no extra padding.
    assert mac_alg3(K12, b"") == mac_alg3(K12, b"\x00" * 8)
    assert mac_alg3(K12, b"12345678") != mac_alg3(K12, b"12345678\x00" + b"\x00" * 7)
    # Method 2 always appends 0x80, so a whole block grows by one block.
    assert mac_alg3(K12, b"12345678", 2) == mac_alg3(K12, b"12345678\x80" + b"\x00" * 7, 1)
    assert mac_alg3(K12, b"", 2) == mac_alg3(K12, b"\x80" + b"\x00" * 7, 1)


def test_mac_rejects_bad_key_and_padding() -> None:
    with pytest.raises(InvalidKeyError):
        mac_alg3(K1, b"data")
    with pytest.raises(InvalidKeyError):
        mac_alg3(K12 + K1, b"data")
    with pytest.raises(CryptoError):
        mac_alg3(K12, b"data", padding=3)


@settings(max_examples=150, deadline=None)
@given(
    key=st.binary(min_size=16, max_size=16),
    data=st.binary(max_size=100),
    padding=st.sampled_from([1, 2]),
)
def test_mac_matches_cbc_reference(key: bytes, data: bytes, padding: int) -> None:
    assert mac_alg3(key, data, padding) == ref_mac_alg3(key, data, padding)


# ---------------------------------------------------------------------------------------------
# PVV
# ---------------------------------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(
    pvk=st.binary(min_size=16, max_size=16),
    pan=st.text(alphabet="0123456789", min_size=13, max_size=19),
    pvki=st.sampled_from("0123456789"),
    pin=st.text(alphabet="0123456789", min_size=4, max_size=12),
)
def test_pvv_matches_reference(pvk: bytes, pan: str, pvki: str, pin: str) -> None:
    value = pvv(pvk, pan, pvki, pin)
    assert value == ref_pvv(pvk, pan, pvki, pin)
    assert len(value) == 4 and value.isdigit()
    assert pvv_from_account(pvk, pan_field_12(pan), pvki, pin) == value


def test_pvv_uses_only_the_first_four_pin_digits() -> None:
    assert pvv(K12, "4000001234567899", "1", "1234") == pvv(K12, "4000001234567899", "1", "123499")


def test_decimalisation_second_pass() -> None:
    # Fewer than four decimal digits: the second pass maps A-F to 0-5 in order of appearance.
    assert crypto._decimalise("ABCDEF12ABCDEFAB") == "1201"
    assert crypto._decimalise("ABCDEFABCDEFABCD") == "0123"
    assert crypto._decimalise("A1B2C3D4E5F60789") == "1234"


@pytest.mark.parametrize(
    ("pvk", "pvki", "pin", "error"),
    [
        (K1, "1", "1234", InvalidKeyError),
        (K12, "", "1234", CryptoError),
        (K12, "12", "1234", CryptoError),
        (K12, "A", "1234", CryptoError),
        (K12, "1", "123", PinBlockError),
    ],
)
def test_pvv_rejects_bad_input(pvk: bytes, pvki: str, pin: str, error: type[Exception]) -> None:
    with pytest.raises(error):
        pvv(pvk, "4000001234567899", pvki, pin)


# ---------------------------------------------------------------------------------------------
# Long-lived ECB contexts (one per key and thread)
# ---------------------------------------------------------------------------------------------


def _fresh(key: bytes) -> Cipher[modes.ECB]:
    full = {8: key * 3, 16: key + key[:8], 24: key}[len(key)]
    return Cipher(TripleDES(full), modes.ECB())


def test_reused_ecb_contexts_match_fresh_ones_for_many_keys_and_blocks() -> None:
    rng = random.Random(18)
    # More keys than one thread's cache holds, revisited in random order: hits, misses and
    # evictions interleave, in both directions, with one to four blocks per call.
    keys = [rng.randbytes(rng.choice((8, 16, 24))) for _ in range(100)]
    for _ in range(3_000):
        key = rng.choice(keys)
        data = rng.randbytes(8 * rng.randint(1, 4))
        assert ecb_encrypt(key, data) == _fresh(key).encryptor().update(data)
        assert ecb_decrypt(key, data) == _fresh(key).decryptor().update(data)
        assert ecb_decrypt(key, ecb_encrypt(key, data)) == data


def test_ecb_context_cache_is_bounded_per_thread() -> None:
    for i in range(3 * crypto._ECB_CONTEXTS_PER_THREAD):
        ecb_encrypt(i.to_bytes(8, "big") * 2, bytes(8))
    assert len(crypto._contexts.ecb) == crypto._ECB_CONTEXTS_PER_THREAD


def test_bad_keys_are_not_cached() -> None:
    before = dict(getattr(crypto._contexts, "ecb", {}))
    with pytest.raises(InvalidKeyError):
        ecb_encrypt(bytes(7), bytes(8))
    assert getattr(crypto._contexts, "ecb", {}) == before


def test_ecb_from_many_threads_at_once_matches_fresh_contexts() -> None:
    keys = [random.Random(i).randbytes(16) for i in range(8)]
    barrier = threading.Barrier(4)

    def work(seed: int) -> list[bool]:
        rng = random.Random(seed)
        barrier.wait(timeout=30)
        results = []
        for _ in range(2_000):
            key, data = rng.choice(keys), rng.randbytes(16)
            results.append(ecb_encrypt(key, data) == _fresh(key).encryptor().update(data))
            results.append(ecb_decrypt(key, data) == _fresh(key).decryptor().update(data))
        return results

    with ThreadPoolExecutor(max_workers=4) as pool:
        outcomes = list(pool.map(work, range(4)))
    assert all(all(results) for results in outcomes)


def _mac_reference(key16: bytes, padded: bytes) -> bytes:
    k1, k2 = key16[:8], key16[8:]
    chained = Cipher(TripleDES(k1 * 3), modes.CBC(bytes(8))).encryptor().update(padded)
    last = _fresh(k2).decryptor().update(chained[-8:])
    return _fresh(k1).encryptor().update(last)


def test_reused_cbc_contexts_give_the_zero_iv_mac_for_many_keys_and_messages() -> None:
    rng = random.Random(9797)
    # More keys than one thread's cache holds, each reused many times with messages of
    # every length from empty to 20 blocks, both padding methods.
    keys = [rng.randbytes(16) for _ in range(100)]
    for _ in range(3_000):
        key, data, padding = (
            rng.choice(keys),
            rng.randbytes(rng.randint(0, 160)),
            rng.choice((1, 2)),
        )
        assert mac_alg3(key, data, padding) == _mac_reference(key, crypto._pad(data, padding))
    assert len(crypto._contexts.cbc) <= crypto._ECB_CONTEXTS_PER_THREAD


def test_mac_from_many_threads_at_once_matches_the_reference() -> None:
    keys = [random.Random(i).randbytes(16) for i in range(4)]
    barrier = threading.Barrier(4)

    def work(seed: int) -> bool:
        rng = random.Random(seed)
        barrier.wait(timeout=30)
        return all(
            mac_alg3(key, data) == _mac_reference(key, crypto._pad(data, 1))
            for key, data in (
                (rng.choice(keys), rng.randbytes(rng.randint(0, 64))) for _ in range(2_000)
            )
        )

    with ThreadPoolExecutor(max_workers=4) as pool:
        assert all(pool.map(work, range(4)))
