"""The REST FHIR source against real HTTP servers: the medplum test server (r4 and HAPI modes,
fault injection, auth, request log) and, for crafted Bundles, a tiny stdlib http.server."""
from __future__ import annotations

import base64
import json
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import pytest
import requests

from adapter.config import load_settings
from adapter.errors import (BadRequest, UpstreamAuthError, UpstreamError, UpstreamGone,
                            UpstreamThrottled, UpstreamTimeout)
from adapter.fhir.client import FhirRestSource
from fhirserver import FIXTURES, FhirTestServer

FAST = {"backoff": 0.01, "retries": 3}


def _total(server: FhirTestServer, resource_type: str, **params: str) -> int:
    response = requests.get(f"{server.base_url}/{resource_type}", params={**params, "_summary": "count"},
                            headers={"Accept": "application/fhir+json"}, timeout=30)
    return int(response.json()["total"])


def _search_requests(server: FhirTestServer) -> list[dict]:
    return [r for r in server.requests() if r["method"] == "GET"]


def test_paging_follows_next_links_to_the_total(fhir: FhirTestServer) -> None:
    source = FhirRestSource(fhir.base_url, page_size=100, **FAST)
    result = source.search("DocumentReference", [])
    total = _total(fhir, "DocumentReference")
    ids = [r["id"] for r in result.resources]
    assert len(ids) == total == 1216 and len(set(ids)) == total
    assert result.full_urls[0] == f"{fhir.base_url}/DocumentReference/{ids[0]}"
    assert result.outcomes == []
    pages = [r for r in _search_requests(fhir)
             if r["path"] == "/fhir/DocumentReference" and "_summary" not in r["query"]]
    assert len(pages) == 13 and "_count=100" in pages[0]["query"]


def test_hapi_getpages_links_and_one_rerun_when_the_cache_expires(hapi: FhirTestServer) -> None:
    expired = []
    session = requests.Session()

    def expire_after_first_page(response: requests.Response, *args, **kwargs) -> None:
        if "_getpages" not in response.url and not expired:  # after page 1, once
            hapi.expire_paging()
            expired.append(response.url)

    session.hooks["response"].append(expire_after_first_page)
    source = FhirRestSource(hapi.base_url, page_size=50, session=session, **FAST)
    result = source.search("Condition", [])
    assert len(result.resources) == _total(hapi, "Condition") == 592
    log = _search_requests(hapi)
    first_pages = [r for r in log if r["path"] == "/fhir/Condition" and "_summary" not in r["query"]]
    getpages = [r for r in log if "_getpages=" in r["query"]]
    assert len(first_pages) == 2  # the search was re-run once after the 410
    assert len(getpages) == 1 + 11 and all(r["path"] == "/fhir" for r in getpages)


def test_hapi_cache_expiring_twice_fails_clearly(hapi: FhirTestServer) -> None:
    session = requests.Session()
    session.hooks["response"].append(
        lambda response, *a, **k: hapi.expire_paging() if "_getpages" not in response.url else None)
    source = FhirRestSource(hapi.base_url, page_size=100, session=session, **FAST)
    # One page only (an unknown patient matches nothing): no paging link, nothing expires.
    assert source.search("Condition", [("patient", "no-such-patient")]).resources == []
    with pytest.raises(UpstreamGone) as caught:
        source.search("Observation", [])
    assert caught.value.status == 502 and caught.value.code == "transient"
    assert "expired twice" in caught.value.message


def test_hapi_fulltext_refusal_is_a_bad_request_with_diagnostics(hapi: FhirTestServer) -> None:
    source = FhirRestSource(hapi.base_url, **FAST)
    with pytest.raises(BadRequest) as caught:
        source.search("DocumentReference", [("_content", "chest pain")])
    assert "Fulltext search is not enabled" in caught.value.message
    assert "/fhir/DocumentReference" in caught.value.message and "chest" not in caught.value.message


