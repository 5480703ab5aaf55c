"""Names of the FHIR write-back operations and event codes (the project's decision where Redox is silent).

Redox documents ``$``-operations that take a message Bundle (e.g. ``Observation/$write-results``)
but no order or appointment operation; the project uses the same pattern. Change them here
when a real destination says otherwise (REDOX-REFERENCE "Decisions where Redox is silent").
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class WriteOperation:
    resource_type: str  # the path segment before ``$``, and the focus resource's type
    name: str  # the operation, including ``$``
    write_entity: str  # ConnectionSpec.write_entities entry that entitles it
    events: tuple[str, ...]  # accepted MessageHeader.eventCoding codes
    id_system_suffix: str  # the focus resource's business identifier system ends with this


ORDER_OPERATION = WriteOperation(
    resource_type="ServiceRequest",
    name="$order-new",
    write_entity="orders",
    events=("Order-New", "Order-Update", "Order-Cancel"),
    id_system_suffix=":OrderID",
)
SCHEDULE_OPERATION = WriteOperation(
    resource_type="Appointment",
    name="$schedule-new",
    write_entity="appointments",
    events=("Scheduling-New", "Scheduling-Reschedule", "Scheduling-Cancel"),
    id_system_suffix=":VN",
)
WRITE_OPERATIONS: dict[tuple[str, str], WriteOperation] = {
    (op.resource_type, op.name): op for op in (ORDER_OPERATION, SCHEDULE_OPERATION)
}

# Notification event codes pushed to destinations (REDOX-REFERENCE §3.5), by entity and change.
# Redox's own examples mix ``PatientAdmin-patient-created`` style with
# ``Scheduling-event-appointment-booked``; both styles are kept as Redox shows them.
NOTIFICATION_EVENTS: dict[tuple[str, str], str] = {
    ("patients", "new"): "PatientAdmin-patient-created",
    ("patients", "update"): "PatientAdmin-patient-updated",
    ("patients", "cancel"): "PatientAdmin-patient-updated",
    ("encounters", "new"): "PatientAdmin-patient-arrived",
    ("encounters", "update"): "PatientAdmin-visit-updated",
    ("encounters", "cancel"): "PatientAdmin-visit-cancelled",
    ("results", "new"): "Results-observation-created",
    ("results", "update"): "Results-observation-updated",
    ("results", "cancel"): "Results-observation-cancelled",
    ("medications", "new"): "Medications-medication-created",
    ("medications", "update"): "Medications-medication-updated",
    ("medications", "cancel"): "Medications-medication-cancelled",
    ("appointments", "new"): "Scheduling-event-appointment-booked",
    ("appointments", "update"): "Scheduling-event-appointment-updated",
    ("appointments", "cancel"): "Scheduling-event-appointment-cancelled",
    ("documents", "new"): "Notes-document-created",
    ("documents", "update"): "Notes-document-updated",
    ("documents", "cancel"): "Notes-document-cancelled",
}
# More specific events chosen from the record's state after an update.
ENCOUNTER_PLANNED_EVENT = "PatientAdmin-patient-preadmitted"
ENCOUNTER_DISCHARGED_EVENT = "PatientAdmin-patient-discharged"
APPOINTMENT_RESCHEDULED_EVENT = "Scheduling-event-appointment-rescheduled"
APPOINTMENT_NOSHOW_EVENT = "Scheduling-event-appointment-noshow"
