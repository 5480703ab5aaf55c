"""Tests of the ELT pipelines (normalizers, loaders)."""
