"""The FHIR write-back operations Redox documents, and the notification event codes.

Redox documents message-Bundle operations for writes (REDOX-REFERENCE §3.2, §12.2):
``ServiceRequest/$servicerequest-create`` and ``Appointment/$appointment-create``,
``$appointment-update``, ``$appointment-cancel``. The Bundle's first entry is a MessageHeader
whose ``eventUri`` names the EventDefinition. There is no ServiceRequest update or cancel
operation (those exist only as Data Model ``Order.Update`` / ``Order.Cancel``). The older
``Appointment/$write`` generation, keyed by an ``urn:redox:event-type`` eventCoding, is still
accepted because real destinations still answer it; the pipeline never sends it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

EVENT_DEFINITION_BASE = "https://fhir.redoxengine.com/EventDefinition/"


@dataclass(frozen=True)
class WriteOperation:
    resource_type: str  # the path segment before ``$``, and the focus resource's type
    name: str  # the operation, including ``$``
    write_entity: str  # ConnectionSpec.write_entities entry that entitles it
    id_system_suffix: str  # the focus resource's business identifier system ends with this
    event_uri: str | None = None  # MessageHeader.eventUri the operation requires
    event: str | None = None  # the write log's event name for ``event_uri`` operations
    # The older generation: MessageHeader.eventCoding (urn:redox:event-type) code -> write log event.
    legacy_events: dict[str, str] = field(default_factory=dict)


# Resource types written back, and the write entity that entitles them (and a search for them by
# identifier).
WRITTEN_RESOURCE_TYPES: dict[str, str] = {"ServiceRequest": "orders", "Appointment": "appointments"}
# The identifier type whose system keys each written resource (``urn:redox:<slug>:<type>``).
_BUSINESS_ID_TYPES: dict[str, str] = {"ServiceRequest": "OrderID", "Appointment": "VN"}


def _operation(
    resource_type: str,
    name: str,
    *,
    event_definition: str | None = None,
    event: str | None = None,
    legacy_events: dict[str, str] | None = None,
) -> WriteOperation:
    """A write operation on ``resource_type``: its write entity and business identifier come
    from the resource type, so the operations of one type cannot disagree on them."""
    return WriteOperation(
        resource_type=resource_type,
        name=name,
        write_entity=WRITTEN_RESOURCE_TYPES[resource_type],
        id_system_suffix=":" + _BUSINESS_ID_TYPES[resource_type],
        event_uri=EVENT_DEFINITION_BASE + event_definition if event_definition else None,
        event=event,
        legacy_events=legacy_events or {},
    )


ORDER_CREATE = _operation(
    "ServiceRequest", "$servicerequest-create", event_definition="ServiceRequestCreate", event="Order-New"
)
APPOINTMENT_CREATE = _operation(
    "Appointment", "$appointment-create", event_definition="AppointmentCreate", event="Scheduling-New"
)
APPOINTMENT_UPDATE = _operation(
    "Appointment", "$appointment-update", event_definition="AppointmentUpdate", event="Scheduling-Reschedule"
)
APPOINTMENT_CANCEL = _operation(
    "Appointment", "$appointment-cancel", event_definition="AppointmentCancel", event="Scheduling-Cancel"
)
APPOINTMENT_LEGACY_WRITE = _operation(
    "Appointment",
    "$write",
    legacy_events={
        "Appointment-New": "Scheduling-New",
        "Appointment-Update": "Scheduling-Reschedule",
        "Appointment-Cancel": "Scheduling-Cancel",
    },
)
WRITE_OPERATIONS: dict[tuple[str, str], WriteOperation] = {
    (op.resource_type, op.name): op
    for op in (
        ORDER_CREATE,
        APPOINTMENT_CREATE,
        APPOINTMENT_UPDATE,
        APPOINTMENT_CANCEL,
        APPOINTMENT_LEGACY_WRITE,
    )
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
    ("orders", "new"): "Order-service-request-created",
    ("orders", "update"): "Order-service-request-updated",
    ("orders", "cancel"): "Order-service-request-cancelled",
}
# More specific events chosen from the record's state after an update.
ENCOUNTER_PLANNED_EVENT = "PatientAdmin-patient-preadmitted"
ENCOUNTER_DISCHARGED_EVENT = "PatientAdmin-patient-discharged"
APPOINTMENT_RESCHEDULED_EVENT = "Scheduling-event-appointment-rescheduled"
APPOINTMENT_NOSHOW_EVENT = "Scheduling-event-appointment-noshow"
