"""Interoperability suite: the adapter end to end against a FHIR server it does not control.

`pytest -m hapi --fhir-base-url URL` runs it against any live FHIR R4 server (e.g. a HAPI
sandbox): it loads its own small test patient with a transaction Bundle, runs the searches
through the adapter, and deletes what it created. Without a URL the `hapi`-marked tests are
skipped; the same scenarios always run against the local test server in HAPI mode.
"""
from __future__ import annotations

import base64
import uuid
from urllib.parse import urlsplit

import pytest
import requests

from adapter import create_app
from adapter.config import load_settings

HEADERS = {"Content-Type": "application/fhir+json", "Accept": "application/fhir+json"}


def _note(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _test_patient_bundle(tag: str) -> dict:
    pid = f"urn:uuid:{uuid.uuid4()}"
    subject = {"reference": pid}

    def entry(resource: dict) -> dict:
        return {"fullUrl": f"urn:uuid:{uuid.uuid4()}", "resource": resource,
                "request": {"method": "POST", "url": resource["resourceType"]}}

    def condition(text: str, code: str) -> dict:
        return entry({"resourceType": "Condition", "subject": subject,
                      "clinicalStatus": {"coding": [{
                          "system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                          "code": "active"}]},
                      "code": {"coding": [{"system": "http://snomed.info/sct", "code": code,
                                           "display": text}], "text": text}})

    return {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": pid, "resource": {"resourceType": "Patient",
                                      "identifier": [{"system": "urn:fhir-rerank:interop",
                                                      "value": tag}],
                                      "name": [{"family": "Interop", "given": ["Test"]}]},
         "request": {"method": "POST", "url": "Patient"}},
        condition("Asthma", "195967001"),
        condition("Essential hypertension", "59621000"),
        condition("Fracture of ankle", "16114001"),
        entry({"resourceType": "Observation", "status": "final", "subject": subject,
               "code": {"coding": [{"system": "http://loinc.org", "code": "4548-4",
                                    "display": "Hemoglobin A1c/Hemoglobin.total in Blood"}]},
               "valueQuantity": {"value": 8.1, "unit": "%", "system": "http://unitsofmeasure.org",
                                 "code": "%"}}),
        entry({"resourceType": "Observation", "status": "final", "subject": subject,
               "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4",
                                    "display": "Heart rate"}]},
               "valueQuantity": {"value": 72, "unit": "/min"}}),
        entry({"resourceType": "DocumentReference", "status": "current", "subject": subject,
               "type": {"text": "Progress note"},
               "content": [{"attachment": {"contentType": "text/plain", "data": _note(
                   "Wheezing and shortness of breath at night; asthma inhaler refilled.")}}]}),
    ]}


@pytest.fixture()
def loaded_patient(_interop_base):
    """(FHIR base URL, patient id) of a freshly loaded test patient, deleted afterwards."""
    base = _interop_base
    bundle = _test_patient_bundle(uuid.uuid4().hex)
    resp = requests.post(base, json=bundle, headers=HEADERS, timeout=60)
    assert resp.status_code in (200, 201), resp.text[:500]
    locations = [e["response"]["location"].split("/_history")[0]
                 for e in resp.json()["entry"]]
    patient = next(loc for loc in locations if loc.startswith("Patient/")).split("/")[1]
    yield base, patient
    for loc in reversed(locations):
        requests.delete(f"{base}/{loc}", headers=HEADERS, timeout=60)


@pytest.fixture(params=["local-hapi-mode", pytest.param("live", marks=pytest.mark.hapi)])
def _interop_base(request):
    if request.param == "live":
        return request.config.getoption("--fhir-base-url").rstrip("/")
    return request.getfixturevalue("hapi").base_url


def _client(base: str):
    return create_app(load_settings({"fhir_base_url": base, "reranker": "none"},
                                    env={})).test_client()


def test_each_type_is_found_and_ranked(loaded_patient):
    base, patient = loaded_patient
    client = _client(base)
    for rtype, query, first, count in [
            ("Condition", "asthma", "Asthma", 3),
            ("Observation", "hemoglobin a1c", "4548-4", 2),
            ("DocumentReference", "wheezing", "Progress note", 1)]:
        resp = client.get(f"/fhir/{rtype}?patient={patient}&_content={query}")
        assert resp.status_code == 200, resp.get_data(as_text=True)[:400]
        bundle = resp.get_json()
        entries = [e for e in bundle["entry"] if e["search"]["mode"] == "match"]
        assert bundle["total"] == count and len(entries) == count
        assert first in str(entries[0]["resource"])
        assert all(e["fullUrl"].startswith(base) for e in entries)


def test_rerank_across_types_pages_through_everything(loaded_patient):
    base, patient = loaded_patient
    client = _client(base)
    resp = client.get(f"/fhir/Patient/{patient}/$rerank?query=asthma%20wheezing&_count=4")
    bundle = resp.get_json()
    assert resp.status_code == 200 and bundle["total"] == 6
    first = [e for e in bundle["entry"] if e["search"]["mode"] == "match"]
    assert {e["resource"]["resourceType"] for e in first[:2]} == {"Condition",
                                                                  "DocumentReference"}
    nxt = next(link["url"] for link in bundle["link"] if link["relation"] == "next")
    page2 = client.get(urlsplit(nxt)._replace(scheme="", netloc="").geturl()).get_json()
    ids = {e["fullUrl"] for e in bundle["entry"] + page2["entry"]
           if e["search"]["mode"] == "match"}
    assert len(ids) == 6


def test_unknown_patient_is_404(_interop_base):
    resp = _client(_interop_base).get(f"/fhir/Condition?patient=nobody-{uuid.uuid4().hex[:8]}"
                                      "&_content=x")
    assert resp.status_code == 404
    assert resp.get_json()["issue"][0]["code"] == "not-found"
