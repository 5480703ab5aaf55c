"""Dagster assets, checks, partitions, schedules and sensors of the redox-elt pipeline.

Composed into a code location by ``redox_elt/definitions.py``, which reads the environment
and builds the partition-, schedule- and resource-dependent pieces through the ``build_*``
factories here; the Dagster resources live in ``assets.resources``. Plain-Python helpers
(``partitions.windows_for_run``, ``check_queries``) carry no Dagster state
and are what the tests exercise directly.
"""
