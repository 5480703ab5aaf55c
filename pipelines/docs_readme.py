"""Generate the column tables of ``warehouse/README.md`` from ``pipelines/model_docs.py``.

The README keeps hand-written prose around two generated blocks, between markers:
``model-columns`` (lineage columns, every table of the common model, the crosswalk and the
persons view) and ``analytics-views`` (each view: its question and its columns). Run
``python -m pipelines.docs_readme`` after changing a doc or a column; ``--check`` exits 1
when the README is stale (a test runs it), so the README, the DuckDB COMMENTs and the
Dagster column schemas never disagree.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pyarrow as pa

from pipelines.analytics import ANALYTICS_SCHEMA, ANALYTICS_VIEWS, relation_columns
from pipelines.model import ENTITY_COLUMNS, LINEAGE, identifiers_schema
from pipelines.model_docs import LINEAGE_DOCS, TABLE_DOCS, column_doc, type_name
from pipelines.vocabulary import CROSSWALK_TABLE

README = Path(__file__).resolve().parent.parent / "warehouse" / "README.md"
BLOCKS = ("model-columns", "analytics-views")


def begin_marker(block: str) -> str:
    return f"<!-- BEGIN GENERATED {block}: python -m pipelines.docs_readme (from pipelines/model_docs.py) -->"


def end_marker(block: str) -> str:
    return f"<!-- END GENERATED {block} -->"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ") if text else "—"


def _code(text: str) -> str:
    return f"`{text}`" if text else "—"


def _surface_table(table: str, columns: list[tuple[str, str]]) -> list[str]:
    lines = ["| column | type | FHIR | Data Model | meaning |", "|---|---|---|---|---|"]
    for name, type_ in columns:
        doc = column_doc(table, name)
        if doc is None:
            raise KeyError(f"{table}.{name} has no entry in pipelines/model_docs.py COLUMN_DOCS")
        lines.append(
            f"| `{name}` | {type_} | {_cell(_code(doc.fhir_path))} | {_cell(_code(doc.datamodel_field))} "
            f"| {_cell(doc.description)} |"
        )
    return lines


def child_columns() -> dict[str, list[tuple[str, pa.DataType]]]:
    import pipelines.model as model

    return dict(getattr(model, "CHILD_COLUMNS", {}))


def model_columns_block() -> str:
    out = [
        "### Lineage columns (lead every table of the common model)",
        "",
        *_surface_table("patients", [(c, type_name(t)) for c, t in LINEAGE if c in LINEAGE_DOCS]),
    ]
    tables = [(e, [(c, type_name(t)) for c, t in cols]) for e, cols in ENTITY_COLUMNS.items()]
    # Child tables (result components, report members), where the model has them.
    tables += [(t, [(c, type_name(ty)) for c, ty in cols]) for t, cols in child_columns().items()]
    tables.append((CROSSWALK_TABLE, [(f.name, type_name(f.type)) for f in identifiers_schema()]))
    tables.append(("persons", [(c, type_name(t)) for c, t in relation_columns()["persons"]]))
    for table, columns in tables:
        lineage = " The lineage columns above lead it." if table in ENTITY_COLUMNS else ""
        out += [
            "",
            f"### {table}",
            "",
            f"{TABLE_DOCS.get(table, '')}{lineage}",
            "",
            *_surface_table(table, columns),
        ]
    return "\n".join(out)


def analytics_views_block() -> str:
    out: list[str] = []
    for view in ANALYTICS_VIEWS:
        out += [f"### {ANALYTICS_SCHEMA}.{view}", "", TABLE_DOCS[view], ""]
        out += ["| column | type | meaning |", "|---|---|---|"]
        for name, type_ in relation_columns()[view]:
            doc = column_doc(view, name)
            if doc is None:
                raise KeyError(f"{view}.{name} has no entry in pipelines/model_docs.py COLUMN_DOCS")
            out.append(f"| `{name}` | {type_name(type_)} | {_cell(doc.description)} |")
        out.append("")
    return "\n".join(out).rstrip()


def render(text: str) -> str:
    """``text`` with every generated block replaced by its current content."""
    for block, body in (
        ("model-columns", model_columns_block()),
        ("analytics-views", analytics_views_block()),
    ):
        begin, end = begin_marker(block), end_marker(block)
        if begin not in text or end not in text:
            raise ValueError(
                f"warehouse/README.md lacks the markers of the {block} block ({begin} ... {end})"
            )
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        text = f"{head}{begin}\n\n{body}\n\n{end}{tail}"
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when the README is stale; write nothing")
    parser.add_argument("--readme", type=Path, default=README)
    args = parser.parse_args(argv)
    current = args.readme.read_text(encoding="utf-8")
    wanted = render(current)
    if args.check:
        if wanted != current:
            print(f"{args.readme} is stale: run python -m pipelines.docs_readme", file=sys.stderr)
            return 1
        return 0
    if wanted != current:
        args.readme.write_text(wanted, encoding="utf-8")
        print(f"updated {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