def test_503_twice_is_retried_then_succeeds(fhir: FhirTestServer) -> None:
    fhir.inject_fault(status=503, times=2, path_contains="Condition")
    source = FhirRestSource(fhir.base_url, **FAST)
    patient = "Patient/129c6ac7-8d06-89de-ad63-0204a93e76c3"
    result = source.search("Condition", [("patient", patient)])
    assert len(result.resources) == _total(fhir, "Condition", patient=patient) > 0
    tries = [r for r in _search_requests(fhir) if r["path"] == "/fhir/Condition" and "_summary" not in r["query"]]
    assert len(tries) == 3
    assert "patient=Patient%2F129c6ac7" in tries[0]["query"]  # passed as given


def test_5xx_after_retries_names_status_and_path_not_query(fhir: FhirTestServer) -> None:
    fhir.inject_fault(status=502, times=10, path_contains="Observation")
    source = FhirRestSource(fhir.base_url, backoff=0.01, retries=2)
    with pytest.raises(UpstreamError) as caught:
        source.search("Observation", [("patient", "secret-patient-id")])
    error = caught.value
    assert type(error) is UpstreamError and error.status == 502
    assert "502" in error.message and "/fhir/Observation" in error.message and "3 attempts" in error.message
    assert "secret-patient-id" not in error.message
    assert len(_search_requests(fhir)) == 3


def test_429_honours_retry_after_then_throttled(fhir: FhirTestServer) -> None:
    fhir.inject_fault(status=429, times=1, path_contains="Condition", retry_after=1)
    source = FhirRestSource(fhir.base_url, backoff=0.01, retries=1)
    started = time.monotonic()
    assert source.search("Condition", [("_id", "f201")]).resources[0]["id"] == "f201"
    assert time.monotonic() - started >= 0.95
    fhir.inject_fault(status=429, times=5, path_contains="Condition", retry_after=1)
    with pytest.raises(UpstreamThrottled) as caught:
        source.search("Condition", [("_id", "f201")])
    assert caught.value.status == 429 and caught.value.headers == {"Retry-After": "1"}


def test_slow_server_is_an_upstream_timeout(fhir: FhirTestServer) -> None:
    fhir.inject_fault(delay=1.5, times=1, path_contains="Condition")
    source = FhirRestSource(fhir.base_url, timeout=0.3, **FAST)
    started = time.monotonic()
    with pytest.raises(UpstreamTimeout) as caught:
        source.search("Condition", [])
    assert time.monotonic() - started < 1.2
    assert caught.value.status == 504 and "fhir_timeout" in caught.value.message


def test_auth_is_mapped_and_passed_through_with_accept(fhir: FhirTestServer) -> None:
    fhir.set_auth(token="Bearer good-token", forbid="Bearer bad-token")
    source = FhirRestSource(fhir.base_url, page_size=200, **FAST)
    with pytest.raises(UpstreamAuthError) as missing:
        source.search("Condition", [])
    with pytest.raises(UpstreamAuthError) as forbidden:
        source.search("Condition", [], authorization="Bearer bad-token")
    assert (missing.value.status, forbidden.value.status) == (401, 403)
    assert "Bearer" not in missing.value.message + forbidden.value.message
    result = source.search("Condition", [], authorization="Bearer good-token")
    assert len(result.resources) == 592
    log = _search_requests(fhir)
    assert len(log) == 2 + 3  # one try per refusal (4xx is not retried), then 3 pages
    assert [r["authorization"] for r in log] == [None, "Bearer bad-token"] + ["Bearer good-token"] * 3
    assert {r["accept"] for r in log} == {"application/fhir+json"}


def test_page_cap_and_resource_cap_warn(fhir: FhirTestServer) -> None:
    source = FhirRestSource(fhir.base_url, page_size=10, max_pages=2, **FAST)
    capped = source.search("Condition", [])
    assert len(capped.resources) == 20
    assert [o.code for o in capped.outcomes] == ["incomplete"]
    assert "fhir_max_pages" in capped.outcomes[0].diagnostics
    fhir.reset()
    limited = FhirRestSource(fhir.base_url, page_size=10, **FAST).search("Condition", [], limit=25)
    assert len(limited.resources) == len(limited.full_urls) == 25
    assert "stopped at 25 resources" in limited.outcomes[0].diagnostics
    assert "max_resources" in limited.outcomes[0].diagnostics
    assert len(_search_requests(fhir)) == 3  # stopped fetching at the cap


