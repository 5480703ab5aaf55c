"""The query interface every population backend offers to the sandbox's API layers.

``SyntheticPopulation`` (generated lazily from a seed) and the file-backed
population of ``--seed-from`` both implement it, so the FHIR and Data Model
routes never know where records come from.
"""

from __future__ import annotations

import abc
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime

from sandbox.population.records import Change, PatientRecord, Record, is_live


@dataclass(frozen=True)
class Query:
    """A selection of one entity's records in one connection.

    Time bounds are UTC datetimes; ``None`` means unbounded. ``updated_*`` filter on
    ``last_updated``; ``date_*`` filter on the entity's clinical date (encounter
    start, result effective time, medication start, appointment start, document
    authored time, problem onset, allergy recorded time, immunization occurrence, procedure
    start, report effective time, order authored time; patients have none). Results are
    ordered by ``(last_updated, id)``,
    which stays stable while pages are read.
    """

    connection_id: str
    entity: str
    ids: Sequence[str] | None = None  # FHIR logical ids
    patient_id: str | None = None  # FHIR logical id of the patient
    updated_ge: datetime | None = None
    updated_gt: datetime | None = None
    updated_le: datetime | None = None
    updated_lt: datetime | None = None
    date_ge: datetime | None = None
    date_gt: datetime | None = None
    date_le: datetime | None = None
    date_lt: datetime | None = None
    statuses: Sequence[str] | None = None  # entity status values (patients: "active"/"inactive")
    # results: an observation-category code ("laboratory", "vital-signs", "social-history", "survey",
    # "exam", ...); medications: "request" | "statement"; allergies: "medication" | "food" | ...
    category: str | None = None


class RecordStore(abc.ABC):
    """Read, page and change a population. Implementations must be thread-safe for reads."""

    @property
    @abc.abstractmethod
    def now(self) -> datetime:
        """The simulated current time (moves with ``advance``)."""

    @abc.abstractmethod
    def count(self, query: Query) -> int:
        """How many records match (the Bundle ``total``)."""

    @abc.abstractmethod
    def page(self, query: Query, offset: int, limit: int) -> list[Record]:
        """Records ``offset .. offset+limit`` of the ordered selection."""

    def iter(self, query: Query, batch: int = 1000) -> Iterator[Record]:
        offset = 0
        while True:
            rows = self.page(query, offset, batch)
            yield from rows
            if len(rows) < batch:
                return
            offset += batch

    @abc.abstractmethod
    def get(self, connection_id: str, entity: str, record_id: str) -> Record | None:
        """One record by FHIR logical id."""

    @abc.abstractmethod
    def find_patients(
        self,
        connection_id: str,
        *,
        identifier: str | None = None,  # an identifier value (MRN, EHR id, NIST, enterprise id, FHIR id)
        id_type: str | None = None,  # MR, EHRID, NIST, EPI or a FHIR system URI; None matches any
        family: str | None = None,
        given: str | None = None,
        birth_date: str | None = None,  # YYYY-MM-DD
    ) -> list[PatientRecord]:
        """Exact-match patient search (REDOX-REFERENCE §3.3: the sandbox matches exactly)."""

    @abc.abstractmethod
    def find_by_business_id(self, connection_id: str, entity: str, business_id: str) -> Record | None:
        """Encounter/appointment by visit number, result by result id, medication by order id,
        document by document id."""

    @abc.abstractmethod
    def advance(self, days: float, change_fraction: float) -> list[Change]:
        """Move simulated time forward ``days``: create new records, update about
        ``change_fraction`` of existing ones, cancel / enter-in-error a few. Returns the
        changes in the order they happened (webhooks are sent in this order)."""

    @abc.abstractmethod
    def counts(self, live_only: bool = False) -> dict[str, dict[str, int]]:
        """``{connection_id: {entity: n}}`` over each connection's entities; ``live_only``
        leaves out cancelled / entered-in-error records and inactive patients."""

    def component_counts(self, live_only: bool = False) -> dict[str, int]:
        """``{connection_id: n}``: how many ``Observation.component`` entries the connection's
        results carry (a blood pressure panel has two); ``live_only`` counts live results only.
        Backends may override this with a column-level version."""
        out: dict[str, int] = {}
        for connection_id, entities in self.counts().items():
            if "results" not in entities:
                continue
            out[connection_id] = sum(
                len(r.components)  # type: ignore[attr-defined]
                for r in self.iter(Query(connection_id, "results"))
                if not live_only or is_live(r)
            )
        return out

    def roster(self, connection_id: str) -> list[str]:
        """The MRN of every patient of the connection (inactive ones included): the patient list
        an organization holds for it. Backends override this with a column-level version."""
        return [r.mrn for r in self.iter(Query(connection_id, "patients"))]  # type: ignore[attr-defined]

    def active_patients(self, connection_id: str, since: datetime) -> int:
        """How many patients of the connection have an encounter or an appointment starting at or
        after ``since`` (any status: what an Encounter ``date`` / Booked window search shows)."""
        seen: set[str] = set()
        for entity in ("encounters", "appointments"):
            for r in self.iter(Query(connection_id, entity, date_ge=since)):
                seen.add(r.patient.patient_id)  # type: ignore[attr-defined]
        return len(seen)

    @abc.abstractmethod
    def persons(self) -> list[dict]:
        """Which source records are the same person: ``[{"enterprise_id", "records":
        [{"connection_id", "patient_id", "mrn"}]}]`` for every person known to at least
        one connection, ordered by enterprise id."""
