"""Fixtures for the auth-core tests: an isolated redox-elt home and a fresh shared client state."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from resources.client import SHARED
from resources.keys import KeyRing
from resources.vault import Vault


@pytest.fixture(autouse=True)
def isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Every test gets its own vault home and master key; nothing touches ~/.redox-elt."""
    home = tmp_path / "redox-home"
    monkeypatch.setenv("REDOX_ELT_HOME", str(home))
    monkeypatch.setenv("REDOX_ELT_MASTER_KEY", "test-master-key-" + tmp_path.name)
    monkeypatch.delenv("REDOX_ELT_CONFIG", raising=False)
    SHARED.reset()
    yield home
    SHARED.reset()


@pytest.fixture
def vault(isolated_home: Path) -> Vault:
    return Vault()


@pytest.fixture
def key_ring(vault: Vault) -> KeyRing:
    ring = KeyRing(vault)
    ring.generate()
    return ring
