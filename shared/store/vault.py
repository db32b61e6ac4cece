"""Encryption at rest: AES-256-GCM with named keys, so keys can rotate.

A :class:`Vault` holds one or more 32-byte data keys under short ids (``"k1"``, ``"k2"``...)
and seals with the *current* one. Every sealed blob is stored beside the id of the key that
sealed it, so after a rotation (a new current key, the old ones still listed) old blobs keep
opening and new ones use the new key; an old key can be dropped once nothing sealed under it
remains.

Blob layout: a random 12-byte nonce followed by the GCM ciphertext and its 16-byte tag.
Random nonces are safe for up to about 2**32 seals per key (NIST SP 800-38D); rotate well
before that. The optional ``aad`` (additional authenticated data) is not stored but must be
given again to open: binding a blob to the row that owns it (e.g. its idempotency key) means a
blob copied onto another row fails authentication instead of decrypting as someone else's.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from types import MappingProxyType
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from shared.errors import PaylabError

__all__ = ["KEY_BYTES", "MAX_KEY_ID_LENGTH", "NONCE_BYTES", "Vault", "VaultError"]

#: Length of every data key (AES-256).
KEY_BYTES: Final = 32
#: Length of the random nonce at the start of every blob.
NONCE_BYTES: Final = 12
#: Length of the GCM authentication tag at the end of every blob.
TAG_BYTES: Final = 16
#: Longest key id (it is stored in a ``String(16)`` column beside each blob).
MAX_KEY_ID_LENGTH: Final = 16
#: HKDF ``info`` of :meth:`Vault.from_secret`: changing it changes every derived key.
HKDF_INFO: Final = b"paylab data key"


class VaultError(PaylabError):
    """A blob cannot be opened: unknown key id, or it fails authentication.

    Authentication fails when the blob was altered, was sealed under another key with the
    same id, or is opened with another ``aad`` than it was sealed with. The message never
    contains key material or plaintext.
    """


class Vault:
    """Seals data with AES-256-GCM; the key id is stored beside each ciphertext so keys can rotate.

    Thread-safe: the key table is immutable after construction and each seal draws a fresh
    nonce from :func:`os.urandom`.
    """

    __slots__ = ("_ciphers", "_current")

    def __init__(self, keys: Mapping[str, bytes], current: str) -> None:
        """``keys`` maps key ids (1-16 characters) to 32-byte keys; ``current`` seals.

        Raises:
            ValueError: a key is not 32 bytes, a key id is empty or too long, or ``current``
                is not one of ``keys``.
        """
        ciphers: dict[str, AESGCM] = {}
        for key_id, key in keys.items():
            if not key_id or len(key_id) > MAX_KEY_ID_LENGTH:
                raise ValueError(f"key ids must be 1..{MAX_KEY_ID_LENGTH} characters: {key_id!r}")
            if len(key) != KEY_BYTES:
                # The key itself is never echoed, only which one is wrong.
                raise ValueError(f"key {key_id!r} must be {KEY_BYTES} bytes, got {len(key)}")
            ciphers[key_id] = AESGCM(bytes(key))
        if current not in ciphers:
            raise ValueError(f"current key id {current!r} is not among the keys")
        self._ciphers: Mapping[str, AESGCM] = MappingProxyType(ciphers)
        self._current = current

    @classmethod
    def from_secret(cls, secret: str, key_id: str = "k1") -> Vault:
        """A vault with one key derived from ``secret`` (HKDF-SHA256, info ``b"paylab data key"``).

        For configuration that holds a passphrase rather than raw key bytes. HKDF is not a
        password hash: the secret must carry enough entropy on its own (a random string, not
        a word). The same secret always derives the same key, so a restart can open what the
        previous run sealed.

        Raises:
            ValueError: the secret is empty, or the key id is invalid.
        """
        return cls.from_secrets({key_id: secret}, key_id)

    @classmethod
    def from_secrets(cls, secrets: Mapping[str, str], current: str) -> Vault:
        """A vault with one key per ``key id -> secret`` (derived as in :meth:`from_secret`).

        ``current`` seals; the others still open what they sealed: that is key rotation.

        Raises:
            ValueError: a secret is empty, a key id is invalid, or ``current`` is missing.
        """
        keys: dict[str, bytes] = {}
        for key_id, secret in secrets.items():
            if not secret:
                raise ValueError("the vault secret must not be empty")
            keys[key_id] = HKDF(
                algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=HKDF_INFO
            ).derive(secret.encode("utf-8"))
        return cls(keys, current)

    @property
    def current_key_id(self) -> str:
        """The id of the key :meth:`seal` uses."""
        return self._current

    @property
    def key_ids(self) -> frozenset[str]:
        """Every key id this vault can open."""
        return frozenset(self._ciphers)

    def seal(self, plaintext: bytes, aad: bytes = b"") -> tuple[str, bytes]:
        """Encrypt ``plaintext`` under the current key: ``(key_id, nonce + ciphertext + tag)``.

        The same ``aad`` must be given to :meth:`open`. Sealing the same plaintext twice gives
        different blobs (fresh nonce each time).
        """
        nonce = os.urandom(NONCE_BYTES)
        blob = nonce + self._ciphers[self._current].encrypt(nonce, plaintext, aad)
        return self._current, blob

    def open(self, key_id: str, blob: bytes, aad: bytes = b"") -> bytes:
        """Decrypt a blob made by :meth:`seal` (possibly by another vault with the same key).

        Raises:
            VaultError: ``key_id`` is not one of this vault's keys, or the blob is truncated,
                altered, or opened with another ``aad`` than it was sealed with.
        """
        cipher = self._ciphers.get(key_id)
        if cipher is None:
            raise VaultError(f"unknown data key id {key_id!r}")
        if len(blob) < NONCE_BYTES + TAG_BYTES:
            raise VaultError(f"sealed blob too short ({len(blob)} bytes)")
        try:
            return cipher.decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], aad)
        except InvalidTag:
            raise VaultError(f"sealed blob fails authentication under key {key_id!r}") from None

    def __repr__(self) -> str:
        # Never show key material.
        return f"Vault(keys={sorted(self._ciphers)!r}, current={self._current!r})"
