"""Reverse ETL: orders and appointments from the warehouse's outboxes to the EHR, exactly once.

``outbox`` holds the tables and their status lifecycle, ``payloads`` builds and validates the
request for each connection's surface, ``sender`` delivers without ever re-sending blindly,
``cli`` is ``redox-elt writeback``. See README "Write-back".
"""

from pipelines.writeback.outbox import ensure_outbox_tables

__all__ = ["ensure_outbox_tables"]
