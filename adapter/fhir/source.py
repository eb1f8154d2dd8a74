"""The FHIR source interface: a live REST server or files on disk answer the same calls."""
from __future__ import annotations

from abc import ABC, abstractmethod

from adapter.models import FetchResult


class FhirSource(ABC):
    """Fetches resources of one type for one search.

    `params` are FHIR search parameters as (name, value) pairs (e.g. ("patient", "123"),
    ("date", "ge2020")); `authorization` is the caller's Authorization header, passed through.
    Raises adapter.errors.Upstream* on failure. Never logs resource content.
    """

    @abstractmethod
    def search(self, resource_type: str, params: list[tuple[str, str]],
               authorization: str | None = None, limit: int | None = None) -> FetchResult:
        """All matching resources (following paging), up to `limit`."""

    def search_many(self, searches: list[tuple[str, list[tuple[str, str]]]],
                    authorization: str | None = None,
                    limit: int | None = None) -> dict[str, FetchResult]:
        """Several searches (one per resource type); sources may run them concurrently."""
        return {rtype: self.search(rtype, params, authorization, limit)
                for rtype, params in searches}

    @abstractmethod
    def patient_exists(self, patient_id: str, authorization: str | None = None) -> bool:
        """True when Patient/<id> is known upstream (used to answer 404 for unknown patients)."""

    def fetch_attachment(self, url: str, authorization: str | None = None) -> tuple[str, bytes] | None:
        """(content type, bytes) of an attachment given by url (e.g. "Binary/x"), or None."""
        return None

    def describe(self) -> str:
        return type(self).__name__
