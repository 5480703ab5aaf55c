"""The vault keeps secrets sealed: round trip, wrong key, corrupt file, no plaintext, atomic writes."""

from __future__ import annotations

import base64
import json
import os
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from resources.vault import KEY_FILE, Vault, VaultCorrupt, VaultEntryNotFound, VaultError, VaultLocked

CANARY = "canary-secret-6f1d2c9e4b"


def _all_bytes_under(directory: Path) -> bytes:
    return b"".join(p.read_bytes() for p in directory.rglob("*") if p.is_file())


def test_round_trip_set_get_list_delete(vault: Vault) -> None:
    vault.set("api-secret", CANARY)
    vault.set("webhook-token", "tok-1")
    assert vault.get("api-secret") == CANARY
    assert vault.names() == ["api-secret", "webhook-token"]
    assert Vault().get("webhook-token") == "tok-1"  # a second instance (another process) reads it
    assert vault.delete("api-secret") is True
    assert vault.delete("api-secret") is False
    with pytest.raises(VaultEntryNotFound, match="no vault entry named 'api-secret'"):
        vault.get("api-secret")


def test_file_holds_no_plaintext_of_secrets_or_names(vault: Vault, isolated_home: Path) -> None:
    vault.set("legacy-secret-for-northwind", CANARY)
    raw = _all_bytes_under(isolated_home)
    assert CANARY.encode() not in raw
    assert b"legacy-secret-for-northwind" not in raw
    assert stat.S_IMODE(vault.path.stat().st_mode) == 0o600
    assert stat.S_IMODE(isolated_home.stat().st_mode) == 0o700


def test_wrong_master_key_is_a_clear_error_and_decrypts_nothing(
    vault: Vault, monkeypatch: pytest.MonkeyPatch
) -> None:
    vault.set("api-secret", CANARY)
    monkeypatch.setenv("REDOX_ELT_MASTER_KEY", "not-the-key")
    intruder = Vault()
    with pytest.raises(VaultLocked) as caught:
        intruder.get("api-secret")
    message = str(caught.value)
    assert "REDOX_ELT_MASTER_KEY does not match" in message
    assert CANARY not in message and "not-the-key" not in message
    with pytest.raises(VaultLocked):
        intruder.names()  # not even the names leak
    with pytest.raises(VaultLocked):
        intruder.set("other", "x")  # and nothing is re-sealed under the wrong key


def test_vault_sealed_with_env_key_says_so_when_env_is_unset(
    vault: Vault, monkeypatch: pytest.MonkeyPatch
) -> None:
    vault.set("api-secret", CANARY)
    monkeypatch.delenv("REDOX_ELT_MASTER_KEY")
    with pytest.raises(VaultLocked, match="sealed with REDOX_ELT_MASTER_KEY, which is not set"):
        Vault().get("api-secret")


def test_key_file_is_created_0600_when_no_env_key(
    isolated_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("REDOX_ELT_MASTER_KEY")
    Vault().set("api-secret", CANARY)
    key_file = isolated_home / KEY_FILE
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert Vault().get("api-secret") == CANARY
    assert CANARY.encode() not in _all_bytes_under(isolated_home)
    key_file.chmod(0o644)
    with pytest.raises(VaultError, match="readable by other users"):
        Vault().get("api-secret")


@pytest.mark.parametrize(
    "damage",
    [
        lambda text: text[: len(text) // 2],  # truncated
        lambda text: "not json at all",
        lambda text: json.dumps(dict(json.loads(text), format="something-else")),
        lambda text: json.dumps(dict(json.loads(text), nonce="!!")),
    ],
    ids=["truncated", "garbage", "wrong-format", "bad-base64"],
)
def test_corrupt_file_is_reported_as_corrupt(vault: Vault, damage) -> None:
    vault.set("api-secret", CANARY)
    vault.path.write_text(damage(vault.path.read_text()))
    with pytest.raises(VaultCorrupt, match="corrupt"):
        Vault().get("api-secret")


def test_flipped_ciphertext_byte_fails_the_tag_check(vault: Vault) -> None:
    vault.set("api-secret", CANARY)
    document = json.loads(vault.path.read_text())
    ciphertext = bytearray(base64.b64decode(document["ciphertext"]))
    ciphertext[5] ^= 0x01
    document["ciphertext"] = base64.b64encode(bytes(ciphertext)).decode()
    vault.path.write_text(json.dumps(document))
    with pytest.raises(VaultLocked, match="or the file was modified"):
        Vault().get("api-secret")


def test_crash_during_write_leaves_the_previous_vault_intact(
    vault: Vault, monkeypatch: pytest.MonkeyPatch
) -> None:
    vault.set("api-secret", CANARY)
    before = vault.path.read_bytes()

    def crash(src: str, dst: str) -> None:
        raise OSError("simulated crash between write and rename")

    with monkeypatch.context() as patched:
        patched.setattr(os, "replace", crash)
        with pytest.raises(OSError, match="simulated crash"):
            vault.set("api-secret", "replacement")
    assert vault.path.read_bytes() == before
    assert Vault(vault.home).get("api-secret") == CANARY
    assert not [p for p in vault.home.iterdir() if p.name.endswith(".tmp")]


def test_concurrent_writers_lose_no_update(vault: Vault) -> None:
    def write(i: int) -> None:
        Vault(vault.home).set(f"entry-{i}", f"value-{i}")

    threads = [threading.Thread(target=write, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert vault.names() == sorted(f"entry-{i}" for i in range(8))


def test_repr_never_shows_values(vault: Vault) -> None:
    vault.set("api-secret", CANARY)
    assert CANARY not in repr(vault)


def test_cli_wrong_master_key_exits_nonzero_without_traceback(tmp_path: Path) -> None:
    env = dict(os.environ, HOME=str(tmp_path), REDOX_ELT_MASTER_KEY="right-key")
    env.pop("REDOX_ELT_HOME", None)
    cli = [sys.executable, "-m", "redox_elt.cli"]
    cwd = Path(__file__).resolve().parents[2]
    ok = subprocess.run(
        [*cli, "vault", "set", "acc", CANARY], env=env, cwd=cwd, capture_output=True, text=True, timeout=60
    )
    assert ok.returncode == 0, ok.stderr
    got = subprocess.run(
        [*cli, "vault", "get", "acc"], env=env, cwd=cwd, capture_output=True, text=True, timeout=60
    )
    assert got.stdout.strip() == CANARY
    assert not subprocess.run(["grep", "-rl", CANARY, str(tmp_path)], capture_output=True, text=True).stdout
    bad = subprocess.run(
        [*cli, "vault", "get", "acc"],
        env=dict(env, REDOX_ELT_MASTER_KEY="wrong-key"),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode != 0
    assert "Traceback" not in bad.stderr
    assert "REDOX_ELT_MASTER_KEY does not match" in bad.stderr
    assert CANARY not in bad.stderr + bad.stdout
