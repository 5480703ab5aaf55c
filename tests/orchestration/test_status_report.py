"""``redox-elt status`` and ``redox-elt report`` against a synced warehouse: the numbers
equal the warehouse's own, nothing identifying a patient reaches the output, and the HTML
page is self-contained and renders in headless Chromium with no console error.

The browser test needs Chromium: Debian's (``apt-get install chromium``; ``.ci/run``
installs it) or Playwright's own (``playwright install chromium``, where downloads work).
Without one it is skipped, saying why."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import duckdb
import pytest

from pipelines.sync import run_sync
from pipelines.warehouse import WarehousePaths
from redox_elt.cli import main
from resources.settings import load_settings
from sandbox.server import SandboxServer
from tests.conftest import sandbox_config
from tests.orchestration.conftest import import_roster, register

FHIR, DM = "northwind-fhir", "lakeside-dm"
PATIENTS = 80


@pytest.fixture(scope="module")
def synced(tmp_path_factory: pytest.TempPathFactory, isolated_home: Path) -> Iterator[tuple[Path, Path]]:
    """(connections file, warehouse file) after one sync of two connections, one of them
    with damaged entries so the quarantine has reasons to show."""
    root = tmp_path_factory.mktemp("status")
    server = SandboxServer(sandbox_config(patients=PATIENTS)).start()
    try:
        config = register(server, root, (FHIR, DM))
        import_roster(server, config, root / "wh")
        server.state.faults.set({"bad_entry_rate": 0.2, "connection": FHIR})
        paths = WarehousePaths.at(root / "wh")
        report = run_sync(load_settings(config), paths, caller="cli")
        assert report.ok, report.failures
        yield config, paths.duckdb
    finally:
        server.stop()


def _phi_values(warehouse: Path) -> set[str]:
    """Every name, identifier and birth date in the warehouse (what must never be shown)."""
    with duckdb.connect(str(warehouse), read_only=True) as con:
        rows = con.execute(
            "SELECT family_name, given_names, mrn, enterprise_id, ehr_id, birth_date::VARCHAR, phone, email "
            "FROM redox.patients"
        ).fetchall()
        ids = con.execute("SELECT id_value FROM redox.patient_identifiers").fetchall()
    values = {str(v) for row in rows for v in row if v is not None} | {str(r[0]) for r in ids}
    return {v for v in values if len(v) >= 4}  # short values (a sex code, "Li") match by accident


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_status_json_matches_the_warehouse_and_shows_no_phi(
    synced: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    config, warehouse = synced
    code, out, err = _run(capsys, "status", "--json", "--config", str(config), "--warehouse", str(warehouse))
    assert code == 0, err
    status = json.loads(out)
    by_id = {c["connection_id"]: c for c in status["connections"]}
    assert list(by_id) == [FHIR, DM]
    with duckdb.connect(str(warehouse), read_only=True) as con:
        for cid, st in by_id.items():
            assert st["last_sync"]["status"] == "success" and st["last_success_at"] is not None
            for entity, n in st["rows"].items():
                assert (
                    n
                    == con.execute(
                        f"SELECT count(*) FROM redox.{entity} WHERE connection_id = ?", [cid]
                    ).fetchone()[0]
                )
            calls = con.execute(
                "SELECT count(*) FROM audit.api_calls WHERE connection_id = ?", [cid]
            ).fetchone()[0]
            assert st["api_calls_24h"]["calls"] == calls > 0
            panel = con.execute(
                "SELECT count(*) FROM ops.patient_panel WHERE connection_id = ?", [cid]
            ).fetchone()[0]
            assert st["panel"]["patients"] == panel > 0
            assert {r["schedule"] for r in st["next_runs"]} == {
                "incremental_sync_ehr",
                "daily_reconciliation",
            }
    assert by_id[FHIR]["quarantine_open"] > 0 and by_id[DM]["quarantine_open"] == 0
    assert status["quota"]["used"] > 0 and status["quota"]["requests"] >= status["quota"]["used"]

    code, text, err = _run(capsys, "status", "--config", str(config), "--warehouse", str(warehouse))
    assert code == 0, err
    assert all(len(line) <= 80 for line in text.splitlines()), text
    assert "incremental_sync_ehr" in text and f"{FHIR} (ehr)" in text
    leaked = [v for v in _phi_values(warehouse) if v in out or v in text]
    assert not leaked, f"{len(leaked)} identifying values in the status output"


def test_status_without_a_warehouse_is_one_line_exit_2(
    synced: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config, _ = synced
    code, out, err = _run(
        capsys, "status", "--config", str(config), "--warehouse", str(tmp_path / "none.duckdb")
    )
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and "run redox-elt sync first" in err
    assert not (tmp_path / "none.duckdb").exists()


def test_the_report_is_one_self_contained_page_without_phi(
    synced: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config, warehouse = synced
    out_dir = tmp_path / "report"
    code, out, err = _run(
        capsys, "report", "--out", str(out_dir), "--config", str(config), "--warehouse", str(warehouse)
    )
    assert code == 0, err
    page = (out_dir / "index.html").read_text()
    assert [p.name for p in out_dir.iterdir()] == ["index.html"]
    # Nothing to fetch: no script, stylesheet, image or font from anywhere.
    assert not re.search(r"<script|<link|<img|@import|url\(", page)
    assert set(re.findall(r"https?://[^\"' )<]+", page)) <= {"http://www.w3.org/2000/svg"}
    assert page.count("<svg") >= 6
    # The charts carry the warehouse's numbers: each connection's rows and a quarantine reason.
    with duckdb.connect(str(warehouse), read_only=True) as con:
        # The most frequent open reason overall: the chart shows open entries, most first.
        reason = con.execute(
            "SELECT reason FROM raw.quarantine WHERE resolved_at IS NULL "
            "GROUP BY connection_id, entity, reason ORDER BY count(*) DESC, "
            "connection_id || ' ' || entity || ': ' || reason LIMIT 1"
        ).fetchone()[0]
        published = con.execute(
            "SELECT published_rows FROM ops.sync_runs WHERE connection_id = ? ORDER BY finished_at DESC LIMIT 1",
            [DM],
        ).fetchone()[0]
    assert reason[:40].replace("&", "&amp;").replace("<", "&lt;") in page
    assert f"{DM}: {published:,}" in page
    leaked = [v for v in _phi_values(warehouse) if v in page]
    assert not leaked, f"{len(leaked)} identifying values in the report"


def _browser_path() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


def test_the_report_renders_in_headless_chromium_without_console_errors(
    synced: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="playwright is not installed (pip install -e '.[dev]')"
    )
    config, warehouse = synced
    out_dir = tmp_path / "report"
    assert (
        _run(capsys, "report", "--out", str(out_dir), "--config", str(config), "--warehouse", str(warehouse))[
            0
        ]
        == 0
    )
    executable = _browser_path()
    problems: list[str] = []
    with sync_api.sync_playwright() as pw:
        try:
            browser = pw.chromium.launch(
                executable_path=executable,
                args=[
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-background-networking",
                    "--disable-component-update",
                ],
            )
        except sync_api.Error as exc:
            pytest.skip(
                f"no Chromium to run (apt-get install chromium, or playwright install chromium): {str(exc).splitlines()[0]}"
            )
        try:
            page = browser.new_page(viewport={"width": 800, "height": 1200})
            page.on(
                "console",
                lambda m: (
                    problems.append(f"console {m.type}: {m.text}") if m.type in ("error", "warning") else None
                ),
            )
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url}"))
            requests: list[str] = []
            page.on("request", lambda r: requests.append(r.url))
            page.goto((out_dir / "index.html").as_uri(), wait_until="load")
            charts = page.locator("svg.chart")
            assert charts.count() >= 6
            # Every chart is laid out with a real size (an SVG that failed to parse has none).
            for i in range(charts.count()):
                box = charts.nth(i).bounding_box()
                assert box is not None and box["width"] > 100 and box["height"] > 20
            assert page.locator("h1").inner_text() == "redox-elt report"
        finally:
            browser.close()
    assert not problems, problems
    assert requests == [(out_dir / "index.html").as_uri()], requests
