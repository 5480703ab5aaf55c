"""The connections config file: round trip, env override, and errors that name the field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from resources.settings import ConfigError, load_settings, settings_from_dict, write_settings


def config(**overrides: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "organization": "Org",
        "environment": "Development",
        "token_url": "http://127.0.0.1:9/v2/auth/token",
        "legacy_auth_url": "http://127.0.0.1:9/auth",
        "auth": {
            "client_id": "c-1",
            "key_ring": "signing-keys",
            "legacy_api_key": "k-1",
            "legacy_secret_ref": "legacy",
        },
        "connections": [
            {
                "id": "north",
                "name": "North",
                "kind": "ehr",
                "surfaces": ["fhir", "datamodel"],
                "entities": ["patients", "results"],
                "write_entities": ["orders"],
                "fhir_base_url": "http://127.0.0.1:9/fhir/R4/north/Development",
                "datamodel_url": "http://127.0.0.1:9/endpoint",
                "destination_id": "d-1",
                "headers": {},
                "max_rps": 20,
            }
        ],
        "audit": {"path": "audit/calls.jsonl"},
    }
    doc.update(overrides)
    return doc


def conn(**overrides: Any) -> dict[str, Any]:
    return dict(config()["connections"][0], **overrides)


def test_write_then_load_round_trips(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "c.yaml"
    write_settings(settings_from_dict(config(), source_path=path), path)
    monkeypatch.setenv("REDOX_ELT_CONFIG", str(path))
    loaded = load_settings()
    north = loaded.connection("north")
    assert north.surfaces == ("fhir", "datamodel") and north.max_rps == 20.0 and north.timeout_s == 30.0
    assert loaded.audit.path == (tmp_path / "audit/calls.jsonl").resolve()
    assert loaded.auth.has_oauth and loaded.auth.has_legacy
    assert "audit/calls.jsonl" in path.read_text()


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        (
            config(connections=[conn(fhir_base_url=None)]),
            "connection 'north': surface 'fhir' needs 'fhir_base_url'",
        ),
        (
            config(connections=[conn(datamodel_url=None)]),
            "connection 'north': surface 'datamodel' needs 'datamodel_url'",
        ),
        (config(connections=[conn(destination_id=None)]), "surface 'datamodel' needs 'destination_id'"),
        (
            config(connections=[conn(entities=["patients", "vitals"])]),
            "connection 'north': entities: unknown value 'vitals'",
        ),
        (config(connections=[conn(write_entities=["results"])]), "write_entities: unknown value 'results'"),
        (config(connections=[conn(surfaces=["hl7"])]), "surfaces: unknown value 'hl7'"),
        (config(connections=[conn(timeout_s=0)]), "'timeout_s' must be a positive number"),
        (config(connections=[conn(), conn()]), "id 'north' appears more than once"),
        (config(connections=[conn(secret="x")]), "'secret' would store a secret in the clear"),
        (config(connections=[conn(headers={"Authorization": "Bearer x"})]), "must not carry Authorization"),
        (
            config(auth={"client_id": "c", "legacy_secret": "s"}),
            "'legacy_secret' would store a secret in the clear",
        ),
        (config(auth={"legacy_api_key": "k"}), "'legacy_secret_ref' is missing"),
        (config(auth={}), "auth: set 'client_id'"),
        (config(token_url=None), "token_url: required"),
        (config(auth={"legacy_api_key": "k", "legacy_secret_ref": "s"}), "surface 'fhir' needs OAuth"),
        (config(connections=[]), "connections: required"),
        (config(surprise=1), "config: unknown field 'surprise'"),
        (config(token_url="ftp://x"), "'token_url' must be an http(s) URL"),
    ],
)
def test_errors_name_the_field(doc: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        settings_from_dict(doc)
    assert message in str(caught.value)


def test_missing_file_and_bad_yaml_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("connections: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings(bad)
    with pytest.raises(ConfigError, match="REDOX_ELT_CONFIG"):
        load_settings()


def test_env_overrides_a_connection_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDOX_NORTH_FHIR_BASE_URL", "http://127.0.0.1:10/fhir/R4/north/Staging")
    settings = settings_from_dict(config())
    assert settings.connection("north").fhir_base_url == "http://127.0.0.1:10/fhir/R4/north/Staging"
