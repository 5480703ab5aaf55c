"""Bad server pages through the page-to-rows functions: one defective record never costs its page.

Good pages are real: FHIR resources the sandbox renders for a small population, and the
Redox Dev Tools Data Model examples vendored under ``tests/fixtures``. Each case damages one
record of a page (the sandbox's documented defects, plus wrong types, missing keys, bad dates,
non-object entries, deep nesting, huge and unicode strings at random places) and checks:

* ``bundle_rows`` / ``payload_rows`` return rows and quarantine entries, or refuse the whole
  page with ``NormalizationError`` only where the page itself is unreadable — never another
  exception (no traceback in a sync);
* every row the page's other records gave before still comes out;
* the damaged record comes out as rows or as a quarantine entry (it is never silently lost),
  and no quarantine reason quotes the damaged value.

Seeded: the same cases every run (``CHAOS_SEED`` picks another set).
"""

from __future__ import annotations

import copy
import json
import os
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pipelines.datamodel.pages import payload_rows
from pipelines.fhir.pages import bundle_rows
from pipelines.model import ENTITY_KEY
from pipelines.normalize_common import NormalizationError
from pipelines.pages import PageRows
from sandbox.damage import DATAMODEL_RECORD_LISTS, damage_datamodel_record, damage_fhir_resource

SEED = int(os.environ.get("CHAOS_SEED", "20261130"))
FHIR_CASES = 600
DATAMODEL_CASES = 600
CONN = "chaos-conn"
MARKER = "Ximenez\u202eQ"  # a value planted by a mutation: never in a reason
EXAMPLES = Path(__file__).resolve().parents[1] / "fixtures" / "redox-examples" / "datamodel"
ENTITIES = ("patients", "encounters", "results", "medications", "appointments", "documents")


# ---- good pages ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fhir_resources() -> dict[str, list[dict[str, Any]]]:
    """Rendered FHIR resources per entity for one connection of a 12-patient population."""
    from sandbox.fhir.render import render_resource
    from sandbox.population.store import Query
    from sandbox.population.synthetic import SyntheticPopulation
    from tests.conftest import sandbox_config

    config = sandbox_config(patients=12)
    store = SyntheticPopulation(config)
    conn = next(c for c in config.connections if c.id == "northwind-fhir")
    out = {}
    for entity in ENTITIES:
        out[entity] = [render_resource(r, conn) for r in list(store.iter(Query(conn.id, entity)))[:40]]
        assert out[entity], entity
    return out


@pytest.fixture(scope="module")
def datamodel_pages() -> list[tuple[str, dict[str, Any]]]:
    """Redox's example answers and pushes that read cleanly and hold a list of records."""
    pages = []
    for path in sorted(EXAMPLES.rglob("*.json")):
        body = json.loads(path.read_text())
        try:
            base = payload_rows(body, CONN, "ref")
        except NormalizationError:
            continue
        lists = [k for k in DATAMODEL_RECORD_LISTS if isinstance(body.get(k), list) and body[k]]
        if lists and any(base.rows.values()):
            pages.append((path.name, body))
    assert len(pages) >= 5
    return pages


# ---- mutations -------------------------------------------------------------------------------

HOSTILE_VALUES: list[Callable[[random.Random], Any]] = [
    lambda r: None,
    lambda r: 1,
    lambda r: -(2**63),
    lambda r: 1e308,
    lambda r: True,
    lambda r: "",
    lambda r: [],
    lambda r: {},
    lambda r: [1, "x", None],
    lambda r: "31/12/2020",
    lambda r: "9999-99-99T99:99:99Z",
    lambda r: "0000-00-00",
    lambda r: "2024-02-30T25:61:00+99:00",
    lambda r: MARKER * r.randint(1, 3),
    lambda r: "\r\n" + MARKER + "\x00",
    lambda r: MARKER + "x" * 200_000,  # a huge string
    lambda r: {"resourceType": MARKER},
    lambda r: _deep(r.randint(50, 400)),  # deep nesting
    lambda r: "../../etc/passwd",
    lambda r: "名前" * 10,
]


def _deep(depth: int) -> Any:
    node: Any = MARKER
    for _ in range(depth):
        node = [node] if depth % 2 else {"a": node}
    return node


