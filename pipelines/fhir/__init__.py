"""Redox's FHIR R4 surface: settings and query builders (``settings``), per-patient pulls
(``patient_pull``), the page-to-rows function (``pages``) and the normalizers (``normalize``).
EHR connections are extracted per patient through ``pipelines.access``."""
