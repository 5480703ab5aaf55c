"""What one landed page gives: rows per entity and per-record quarantine entries.

Both surfaces' page-to-rows functions (``pipelines.fhir.pages.bundle_rows``,
``pipelines.datamodel.pages.payload_rows``) return a ``PageRows``; the live sources and
``redox-elt renormalize`` hand it to the same ``PageRouter``
(``pipelines.batches``), so a replay of the landing rebuilds exactly what the live sync
loaded. A page may feed several entities at once (a Data Model visit page gives patients
and encounters; a FHIR Bundle with ``_include``/``_revinclude`` gives patients,
encounters, results ... together), so rows are kept per entity for every entity present.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pipelines.quarantine import QuarantineEntry
from pipelines.vocabulary import ENTITIES


@dataclass
class PageRows:
    rows: dict[str, list[dict[str, Any]]] = field(default_factory=lambda: {e: [] for e in ENTITIES})
    quarantined: list[QuarantineEntry] = field(default_factory=list)
    # Data Model DocumentGet answers: document id → content bytes (the answer has no metadata;
    # the DocumentQuery answer's row takes the content).
    contents: dict[str, bytes] = field(default_factory=dict)

    def count(self) -> int:
        return sum(len(v) for v in self.rows.values())

    def entities(self) -> list[str]:
        return [e for e in ENTITIES if self.rows.get(e)]
