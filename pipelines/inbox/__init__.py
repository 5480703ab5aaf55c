"""The webhook inbox: what Redox pushes (Data Model events, FHIR notifications), received,
stored durably and de-duplicated, then processed into the common model.

- ``envelope``: what one delivered body is (family, de-duplication key, event, quarantine
  reason) — pure, shared by the receiver and the processing.
- ``store``: the SQLite inbox beside the warehouse (never the DuckDB file: the receiver must
  not take the warehouse's writer lock), with a group-commit writer for the receiver.
- ``receiver``: the ASGI destination Redox posts to (verification handshake, token, size).
- ``process``: stored messages → staged rows, panel entries, the events table.
- ``cli``: ``redox-elt webhook serve | stats | replay``.
"""
