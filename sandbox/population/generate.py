"""Vectorised generation of index rows (the compact columns behind every synthetic record).

Each ``gen_*`` function draws, with numpy, the columns that queries need and that fix a record's
shape: patient, clinical time, last-updated time, status, category, links and a few small
integers (``aux``, ``item``) from which the record builder derives the rest. Times are integer
seconds relative to the population's clock start. The same functions build the initial history
and the records that ``advance`` adds, so new records look like old ones.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

from sandbox.population import vocab
from sandbox.population.query import CATEGORY_VALUES, STATUS_VALUES

DAY = 86400
HOUR = 3600
S = {entity: {name: i for i, name in enumerate(values)} for entity, values in STATUS_VALUES.items()}
ENC_CLASS_CODE = {c: CATEGORY_VALUES["encounters"].index(c) for c in vocab.ENCOUNTER_CLASSES}


@dataclass
class Rows:
    """Columns of a batch of rows of one table (all the same length)."""

    patient: np.ndarray
    clin: np.ndarray  # int64 seconds; CLIN_NONE for patients
    lu: np.ndarray
    status: np.ndarray
    category: np.ndarray
    version: np.ndarray
    link: np.ndarray  # encounter row, or -1
    aux: np.ndarray  # encounter/appointment duration, result turnaround, medication course length
    item: np.ndarray  # result panel*16+component, medication drug, document type
    order_no: np.ndarray  # results: lab order number; others: -1

    def __len__(self) -> int:
        return len(self.patient)

    @staticmethod
    def empty() -> Rows:
        return Rows(*(np.empty(0, np.int64) for _ in fields(Rows)))

    def take(self, idx: np.ndarray) -> Rows:
        return Rows(*(getattr(self, f.name)[idx] for f in fields(Rows)))


CLIN_NONE = np.iinfo(np.int32).min


@dataclass
class Anchors:
    """The visits new clinical records hang off: one entry per record (or per lab order)."""

    patient: np.ndarray
    enc_row: np.ndarray  # -1: no encounter (connection without encounters, or a statement)
    start: np.ndarray  # seconds
    dur: np.ndarray  # seconds
    enc_class: np.ndarray  # ENC_CLASS_CODE, -1 without encounter


def concat_rows(*parts: Rows) -> Rows:
    """The rows of ``parts`` one after the other."""
    return Rows(
        *(np.concatenate([np.asarray(getattr(p, f.name), np.int64) for p in parts]) for f in fields(Rows))
    )


def _rows(n: int, **cols) -> Rows:
    out = {}
    for f in fields(Rows):
        v = cols.get(f.name)
        if v is None:
            v = np.full(n, -1, dtype=np.int64)
        out[f.name] = np.asarray(v, dtype=np.int64)
    return Rows(**out)


def _uniform_int(rng: np.random.Generator, lo, hi, n: int) -> np.ndarray:
    """``n`` integers uniform in [lo, hi] (elementwise; an empty range gives lo)."""
    lo = np.broadcast_to(np.asarray(lo, dtype=np.int64), (n,))
    hi = np.broadcast_to(np.asarray(hi, dtype=np.int64), (n,))
    span = np.maximum(hi - lo, 0)
    return lo + np.floor(rng.random(n) * (span + 1)).astype(np.int64)


def _dead(rng: np.random.Generator, n: int, p_cancel: float, p_error: float) -> np.ndarray:
    """0 live, 1 cancelled, 2 entered-in-error."""
    u = rng.random(n)
    return np.where(u < p_cancel, 1, np.where(u < p_cancel + p_error, 2, 0))


def gen_patients(
    rng: np.random.Generator, n: int, lo, hi: int, protected: np.ndarray, allow_dead: bool
) -> Rows:
    """``protected`` rows (canonical test patients) are never inactive."""
    lu = _uniform_int(rng, lo, hi, n) if n else np.empty(0, np.int64)
    status = np.zeros(n, dtype=np.int64)
    if allow_dead:
        inactive = (rng.random(n) < 0.005) & ~protected
        status[inactive] = S["patients"]["inactive"]
    version = 1 + (rng.random(n) < 0.3).astype(np.int64) + (status != 0)
    return _rows(n, patient=np.arange(n), clin=np.full(n, CLIN_NONE), lu=lu, status=status, version=version)


def gen_encounters(
    rng: np.random.Generator, patients: np.ndarray, lo, hi: int, now: int, allow_dead: bool
) -> Rows:
    n = len(patients)
    st = S["encounters"]
    cls_idx = rng.choice(len(vocab.ENCOUNTER_CLASSES), size=n, p=vocab.ENCOUNTER_CLASS_WEIGHTS)
    lows = np.array([vocab.ENCOUNTER_DURATION_S[c][0] for c in vocab.ENCOUNTER_CLASSES])
    highs = np.array([vocab.ENCOUNTER_DURATION_S[c][1] for c in vocab.ENCOUNTER_CLASSES])
    dur = _uniform_int(rng, lows[cls_idx], highs[cls_idx], n)
    start = _uniform_int(rng, lo, hi - 60, n)
    end = start + dur
    inpatientish = np.isin(cls_idx, [1, 2, 3])  # IMP, EMER, OBSENC
    lag = np.where(inpatientish, _uniform_int(rng, 0, 24 * HOUR, n), _uniform_int(rng, 0, 2 * HOUR, n))
    finished = end <= now
    status = np.where(
        finished,
        st["finished"],
        np.where(inpatientish | (rng.random(n) < 0.5), st["in-progress"], st["arrived"]),
    )
    lu = np.where(
        finished, np.minimum(end + lag, now), start + ((now - start) * rng.random(n)).astype(np.int64)
    )
    version = np.where(finished, 2, 1)
    if allow_dead:
        # Visits that were booked get cancelled (their appointment says so); an admission or an
        # ED arrival of the history happened. (``advance`` may still cancel any visit.)
        dead = np.where(inpatientish, 0, _dead(rng, n, 0.015, 0.005))
        status = np.where(dead == 1, st["cancelled"], np.where(dead == 2, st["entered-in-error"], status))
        version = np.where(dead > 0, version + 1, version)
    lu = np.maximum(lu, start)
    category = np.array([ENC_CLASS_CODE[c] for c in vocab.ENCOUNTER_CLASSES])[cls_idx]
    return _rows(
        n, patient=patients, clin=start, lu=lu, status=status, category=category, version=version, aux=dur
    )


def anchors_from_encounters(enc_rows: np.ndarray, enc: Rows, offset: int = 0) -> Anchors:
    """Anchors on encounter rows (``enc`` holds the encounter columns, ``offset`` its first row)."""
    local = enc_rows - offset
    return Anchors(enc.patient[local], enc_rows, enc.clin[local], enc.aux[local], enc.category[local])


def anchors_without_encounters(rng: np.random.Generator, patients: np.ndarray, lo, hi: int) -> Anchors:
    n = len(patients)
    return Anchors(
        patients, np.full(n, -1), _uniform_int(rng, lo, hi - 60, n), np.full(n, HOUR), np.full(n, -1)
    )


def pick_patient_encounters(
    rng: np.random.Generator, patients: np.ndarray, enc_first: np.ndarray, enc_count: np.ndarray
) -> np.ndarray:
    """One random encounter row (of the base history) per entry of ``patients``."""
    return enc_first[patients] + np.floor(rng.random(len(patients)) * enc_count[patients]).astype(np.int64)


def gen_results(
    rng: np.random.Generator,
    lab: Anchors,
    vitals: Anchors,
    now: int,
    first_order_no: int,
    allow_dead: bool,
    other: Anchors | None = None,
) -> Rows:
    """One lab order per ``lab`` anchor, one vital-signs set per ``vitals`` anchor and one
    social-history, survey or exam observation per ``other`` anchor, exploded into one row per
    observation (a blood pressure panel is one row: its components live in the record)."""
    st = S["results"]
    if other is None:
        other = Anchors(*(np.empty(0, np.int64) for _ in fields(Anchors)))
    n_lab, n_vit, n_oth = len(lab.patient), len(vitals.patient), len(other.patient)
    lab_weights = np.array([p.weight for p in vocab.LAB_PANELS])
    other_weights = np.array([p.weight for p in vocab.OTHER_PANELS])
    panel = np.concatenate(
        [
            rng.choice(len(vocab.LAB_PANELS), size=n_lab, p=lab_weights / lab_weights.sum()),
            np.full(n_vit, vocab.VITALS_PANEL_INDEX),
            vocab.OTHER_PANEL_FIRST
            + rng.choice(len(vocab.OTHER_PANELS), size=n_oth, p=other_weights / other_weights.sum()),
        ]
    ).astype(np.int64)
    anchors = Anchors(
        *(
            np.concatenate([getattr(lab, f.name), getattr(vitals, f.name), getattr(other, f.name)])
            for f in fields(Anchors)
        )
    )
    n_orders = n_lab + n_vit + n_oth
    is_vitals = panel >= vocab.VITALS_PANEL_INDEX  # taken during the visit, not sent to a lab
    window = np.where(is_vitals, np.minimum(anchors.dur, 30 * 60), np.minimum(anchors.dur, 4 * HOUR))
    effective = anchors.start + (window * rng.random(n_orders)).astype(np.int64)
    effective = np.minimum(effective, now - 60)
    t_lo = np.array([p.turnaround_s[0] for p in vocab.PANELS])[panel]
    t_hi = np.array([p.turnaround_s[1] for p in vocab.PANELS])[panel]
    turnaround = _uniform_int(rng, t_lo, t_hi, n_orders)
    issued = effective + turnaround
    final = issued <= now
    order_status = np.where(final, st["final"], st["preliminary"])
    order_lu = np.where(
        final,
        np.minimum(issued + _uniform_int(rng, 0, 2 * HOUR, n_orders), now),
        effective + ((now - effective) * rng.random(n_orders)).astype(np.int64),
    )
    order_no = first_order_no + np.arange(n_orders, dtype=np.int64)

    sizes = np.array([len(p.analytes) for p in vocab.PANELS])[panel]
    rep = np.repeat(np.arange(n_orders), sizes)
    comp = np.arange(len(rep)) - np.repeat(np.cumsum(sizes) - sizes, sizes)
    n = len(rep)
    status = order_status[rep]
    lu = order_lu[rep]
    version = np.ones(n, dtype=np.int64)
    if allow_dead:
        corrected = (status == st["final"]) & (rng.random(n) < 0.015)
        status = np.where(corrected, st["corrected"], status)
        lu = np.where(corrected, np.minimum(lu + _uniform_int(rng, HOUR, 72 * HOUR, n), now), lu)
        version = np.where(corrected, 2, version)
        dead = _dead(rng, n, 0.007, 0.003)
        status = np.where(dead == 1, st["cancelled"], np.where(dead == 2, st["entered-in-error"], status))
        version = np.where(dead > 0, version + 1, version)
    panel_category = np.array([vocab.RESULT_CATEGORIES.index(p.category) for p in vocab.PANELS])
    category = panel_category[panel[rep]]
    return _rows(
        n,
        patient=anchors.patient[rep],
        clin=effective[rep],
        lu=lu,
        status=status,
        category=category,
        version=version,
        link=anchors.enc_row[rep],
        aux=turnaround[rep],
        item=panel[rep] * 16 + comp,
        order_no=order_no[rep],
    )


def gen_medications(
    rng: np.random.Generator, requests: Anchors, statements: Anchors, now: int, allow_dead: bool
) -> Rows:
    st = S["medications"]
    anchors = Anchors(
        *(np.concatenate([getattr(requests, f.name), getattr(statements, f.name)]) for f in fields(Anchors))
    )
    n = len(anchors.patient)
    kind = np.concatenate([np.zeros(len(requests.patient)), np.ones(len(statements.patient))]).astype(
        np.int64
    )
    drug = rng.integers(0, len(vocab.DRUGS), size=n)
    chronic = np.array([d.chronic for d in vocab.DRUGS])[drug]
    start = np.minimum(anchors.start + _uniform_int(rng, 0, 2 * HOUR, n) * (kind == 0), now - 60)
    course = np.where(chronic, 0, _uniform_int(rng, 5 * DAY, 14 * DAY, n))
    end = start + course
    u = rng.random(n)
    chronic_status = np.where(u < 0.88, st["active"], np.where(u < 0.92, st["on-hold"], st["stopped"]))
    status = np.where(chronic, chronic_status, np.where(end <= now, st["completed"], st["active"]))
    lag = _uniform_int(rng, 0, 6 * HOUR, n)
    stopped_at = start + ((now - start) * rng.random(n)).astype(np.int64)
    lu = np.where(
        status == st["completed"],
        np.minimum(end + lag, now),
        np.where(status == st["stopped"], stopped_at, np.minimum(start + lag, now)),
    )
    version = np.where(np.isin(status, [st["completed"], st["stopped"], st["on-hold"]]), 2, 1)
    if allow_dead:
        dead = _dead(rng, n, 0.01, 0.005)
        status = np.where(dead == 1, st["cancelled"], np.where(dead == 2, st["entered-in-error"], status))
        version = np.where(dead > 0, version + 1, version)
    return _rows(
        n, patient=anchors.patient, clin=start, lu=lu, status=status, category=kind, version=version,
        link=np.where(kind == 0, anchors.enc_row, -1), aux=course, item=drug,
    )  # fmt: skip


def gen_appointments(
    rng: np.random.Generator, patients: np.ndarray, lo, hi: int, now: int, lu_lo, allow_dead: bool
) -> Rows:
    """Appointments starting in [lo, hi]; ``lu_lo`` bounds when they were booked or last touched.
    These are the bookings that stand on their own (future visits, no-shows, cancellations);
    the appointments behind visits and discharges come from :func:`gen_visit_appointments` and
    :func:`gen_follow_ups`."""
    n = len(patients)
    start = _uniform_int(rng, lo, hi, n)
    start = start - start % (5 * 60)  # slots start on 5-minute marks
    minutes = np.array(vocab.APPOINTMENT_DURATIONS)[rng.integers(0, len(vocab.APPOINTMENT_DURATIONS), size=n)]
    return _appointments_by_clock(rng, patients, start, minutes, None, now, lu_lo, allow_dead)


def _appointments_by_clock(
    rng: np.random.Generator,
    patients: np.ndarray,
    start: np.ndarray,
    minutes: np.ndarray,
    booked_at: np.ndarray | None,
    now: int,
    lu_lo,
    allow_dead: bool,
) -> Rows:
    """Appointment rows whose status follows the clock: booked (or pending / proposed) ahead,
    arrived while the slot runs, then fulfilled or a no-show. ``booked_at`` None: booked a
    random 1-60 days ahead."""
    st = S["appointments"]
    n = len(patients)
    future = start > now
    u = rng.random(n)
    future_status = np.where(u < 0.90, st["booked"], np.where(u < 0.95, st["pending"], st["proposed"]))
    past_status = np.where(u < 0.86, st["fulfilled"], st["noshow"])
    in_clinic = (start <= now) & (start + minutes * 60 > now)
    status = np.where(future, future_status, np.where(in_clinic, st["arrived"], past_status))
    lead = _uniform_int(rng, DAY, 60 * DAY, n)
    if booked_at is None:
        booked_at = start - lead
    booked_at = np.clip(booked_at, lu_lo, now)
    after = np.minimum(start + minutes * 60 + _uniform_int(rng, 0, 4 * HOUR, n), now)
    lu = np.where(future | in_clinic, booked_at, after)
    version = np.where(future, 1, 2)
    if allow_dead:
        cancelled = rng.random(n) < np.where(future, 0.05, 0.10)
        status = np.where(cancelled, st["cancelled"], status)
        cancelled_at = np.maximum(np.minimum(start - lead // 2, now), booked_at)
        lu = np.where(cancelled, np.clip(cancelled_at, lu_lo, now), lu)
        error = rng.random(n) < 0.005
        status = np.where(error, st["entered-in-error"], status)
        version = np.where(cancelled | error, version + 1, version)
    lu = np.clip(lu, lu_lo, now)
    return _rows(n, patient=patients, clin=start, lu=lu, status=status, version=version, aux=minutes)


# Appointment kinds (the ``item`` column of appointment rows; -1: a booking on its own).
APPT_VISIT = 1  # the booking an outpatient or virtual visit fulfils (``link``: that encounter)
APPT_FOLLOW_UP = 2  # the clinic follow-up a discharge books (``link``: the stay it follows)
SCHEDULED_CLASSES = ("AMB", "VR")  # visits that happen because an appointment was booked
DISCHARGE_CLASSES = ("IMP", "OBSENC", "EMER")  # stays whose discharge books a follow-up


def _class_rows(enc: Rows, classes: tuple[str, ...]) -> np.ndarray:
    return np.flatnonzero(np.isin(enc.category, [ENC_CLASS_CODE[c] for c in classes]))


def appointment_status_for_visit(encounter_status: np.ndarray) -> np.ndarray:
    """The status of the appointment a visit fulfils, from the visit's (encounter) status."""
    se, sa = S["encounters"], S["appointments"]
    table = np.full(len(se), sa["booked"], dtype=np.int64)
    table[se["planned"]] = sa["booked"]
    table[se["arrived"]] = sa["arrived"]
    table[se["in-progress"]] = sa["arrived"]
    table[se["finished"]] = sa["fulfilled"]
    table[se["cancelled"]] = sa["cancelled"]
    table[se["entered-in-error"]] = sa["entered-in-error"]
    return table[np.asarray(encounter_status, dtype=np.int64)]


