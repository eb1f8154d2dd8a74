"""What the Flask app holds: settings, the FHIR source and the job runner."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from flask import current_app

from adapter.config import Settings
from adapter.fhir.source import FhirSource


@dataclass
class AppState:
    settings: Settings
    source: FhirSource
    jobs: Any = None  # adapter.jobs.JobRunner (owns its threads and connections)
    trusted_hosts: frozenset[str] = frozenset()  # adapter.api.hosts: Host headers answered


def state() -> AppState:
    return current_app.extensions["fhir_rerank"]