def test_malformed_body_is_an_upstream_error(fhir: FhirTestServer) -> None:
    fhir.inject_fault(malformed=True, times=1, path_contains="Observation")
    with pytest.raises(UpstreamError) as caught:
        FhirRestSource(fhir.base_url, **FAST).search("Observation", [])
    assert caught.value.status == 502 and "not JSON" in caught.value.message


def test_connection_refused_is_retried_then_upstream_error() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    source = FhirRestSource(f"http://127.0.0.1:{port}/fhir", retries=2, backoff=0.1)
    started = time.monotonic()
    with pytest.raises(UpstreamError) as caught:
        source.search("Condition", [])
    assert time.monotonic() - started >= 0.3  # backoff 0.1 + 0.2 between the 3 attempts
    assert type(caught.value) is UpstreamError and "3 attempts" in caught.value.message


def test_patient_exists(fhir: FhirTestServer) -> None:
    source = FhirRestSource(fhir.base_url, **FAST)
    assert source.patient_exists("129c6ac7-8d06-89de-ad63-0204a93e76c3")
    assert source.patient_exists("Patient/example")
    assert not source.patient_exists("no-such-patient")
    fhir.set_auth(token="Bearer t")
    with pytest.raises(UpstreamAuthError):
        source.patient_exists("example")


def test_binary_attachment_fetched_and_size_capped(fhir: FhirTestServer) -> None:
    raw = json.loads((FIXTURES / "hl7-r4-examples" / "Binary-f006.json").read_text())
    data = base64.b64decode(raw["data"])
    source = FhirRestSource(fhir.base_url, **FAST)
    assert source.fetch_attachment("Binary/f006") == ("image/jpeg", data)
    assert source.fetch_attachment(f"{fhir.base_url}/Binary/f006") == ("image/jpeg", data)
    assert source.fetch_attachment("Binary/missing") is None
    small = FhirRestSource(fhir.base_url, max_attachment_bytes=len(data) - 1, **FAST)
    assert small.fetch_attachment("Binary/f006") is None
    fhir.reset()
    assert source.fetch_attachment("http://elsewhere.example/fhir/Binary/f006?x=1") is None
    assert fhir.requests() == []  # another server: not even asked
    # Same host, outside the FHIR base: the caller's token is not sent there either (this
    # admin URL answers 200 JSON to anyone, so a fetch would have returned its bytes).
    origin = fhir.base_url.rsplit("/fhir", 1)[0]
    assert source.fetch_attachment(f"{origin}/admin/requests", "Bearer secret") is None
    assert source.fetch_attachment(f"{origin}/fhir-other/Binary/f006", "Bearer x") is None


def test_search_many_runs_the_types_concurrently(fhir: FhirTestServer) -> None:
    patient = "Patient/129c6ac7-8d06-89de-ad63-0204a93e76c3"
    searches = [(t, [("patient", patient)]) for t in ("DocumentReference", "Observation", "Condition")]
    fhir.inject_fault(delay=0.8, times=3, path_contains=patient.split("/")[1])
    source = FhirRestSource.from_settings(load_settings({"fhir_base_url": fhir.base_url}, env={}))
    started = time.monotonic()
    results = source.search_many(searches)
    elapsed = time.monotonic() - started
    assert elapsed < 2.0  # sequential would take 3 × 0.8 s
    assert list(results) == ["DocumentReference", "Observation", "Condition"]
    for resource_type, result in results.items():
        assert len(result.resources) == _total(fhir, resource_type, patient=patient)


