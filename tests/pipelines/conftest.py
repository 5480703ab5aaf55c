"""Fixtures shared by the pipeline tests."""

from tests.pipelines.inbox_receiver import receiver  # noqa: F401  (the fixture, by name)
