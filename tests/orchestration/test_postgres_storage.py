"""The documented production instance config (dagster.postgres.yaml) against a real
PostgreSQL server started for the test: runs, materializations, dynamic partitions and
the pool config all live in Postgres. Skips, saying why, when no server can be started."""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
POSTGRES_CONFIG = REPO / "dagster.postgres.yaml"
PG_BIN_DIRS = sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)


def _pg_tool(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for directory in PG_BIN_DIRS:
        if (directory / name).exists():
            return str(directory / name)
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_server_user() -> tuple[list[str], str | None]:
    """PostgreSQL refuses to run as root: run its tools as the ``postgres`` user then."""
    if os.geteuid() != 0:
        return [], None
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        pytest.skip("running as root and no 'postgres' user exists to run the PostgreSQL server as")
    runuser = shutil.which("runuser")
    if runuser is None:
        pytest.skip("running as root without runuser: cannot start PostgreSQL as another user")
    return [runuser, "-u", "postgres", "--"], "postgres"


@pytest.fixture
def postgres(tmp_path: Path) -> Iterator[dict[str, str]]:
    pytest.importorskip(
        "dagster_postgres", reason="dagster-postgres is not installed (pin dagster-postgres==0.29.27)"
    )
    initdb, pg_ctl = _pg_tool("initdb"), _pg_tool("pg_ctl")
    if not initdb or not pg_ctl:
        pytest.skip("no PostgreSQL server binaries (initdb/pg_ctl) on PATH or in /usr/lib/postgresql/*/bin")
    prefix, user = _as_server_user()
    # Not under tmp_path: pytest's base temp dir is private to its owner, and the server may
    # run as another user.
    root = Path(tempfile.mkdtemp(prefix="redox-elt-pg-"))
    if user:
        shutil.chown(root, user)
    data, port = root / "data", _free_port()
    env = dict(os.environ, LC_ALL="C")
    made = subprocess.run(
        [*prefix, initdb, "-D", str(data), "-U", "dagster", "--auth=trust", "--no-sync"],
        capture_output=True,
        env=env,
        cwd=root,
    )
    if made.returncode != 0:
        shutil.rmtree(root, ignore_errors=True)
        pytest.fail(f"initdb failed: {made.stderr.decode()[-400:]}")
    started = subprocess.run(
        [
            *prefix,
            pg_ctl,
            "-D",
            str(data),
            "-l",
            str(root / "server.log"),
            "-w",
            "-t",
            "60",
            "start",
            "-o",
            f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off",
        ],
        capture_output=True,
        env=env,
        cwd=root,
    )
    if started.returncode != 0:
        log = (root / "server.log").read_text() if (root / "server.log").exists() else ""
        pytest.fail(f"PostgreSQL did not start: {started.stderr.decode()[-300:]} {log[-300:]}")
    try:
        subprocess.run(
            [
                *prefix,
                _pg_tool("createdb") or "createdb",
                "-h",
                "127.0.0.1",
                "-p",
                str(port),
                "-U",
                "dagster",
                "dagster",
            ],
            check=True,
            capture_output=True,
            env=env,
            cwd=root,
        )
        yield {
            "DAGSTER_PG_HOST": "127.0.0.1",
            "DAGSTER_PG_PORT": str(port),
            "DAGSTER_PG_USER": "dagster",
            "DAGSTER_PG_PASSWORD": "",
            "DAGSTER_PG_DB": "dagster",
        }
    finally:
        subprocess.run(
            [*prefix, pg_ctl, "-D", str(data), "-m", "immediate", "stop"],
            capture_output=True,
            env=env,
            cwd=root,
        )
        shutil.rmtree(root, ignore_errors=True)


def test_the_postgres_instance_config_stores_runs_partitions_and_materializations(
    postgres: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dagster import DagsterInstance, materialize
    from dagster_postgres import PostgresEventLogStorage, PostgresRunStorage

    from assets.partitions import CONNECTIONS_PARTITIONS_NAME
    from assets.resources import WarehouseResource
    from tests.orchestration.conftest import SYNC_ASSETS

    persons = SYNC_ASSETS.persons

    for key, value in postgres.items():
        monkeypatch.setenv(key, value)
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(POSTGRES_CONFIG, home / "dagster.yaml")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    assert "postgres" in yaml.safe_load(POSTGRES_CONFIG.read_text())["storage"]

    with DagsterInstance.get() as instance:
        assert isinstance(instance.run_storage, PostgresRunStorage)
        assert isinstance(instance.event_log_storage, PostgresEventLogStorage)
        assert instance.get_concurrency_config().pool_config.default_pool_limit == 1
        instance.add_dynamic_partitions(CONNECTIONS_PARTITIONS_NAME, ["northwind-fhir"])
        result = materialize(
            [persons],
            instance=instance,
            resources={"warehouse": WarehouseResource(path=str(tmp_path / "wh"))},
        )
        assert result.success
        run_id = result.run_id

    # A second instance (another process in production) reads it all back from Postgres.
    with DagsterInstance.get() as again:
        assert again.get_run_by_id(run_id).is_success
        assert again.get_dynamic_partitions(CONNECTIONS_PARTITIONS_NAME) == ["northwind-fhir"]
        event = again.get_latest_materialization_event(persons.key)
        assert event is not None and event.run_id == run_id
