"""FHIR I/O: sources (REST server or files), flattening, Bundles."""
from __future__ import annotations

from adapter.config import Settings
from adapter.fhir.source import FhirSource


def make_source(settings: Settings) -> FhirSource:
    """The configured FHIR source: a live server when fhir_base_url is set, else files."""
    if settings.fhir_base_url:
        from adapter.fhir.client import FhirRestSource

        return FhirRestSource.from_settings(settings)
    from adapter.fhir.files import FhirFileSource

    return FhirFileSource.from_settings(settings)
