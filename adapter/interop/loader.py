"""Direct calls to the FHIR server (not through the adapter): load the test patient, delete it.

The test patient goes in with one transaction Bundle (the Binary first, on its own, so the
note can point at it by URL). Its server ids come from the transaction-response, whose entries
follow the request's order. Cleanup deletes in reverse order of creation (children before the
Patient, as servers with referential integrity require) and then checks the Patient is gone.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import requests

from adapter.interop.testdata import (TestRecord, binary_resource, build_test_record,
                                       new_tag)

log = logging.getLogger(__name__)
FHIR_JSON = "application/fhir+json"
TIMEOUT_S = 60.0


class ServerCall:
    """The kit's own HTTP client for the FHIR server: FHIR JSON, a timeout, the token."""

    def __init__(self, base_url: str, authorization: str | None) -> None:
        self.base_url = base_url.rstrip("/")
        self.authorization = authorization
        self.session = requests.Session()

    def request(self, method: str, url: str, *, auth: bool = True, json: Any = None,
                params: Any = None) -> requests.Response:
        """`url` is relative to the base unless absolute."""
        headers = {"Accept": FHIR_JSON, "User-Agent": "fhir-rerank-interop/0.1"}
        if json is not None:
            headers["Content-Type"] = FHIR_JSON
        if auth and self.authorization:
            headers["Authorization"] = self.authorization
        full = url if "://" in url else f"{self.base_url}/{url.lstrip('/')}"
        if url.startswith("?"):
            full = self.base_url + url
        return self.session.request(method, full, headers=headers, json=json, params=params,
                                    timeout=TIMEOUT_S, allow_redirects=False)

    def get(self, url: str, **kwargs: Any) -> requests.Response:
        return self.request("GET", url, **kwargs)


def diagnostics(response: requests.Response) -> str:
    """The first issue's diagnostics of an OperationOutcome answer, or the body's start."""
    try:
        body = response.json()
        issue = (body.get("issue") or [{}])[0]
        return str(issue.get("diagnostics") or (issue.get("details") or {}).get("text")
                   or issue.get("code") or "no diagnostics")
    except (ValueError, AttributeError, IndexError, TypeError):
        return response.text[:160].strip() or "empty body"


@dataclass
class LoadedPatient:
    """The test patient as stored: server ids per type, in the order of `record.resources`."""

    record: TestRecord
    patient_id: str
    binary_location: str
    ids: dict[str, list[str]] = field(default_factory=dict)
    locations: list[str] = field(default_factory=list)  # "Type/id", in creation order

    def count(self, rtype: str) -> int:
        return len(self.ids[rtype])

    @property
    def total(self) -> int:
        return sum(len(v) for v in self.ids.values())

    def marker_id(self, marker: str) -> str:
        return self.ids["DocumentReference"][self.record.markers[marker]]


class LoadError(Exception):
    """The test patient could not be loaded; the message says what the server answered."""


def _location(entry: dict[str, Any]) -> str:
    response = entry.get("response") or {}
    location = str(response.get("location") or "")
    resource = entry.get("resource") or {}
    if not location and resource.get("id"):
        location = f"{resource['resourceType']}/{resource['id']}"
    location = location.split("/_history")[0]
    parts = [p for p in location.split("?")[0].split("/") if p]
    if len(parts) < 2:
        raise LoadError(f"a transaction-response entry has no location ({response.get('status')})")
    return "/".join(parts[-2:])


def load_test_patient(call: ServerCall) -> LoadedPatient:
    """Create the Binary, then the transaction; returns the stored ids."""
    tag = new_tag()
    response = call.request("POST", "Binary", json=binary_resource(tag))
    if response.status_code not in (200, 201):
        raise LoadError(f"POST Binary answered {response.status_code}: {diagnostics(response)}")
    created = response.json() if response.content else {}
    binary = (f"Binary/{created['id']}" if isinstance(created, dict) and created.get("id")
              else _location({"response": {"location": response.headers.get("Location", "")}}))
    record = build_test_record(f"{call.base_url}/{binary}", tag)
    response = call.request("POST", "", json=record.bundle)
    if response.status_code not in (200, 201):
        call.request("DELETE", binary)
        raise LoadError(f"the transaction Bundle answered {response.status_code}: "
                        f"{diagnostics(response)}")
    entries = response.json().get("entry") or []
    if len(entries) != len(record.bundle["entry"]):
        raise LoadError(f"the transaction-response has {len(entries)} entries for "
                        f"{len(record.bundle['entry'])} requests")
    locations = [_location(e) for e in entries]
    loaded = LoadedPatient(record, locations[0].split("/")[1], binary,
                           {t: [] for t in record.resources}, locations + [binary])
    for location in locations[1:]:
        rtype, rid = location.split("/")
        loaded.ids[rtype].append(rid)
    log.debug("loaded the interop test patient: %d resources", len(locations) + 1)
    return loaded


def delete_test_patient(call: ServerCall, loaded: LoadedPatient) -> list[str]:
    """Delete everything created, children first; returns the problems (empty when clean)."""
    problems = []
    order = [loc for loc in reversed(loaded.locations) if not loc.startswith(("Patient/", "Binary/"))]
    order += [f"Patient/{loaded.patient_id}", loaded.binary_location]
    for location in order:
        try:
            response = call.request("DELETE", location)
        except requests.RequestException as exc:
            problems.append(f"DELETE {location.split('/')[0]}: {type(exc).__name__}")
            continue
        if response.status_code not in (200, 202, 204, 404, 410):
            problems.append(f"DELETE {location.split('/')[0]} answered {response.status_code}: "
                            f"{diagnostics(response)}")
    check = call.get(f"Patient/{loaded.patient_id}")
    if check.status_code not in (404, 410):
        problems.append(f"the test Patient still reads {check.status_code} after DELETE")
    return problems
