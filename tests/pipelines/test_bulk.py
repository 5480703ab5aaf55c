"""Bulk backfill: the FHIR Bulk Data flow (kick-off, polling, manifest, NDJSON behind the token)
against a small loopback export server, run through dlt into a temporary DuckDB; and, where the
sandbox offers ``bulk_export``, a first sync that equals truth."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import dlt
import duckdb
import httpx
import orjson
import pytest

from pipelines import panel as P
from pipelines.access import extract_connection
from pipelines.landing import RawLanding
from pipelines.warehouse import WarehousePaths

TOKEN = "test-token"
TX = "2026-11-01T00:00:00Z"


def _patient(i: int) -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "id": f"p{i}",
        "meta": {"lastUpdated": TX},
        "identifier": [{"system": "urn:redox:bulk-clinic:MR", "value": f"MRN{i:04d}"}],
        "name": [{"family": "Test", "given": ["Pat"]}],
        "gender": "female",
        "birthDate": "1980-01-01",
    }


def _encounter(i: int, p: int) -> dict[str, Any]:
    return {
        "resourceType": "Encounter",
        "id": f"e{i}",
        "meta": {"lastUpdated": TX},
        "identifier": [{"system": "urn:redox:bulk-clinic:VN", "value": f"V{i}"}],
        "status": "finished",
        "class": {"code": "AMB"},
        "subject": {"reference": f"Patient/p{p}"},
        "period": {"start": "2026-10-01T10:00:00Z", "end": "2026-10-01T11:00:00Z"},
    }


@dataclass
class ExportServer:
    """Kick-off → 202 Content-Location → two 202 polls (Retry-After, X-Progress) → manifest."""

    patients: int = 12
    polls_before_done: int = 2
    seen: list[str] = field(default_factory=list)

    def start(self) -> ExportServer:
        outer = self
        files = {
            "Patient": b"\n".join(orjson.dumps(_patient(i)) for i in range(self.patients)) + b"\n",
            "Encounter": b"\n".join(orjson.dumps(_encounter(i, i % self.patients)) for i in range(30)),
        }
        polls = {"n": 0}

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a: Any) -> None:
                pass

            def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
                self.send_response(status)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:  # noqa: N802 - http.server API
                outer.seen.append(self.path.split("?")[0])
                if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                    return self._send(401)
                if "/$export" in self.path:
                    if self.headers.get("Prefer") != "respond-async":
                        return self._send(400)
                    return self._send(202, headers={"Content-Location": f"{outer.base}/bulk-status/1"})
                if self.path.startswith("/fhir/bulk-status/1"):
                    polls["n"] += 1
                    if polls["n"] <= outer.polls_before_done:
                        return self._send(202, headers={"Retry-After": "0", "X-Progress": "working"})
                    manifest = {
                        "transactionTime": TX,
                        "request": f"{outer.base}/Group/bulk-clinic/$export",
                        "requiresAccessToken": True,
                        "output": [{"type": t, "url": f"{outer.base}/bulk-files/{t}.ndjson"} for t in files],
                        "error": [],
                    }
                    return self._send(200, orjson.dumps(manifest), {"Content-Type": "application/json"})
                if self.path.startswith("/fhir/bulk-files/"):
                    rtype = self.path.rsplit("/", 1)[1].split(".")[0]
                    return self._send(200, files[rtype], {"Content-Type": "application/fhir+ndjson"})
                return self._send(404)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}/fhir"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@dataclass
class FakeConn:
    id: str = "bulk-clinic"
    kind: str = "ehr"
    surfaces: tuple[str, ...] = ("fhir",)
    entities: tuple[str, ...] = ("patients", "encounters")
    fhir_base_url: str = ""
    destination_slug: str = "bulk-clinic"
    headers: dict[str, str] = field(default_factory=dict)
    page_size: int | None = None
    bulk_export: bool = True
    refresh_days: int = 7


class FakeClient:
    """The part of RedoxClient the bulk path uses: ``fhir_bulk_get`` (token, audit)."""

    def __init__(self, conn: FakeConn) -> None:
        self.conn = conn
        self.http = httpx.Client(timeout=10)
        self.audited: list[tuple[str, int]] = []

    def fhir_bulk_get(
        self,
        url: str,
        *,
        kickoff: bool = False,
        accept: str = "application/fhir+json",
        priority: str | None = None,
    ) -> httpx.Response:
        headers = {"Accept": accept, "Authorization": f"Bearer {TOKEN}"}
        if kickoff:
            headers["Prefer"] = "respond-async"
        response = self.http.get(url, headers=headers)
        kind = "kick-off" if kickoff else ("file" if "ndjson" in accept else "status")
        self.audited.append((f"bulk export {kind}", response.status_code))
        return response


@pytest.fixture
def export_server():
    server = ExportServer().start()
    yield server
    server.stop()


def test_bulk_backfill_lands_ndjson_and_fills_the_panel(export_server: ExportServer, tmp_path: Path) -> None:
    conn = FakeConn(fhir_base_url=export_server.base)
    client = FakeClient(conn)
    paths = WarehousePaths.at(tmp_path / "redox.duckdb")
    landing = RawLanding(paths.landing_root)
    extract = extract_connection(client, conn, landing, paths)
    assert extract.stats.mode == "bulk"
    pipeline = dlt.pipeline(
        pipeline_name="bulk_test",
        destination=dlt.destinations.duckdb(str(paths.duckdb)),
        dataset_name="raw",
        pipelines_dir=str(paths.dlt_dir),
    )
    pipeline.run(extract.sources)
    counts = extract.finish(paths)
    assert counts["bulk_patients"] == export_server.patients and counts["bulk_files"] == 2
    with duckdb.connect(str(paths.duckdb)) as con:
        assert con.execute("select count(*) from raw.fhir_patients").fetchone()[0] == export_server.patients
        assert con.execute("select count(*) from raw.fhir_encounters").fetchone()[0] == 30
        stats = P.panel_stats(con, [conn.id])[conn.id]
        assert stats["patients"] == export_server.patients and stats["found_by"] == {
            "bulk": export_server.patients
        }
        assert stats["due"] == 0 and stats["never_pulled"] == 0
        assert stats["oldest_pull_at"].startswith("2026-11-01T00:00:00")
        assert P.get_capability(con, conn.id, "bulk_backfill") is not None
    # Polled until done, files fetched behind the token; landed pages read like any FHIR page.
    assert [op for op, _ in client.audited].count("bulk export status") == 3
    pages = list(landing.pages(conn.id, "fhir"))
    assert pages and all(orjson.loads(landing.read(p.raw_ref))["resourceType"] == "Bundle" for p in pages)

    # Once the backfill completed, the next sync is a panel sync (no second export).
    class NoCalls(FakeClient):
        def fhir_search_pages(self, *a: Any, **k: Any):
            return iter(())

    later = extract_connection(NoCalls(conn), conn, landing, paths, now=datetime(2026, 11, 2, tzinfo=UTC))
    assert later.stats.mode == "panel" and later.stats.due == 0


def test_sandbox_bulk_export_first_sync_equals_truth(sandbox_factory, tmp_path: Path, monkeypatch) -> None:
    from dataclasses import replace

    from sandbox.config import default_connections
    from tests.pipelines.test_patient_pull import connect, published_counts, sync_one, truth

    bulk = "northwind-fhir"
    server = sandbox_factory(
        connections=[replace(c, bulk_export=True) if c.id == bulk else c for c in default_connections()]
    )
    meta = httpx.get(f"{server.url}/_sandbox/connections", timeout=30).json()["connections"]
    assert [c["id"] for c in meta if c.get("bulk_export")] == [bulk]
    entitled = [bulk]
    monkeypatch.setenv("REDOX_ELT_MASTER_KEY", "bulk-test-master-key")
    monkeypatch.setenv("REDOX_ELT_HOME", str(tmp_path / "home"))
    settings = connect(server, tmp_path / "home")
    conn = settings.connection(entitled[0])
    assert conn.bulk_export, "sandbox connect copies bulk_export"
    paths = WarehousePaths.at(tmp_path / "wh" / "redox.duckdb")
    extract = sync_one(settings, conn.id, paths)
    assert extract.stats.mode == "bulk"
    want = truth(server)["counts"][conn.id]
    assert published_counts(paths, conn.id) == {e: want.get(e, 0) for e in want}
    with duckdb.connect(str(paths.duckdb)) as con:
        stats = P.panel_stats(con, [conn.id])[conn.id]
    assert stats["found_by"].get("bulk") == want["patients"]
