"""End-to-end check of a UI backfill: start ``dagster dev`` from the repository root on a
free port (fresh DAGSTER_HOME, warehouse and vault in a temp dir, no REDOX_ELT_CONFIG, so
runs use the embedded sandbox), launch a backfill of N days x M connections through the
GraphQL API exactly as the UI does, wait for it, then compare the warehouse with the
sandbox's truth for that window.

    python scripts/dagster_backfill_check.py [--days 7] [--patients 200] [--end 2026-10-21]

Prints one line per connection and exits non-zero on any mismatch. Counts only, no PHI.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from assets.partitions import CONNECTIONS_PARTITIONS_NAME, partition_key  # noqa: E402
from sandbox.app import build_state  # noqa: E402
from sandbox.config import load_config  # noqa: E402
from sandbox.population.store import Query  # noqa: E402

ENTITIES = ("patients", "encounters", "results", "medications", "appointments", "documents")
# The FHIR connection filters on last-updated, so its window is comparable with the truth
# row for row; the Data Model connection is checked for a successful windowed sync.
FHIR_CONNECTION, DM_CONNECTION = "northwind-fhir", "lakeside-dm"

ADD_PARTITION = """
mutation($repo: RepositorySelector!, $name: String!, $key: String!) {
  addDynamicPartition(repositorySelector: $repo, partitionsDefName: $name, partitionKey: $key) {
    __typename ... on PythonError { message }
  }
}"""
LAUNCH = """
mutation($params: LaunchBackfillParams!) {
  launchPartitionBackfill(backfillParams: $params) {
    __typename
    ... on LaunchBackfillSuccess { backfillId }
    ... on PythonError { message }
    ... on InvalidSubsetError { message }
  }
}"""
STATUS = """
query($id: String!) {
  partitionBackfillOrError(backfillId: $id) {
    __typename ... on PartitionBackfill { status numPartitions }
  }
  runsOrError(filter: {tags: [{key: "dagster/backfill", value: $id}]}) {
    ... on Runs { results { runId status tags { key value } } }
  }
}"""
PARTITIONED_ASSETS = "{ assetNodes { assetKey { path } isPartitioned } }"
REPOS = "{ repositoriesOrError { ... on RepositoryConnection { nodes { name location { name } } } } }"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def graphql(url: str, query: str, variables: dict[str, Any] | None = None) -> dict[str, Any]:
    response = httpx.post(f"{url}/graphql", json={"query": query, "variables": variables or {}}, timeout=30)
    body = response.json()
    if body.get("errors"):
        raise RuntimeError(f"GraphQL error: {body['errors'][0].get('message', '')[:300]}")
    return body["data"]


def wait_for_code_location(url: str, proc: subprocess.Popen[bytes], timeout_s: float) -> dict[str, str]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("dagster dev exited before serving")
        try:
            nodes = graphql(url, REPOS)["repositoriesOrError"].get("nodes") or []
            if nodes:
                return {
                    "repositoryName": nodes[0]["name"],
                    "repositoryLocationName": nodes[0]["location"]["name"],
                }
        except (httpx.HTTPError, ValueError, RuntimeError):
            pass
        time.sleep(1)
    raise RuntimeError(f"dagster dev did not serve the code location within {timeout_s:.0f} s")


def truth(patients: int, connection_id: str, start: datetime, end: datetime) -> dict[str, int]:
    store = build_state(load_config(None, patients=patients)).store
    return {e: store.count(Query(connection_id, e, updated_ge=start, updated_lt=end)) for e in ENTITIES}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--days", type=int, default=7)
    parser.add_argument("--patients", type=int, default=200)
    parser.add_argument(
        "--end", default="2026-10-21", help="first day after the window (the sandbox clock is 2026-11-01)"
    )
    parser.add_argument("--timeout", type=float, default=600.0)
    args = parser.parse_args(argv)
    end_day = date.fromisoformat(args.end)
    days = [end_day - timedelta(days=i) for i in range(args.days, 0, -1)]
    connections = [FHIR_CONNECTION, DM_CONNECTION]

    work = Path(tempfile.mkdtemp(prefix="redox-elt-backfill-"))
    home = work / "dagster_home"
    home.mkdir()
    shutil.copy(REPO / "dagster.yaml", home / "dagster.yaml")
    warehouse = work / "warehouse"
    env = {k: v for k, v in os.environ.items() if k != "REDOX_ELT_CONFIG"}
    env.update(
        DAGSTER_HOME=str(home),
        REDOX_ELT_WAREHOUSE=str(warehouse),
        REDOX_ELT_HOME=str(work / "redox-home"),
        REDOX_ELT_SANDBOX_PATIENTS=str(args.patients),
    )
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = work / "dagster-dev.log"
    started = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "dagster", "dev", "-p", str(port), "-h", "127.0.0.1"],
        cwd=REPO,
        env=env,
        stdout=log_path.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        repo = wait_for_code_location(url, proc, 180)
        print(f"dagster dev serving on {url} after {time.monotonic() - started:.1f} s")
        for connection_id in connections:
            graphql(
                url, ADD_PARTITION, {"repo": repo, "name": CONNECTIONS_PARTITIONS_NAME, "key": connection_id}
            )
        names = [str(partition_key(c, d)) for c in connections for d in days]
        # Every connection x day partitioned asset: what "Materialize all" selects in the UI.
        selection = [
            {"path": n["assetKey"]["path"]}
            for n in graphql(url, PARTITIONED_ASSETS)["assetNodes"]
            if n["isPartitioned"]
        ]
        launched = graphql(
            url,
            LAUNCH,
            {"params": {"partitionNames": names, "assetSelection": selection, "fromFailure": False}},
        )["launchPartitionBackfill"]
        if launched["__typename"] != "LaunchBackfillSuccess":
            raise RuntimeError(
                f"backfill not launched: {launched.get('message', launched['__typename'])[:300]}"
            )
        backfill_id = launched["backfillId"]
        print(
            f"backfill {backfill_id}: {len(names)} partitions ({len(connections)} connections x {len(days)} days)"
        )
        deadline = time.monotonic() + args.timeout
        while True:
            data = graphql(url, STATUS, {"id": backfill_id})
            status = data["partitionBackfillOrError"]["status"]
            runs = data["runsOrError"]["results"]
            if status in ("COMPLETED", "COMPLETED_SUCCESS", "COMPLETED_FAILED", "FAILED", "CANCELED"):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"backfill still {status} after {args.timeout:.0f} s")
            time.sleep(2)
        print(
            f"backfill {status} in {time.monotonic() - started:.1f} s with {len(runs)} run(s): "
            + ", ".join(r["status"] for r in runs)
        )
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)

    problems: list[str] = []
    if any(r["status"] != "SUCCESS" for r in runs):
        problems.append(f"not every run succeeded (log: {log_path})")
    start = datetime.combine(days[0], datetime.min.time(), UTC)
    stop = datetime.combine(end_day, datetime.min.time(), UTC)
    db = warehouse / "redox.duckdb"
    if not db.exists():
        problems.append("no warehouse was written")
    else:
        with duckdb.connect(str(db), read_only=True) as con:

            def counts(c: str) -> dict[str, int]:
                return {
                    e: con.execute(f"SELECT count(*) FROM redox.{e} WHERE connection_id = ?", [c]).fetchone()[
                        0
                    ]
                    for e in ENTITIES
                }

            windows = con.execute(
                "SELECT connection_id, mode, window_start, window_end FROM ops.sync_runs ORDER BY 1"
            ).fetchall()
            got = {c: counts(c) for c in connections}
        expected = truth(args.patients, FHIR_CONNECTION, start, stop)
        print(f"{FHIR_CONNECTION}: warehouse {got[FHIR_CONNECTION]} truth {expected}")
        print(f"{DM_CONNECTION}: warehouse {got[DM_CONNECTION]}")
        print("sync runs: " + "; ".join(f"{c} {m} {s:%Y-%m-%d}..{e:%Y-%m-%d}" for c, m, s, e in windows))
        if got[FHIR_CONNECTION] != expected:
            problems.append(f"{FHIR_CONNECTION} differs from the truth for the window")
        if sorted((c, m, s, e) for c, m, s, e in windows) != sorted(
            (c, "backfill", start, stop) for c in connections
        ):
            problems.append("ops.sync_runs does not show exactly one backfill window per connection")
        if sum(got[DM_CONNECTION].values()) == 0:
            problems.append(f"{DM_CONNECTION} loaded nothing for the window")
    if problems:
        print("FAIL: " + "; ".join(problems))
        return 1
    print("ok: backfill through the GraphQL API matches the sandbox truth")
    return 0


if __name__ == "__main__":
    sys.exit(main())
