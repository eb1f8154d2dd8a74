"""The test FHIR server itself: real medplum searches, paging, HAPI behaviour, the admin knobs.

Other suites trust this server as their upstream, so its own behaviour is pinned here.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import requests

from fhirserver import FIXTURES, FhirTestServer, fixture_patients

FHIR_JSON = {"Accept": "application/fhir+json"}


def _get(url: str, **params: str) -> requests.Response:
    return requests.get(url, params=params or None, headers=FHIR_JSON, timeout=30)


def _next_link(bundle: dict) -> str | None:
    return next((link["url"] for link in bundle.get("link", []) if link["relation"] == "next"), None)


def _follow_all(first: dict) -> list[dict]:
    entries, bundle = list(first.get("entry", [])), first
    while (url := _next_link(bundle)) is not None:
        response = _get(url)
        assert response.status_code == 200, response.text
        bundle = response.json()
        entries += bundle.get("entry", [])
    return entries


def _ndjson_counts(resource_type: str) -> dict[str, int]:
    """Resources per patient reference, counted straight from the Bulk NDJSON fixture."""
    counts: dict[str, int] = {}
    for line in (FIXTURES / "synthea-bulk" / f"{resource_type}.000.ndjson").read_text().splitlines():
        reference = json.loads(line)["subject"]["reference"]
        counts[reference] = counts.get(reference, 0) + 1
    return counts


def test_paging_next_links_reach_total(fhir: FhirTestServer) -> None:
    first = _get(f"{fhir.base_url}/DocumentReference", _count="50").json()
    assert first["total"] == 1215 + 1  # Bulk NDJSON notes + the HL7 example
    assert len(first["entry"]) == 50
    entries = _follow_all(first)
    ids = [e["resource"]["id"] for e in entries]
    assert len(ids) == first["total"] and len(set(ids)) == len(ids)


def test_default_page_size_and_sorted_stable_pages(fhir: FhirTestServer) -> None:
    first = _get(f"{fhir.base_url}/Condition", _sort="-recorded-date").json()
    assert len(first["entry"]) == 20
    entries = _follow_all(first)
    assert len(entries) == first["total"]
    dates = [e["resource"].get("recordedDate") for e in entries]
    known = [d for d in dates if d]
    assert known[:3] == sorted(known, reverse=True)[:3]


def test_patient_bare_id_matches_ndjson(fhir: FhirTestServer) -> None:
    counts = _ndjson_counts("DocumentReference")
    reference, expected = max(counts.items(), key=lambda kv: kv[1])
    patient_id = reference.split("/", 1)[1]
    bare = _get(f"{fhir.base_url}/DocumentReference", patient=patient_id, _count="0").json()
    typed = _get(f"{fhir.base_url}/DocumentReference", subject=reference, _count="0").json()
    assert bare["total"] == typed["total"] == expected


def test_transaction_bundle_references_rewritten(fhir: FhirTestServer) -> None:
    bundle_path = next((FIXTURES / "synthea-r4-bundles").glob("Parker_Casper_*.json"))
    bundle = json.loads(bundle_path.read_text())
    patient_id = bundle["entry"][0]["fullUrl"].removeprefix("urn:uuid:")
    expected = sum(1 for e in bundle["entry"] if e["resource"]["resourceType"] == "Observation")
    found = _get(f"{fhir.base_url}/Observation", patient=patient_id, _count="1000").json()
    assert found["total"] == expected
    assert {e["resource"]["subject"]["reference"] for e in found["entry"]} == {f"Patient/{patient_id}"}


def test_unknown_parameter_ignored_and_recorded(fhir: FhirTestServer) -> None:
    plain = _get(f"{fhir.base_url}/Condition", _count="0").json()["total"]
    odd = _get(f"{fhir.base_url}/Condition", **{"no-such-param": "x", "_count": "0"}).json()
    assert odd["total"] == plain > 0
    assert "no-such-param" not in odd["link"][0]["url"]
    assert fhir.requests()[-1]["ignored"] == ["no-such-param"]


def test_read_missing_is_404_outcome_and_binary_raw(fhir: FhirTestServer) -> None:
    missing = _get(f"{fhir.base_url}/Observation/does-not-exist")
    assert missing.status_code == 404 and missing.json()["resourceType"] == "OperationOutcome"
    raw = requests.get(f"{fhir.base_url}/Binary/f006", headers={"Accept": "image/*"}, timeout=30)
    assert raw.headers["Content-Type"] == "image/jpeg" and raw.content[:3] == b"\xff\xd8\xff"
    as_json = _get(f"{fhir.base_url}/Binary/f006").json()
    assert as_json["resourceType"] == "Binary" and as_json["contentType"] == "image/jpeg"


def test_fault_injection_then_normal(fhir: FhirTestServer) -> None:
    fhir.inject_fault(status=503, times=2, path_contains="Observation", retry_after=1)
    assert _get(f"{fhir.base_url}/Condition", _count="1").status_code == 200  # other path untouched
    for _ in range(2):
        failed = _get(f"{fhir.base_url}/Observation", _count="1")
        assert failed.status_code == 503 and failed.headers["Retry-After"] == "1"
        assert failed.json()["issue"][0]["code"] == "transient"
    assert _get(f"{fhir.base_url}/Observation", _count="1").status_code == 200
    fhir.inject_fault(malformed=True, path_contains="Patient")
    broken = _get(f"{fhir.base_url}/Patient")
    assert broken.status_code == 200
    with pytest.raises(ValueError):
        broken.json()


def test_auth_and_request_log(fhir: FhirTestServer) -> None:
    fhir.set_auth(token="Bearer good", forbid="Bearer banned")
    url = f"{fhir.base_url}/Patient"
    assert requests.get(url, headers=FHIR_JSON, timeout=30).status_code == 401
    assert requests.get(url, headers={**FHIR_JSON, "Authorization": "Bearer banned"}, timeout=30).status_code == 403
    assert requests.get(url, headers={**FHIR_JSON, "Authorization": "Bearer good"}, timeout=30).status_code == 200
    seen = [r["authorization"] for r in fhir.requests() if r["path"] == "/fhir/Patient"]
    assert seen == [None, "Bearer banned", "Bearer good"]
    fhir.reset()
    assert requests.get(url, headers=FHIR_JSON, timeout=30).status_code == 200
    assert len(fhir.requests()) == 1


def test_hapi_getpages_links_and_410(hapi: FhirTestServer) -> None:
    first = _get(f"{hapi.base_url}/DocumentReference", _count="100").json()
    next_url = _next_link(first)
    assert next_url is not None and next_url.startswith(f"{hapi.base_url}?_getpages=")
    assert "_getpagesoffset=100&_count=100&_pretty=true&_bundletype=searchset" in next_url
    assert len(_follow_all(first)) == first["total"]
    hapi.expire_paging()
    gone = _get(next_url)
    assert gone.status_code == 410
    assert gone.json()["resourceType"] == "OperationOutcome"


def test_hapi_content_refused(hapi: FhirTestServer) -> None:
    refused = _get(f"{hapi.base_url}/DocumentReference", _content="chest pain")
    assert refused.status_code == 400
    assert refused.json()["issue"][0]["diagnostics"] == (
        "Fulltext search is not enabled on this service, can not process parameter: _content")


def test_fixture_patients_counts(fhir_server: FhirTestServer) -> None:
    patients = fixture_patients(fhir_server)
    totals = [p["total"] for p in patients]
    assert totals == sorted(totals, reverse=True)
    largest = patients[0]
    assert largest["total"] == largest["DocumentReference"] + largest["Observation"] + largest["Condition"] > 0
    doc_counts = _ndjson_counts("DocumentReference")
    by_id = {p["id"]: p for p in patients}
    for reference, n in doc_counts.items():
        assert by_id[reference.split("/", 1)[1]]["DocumentReference"] == n


def test_start_failure_reports_stderr(tmp_path: Path) -> None:
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(RuntimeError, match="server stderr"):
        FhirTestServer().start([broken])
