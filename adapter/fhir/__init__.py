"""FHIR I/O: sources (REST server or files), flattening, Bundles."""
from __future__ import annotations

from adapter.config import Settings
from adapter.fhir.client import FhirRestSource
from adapter.fhir.files import FhirFileSource
from adapter.fhir.source import FhirSource


def make_source(settings: Settings) -> FhirSource:
    """The configured FHIR source: a live server when fhir_base_url is set, else files."""
    if settings.fhir_base_url:
        return FhirRestSource.from_settings(settings)
    return FhirFileSource.from_settings(settings)
