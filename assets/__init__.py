"""Dagster assets, checks, partitions, schedules and sensors of the redox-elt pipeline.

Composed into a code location by ``redox_elt/definitions.py``. Plain-Python helpers
(``partitions.windows_for_run``, ``sync_run``, ``check_queries``) carry no Dagster state
and are what the tests exercise directly.
"""
