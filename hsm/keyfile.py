"""The HSM mock's key file: a local master key (LMK) and named working keys.

The shipped file ``hsm/test-keys.json`` holds fixed, publicly known **TEST ONLY** keys, so every
component of a lab deployment (terminals, gateway, billing, HSM) agrees on them out of the box.
Never use them, or this format, for anything real.

File structure (JSON object)::

    {
      "comment": "...",                          free text, ignored
      "lmk": "<32 hex>",                         double-length 3DES LMK
      "lmk_kcv": "<6 hex>",                      optional; checked when present
      "keys": {
        "<NAME>": {
          "clear": "<32 hex>",                   double-length key, odd parity per byte
          "under_lmk": "U<32 hex>",              the clear key encrypted under the LMK
          "kcv": "<6 hex>",                      key check value of the clear key
          "description": "..."                   optional free text, ignored
        }, ...
      }
    }

Required key names are :data:`DEMO_KEY_NAMES`: ``TPK`` (terminal PIN key, acquirer terminals),
``TAK`` (MAC key between acquirer and gateway), ``ZPK`` (zone PIN key between gateway and
billing) and ``PVK`` (PIN verification key pair used by billing); others may be added.

Simplification: a real payShield encrypts each key type under a different *variant* of the LMK
(LMK pair 06-07 for TPKs, 14-15 for TAKs, ...). Here every key is encrypted under the plain LMK
with 3DES ECB (two independent blocks), so ``under_lmk`` depends only on the clear key.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final

from hsm.errors import KeyFileError, KeyReferenceError
from shared.crypto import ecb_decrypt, ecb_encrypt, has_odd_parity, kcv, with_odd_parity

__all__ = [
    "DEMO_KEY_NAMES",
    "SHIPPED_KEY_FILE",
    "KeyEntry",
    "KeyFile",
    "decrypt_under_lmk",
    "encrypt_under_lmk",
    "generate_key_file",
    "load_key_file",
    "parse_key_file",
]

DEMO_KEY_NAMES: Final = ("TPK", "TAK", "ZPK", "PVK")
"""Key names every key file must define."""

SHIPPED_KEY_FILE: Final = "test-keys.json"
"""Name of the shipped test key file inside the ``hsm`` package."""

_KEY_HEX = re.compile(r"[0-9A-Fa-f]{32}")
_KEY_REF = re.compile(r"U[0-9A-Fa-f]{32}")
_KCV_HEX = re.compile(r"[0-9A-Fa-f]{6}")

_DESCRIPTIONS: Final[Mapping[str, str]] = {
    "TPK": "terminal PIN key: acquirer terminals encrypt PIN blocks under it",
    "TAK": "terminal authentication (MAC) key between acquirer and gateway",
    "ZPK": "zone PIN key between gateway and billing",
    "PVK": "PIN verification key pair used by billing (Visa PVV)",
}


@dataclass(frozen=True, slots=True)
class KeyEntry:
    """One named working key: clear value, its form under the LMK, and its check value."""

    clear: bytes
    under_lmk: str
    kcv: str

    def __repr__(self) -> str:
        # Keep key material out of logs and tracebacks.
        return f"KeyEntry(kcv={self.kcv!r})"


@dataclass(frozen=True, slots=True)
class KeyFile:
    """A validated key file: the LMK and the named keys (read-only mapping)."""

    lmk: bytes
    keys: Mapping[str, KeyEntry]

    def entry(self, name: str) -> KeyEntry:
        """The key called ``name``; raises :class:`KeyFileError` when it is not defined."""
        try:
            return self.keys[name]
        except KeyError:
            raise KeyFileError(f"key file defines no key named {name!r}") from None

    def __repr__(self) -> str:
        return f"KeyFile(lmk_kcv={kcv(self.lmk)!r}, keys={sorted(self.keys)!r})"


def encrypt_under_lmk(lmk: bytes, clear: bytes) -> str:
    """Encrypt a 16-byte ``clear`` key under ``lmk`` (3DES ECB); return ``"U"`` + 32 upper hex."""
    if len(clear) != 16:
        raise KeyReferenceError("only double-length (16-byte) keys are supported")
    return "U" + ecb_encrypt(lmk, clear).hex().upper()


def decrypt_under_lmk(lmk: bytes, ref: str, *, check_parity: bool = True) -> bytes:
    """Decrypt a key reference ``"U"`` + 32 hex digits under ``lmk``; return the 16-byte key.

    Raises :class:`KeyReferenceError` when ``ref`` is malformed or, with ``check_parity``, when
    the decrypted key does not have odd parity in every byte (how an HSM notices a key that was
    not encrypted under its LMK, or was corrupted).
    """
    if not isinstance(ref, str) or not _KEY_REF.fullmatch(ref):
        raise KeyReferenceError("key reference must be 'U' followed by 32 hex digits")
    clear = ecb_decrypt(lmk, bytes.fromhex(ref[1:]))
    if check_parity and not has_odd_parity(clear):
        raise KeyReferenceError("key decrypted under the LMK fails the parity check")
    return clear


def _hex_key(value: Any, where: str) -> bytes:
    if not isinstance(value, str) or not _KEY_HEX.fullmatch(value):
        raise KeyFileError(f"{where} must be 32 hex digits")
    key = bytes.fromhex(value)
    if not has_odd_parity(key):
        raise KeyFileError(f"{where} does not have odd parity in every byte")
    return key


def _kcv_field(value: Any, where: str) -> str:
    if not isinstance(value, str) or not _KCV_HEX.fullmatch(value):
        raise KeyFileError(f"{where} must be 6 hex digits")
    return value.upper()


def parse_key_file(data: Any) -> KeyFile:
    """Validate a decoded key file (see the module docstring) and build a :class:`KeyFile`.

    Checks that every key has odd parity, that ``under_lmk`` decrypts under the LMK to
    ``clear``, that each ``kcv`` matches, and that all :data:`DEMO_KEY_NAMES` are present.
    Raises :class:`KeyFileError` naming the offending entry (never its value).
    """
    if not isinstance(data, Mapping):
        raise KeyFileError("key file must be a JSON object")
    lmk = _hex_key(data.get("lmk"), "lmk")
    if "lmk_kcv" in data and _kcv_field(data["lmk_kcv"], "lmk_kcv") != kcv(lmk):
        raise KeyFileError("lmk_kcv does not match the LMK")
    raw_keys = data.get("keys")
    if not isinstance(raw_keys, Mapping):
        raise KeyFileError("key file must have a 'keys' object")
    keys: dict[str, KeyEntry] = {}
    for name, raw in raw_keys.items():
        if not isinstance(raw, Mapping):
            raise KeyFileError(f"keys.{name} must be an object")
        clear = _hex_key(raw.get("clear"), f"keys.{name}.clear")
        check = _kcv_field(raw.get("kcv"), f"keys.{name}.kcv")
        ref = raw.get("under_lmk")
        if not isinstance(ref, str):
            raise KeyFileError(f"keys.{name}.under_lmk must be a string")
        try:
            decrypted = decrypt_under_lmk(lmk, ref)
        except KeyReferenceError as exc:
            raise KeyFileError(f"keys.{name}.under_lmk is invalid: {exc}") from None
        if decrypted != clear:
            raise KeyFileError(f"keys.{name}.under_lmk does not decrypt to keys.{name}.clear")
        if kcv(clear) != check:
            raise KeyFileError(f"keys.{name}.kcv does not match keys.{name}.clear")
        keys[name] = KeyEntry(clear=clear, under_lmk=ref.upper(), kcv=check)
    missing = [n for n in DEMO_KEY_NAMES if n not in keys]
    if missing:
        raise KeyFileError(f"key file lacks required keys: {', '.join(missing)}")
    return KeyFile(lmk=lmk, keys=MappingProxyType(keys))


def load_key_file(path: Path | None = None) -> KeyFile:
    """Load and validate a key file; ``None`` loads the shipped TEST ONLY ``hsm/test-keys.json``.

    Raises :class:`KeyFileError` when the file cannot be read, is not JSON, or fails
    :func:`parse_key_file`'s checks.
    """
    try:
        if path is None:
            text = resources.files("hsm").joinpath(SHIPPED_KEY_FILE).read_text(encoding="utf-8")
        else:
            text = Path(path).read_text(encoding="utf-8")
        data = json.loads(text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise KeyFileError(f"cannot read key file: {type(exc).__name__}: {exc}") from exc
    return parse_key_file(data)


def _random_key() -> bytes:
    while True:
        key = with_odd_parity(secrets.token_bytes(16))
        # Equal halves would make the "double-length" key single DES in disguise.
        if key[:8] != key[8:]:
            return key


def generate_key_file() -> dict[str, Any]:
    """A fresh key file (JSON-ready dict) with a random LMK and random :data:`DEMO_KEY_NAMES`.

    All keys are double-length with odd parity; the result passes :func:`parse_key_file`.
    """
    lmk = _random_key()
    keys: dict[str, Any] = {}
    for name in DEMO_KEY_NAMES:
        clear = _random_key()
        keys[name] = {
            "description": _DESCRIPTIONS[name],
            "clear": clear.hex().upper(),
            "under_lmk": encrypt_under_lmk(lmk, clear),
            "kcv": kcv(clear),
        }
    return {
        "comment": (
            "Generated paylab HSM key file. Keys are under_lmk = 3DES-ECB(LMK, clear), "
            "no LMK variants."
        ),
        "lmk": lmk.hex().upper(),
        "lmk_kcv": kcv(lmk),
        "keys": keys,
    }
