"""A client that could not authenticate fails when it opens, not with "0 rows" later.

A clinical-network connection with no known patients sends no request at all; with a wrong
master key it used to "succeed" and record a live run. Opening the client now checks, locally,
that the vault opens and holds a signing key (or the legacy secret)."""

from __future__ import annotations

from pathlib import Path

import pytest

from resources.audit import AuditLog
from resources.auth import TokenError
from resources.client import SHARED, RedoxClient
from resources.keys import KeyRing
from resources.settings import settings_from_dict
from resources.vault import Vault, VaultError

GOOD_KEY = "right-master-key-0123456789abcdef"


def settings(**auth: str):
    return settings_from_dict(
        {
            "organization": "T",
            "environment": "Development",
            "token_url": "http://127.0.0.1:9/v2/auth/token",
            "legacy_auth_url": "http://127.0.0.1:9/auth",
            "auth": {"client_id": "c", "key_ring": "signing-keys", **auth},
            "connections": [
                {
                    "id": "net",
                    "kind": "network",
                    "surfaces": ["datamodel"],
                    "entities": ["patients", "documents"],
                    "datamodel_url": "http://127.0.0.1:9/endpoint",
                    "destination_id": "00000000-0000-4000-8000-000000000001",
                }
            ],
        }
    )


@pytest.fixture(autouse=True)
def fresh_providers():
    SHARED.reset()
    yield
    SHARED.reset()


def test_a_wrong_master_key_fails_the_client_at_open(tmp_path: Path) -> None:
    KeyRing(Vault(tmp_path, master_key=GOOD_KEY), "signing-keys").generate()
    wrong = Vault(tmp_path, master_key="wrong-master-key-0123456789abcdef")
    client = RedoxClient(settings(), "net", audit=AuditLog(tmp_path / "a.jsonl"), vault=wrong)
    with pytest.raises(VaultError, match="cannot open the vault"):
        client.__enter__()


def test_an_empty_key_ring_fails_the_client_at_open(tmp_path: Path) -> None:
    vault = Vault(tmp_path, master_key=GOOD_KEY)
    client = RedoxClient(settings(), "net", audit=AuditLog(tmp_path / "a.jsonl"), vault=vault)
    with pytest.raises(TokenError, match="no signing key"):
        client.__enter__()


def test_the_right_key_opens_and_sends_nothing(tmp_path: Path) -> None:
    vault = Vault(tmp_path, master_key=GOOD_KEY)
    KeyRing(vault, "signing-keys").generate()
    with RedoxClient(settings(), "net", audit=AuditLog(tmp_path / "a.jsonl"), vault=vault) as client:
        assert client.conn.id == "net"
    assert not (tmp_path / "a.jsonl").exists() or (tmp_path / "a.jsonl").read_text() == ""


def test_oauth_without_a_key_falls_back_to_a_readable_legacy_secret(tmp_path: Path) -> None:
    vault = Vault(tmp_path, master_key=GOOD_KEY)
    vault.set("legacy-secret", "s3cret")
    with RedoxClient(
        settings(legacy_api_key="k", legacy_secret_ref="legacy-secret"),
        "net",
        audit=AuditLog(tmp_path / "a.jsonl"),
        vault=vault,
    ):
        pass
