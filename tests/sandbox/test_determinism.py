"""Same seed -> byte-identical data over HTTP; different seed -> different data.

Two real servers answer the same requests and the raw response bytes are compared. A few
fields are volatile by design and are blanked (by value, in the raw bytes) before comparing:

- FHIR: the server's own base URL (``http://127.0.0.1:<port>``) in ``fullUrl`` and links.
- FHIR Bundles: ``Bundle.id`` (a fresh UUID per response), ``Bundle.meta.lastUpdated`` (the
  wall-clock time the Bundle was assembled) and the opaque ``_page_token`` in ``self`` /
  ``next`` links (random, so a token cannot be guessed).
- Data Model: ``Meta.Logs[].ID`` / ``AttemptID`` (fresh per request, as in Redox) and
  ``Meta.Message.ID`` / ``Meta.Transmission.ID`` (counters shared by every server in one
  process).

Everything else — every resource, every record, every identifier and timestamp — must match
byte for byte.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import orjson
import pytest

from sandbox.server import SandboxServer
from tests.sandbox.test_server_e2e import Live, Receiver, next_link, wait_until_delivered

PAGE_TOKEN = re.compile(rb"_page_token=[A-Za-z0-9_\-]+")


def fhir_bytes(response: httpx.Response) -> bytes:
    """The raw Bundle/resource bytes with the volatile values blanked."""
    assert response.status_code == 200, response.text[:300]
    # Absolute URLs carry each server's own port.
    base = f"{response.request.url.scheme}://{response.request.url.netloc.decode()}"
    raw = response.content.replace(base.encode(), b"<base-url>")
    doc = orjson.loads(raw)
    if doc["resourceType"] == "Bundle":
        raw = raw.replace(doc["id"].encode(), b"<bundle-id>", 1)
        raw = raw.replace(orjson.dumps(doc["meta"]["lastUpdated"]), b'"<assembled-at>"', 1)
        raw = PAGE_TOKEN.sub(b"_page_token=<token>", raw)
    return raw


def dm_bytes(response: httpx.Response) -> bytes:
    assert response.status_code == 200, response.text[:300]
    raw = response.content
    meta = orjson.loads(raw)["Meta"]
    for log in meta.get("Logs", []):
        raw = raw.replace(log["ID"].encode(), b"<log-id>").replace(log["AttemptID"].encode(), b"<attempt-id>")
    for counter in ("Message", "Transmission"):
        if counter in meta:
            raw = raw.replace(
                f'"{counter}":{{"ID":{meta[counter]["ID"]}}}'.encode(), f'"{counter}":<id>'.encode()
            )
    return raw


def fhir_transcript(live: Live, conn_id: str) -> list[bytes]:
    """Searches the Redox way, as blanked bytes: a patient from the roster by identifier with its
    records per type, an Encounter date window and its second page, and a read."""
    out = []
    roster = live.http.get(f"{live.url}/_sandbox/roster", params={"connection": conn_id}).json()["patients"]
    ident = roster[len(roster) // 2]
    patient = live.fhir_search(conn_id, "Patient", {"identifier": f"{ident['system']}|{ident['value']}"})
    out.append(fhir_bytes(patient))
    patient_id = orjson.loads(patient.content)["entry"][0]["resource"]["id"]
    for rtype in ("Observation", "Encounter", "MedicationRequest", "Appointment", "DocumentReference"):
        out.append(fhir_bytes(live.fhir_search(conn_id, rtype, {"patient": patient_id, "_count": "20"})))
    first = live.fhir_search(conn_id, "Encounter", {"date": "ge2000-01-01", "_count": "50"})
    out.append(fhir_bytes(first))
    out.append(fhir_bytes(live.http.post(next_link(first.json()), headers=live.bearer())))
    out.append(fhir_bytes(live.fhir_search(conn_id, "Encounter", {"date": "ge2026-01-01", "_count": "20"})))
    out.append(fhir_bytes(live.fhir_read(conn_id, "Patient", patient_id)))
    return out


def dm_transcript(live: Live, conn_id: str) -> list[bytes]:
    record = next(r for p in live.truth()["persons"] for r in p["records"] if r["connection_id"] == conn_id)
    ident = [{"ID": record["mrn"], "IDType": "MR"}]
    patients = [{"Identifiers": ident}]
    asks: list[tuple[str, str, dict[str, Any]]] = [
        ("PatientSearch", "Query", {"Patient": {"Identifiers": ident}}),
        ("PatientAdmin", "VisitQuery", {"Patients": patients, "VisitStartDateTime": "2026-01-01"}),
        ("Results", "Query", {"Patients": patients, "LastUpdated": {"StartDateTime": "2026-06-01"}}),
        ("Scheduling", "Booked", {"StartDateTime": "2026-10-01", "EndDateTime": "2026-12-01"}),
        ("Scheduling", "AvailableSlots", {"StartDateTime": "2026-11-02", "EndDateTime": "2026-11-06"}),
        ("PatientAdmin", "CensusQuery", {}),
        ("Clinical Summary", "PatientQuery", {"Patient": {"Identifiers": ident}}),
        ("Notes", "Query", {"Patients": patients}),
    ]
    return [dm_bytes(live.dm(conn_id, model, event, **body)) for model, event, body in asks]


@pytest.fixture
def pair(sandbox_factory: Callable[..., SandboxServer]) -> Iterator[tuple[Live, Live]]:
    one, two = Live(sandbox_factory().url), Live(sandbox_factory().url)
    yield one, two
    one.close()
    two.close()


def test_same_seed_serves_byte_identical_fhir(pair: tuple[Live, Live]) -> None:
    one, two = pair
    for conn_id in ("northwind-fhir", "riverbend-both"):
        a, b = fhir_transcript(one, conn_id), fhir_transcript(two, conn_id)
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert x == y, f"{conn_id}: response {i} differs"


def test_same_seed_serves_byte_identical_data_model(pair: tuple[Live, Live]) -> None:
    one, two = pair
    for conn_id in ("lakeside-dm", "riverbend-both"):
        for i, (x, y) in enumerate(
            zip(dm_transcript(one, conn_id), dm_transcript(two, conn_id), strict=True)
        ):
            assert x == y, f"{conn_id}: query {i} differs"


def test_same_seed_advances_identically_and_pushes_identical_events(pair: tuple[Live, Live]) -> None:
    one, two = pair
    receivers = [Receiver(), Receiver()]
    try:
        for live, receiver in zip(pair, receivers, strict=True):
            r = live.http.post(f"{live.url}/_sandbox/webhooks", json={"url": receiver.url, "token": "vt"})
            assert r.status_code == 200
        moves = [live.advance(2, 0.05) for live in pair]
        assert moves[0] == moves[1]
        stats = [wait_until_delivered(live) for live in pair]
        assert stats[0] == stats[1] and stats[0]["distinct_sent"] > 0
        events = []
        for live, receiver, s in zip(pair, receivers, stats, strict=True):
            payloads = receiver.wait_for(s["distinct_sent"])
            for payload in payloads:
                for volatile in ("Logs", "Message", "Transmission"):
                    payload.get("Meta", {}).pop(volatile, None)  # FHIR notifications have no Meta
            # FHIR notifications name the server's own base URL (its port differs).
            events.append([orjson.dumps(p).replace(live.url.encode(), b"BASE") for p in payloads])
        assert events[0] == events[1]
        truths = [live.http.get(f"{live.url}/_sandbox/truth").content for live in pair]
        assert truths[0] == truths[1]
        # After the same advance, reads still agree byte for byte.
        assert fhir_transcript(one, "northwind-fhir") == fhir_transcript(two, "northwind-fhir")
    finally:
        for receiver in receivers:
            receiver.close()


def test_different_seed_serves_different_data(sandbox_factory: Callable[..., SandboxServer]) -> None:
    one, other = Live(sandbox_factory().url), Live(sandbox_factory(seed=8).url)
    try:
        a, b = fhir_transcript(one, "northwind-fhir"), fhir_transcript(other, "northwind-fhir")
        assert all(x != y for x, y in zip(a, b, strict=True))
        assert one.truth()["persons"] != other.truth()["persons"]
        ids = [
            {
                e["resource"]["id"]
                for e in live.fhir_search(
                    "riverbend-both", "Encounter", {"_count": "500", "date": "ge2000-01-01"}
                ).json()["entry"]
            }
            for live in (one, other)
        ]
        assert not ids[0] & ids[1]
    finally:
        one.close()
        other.close()
