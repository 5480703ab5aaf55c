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
        (config(connections=[conn(timeout_s=0)]), "'timeout_s' must be a number from 0.1 to 600"),
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


# ---- hostile values (issue 14 items 3 and 5): one line naming the field and the allowed range ----

NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        (config(connections=[conn(id="../../escape")]), "is not a plain name: use 1-63 of a-z 0-9 - _"),
        (config(connections=[conn(id="North")]), "is not a plain name"),
        (config(connections=[conn(id="a/b")]), "is not a plain name"),
        (config(connections=[conn(id="-lead")]), "is not a plain name"),
        (config(connections=[conn(id="x" * 64)]), "is not a plain name"),
        (config(connections=[conn(id="a\nb")]), "is not a plain name"),
        (config(connections=[conn(id="ab\n")]), "is not a plain name"),
        (config(connections=[conn(timeout_s=NAN)]), "'timeout_s' must be a number from 0.1 to 600"),
        (config(connections=[conn(timeout_s=INF)]), "'timeout_s' must be a number from 0.1 to 600"),
        (config(connections=[conn(timeout_s=-1)]), "'timeout_s' must be a number from 0.1 to 600"),
        (config(connections=[conn(timeout_s="30")]), "'timeout_s' must be a number"),
        (config(connections=[conn(max_rps=1e-9)]), "'max_rps' must be a number from 0.01 to 10000"),
        (config(connections=[conn(max_rps=NAN)]), "'max_rps' must be a number from 0.01 to 10000"),
        (config(connections=[conn(max_rps=True)]), "'max_rps' must be a number"),
        (config(connections=[conn(page_size=0)]), "'page_size' must be a whole number from 1 to 10000"),
        (config(connections=[conn(page_size=2.5)]), "'page_size' must be a whole number"),
        (config(connections=[conn(headers={"X-A": "v\r\nX-Evil: 1"})]), "header 'X-A' value contains CR, LF"),
        (config(connections=[conn(headers={"X-A": "v\n"})]), "contains CR, LF"),
        (config(connections=[conn(headers={"Bad Name": "v"})]), "is not a valid HTTP header name"),
        (config(connections=[conn(fhir_base_url="http://127.0.0.1:9/fhir R4/x")]), "without spaces"),
        (config(connections=[conn(fhir_base_url="ftp://127.0.0.1/fhir")]), "must be an http(s) URL"),
        (config(connections=[conn(fhir_base_url="file:///etc/passwd")]), "must be an http(s) URL"),
        (config(connections=[conn(fhir_base_url="javascript:alert(1)")]), "must be an http(s) URL"),
        (config(connections=[conn(datamodel_url="http://127.0.0.1:99999/endpoint")]), "not a valid URL"),
        (
            config(connections=[conn(datamodel_url="http://u:pw@127.0.0.1/endpoint")]),
            "must not carry user:password@",
        ),
        (config(token_url="http://127.0.0.1:9/v2/auth/token\r\n"), "without spaces or control characters"),
        (config(quota={"requests": 0}), "quota: 'requests' must be a whole number from 1 to 100000000"),
        (config(quota={"requests": 7500.5}), "quota: 'requests' must be a whole number"),
        (config(quota={"window_s": NAN}), "quota: 'window_s' must be a number from 1 to 86400"),
        (config(quota={"window_s": -300}), "quota: 'window_s' must be a number from 1 to 86400"),
        (config(quota={"limit": 5}), "quota: unknown field 'limit'"),
        (config(quota=7500), "quota: must be a mapping"),
    ],
)
def test_hostile_values_are_refused_in_one_line(doc: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        settings_from_dict(doc)
    text = str(caught.value)
    assert message in text, text
    assert "\n" not in text and "\r" not in text


def test_quota_defaults_and_round_trip(tmp_path: Path) -> None:
    default = settings_from_dict(config())
    assert (default.quota.requests, default.quota.window_s) == (6750, 300.0)
    path = tmp_path / "c.yaml"
    write_settings(
        settings_from_dict(config(quota={"requests": 500, "window_s": 60}), source_path=path), path
    )
    loaded = load_settings(path)
    assert (loaded.quota.requests, loaded.quota.window_s) == (500, 60.0)


def test_config_file_is_owner_only(tmp_path: Path) -> None:
    path = tmp_path / "new-folder" / "c.yaml"
    write_settings(settings_from_dict(config(), source_path=path), path)
    assert path.stat().st_mode & 0o777 == 0o600
    assert path.parent.stat().st_mode & 0o777 == 0o700


# ---- fuzz: any value in any field is either accepted or refused with a ConfigError ----------------

HOSTILE = [
    None,
    "",
    " ",
    "../../escape",
    "a\r\nb",
    "\x00",
    "é" * 300,
    0,
    -1,
    10**30,
    1e-9,
    float("nan"),
    float("inf"),
    True,
    [],
    ["x"],
    {},
    {"k": "v"},
    "http://",
    "http://h:0/x",
    "http://[::1/x",
    "https://h/x y",
]
TOP_FIELDS = [
    "organization",
    "environment",
    "token_url",
    "legacy_auth_url",
    "auth",
    "connections",
    "audit",
    "quota",
]
CONN_FIELDS = [
    "id",
    "name",
    "kind",
    "surfaces",
    "entities",
    "write_entities",
    "fhir_base_url",
    "datamodel_url",
    "destination_id",
    "destination_slug",
    "headers",
    "timeout_s",
    "max_rps",
    "page_size",
]


def test_config_fuzz_never_raises_anything_but_config_error() -> None:
    import random

    rng = random.Random(14)
    outcomes = {"accepted": 0, "refused": 0}
    for _ in range(1500):
        doc = config()
        for _ in range(rng.randint(1, 3)):
            value = rng.choice(HOSTILE)
            where = rng.random()
            if where < 0.25:
                doc[rng.choice(TOP_FIELDS)] = value
            elif where < 0.35:
                doc["auth"] = dict(doc["auth"]) if isinstance(doc.get("auth"), dict) else {}
                doc["auth"][rng.choice(["client_id", "key_ring", "legacy_api_key", "legacy_secret_ref"])] = (
                    value
                )
            elif where < 0.45:
                doc["quota"] = {rng.choice(["requests", "window_s"]): value}
            elif (
                isinstance(doc.get("connections"), list)
                and doc["connections"]
                and isinstance(doc["connections"][0], dict)
            ):
                doc["connections"] = [dict(doc["connections"][0], **{rng.choice(CONN_FIELDS): value})]
            elif where < 0.5:
                doc["connections"] = [{"headers": {rng.choice(["X-A", "Bad Name", ""]): value}}]
        try:
            settings_from_dict(doc)
            outcomes["accepted"] += 1
        except ConfigError as exc:
            text = str(exc)
            assert "\n" not in text and "\r" not in text and len(text) < 400, text
            outcomes["refused"] += 1
    assert outcomes["refused"] > 1000 and outcomes["accepted"] > 10, outcomes
