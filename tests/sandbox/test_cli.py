"""``redox-elt sandbox serve`` and ``redox-elt sandbox connect`` as a user runs them: subprocesses.

``serve`` is started with ``--port 0`` and announces the bound URL on its first line, so no
port is ever guessed. Every subprocess gets its own HOME, REDOX_ELT_HOME and master key.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest
import yaml

from sandbox.server import SandboxServer
from tests.sandbox.test_server_e2e import Live, fhir_valid, strict_redox


def redox_elt() -> list[str]:
    """The installed console script beside this interpreter, else the module it runs."""
    script = Path(sys.executable).with_name("redox-elt")
    return [str(script)] if script.exists() else [sys.executable, "-m", "redox_elt.cli"]


@pytest.fixture
def cli_env(tmp_path: Path) -> dict[str, str]:
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("REDOX_ELT_")}
    env.update(
        HOME=str(home),
        REDOX_ELT_HOME=str(home / ".redox-elt"),
        REDOX_ELT_MASTER_KEY="cli-test-master-key-" + tmp_path.name,
        PYTHONUNBUFFERED="1",
    )
    return env


class Served:
    def __init__(self, process: subprocess.Popen[str], url: str) -> None:
        self.process = process
        self.url = url


@pytest.fixture
def serve(cli_env: dict[str, str]) -> Iterator:
    started: list[subprocess.Popen[str]] = []

    def start(*args: str) -> Served:
        process = subprocess.Popen(
            [*redox_elt(), "sandbox", "serve", "--host", "127.0.0.1", "--port", "0", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=cli_env,
        )
        started.append(process)
        line = process.stdout.readline()  # blocks until the socket is bound (or the process dies)
        if "listening on " not in line:
            process.wait(timeout=30)
            raise AssertionError(f"serve did not start: {line!r} {process.stderr.read()[-500:]!r}")
        url = line.split("listening on ", 1)[1].split()[0]
        return Served(process, url)

    yield start
    for process in started:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def connections(url: str) -> dict:
    for _ in range(200):
        try:
            r = httpx.get(f"{url}/_sandbox/connections", timeout=5)
            if r.status_code == 200:
                return r.json()
        except httpx.TransportError:
            pass
    raise AssertionError("the sandbox never answered /_sandbox/connections")


def test_serve_answers_the_control_plane_and_stops_on_sigint(serve) -> None:
    served = serve("--patients", "150", "--seed", "3")
    doc = connections(served.url)
    assert doc["token_url"] == f"{served.url}/v2/auth/token"
    assert [c["id"] for c in doc["connections"]] == [
        "northwind-fhir",
        "lakeside-dm",
        "riverbend-both",
        "carequality-network",
    ]
    truth = httpx.get(f"{served.url}/_sandbox/truth", timeout=10).json()
    assert 0 < truth["counts"]["northwind-fhir"]["patients"] <= 150 + 4  # + the canonical test family
    served.process.send_signal(signal.SIGINT)
    assert served.process.wait(timeout=15) == 0


def test_serve_with_a_config_file_changes_the_connections(serve, tmp_path: Path) -> None:
    config = tmp_path / "sandbox.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "patients": 120,
                "seed": 5,
                "environment": "Staging",
                "quota_requests": 100,
                "quota_window_s": 60,
                "search_policy": "open",  # not Redox: lets this test list every patient at once
                "connections": [
                    {
                        "id": "alpha-fhir",
                        "name": "Alpha Hospital",
                        "surfaces": ["fhir"],
                        "entities": ["patients", "results"],
                        "slug": "alpha-hospital",
                        "membership": 1.0,
                        "page_size": 25,
                        "bulk_export": True,
                        "refresh_days": 3,
                    },
                    {
                        "id": "beta-dm",
                        "name": "Beta Clinic",
                        "surfaces": ["datamodel"],
                        "write_entities": ["orders"],
                    },
                ],
            }
        )
    )
    served = serve("--config", str(config))
    doc = connections(served.url)
    assert doc["environment"] == "Staging"
    alpha, beta = doc["connections"]
    assert (alpha["id"], alpha["entities"], alpha["page_size"]) == ("alpha-fhir", ["patients", "results"], 25)
    assert alpha["fhir_base_url"] == f"{served.url}/fhir/R4/alpha-hospital/Staging"
    assert (beta["id"], beta["surfaces"], beta["write_entities"]) == ("beta-dm", ["datamodel"], ["orders"])
    assert beta["rate_limit"] == {"requests": 100, "window_s": 60, "scope": "client"}
    assert (alpha["bulk_export"], alpha["refresh_days"], beta["bulk_export"]) == (True, 3, False)
    assert alpha["bulk_group_id"] and beta["bulk_group_id"] is None
    truth = httpx.get(f"{served.url}/_sandbox/truth", timeout=10).json()
    assert set(truth["counts"]) == {"alpha-fhir", "beta-dm"}
    assert set(truth["counts"]["alpha-fhir"]) == {"patients", "results"}
    live = Live(served.url)
    bundle = live.fhir_search("alpha-fhir", "Patient", {"_lastUpdated": "ge1900-01-01"}).json()
    assert bundle["total"] == truth["counts"]["alpha-fhir"]["patients"] and len(bundle["entry"]) == 25
    assert live.fhir_search("alpha-fhir", "Encounter", {"date": "ge1900"}).status_code == 403  # not entitled
    live.close()


def test_serve_refuses_a_bad_config_with_a_clear_message(cli_env: dict[str, str], tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("connections:\n  - id: x\n    name: X\n    surfaces: [hl7]\n")
    done = subprocess.run(
        [*redox_elt(), "sandbox", "serve", "--port", "0", "--config", str(config)],
        capture_output=True,
        text=True,
        env=cli_env,
        timeout=60,
    )
    assert done.returncode == 2
    assert "config error" in done.stderr and "unknown surface 'hl7'" in done.stderr


PATIENTS = [
    {
        "resourceType": "Patient",
        "id": f"pt-{n}",
        "meta": {"lastUpdated": f"2026-0{n}-10T08:00:00Z"},
        "identifier": [
            {
                "type": {
                    "coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "MR"}]
                },
                "system": "urn:oid:1.2.840.114350.1.13.0.1.7.5.737384.14",
                "value": f"E{n}000",
            }
        ],
        "name": [{"family": family, "given": [given]}],
        "gender": gender,
        "birthDate": birth,
    }
    for n, family, given, gender, birth in (
        (1, "Quill", "Ada", "female", "1961-04-12"),
        (2, "Marsh", "Ben", "male", "1978-11-30"),
        (3, "Fenwick", "Cora", "female", "2001-02-03"),
    )
]
ENCOUNTERS = [
    {
        "resourceType": "Encounter",
        "id": f"enc-{n}",
        "meta": {"lastUpdated": f"2026-0{n}-11T09:00:00Z"},
        "status": "finished",
        "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
        "type": [
            {"coding": [{"system": "http://snomed.info/sct", "code": "185349003", "display": "Check up"}]}
        ],
        "subject": {"reference": f"Patient/pt-{n}"},
        "participant": [{"individual": {"reference": "Practitioner/pr-1"}}],
        # A bulk export references its Locations (no display): the name comes from Location.ndjson.
        "location": [{"location": {"reference": "Location/loc-1"}}],
        "period": {"start": f"2026-0{n}-11T08:00:00Z", "end": f"2026-0{n}-11T08:30:00Z"},
    }
    for n in (1, 2)
]
PRACTITIONERS = [
    {
        "resourceType": "Practitioner",
        "id": "pr-1",
        "identifier": [{"system": "http://hl7.org/fhir/sid/us-npi", "value": "1234567893"}],
        "name": [{"family": "Granite", "given": ["Pat"]}],
    }
]
LOCATIONS = [{"resourceType": "Location", "id": "loc-1", "name": "Quarry Street Clinic"}]
OBSERVATIONS = [
    {
        "resourceType": "Observation",
        "id": f"obs-{n}",
        "meta": {"lastUpdated": f"2026-0{n}-12T10:00:00Z"},
        "status": "final",
        "category": [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                        "code": "laboratory",
                    }
                ]
            }
        ],
        "code": {"coding": [{"system": "http://loinc.org", "code": "2345-7", "display": "Glucose"}]},
        "subject": {"reference": f"Patient/pt-{n}"},
        "effectiveDateTime": f"2026-0{n}-12T07:45:00Z",
        "valueQuantity": {
            "value": 90 + n,
            "unit": "mg/dL",
            "system": "http://unitsofmeasure.org",
            "code": "mg/dL",
        },
        "referenceRange": [{"low": {"value": 70, "unit": "mg/dL"}, "high": {"value": 99, "unit": "mg/dL"}}],
    }
    for n in (1, 2, 3)
]


def write_ndjson(directory: Path) -> None:
    directory.mkdir()
    files = (
        ("Patient", PATIENTS),
        ("Practitioner", PRACTITIONERS),
        ("Location", LOCATIONS),
        ("Encounter", ENCOUNTERS),
        ("Observation", OBSERVATIONS),
    )
    for name, resources in files:
        (directory / f"{name}.ndjson").write_bytes(b"\n".join(orjson.dumps(r) for r in resources) + b"\n")


def test_serve_seed_from_a_bulk_export_serves_it_through_both_surfaces(serve, tmp_path: Path) -> None:
    export = tmp_path / "export"
    write_ndjson(export)
    served = serve("--seed-from", str(export))
    [conn] = connections(served.url)["connections"]
    assert set(conn["surfaces"]) == {"fhir", "datamodel"}
    live = Live(served.url)
    truth = live.truth()
    counts = truth["counts"][conn["id"]]
    assert (counts["patients"], counts["encounters"], counts["results"]) == (3, 2, 3)
    assert counts["medications"] == counts["appointments"] == counts["documents"] == 0
    # The Redox way: each roster MRN -> one Patient search that revincludes the patient's records.
    roster = live.http.get(f"{served.url}/_sandbox/roster", params={"connection": conn["id"]}).json()
    by_type: dict[str, list[dict]] = {}
    for ident in roster["patients"]:
        params = {"identifier": f"{ident['system']}|{ident['value']}", "_revinclude": "*"}
        bundle = live.fhir_search(conn["id"], "Patient", params).json()
        assert bundle["total"] == 1
        for entry in bundle["entry"]:
            by_type.setdefault(entry["resource"]["resourceType"], []).append(entry["resource"])
    for rtype, expected in (("Patient", 3), ("Encounter", 2), ("Observation", 3)):
        assert len(by_type[rtype]) == expected
        for resource in by_type[rtype]:
            fhir_valid(resource)
    patients = by_type["Patient"]
    assert sorted(p["birthDate"] for p in patients) == ["1961-04-12", "1978-11-30", "2001-02-03"]
    observations = by_type["Observation"]
    assert sorted(o["valueQuantity"]["value"] for o in observations) == [91, 92, 93]
    encounters, _ = live.fhir_all(conn["id"], "Encounter", {"date": "ge1900-01-01"})
    assert {e["period"]["start"][:10] for e in encounters} == {"2026-01-11", "2026-02-11"}
    found = live.dm(
        conn["id"], "PatientSearch", "Query", Patient={"Identifiers": [{"ID": "E2000", "IDType": "MR"}]}
    )
    assert found.status_code == 200, found.text
    strict_redox(found.json())
    assert found.json()["Patient"]["Demographics"]["LastName"] == "Marsh"
    visits = live.dm(
        conn["id"],
        "PatientAdmin",
        "VisitQuery",
        Patients=[{"Identifiers": [{"ID": "E2000", "IDType": "MR"}]}],
        VisitStartDateTime="2026-01-01",
    )
    assert visits.status_code == 200, visits.text
    strict_redox(visits.json())
    facilities = {v["Location"]["Facility"] for p in visits.json()["Patients"] for v in p["Visits"]}
    assert facilities == {"Quarry Street Clinic"}
    live.close()


def test_connect_registers_a_vault_key_and_writes_the_sync_config(
    sandbox_server: SandboxServer, cli_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "conf" / "connections.yaml"
    command = [*redox_elt(), "sandbox", "connect", "--url", sandbox_server.url, "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, env=cli_env, timeout=120)
    assert done.returncode == 0, done.stderr
    text = out.read_text()
    assert "PRIVATE" not in text and '"d"' not in text and "secret:" not in text  # nothing secret in the file
    document = yaml.safe_load(text)
    meta = httpx.get(f"{sandbox_server.url}/_sandbox/connections", timeout=10).json()
    assert document["token_url"] == meta["token_url"]
    assert [c["id"] for c in document["connections"]] == [c["id"] for c in meta["connections"]]
    for written, served in zip(document["connections"], meta["connections"], strict=True):
        for key in ("fhir_base_url", "datamodel_url", "destination_id", "surfaces", "entities"):
            assert written[key] == served[key], key
    vault_dir = Path(cli_env["REDOX_ELT_HOME"])
    assert (vault_dir / "vault.json").exists()
    assert b"PRIVATE" not in (vault_dir / "vault.json").read_bytes()  # sealed, not plain PEM

    # The config is what `redox-elt sync` reads, and the key it names signs accepted assertions.
    for name in ("HOME", "REDOX_ELT_HOME", "REDOX_ELT_MASTER_KEY"):
        monkeypatch.setenv(name, cli_env[name])
    from resources.auth import OAuthTokenProvider
    from resources.keys import KeyRing
    from resources.settings import load_settings
    from resources.vault import Vault

    settings = load_settings(out)
    ring = KeyRing(Vault(), settings.auth.key_ring)
    with httpx.Client(timeout=10) as http:
        provider = OAuthTokenProvider(settings.token_url, settings.auth.client_id, ring, http)
        assertion = provider.assertion(ring.load().keys[-1])
        live = Live(sandbox_server.url, client_name="someone-else")
        r = live.token_call(assertion)
        assert r.status_code == 200, r.text
        live.close()

    # Connecting again reuses the vault key: the same client, still able to sign.
    again = subprocess.run(command, capture_output=True, text=True, env=cli_env, timeout=120)
    assert again.returncode == 0, again.stderr
    assert yaml.safe_load(out.read_text())["auth"]["client_id"] == settings.auth.client_id
    unreachable = subprocess.run(
        [
            *redox_elt(),
            "sandbox",
            "connect",
            "--url",
            "http://127.0.0.1:9",
            "--out",
            str(tmp_path / "x.yaml"),
        ],
        capture_output=True,
        text=True,
        env=cli_env,
        timeout=120,
    )
    assert unreachable.returncode == 1 and "cannot reach" in unreachable.stderr