def _paths(node: Any, prefix: tuple = ()) -> Iterator[tuple]:
    """Every path to a value inside ``node`` (dict keys and list indexes)."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield (*prefix, k)
            yield from _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield (*prefix, i)
            yield from _paths(v, (*prefix, i))


def _set(node: Any, path: tuple, value: Any, *, delete: bool = False) -> None:
    for step in path[:-1]:
        node = node[step]
    if delete and isinstance(node, dict):
        del node[path[-1]]
    else:
        node[path[-1]] = value


def mutate(
    record: Any, rng: random.Random, sandbox_damage: Callable[[int, str, Any], Any]
) -> tuple[Any, str]:
    """One damaged copy of ``record`` and the name of the damage."""
    kind = rng.choice(("sandbox", "value", "value", "delete", "non_object", "many"))
    damaged = copy.deepcopy(record)
    if kind == "sandbox":
        return sandbox_damage(rng.randrange(1 << 30), str(rng.random()), damaged), kind
    if kind == "non_object":
        return rng.choice([1, "x", None, [], True, 0.5, MARKER]), kind
    paths = list(_paths(damaged))
    if not paths:
        return None, "non_object"
    for _ in range(rng.randint(2, 6) if kind == "many" else 1):
        paths = list(_paths(damaged))
        if not paths:
            break
        path = rng.choice(paths)
        if kind == "delete":
            _set(damaged, path, None, delete=True)
        else:
            _set(damaged, path, rng.choice(HOSTILE_VALUES)(rng))
    return damaged, kind


# ---- the invariant ---------------------------------------------------------------------------


def row_keys(page: PageRows) -> set[tuple[str, Any, Any]]:
    return {
        (entity, row.get(ENTITY_KEY[entity]), row.get("source_id"))
        for entity, rows in page.rows.items()
        for row in rows
    }


def check_page(read: Callable[[Any], PageRows], body: Any, without: Any, alone: Any, case: str) -> bool:
    """``body`` has one damaged record; ``without`` is the page without it, ``alone`` the
    undamaged record on its own page (what it contributes when good)."""
    try:
        got = read(body)
    except NormalizationError as exc:
        # Only a page that is unreadable as a whole may be refused, and in our words.
        assert MARKER not in str(exc), case
        pytest.fail(f"{case}: one damaged record failed the whole page: {exc}")
    except RecursionError:
        pytest.fail(f"{case}: deep nesting overflowed the stack")
    good_before = row_keys(read(without)) - row_keys(read(alone))
    lost = good_before - row_keys(got)
    assert not lost, f"{case}: good records lost: {sorted(map(str, lost))[:3]}"
    for q in got.quarantined:
        assert MARKER not in q.reason and "\n" not in q.reason, (
            f"{case}: reason quotes a value: {q.reason[:80]}"
        )
        assert len(q.reason) < 400, case
    contributed = row_keys(got) - good_before
    assert contributed or got.quarantined or not row_keys(read(alone)), (
        f"{case}: the damaged record vanished (no rows, no quarantine entry)"
    )
    return bool(got.quarantined)


def _bundle(resources: list[Any]) -> dict[str, Any]:
    return {
        "resourceType": "Bundle",
        "type": "searchset",
        "entry": [
            r if not isinstance(r, dict) or "resourceType" not in r else {"resource": r} for r in resources
        ],
    }


def test_fhir_bundles_with_one_damaged_entry(fhir_resources: dict[str, list[dict[str, Any]]]) -> None:
    rng = random.Random(SEED)
    kinds: dict[str, int] = {}
    quarantined = 0
    for n in range(FHIR_CASES):
        entity = rng.choice(ENTITIES)
        pool = fhir_resources[entity]
        chosen = rng.sample(pool, min(len(pool), rng.randint(2, 8)))
        i = rng.randrange(len(chosen))
        damaged, kind = mutate(chosen[i], rng, damage_fhir_resource)
        kinds[kind] = kinds.get(kind, 0) + 1
        page = [*chosen[:i], damaged, *chosen[i + 1 :]]
        body = _bundle(page)
        if not isinstance(damaged, dict) or "resourceType" not in damaged:
            body["entry"][i] = damaged if not isinstance(damaged, dict) else {"resource": damaged}

        def read(b: Any, entity: str = entity) -> PageRows:
            return bundle_rows(b, CONN, "ref", entity)

        quarantined += check_page(
            read,
            body,
            _bundle(chosen[:i] + chosen[i + 1 :]),
            _bundle([chosen[i]]),
            f"fhir case {n} ({entity}, {kind}, seed {SEED})",
        )
    assert len(kinds) >= 5  # every kind of damage was tried
    assert quarantined > FHIR_CASES // 3, quarantined  # the damage was mostly real


def test_datamodel_answers_with_one_damaged_record(datamodel_pages: list[tuple[str, dict[str, Any]]]) -> None:
    rng = random.Random(SEED + 1)
    kinds: dict[str, int] = {}
    quarantined = 0
    for n in range(DATAMODEL_CASES):
        name, body = rng.choice(datamodel_pages)
        lists = [k for k in DATAMODEL_RECORD_LISTS if isinstance(body.get(k), list) and body[k]]
        list_name = rng.choice(lists)
        records = body[list_name]
        i = rng.randrange(len(records))
        damaged, kind = mutate(records[i], rng, damage_datamodel_record)
        kinds[kind] = kinds.get(kind, 0) + 1

        def page(items: list[Any], body: dict[str, Any] = body, list_name: str = list_name) -> dict[str, Any]:
            return {**body, list_name: items}

        quarantined += check_page(
            lambda b: payload_rows(b, CONN, "ref"),
            page([*records[:i], damaged, *records[i + 1 :]]),
            page(records[:i] + records[i + 1 :]),
            page([records[i]]),
            f"datamodel case {n} ({name} {list_name}[{i}], {kind}, seed {SEED})",
        )
    assert len(kinds) >= 5
    assert quarantined > DATAMODEL_CASES // 8, quarantined  # many DM fields are optional


def test_whole_pages_that_are_not_pages_are_refused_in_one_line() -> None:
    """Bodies that are not a Bundle / not a Data Model payload: NormalizationError, no value quoted."""
    rng = random.Random(SEED + 2)
    bodies: list[Any] = [None, 1, "x", [], [1, 2], {}, {"resourceType": MARKER}, _deep(300)]
    bodies += [{"resourceType": "Bundle", "entry": rng.choice(HOSTILE_VALUES)(rng)} for _ in range(40)]
    bodies += [{"Meta": rng.choice(HOSTILE_VALUES)(rng)} for _ in range(40)]
    bodies += [
        {"Meta": {"DataModel": rng.choice(HOSTILE_VALUES)(rng), "EventType": "Query"}} for _ in range(40)
    ]
    for body in bodies:
        for read in (
            lambda b: bundle_rows(b, CONN, "ref", "results"),
            lambda b: payload_rows(b, CONN, "ref"),
        ):
            try:
                got = read(body)
            except NormalizationError as exc:
                assert MARKER not in str(exc) and "\n" not in str(exc)
                continue
            for q in got.quarantined:
                assert MARKER not in q.reason
