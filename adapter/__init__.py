"""FHIR Rerank Adapter: search a patient's FHIR record by meaning.

`create_app(config=None)` builds the Flask app; nothing is read or loaded at import time.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

from adapter.version import __version__

if TYPE_CHECKING:
    from flask import Flask

    from adapter.config import Settings
    from adapter.fhir.source import FhirSource

__all__ = ["__version__", "create_app"]


def create_app(config: "Settings | Mapping[str, Any] | None" = None, *,
               source: "FhirSource | None" = None) -> "Flask":
    """Build the app from Settings (or a mapping of overrides on top of config/ and the env):
    `adapter.api.app.create_app`. Imported here, not at the top: this package runs before
    every adapter module, which must not all load Flask and the API."""
    from adapter.api.app import create_app as build

    return build(config, source=source)