def gen_visit_appointments(rng: np.random.Generator, enc: Rows, enc_offset: int, now: int, lu_lo) -> Rows:
    """One appointment behind every outpatient (AMB) and virtual (VR) encounter of ``enc``
    (whose first row is table row ``enc_offset``): same patient and start, the visit's length,
    and the status the visit has reached (finished -> fulfilled, under way -> arrived,
    cancelled -> cancelled). ``link`` is the encounter row; the visit shares its number."""
    st = S["appointments"]
    local = _class_rows(enc, SCHEDULED_CLASSES)
    n = len(local)
    start = enc.clin[local]
    minutes = np.maximum(5, -(-enc.aux[local] // 60))  # the visit's length, whole minutes
    status = appointment_status_for_visit(enc.status[local])
    booked_at = np.clip(start - _uniform_int(rng, HOUR, 45 * DAY, n), lu_lo, now)
    touched = np.minimum(np.maximum(enc.lu[local], start), now)  # checked in / out with the visit
    lu = np.where(status == st["booked"], booked_at, np.maximum(touched, booked_at))
    version = np.select([status == st["fulfilled"], status == st["booked"]], [3, 1], default=2)
    return _rows(
        n, patient=enc.patient[local], clin=start, lu=np.clip(lu, lu_lo, now), status=status,
        version=version, link=local + enc_offset, aux=minutes, item=np.full(n, APPT_VISIT),
    )  # fmt: skip


def gen_follow_ups(
    rng: np.random.Generator,
    patients: np.ndarray,
    discharged: np.ndarray,
    stay_rows: np.ndarray,
    now: int,
    lu_lo,
    allow_dead: bool,
) -> Rows:
    """The clinic follow-up booked at each discharge (``discharged``: seconds), 3-14 days later;
    its status follows the clock like any booking. ``link`` is the stay it follows."""
    n = len(patients)
    start = discharged + _uniform_int(rng, 3 * DAY, 14 * DAY, n)
    start = start - start % (5 * 60)
    minutes = np.array((20, 30, 30, 40))[rng.integers(0, 4, size=n)]
    rows = _appointments_by_clock(rng, patients, start, minutes, discharged, now, lu_lo, allow_dead)
    rows.link = np.asarray(stay_rows, dtype=np.int64)
    rows.item = np.full(n, APPT_FOLLOW_UP, dtype=np.int64)
    return rows


def finished_stays(enc: Rows) -> np.ndarray:
    """Local rows of ``enc`` that are finished hospital, observation or emergency stays."""
    local = _class_rows(enc, DISCHARGE_CLASSES)
    return local[enc.status[local] == S["encounters"]["finished"]]


def gen_documents(
    rng: np.random.Generator, notes: Anchors, cdas: Anchors, now: int, allow_dead: bool
) -> Rows:
    st = S["documents"]
    anchors = Anchors(
        *(np.concatenate([getattr(notes, f.name), getattr(cdas, f.name)]) for f in fields(Anchors))
    )
    n = len(anchors.patient)
    kind = np.concatenate([np.zeros(len(notes.patient)), np.ones(len(cdas.patient))]).astype(np.int64)
    inpatient = anchors.enc_class == ENC_CLASS_CODE["IMP"]
    note_type = rng.integers(0, len(vocab.NOTE_TYPES), size=n)
    cda_type = np.where(inpatient, 1, 0)  # discharge summary after a stay, else a CCD
    item = np.where(kind == 0, note_type, cda_type)
    written = np.where(kind == 1, anchors.dur, np.minimum(anchors.dur, 2 * HOUR))
    authored = np.minimum(anchors.start + (written * rng.random(n)).astype(np.int64) + 15 * 60, now - 60)
    authored = np.maximum(authored, anchors.start)
    lu = np.minimum(authored + _uniform_int(rng, 0, 24 * HOUR, n), now)
    status = np.full(n, st["current"])
    version = np.ones(n, dtype=np.int64)
    if allow_dead:
        u = rng.random(n)
        status = np.where(u < 0.03, st["superseded"], np.where(u < 0.04, st["entered-in-error"], status))
        version = np.where(status != st["current"], 2, 1)
    return _rows(
        n, patient=anchors.patient, clin=authored, lu=lu, status=status, category=kind, version=version,
        link=anchors.enc_row, aux=np.zeros(n), item=item,
    )  # fmt: skip


def _distinct_items(rng: np.random.Generator, counts: np.ndarray, n_items: int) -> np.ndarray:
    """For patients with ``counts`` records each, item numbers that never repeat within one
    patient (so a patient's problems, allergies ... have distinct codes: a natural key that
    both surfaces share). ``counts`` must not exceed ``n_items``."""
    offset = np.repeat(rng.integers(0, n_items, size=len(counts)), counts)
    within = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
    return (offset + within) % n_items


def gen_problems(
    rng: np.random.Generator, anchors: Anchors, items: np.ndarray, now: int, allow_dead: bool
) -> Rows:
    """Problems diagnosed at ``anchors`` (one per anchor, ``items`` index vocab.PROBLEMS).
    Chronic problems stay active; acute ones resolve after days to weeks."""
    st = S["problems"]
    n = len(anchors.patient)
    chronic = np.array([p.chronic for p in vocab.PROBLEMS], dtype=bool)[items]
    onset = np.minimum(anchors.start + _uniform_int(rng, 0, HOUR, n), now - 60)
    course = np.where(chronic, 0, _uniform_int(rng, 5 * DAY, 45 * DAY, n))
    resolved = ~chronic & (onset + course <= now)
    u = rng.random(n)
    status = np.where(
        resolved,
        st["resolved"],
        np.where(chronic & (u < 0.06), st["inactive"], st["active"]),
    )
    recorded_lag = _uniform_int(rng, 0, 2 * HOUR, n)
    lu = np.where(
        resolved, np.minimum(onset + course + recorded_lag, now), np.minimum(onset + recorded_lag, now)
    )
    version = np.where(status == st["active"], 1, 2)
    if allow_dead:
        error = rng.random(n) < 0.006
        status = np.where(error, st["entered-in-error"], status)
        version = np.where(error, version + 1, version)
    return _rows(
        n, patient=anchors.patient, clin=onset, lu=lu, status=status, category=np.zeros(n),
        version=version, link=anchors.enc_row, aux=course, item=items,
    )  # fmt: skip


def gen_allergies(
    rng: np.random.Generator, patients: np.ndarray, items: np.ndarray, lo, hi: int, now: int, allow_dead: bool
) -> Rows:
    """Allergies recorded at some moment in [lo, hi] (``items`` index vocab.ALLERGENS)."""
    st = S["allergies"]
    n = len(patients)
    recorded = _uniform_int(rng, lo, hi - 60, n)
    u = rng.random(n)
    status = np.where(u < 0.9, st["active"], np.where(u < 0.96, st["inactive"], st["resolved"]))
    lu = np.where(
        status == st["active"], recorded, recorded + ((now - recorded) * rng.random(n)).astype(np.int64)
    )
    version = np.where(status == st["active"], 1, 2)
    if allow_dead:
        error = rng.random(n) < 0.006
        status = np.where(error, st["entered-in-error"], status)
        version = np.where(error, version + 1, version)
    category_names = ("medication", "food", "environment")
    category = np.array([category_names.index(a.category) for a in vocab.ALLERGENS])[items]
    return _rows(
        n, patient=patients, clin=recorded, lu=np.minimum(lu, now), status=status, category=category,
        version=version, item=items,
    )  # fmt: skip


def gen_immunizations(rng: np.random.Generator, anchors: Anchors, now: int, allow_dead: bool) -> Rows:
    st = S["immunizations"]
    n = len(anchors.patient)
    given = np.minimum(anchors.start + _uniform_int(rng, 5 * 60, 45 * 60, n), now - 60)
    u = rng.random(n)
    status = np.where(u < 0.96, st["completed"], st["not-done"])
    lu = np.minimum(given + _uniform_int(rng, 0, 4 * HOUR, n), now)
    version = np.ones(n, dtype=np.int64)
    if allow_dead:
        error = rng.random(n) < 0.005
        status = np.where(error, st["entered-in-error"], status)
        version = np.where(error, 2, version)
    item = rng.integers(0, len(vocab.VACCINES), size=n)
    return _rows(
        n, patient=anchors.patient, clin=given, lu=lu, status=status, version=version,
        link=anchors.enc_row, item=item,
    )  # fmt: skip


def gen_procedures(rng: np.random.Generator, anchors: Anchors, now: int, allow_dead: bool) -> Rows:
    st = S["procedures"]
    n = len(anchors.patient)
    item = rng.integers(0, len(vocab.PROCEDURES), size=n)
    minutes = np.array([p.minutes for p in vocab.PROCEDURES])[item]
    start = np.minimum(
        anchors.start + (np.maximum(anchors.dur - minutes * 60, 0) * rng.random(n)).astype(np.int64), now - 60
    )
    end = start + minutes * 60
    status = np.where(end <= now, st["completed"], st["in-progress"])
    status = np.where(rng.random(n) < 0.02, st["not-done"], status)
    lu = np.where(status == st["completed"], np.minimum(end + _uniform_int(rng, 0, 2 * HOUR, n), now), start)
    version = np.where(status == st["completed"], 2, 1)
    if allow_dead:
        error = rng.random(n) < 0.005
        status = np.where(error, st["entered-in-error"], status)
        version = np.where(error, version + 1, version)
    return _rows(
        n, patient=anchors.patient, clin=start, lu=lu, status=status, version=version,
        link=anchors.enc_row, aux=minutes * 60, item=item,
    )  # fmt: skip


def lab_order_groups(results: Rows, offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(first row, row count) of every laboratory order in a batch of result rows, whose first
    row is table row ``offset``. ``gen_results`` writes each order's rows contiguously."""
    if not len(results):
        return np.empty(0, np.int64), np.empty(0, np.int64)
    order_no = np.asarray(results.order_no, dtype=np.int64)
    starts = np.flatnonzero(np.concatenate([[True], order_no[1:] != order_no[:-1]]))
    counts = np.diff(np.concatenate([starts, [len(order_no)]]))
    lab = np.asarray(results.category)[starts] == 0
    return starts[lab] + offset, counts[lab]


def gen_reports(
    rng: np.random.Generator,
    results: Rows,
    first: np.ndarray,
    count: np.ndarray,
    offset: int,
    allow_dead: bool,
) -> Rows:
    """One DiagnosticReport per lab order (``first``/``count`` from :func:`lab_order_groups`;
    ``results`` holds the batch whose first row is table row ``offset``)."""
    st, rs = S["diagnostic_reports"], S["results"]
    n = len(first)
    local = first - offset
    order_status = np.asarray(results.status)[local]
    status = np.where(order_status == rs["preliminary"], st["preliminary"], st["final"])
    lu_all = np.asarray(results.lu)
    last = np.maximum.reduceat(lu_all, local) if n else np.empty(0, np.int64)
    version = np.where(status == st["final"], 2, 1)
    if allow_dead:
        dead = _dead(rng, n, 0.004, 0.002)
        status = np.where(dead == 1, st["cancelled"], np.where(dead == 2, st["entered-in-error"], status))
        version = np.where(dead > 0, version + 1, version)
    return _rows(
        n, patient=np.asarray(results.patient)[local], clin=np.asarray(results.clin)[local], lu=last,
        status=status, version=version, link=first, aux=count, item=np.asarray(results.item)[local] >> 4,
        order_no=np.asarray(results.order_no)[local],
    )  # fmt: skip


def gen_orders(
    rng: np.random.Generator, results: Rows, first: np.ndarray, offset: int, now: int, allow_dead: bool
) -> Rows:
    """One inbound lab order (ServiceRequest) per lab order; placed before its collection."""
    st, rs = S["orders"], S["results"]
    n = len(first)
    local = first - offset
    collected = np.asarray(results.clin)[local]
    lead = _uniform_int(rng, 10 * 60, 3 * DAY, n)
    authored = collected - lead
    order_status = np.asarray(results.status)[local]
    status = np.where(order_status == rs["preliminary"], st["active"], st["completed"])
    lu = np.where(status == st["completed"], np.minimum(np.asarray(results.lu)[local], now), authored)
    version = np.where(status == st["completed"], 2, 1)
    if allow_dead:
        dead = _dead(rng, n, 0.006, 0.002)
        status = np.where(dead == 1, st["revoked"], np.where(dead == 2, st["entered-in-error"], status))
        version = np.where(dead > 0, version + 1, version)
    enc = np.asarray(results.link)[local]
    return _rows(
        n, patient=np.asarray(results.patient)[local], clin=authored, lu=np.maximum(lu, authored),
        status=status, version=version, link=enc, aux=lead, item=np.asarray(results.item)[local] >> 4,
        order_no=np.asarray(results.order_no)[local],
    )  # fmt: skip
