"""shared.store.vault: AES-256-GCM sealing with named keys."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.errors import ConfigError, PaylabError
from shared.ops.settings import Settings
from shared.store.vault import NONCE_BYTES, Vault, VaultError

K1 = bytes(range(32))
K2 = bytes(range(32, 64))


def test_roundtrip() -> None:
    vault = Vault({"k1": K1}, "k1")
    key_id, blob = vault.seal(b"0220 message", b"acq|term|000001|1122060000")
    assert key_id == "k1"
    assert b"0220 message" not in blob
    assert vault.open(key_id, blob, b"acq|term|000001|1122060000") == b"0220 message"


def test_empty_plaintext_roundtrips() -> None:
    vault = Vault({"k1": K1}, "k1")
    assert vault.open(*vault.seal(b"")) == b""


def test_aad_mismatch_fails() -> None:
    vault = Vault({"k1": K1}, "k1")
    key_id, blob = vault.seal(b"secret", b"row-1")
    with pytest.raises(VaultError, match="authentication"):
        vault.open(key_id, blob, b"row-2")
    with pytest.raises(VaultError):
        vault.open(key_id, blob)  # aad omitted


@pytest.mark.parametrize("position", [0, NONCE_BYTES, -1])
def test_tampered_blob_fails(position: int) -> None:
    vault = Vault({"k1": K1}, "k1")
    key_id, blob = vault.seal(b"secret")
    tampered = bytearray(blob)
    tampered[position] ^= 0x01
    with pytest.raises(VaultError):
        vault.open(key_id, bytes(tampered))


def test_truncated_blob_fails() -> None:
    vault = Vault({"k1": K1}, "k1")
    key_id, blob = vault.seal(b"secret")
    with pytest.raises(VaultError, match="too short"):
        vault.open(key_id, blob[:20])
    with pytest.raises(VaultError):
        vault.open(key_id, blob[:-1])


def test_unknown_key_id() -> None:
    vault = Vault({"k1": K1}, "k1")
    _, blob = vault.seal(b"secret")
    with pytest.raises(VaultError, match="unknown data key id 'k9'"):
        vault.open("k9", blob)


def test_same_id_other_key_fails() -> None:
    key_id, blob = Vault({"k1": K1}, "k1").seal(b"secret")
    with pytest.raises(VaultError):
        Vault({"k1": K2}, "k1").open(key_id, blob)


def test_rotation() -> None:
    old = Vault({"k1": K1}, "k1")
    old_id, old_blob = old.seal(b"sealed before rotation", b"aad")
    rotated = Vault({"k1": K1, "k2": K2}, "k2")
    new_id, new_blob = rotated.seal(b"sealed after rotation", b"aad")
    assert (old_id, new_id) == ("k1", "k2")
    assert rotated.current_key_id == "k2"
    assert rotated.key_ids == {"k1", "k2"}
    assert rotated.open(old_id, old_blob, b"aad") == b"sealed before rotation"
    assert rotated.open(new_id, new_blob, b"aad") == b"sealed after rotation"
    # The old vault cannot read what the new key sealed.
    with pytest.raises(VaultError):
        old.open(new_id, new_blob, b"aad")
    # Once k1 is retired, its blobs no longer open.
    with pytest.raises(VaultError, match="unknown"):
        Vault({"k2": K2}, "k2").open(old_id, old_blob, b"aad")


def test_nonces_are_unique() -> None:
    vault = Vault({"k1": K1}, "k1")
    blobs = [vault.seal(b"same plaintext")[1] for _ in range(2000)]
    assert len({b[:NONCE_BYTES] for b in blobs}) == len(blobs)
    assert len(set(blobs)) == len(blobs)


def test_from_secret_is_deterministic_and_keyed() -> None:
    a = Vault.from_secret("correct horse battery staple")
    b = Vault.from_secret("correct horse battery staple")
    c = Vault.from_secret("another secret entirely", key_id="k7")
    key_id, blob = a.seal(b"x")
    assert b.open(key_id, blob) == b"x"
    assert c.current_key_id == "k7"
    with pytest.raises(VaultError):
        c.open("k7", blob)


@pytest.mark.parametrize(
    ("keys", "current", "match"),
    [
        ({"k1": b"short"}, "k1", "32 bytes"),
        ({"k1": K1 + b"x"}, "k1", "32 bytes"),
        ({"k1": K1}, "k2", "not among"),
        ({}, "k1", "not among"),
        ({"": K1}, "", "1..16"),
        ({"k" * 17: K1}, "k" * 17, "1..16"),
    ],
)
def test_invalid_construction(keys: dict[str, bytes], current: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Vault(keys, current)


def test_empty_secret_is_refused() -> None:
    with pytest.raises(ValueError):
        Vault.from_secret("")


def test_errors_are_paylab_errors_and_repr_hides_keys() -> None:
    assert issubclass(VaultError, PaylabError)
    vault = Vault({"k1": K1}, "k1")
    assert K1.hex() not in repr(vault)
    assert repr(vault) == "Vault(keys=['k1'], current='k1')"


# -- rotation through the settings -------------------------------------------------------------


def _settings(tmp_path: Path, **values: object) -> Settings:
    return Settings(_env_file=None, data_dir=tmp_path, **values)  # type: ignore[call-arg]


def test_rotated_settings_open_what_the_old_key_sealed(tmp_path: Path) -> None:
    old = _settings(tmp_path, data_key="first-secret-0123456789", data_key_id="k1")
    key_id, blob = Vault.from_secrets(old.data_keys(), old.data_key_id).seal(b"0220...", b"key")
    new = _settings(
        tmp_path,
        data_key="second-secret-0123456789",
        data_key_id="k2",
        data_keys_retired="k1:first-secret-0123456789",
    )
    vault = Vault.from_secrets(new.data_keys(), new.data_key_id)
    assert vault.open(key_id, blob, b"key") == b"0220..."
    assert vault.seal(b"x")[0] == "k2"


def test_data_key_file_replaces_the_inline_secret(tmp_path: Path) -> None:
    secret_file = tmp_path / "data.key"
    secret_file.write_text("file-secret-0123456789\n")
    s = _settings(tmp_path, data_key_file=secret_file)
    assert s.data_keys() == {"k1": "file-secret-0123456789"}


@pytest.mark.parametrize("retired", ["k0", "k0:", ":secret", "k0:a,broken"])
def test_malformed_retired_keys_are_a_config_error(tmp_path: Path, retired: str) -> None:
    with pytest.raises(ConfigError):
        _settings(tmp_path, data_keys_retired=retired).data_keys()


def test_unreadable_data_key_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        _settings(tmp_path, data_key_file=tmp_path / "missing.key").data_keys()