class CraftedFhir(BaseHTTPRequestHandler):
    """Serves `pages[key]` Bundles: key = the query string ('' for the first page)."""

    pages: dict[str, dict] = {}
    seen: list[str] = []

    def do_GET(self) -> None:  # noqa: N802 (http.server API)
        parts = urlsplit(self.path)
        query = {k: v[0] for k, v in parse_qs(parts.query).items() if k != "_count"}
        key = "&".join(f"{k}={v}" for k, v in sorted(query.items()))
        self.seen.append(self.path)
        body = json.dumps(self.pages.get(key, {"resourceType": "OperationOutcome"})).encode()
        self.send_response(200 if key in self.pages else 404)
        self.send_header("Content-Type", "application/fhir+json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def crafted() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), CraftedFhir)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    CraftedFhir.pages, CraftedFhir.seen = {}, []
    yield f"http://127.0.0.1:{server.server_address[1]}/fhir"
    server.shutdown()
    server.server_close()


def _bundle(entries: list, next_url: str | None = None) -> dict:
    links = [{"relation": "next", "url": next_url}] if next_url else []
    return {"resourceType": "Bundle", "type": "searchset", "entry": entries, "link": links}


def _obs(rid: str) -> dict:
    return {"resource": {"resourceType": "Observation", "id": rid, "status": "final"}}


def test_relative_links_odd_entries_and_foreign_next_link(crafted: str) -> None:
    CraftedFhir.pages = {
        "": _bundle([_obs("a"), {"fullUrl": "urn:x", "resource": "not an object"}, {"search": {}}],
                    "Observation?page=2"),
        "page=2": _bundle([_obs("b"), {"resource": {"id": "no-type"}},
                           {"search": {"mode": "outcome"}, "resource": {
                               "resourceType": "OperationOutcome",
                               "issue": [{"severity": "warning", "code": "processing",
                                          "diagnostics": "some results were dropped"}]}}],
                          "?_getpages=abc&_getpagesoffset=2"),
        "_getpages=abc&_getpagesoffset=2": _bundle(
            [{"fullUrl": "http://upstream.example/fhir/Observation/c", **_obs("c")}]),
    }
    result = FhirRestSource(crafted, **FAST).search("Observation", [])
    assert [r["id"] for r in result.resources] == ["a", "b", "c"]
    assert result.full_urls == [f"{crafted}/Observation/a", f"{crafted}/Observation/b",
                                "http://upstream.example/fhir/Observation/c"]
    assert [(o.severity, o.diagnostics) for o in result.outcomes] == [
        ("warning", "FHIR server: some results were dropped"),
        ("warning", "skipped 3 search entries without a resource/resourceType")]
    assert CraftedFhir.seen[1].startswith("/fhir/Observation?page=2")
    assert CraftedFhir.seen[2].startswith("/fhir?_getpages=abc")

    CraftedFhir.pages = {"": _bundle([_obs("a")], "http://evil.example/fhir/Observation?page=2")}
    with pytest.raises(UpstreamError) as caught:
        FhirRestSource(crafted, **FAST).search("Observation", [])
    assert "another server" in caught.value.message and "evil.example" in caught.value.message
    origin = crafted.rsplit("/fhir", 1)[0]
    CraftedFhir.pages = {"": _bundle([_obs("a")], f"{origin}/other/Observation?page=2")}
    with pytest.raises(UpstreamError, match="outside the FHIR base"):
        FhirRestSource(crafted, **FAST).search("Observation", [])
    CraftedFhir.pages = {"": {"resourceType": "Patient", "id": "x"}}
    with pytest.raises(UpstreamError, match="expected a Bundle"):
        FhirRestSource(crafted, **FAST).search("Observation", [])


def test_retry_warnings_mask_the_patient_id(fhir, caplog) -> None:
    import logging

    from adapter.fhir.client import FhirRestSource

    fhir.inject_fault(status=503, times=1, path_contains="Patient/")
    source = FhirRestSource(fhir.base_url, retries=1, backoff=0.01)
    with caplog.at_level(logging.INFO):
        source.patient_exists("79a66c97-6131-3213-f3c9-4606946ab056")
    assert "/Patient/*" in caplog.text and "79a66c97" not in caplog.text
