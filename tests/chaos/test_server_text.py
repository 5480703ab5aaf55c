"""Server text never reaches the output (issue 14, item 4), end to end.

A loopback server answers every FHIR search with a partial failure whose OperationOutcome
``severity``/``code``/``diagnostics`` carry a patient's name and MRN, and every Data Model
query with ``Meta.Errors`` whose ``Type``/``Module``/``Text`` carry them. ``redox-elt sync``
runs as a real subprocess with ``DAGSTER_HOME`` set (run storage and compute logs on disk),
then the name and the MRN are looked for everywhere the run writes outside the raw landing:
stdout, stderr, ``ops.sync_runs``, the warehouse folder, the Dagster instance, the home folder.
"""

from __future__ import annotations

import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import duckdb
import pytest
import yaml

NAME = "Quenby Zarathustrine"
MRN = "MRN55501234"
HOSTILE = f"{NAME} {MRN}"
ROOT = Path(__file__).resolve().parents[2]


class Hostile(http.server.BaseHTTPRequestHandler):
    """Tokens for anyone; every clinical answer a partial failure carrying PHI in code fields."""

    def log_message(self, *args: object) -> None:  # quiet test output
        pass

    def _send(self, status: int, body: object) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        if self.path.endswith("/auth/token"):
            self._send(200, {"access_token": "tok", "token_type": "bearer", "expires_in": 300})
            return
        try:
            meta = json.loads(raw).get("Meta") or {}
        except ValueError:
            meta = {}
        self._send(
            200,
            {
                "Meta": {
                    "DataModel": meta.get("DataModel", "PatientAdmin"),
                    "EventType": meta.get("EventType", "VisitQuery"),
                    "Errors": [{"ID": 1, "Text": HOSTILE, "Type": HOSTILE, "Module": NAME}],
                }
            },
        )

    def do_GET(self) -> None:  # noqa: N802
        outcome = {
            "resourceType": "OperationOutcome",
            "issue": [{"severity": NAME, "code": HOSTILE, "diagnostics": f"no record for {HOSTILE}"}],
        }
        self._send(
            200,
            {
                "resourceType": "Bundle",
                "type": "searchset",
                "entry": [{"resource": outcome, "search": {"mode": "outcome"}}],
            },
        )


@pytest.fixture
def hostile_server() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hostile)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def write_config(url: str, path: Path) -> None:
    def conn(cid: str, surfaces: list[str]) -> dict:
        return {
            "id": cid,
            "kind": "ehr",
            "surfaces": surfaces,
            "entities": ["patients", "encounters", "results"],
            "fhir_base_url": f"{url}/fhir/R4/hostile/Development" if "fhir" in surfaces else None,
            "datamodel_url": f"{url}/endpoint" if "datamodel" in surfaces else None,
            "destination_id": "00000000-0000-4000-8000-000000000001",
            "destination_slug": "hostile",
            "timeout_s": 10.0,
        }

    doc = {
        "organization": "Hostile Org",
        "environment": "Development",
        "token_url": f"{url}/v2/auth/token",
        "auth": {"client_id": "client-1", "key_ring": "signing-keys"},
        "connections": [conn("hostile-fhir", ["fhir"]), conn("hostile-dm", ["datamodel"])],
        "audit": {"path": "audit/api_calls.jsonl"},
    }
    path.write_text(yaml.safe_dump(doc))


def files_holding(root: Path, needles: tuple[str, ...], skip: tuple[str, ...] = ()) -> list[str]:
    hits = []
    for p in root.rglob("*"):
        if not p.is_file() or any(part in skip for part in p.parts):
            continue
        data = p.read_bytes()
        if any(n.encode() in data for n in needles):
            hits.append(str(p.relative_to(root)))
    return hits


def test_server_text_with_phi_never_reaches_any_output(hostile_server: str, tmp_path: Path) -> None:
    home = tmp_path / "home"
    redox_home = home / ".redox-elt"
    dagster_home = tmp_path / "dagster_home"
    dagster_home.mkdir()
    shutil.copy(ROOT / "dagster.yaml", dagster_home / "dagster.yaml")
    env = {
        **os.environ,
        "HOME": str(home),
        "REDOX_ELT_HOME": str(redox_home),
        "DAGSTER_HOME": str(dagster_home),
    }
    env.pop("REDOX_ELT_CONFIG", None)
    from resources.keys import KeyRing
    from resources.vault import Vault

    KeyRing(Vault(redox_home, master_key="chaos-master-key-0123456789abcdef"), "signing-keys").generate()
    env["REDOX_ELT_MASTER_KEY"] = "chaos-master-key-0123456789abcdef"
    cfg = tmp_path / "c.yaml"
    write_config(hostile_server, cfg)
    wh_dir = tmp_path / "data"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "redox_elt.cli",
            "-v",
            "sync",
            "--config",
            str(cfg),
            "--warehouse",
            str(wh_dir / "w.duckdb"),
        ],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1, (done.returncode, done.stderr[-500:])  # both connections failed
    needles = (NAME, MRN, "Quenby", "Zarathustrine")
    for stream in (done.stdout, done.stderr):
        assert not any(n in stream for n in needles)
        assert "Traceback (most recent call last)" not in stream or "dagster" in stream
    with duckdb.connect(str(wh_dir / "w.duckdb"), read_only=True) as con:
        runs = con.execute("SELECT connection_id, status, error FROM ops.sync_runs ORDER BY 1").fetchall()
    assert [(c, s) for c, s, _ in runs] == [("hostile-dm", "failed"), ("hostile-fhir", "failed")]
    # The failure is named by the pipeline's words and the whitelisted codes only.
    assert all("partial failure" in (e or "") or "unrecognized" in (e or "") for _, _, e in runs), runs
    assert not any(n in (e or "") for _, _, e in runs for n in needles), runs
    # Everything the run wrote: the warehouse folder (the raw landing holds what a server sent,
    # by design), the Dagster instance (run storage, event logs, compute logs) and the home folder.
    assert files_holding(wh_dir, needles, skip=("w.landing",)) == []
    assert files_holding(dagster_home, needles) == []
    assert files_holding(home, needles) == []
