"""Error types of the HSM package.

Messages never contain key material, PINs or PIN blocks.
"""

from __future__ import annotations

from shared.crypto import InvalidKeyError
from shared.errors import PaylabError

__all__ = [
    "HsmCommandError",
    "HsmError",
    "HsmProtocolError",
    "KeyFileError",
    "KeyReferenceError",
]


class HsmError(PaylabError):
    """Base class for the HSM package's errors."""


class KeyFileError(HsmError, ValueError):
    """A key file is unreadable, incomplete or inconsistent (wrong KCV, parity, encryption)."""


class KeyReferenceError(HsmError, InvalidKeyError):
    """A key reference is not ``"U"`` + 32 hex digits, or it decrypts to a key with bad parity."""


class HsmProtocolError(HsmError, ValueError):
    """A host command could not be built, or an HSM response is malformed."""


class HsmCommandError(HsmError):
    """A well-formed HSM response carried an unexpected response code or an error code.

    ``code`` is the 2-character response code received and ``error`` its 2-digit error code, so
    callers can map HSM errors to their own response codes.
    """

    def __init__(self, code: str, error: str) -> None:
        super().__init__(f"HSM response {code} returned error {error}")
        self.code = code
        self.error = error
