"""The adapter's core end to end against both FHIR servers it is tested with: the Node test
server (medplum, `fhir`) and real HAPI FHIR JPA (`hapi_fhir`, tests/hapi), each holding the
largest Synthea Bulk patient (708 base64 notes, 219 Conditions) under the same ids.

search → flatten → BM25 → Bundle, the upstream paging behind it (HAPI caps pages at 200 and
pages with `_getpages`), `$rerank`, filters, attachments inline and by URL, and the caller's
token passed through: the same answers whichever server is upstream.
"""
from __future__ import annotations

import base64
import json
import uuid
from urllib.parse import urlsplit

import pytest
import requests

from adapter import create_app
from adapter.config import load_settings

BIG = "79a66c97-6131-3213-f3c9-4606946ab056"
FHIR_JSON = "application/fhir+json"
# ids: not "hapi", which conftest reads as the `-m hapi` marker of the --fhir-base-url suite
SERVERS = ["node-server", "hapi-jpa"]


@pytest.fixture(params=SERVERS)
def upstream(request):
    """The Node test server or real HAPI (both reset after the test)."""
    return request.getfixturevalue("fhir" if request.param == "node-server" else "hapi_fhir")


def adapter_for(server):
    settings = load_settings({"reranker": "none", "fhir_base_url": server.base_url,
                              "fhir_retries": 1, "fhir_backoff": 0.01, "fhir_timeout": 30}, env={})
    return create_app(settings).test_client()


def bundle_of(resp):
    assert resp.status_code == 200, resp.get_data(as_text=True)[:500]
    assert resp.content_type.startswith(FHIR_JSON)
    return resp.get_json()


def matches(bundle):
    return [e for e in bundle.get("entry", []) if e["search"]["mode"] == "match"]


def infos(bundle):
    return [i.get("diagnostics", "") for e in bundle.get("entry", []) if e["search"]["mode"] == "outcome"
            for i in e["resource"]["issue"]]


def ids(bundle):
    return [e["fullUrl"].rsplit("/", 2)[-2] + "/" + e["fullUrl"].rsplit("/", 1)[-1] for e in matches(bundle)]


def scored(bundle):
    """(score, ids with that score) in rank order."""
    out: list[tuple[float, set[str]]] = []
    for entry, rid in zip(matches(bundle), ids(bundle)):
        score = round(entry["search"]["score"], 9)
        if out and out[-1][0] == score:
            out[-1][1].add(rid)
        else:
            out.append((score, {rid}))
    return out[:-1]  # the last tie group may be cut by _count differently


def test_search_flatten_bm25_bundle(upstream):
    """Every Condition and every note is pulled (HAPI: pages of at most 200 over `_getpages`),
    flattened (notes from base64), ranked and returned as a searchset pointing at the server."""
    rest = adapter_for(upstream)
    bundle = bundle_of(rest.get(f"/fhir/Condition?patient={BIG}&_content=heart%20disease&_count=5"))
    assert bundle["type"] == "searchset" and len(matches(bundle)) == 5
    assert all(e["fullUrl"].startswith(upstream.base_url + "/Condition/") for e in matches(bundle))
    assert any("of 219 resources" in d and "hold a word of the question" in d
               for d in infos(bundle)), infos(bundle)
    scores = [e["search"]["score"] for e in matches(bundle)]
    assert scores == sorted(scores, reverse=True)
    notes = bundle_of(rest.get(f"/fhir/DocumentReference?patient={BIG}&_content=kidney%20disease&_count=3"))
    assert any("(of 708)" in d and "hold a word of the question" in d
               for d in infos(notes)), infos(notes)
    assert len(matches(notes)) == 3


def test_both_servers_give_the_same_ranking_node_and_hapi(fhir, hapi_fhir):
    """Same data under the same ids: the adapter's answer must not depend on the server."""
    for url in (f"/fhir/Condition?patient={BIG}&_content=sinusitis%20chronic&_count=20",
                f"/fhir/DocumentReference?patient={BIG}&_content=kidney%20anxiety&_count=20",
                f"/fhir/$rerank?query=emergency%20breathing&patient={BIG}&_count=30"
                "&_type=Condition,DocumentReference"):
        node, hapi = (bundle_of(adapter_for(s).get(url)) for s in (fhir, hapi_fhir))
        assert ids(node) and node["total"] == hapi["total"], url
        assert ids(node) == ids(hapi), url  # ties go by resource id, whatever the server order
        assert scored(node) == scored(hapi), url


def test_paging_is_stable_and_complete(upstream):
    rest = adapter_for(upstream)
    base = f"/fhir/Condition?patient={BIG}&_content=stress%20employment&recall=30"
    whole = matches(bundle_of(rest.get(base + "&_count=30")))
    seen, url = [], base + "&_count=7"
    while url:
        page = bundle_of(rest.get(url))
        seen += matches(page)
        nxt = [link["url"] for link in page["link"] if link["relation"] == "next"]
        url = urlsplit(nxt[0])._replace(scheme="", netloc="").geturl() if nxt else None
    assert [e["fullUrl"] for e in seen] == [e["fullUrl"] for e in whole] and len(seen) == 30


def test_rerank_get_post_and_instance_agree(upstream):
    rest = adapter_for(upstream)
    got = bundle_of(rest.get(f"/fhir/$rerank?query=sinusitis&patient={BIG}"
                             "&_type=Condition,DocumentReference&_count=50"))
    assert {e["resource"]["resourceType"] for e in matches(got)} == {"Condition", "DocumentReference"}
    body = {"resourceType": "Parameters", "parameter": [
        {"name": "query", "valueString": "sinusitis"},
        {"name": "patient", "valueReference": {"reference": f"Patient/{BIG}"}},
        {"name": "_type", "valueCode": "Condition"}, {"name": "_type", "valueCode": "DocumentReference"},
        {"name": "_count", "valueInteger": 50}]}
    posted = bundle_of(rest.post("/fhir/$rerank", data=json.dumps(body), content_type=FHIR_JSON))
    instance = bundle_of(rest.get(f"/fhir/Patient/{BIG}/$rerank?query=sinusitis"
                                  "&_type=Condition,DocumentReference&_count=50"))
    assert ids(got) == ids(posted) == ids(instance)


def test_filters_reach_the_server_and_hold(upstream):
    rest = adapter_for(upstream)
    url = f"/fhir/Condition?patient={BIG}&_content=disorder&recall=500&_count=200"
    everything = bundle_of(rest.get(url))
    active = bundle_of(rest.get(url + "&clinical-status=active"))
    assert 0 < len(matches(active)) < len(matches(everything))
    assert all(c["code"] == "active" for e in matches(active)
               for c in e["resource"]["clinicalStatus"]["coding"])
    recent = bundle_of(rest.get(f"/fhir/DocumentReference?patient={BIG}&_content=kidney"
                                "&date=ge1990-01-01&recall=1000&_count=200"))
    assert matches(recent) and all(e["resource"]["date"] >= "1990" for e in matches(recent))


def test_attachment_by_url_is_fetched_from_the_server(upstream):
    """A note whose text is only in a Binary the DocumentReference points at by URL."""
    word = f"zq{uuid.uuid4().hex[:8]}"
    headers = {"Content-Type": FHIR_JSON, "Accept": FHIR_JSON}
    text = base64.b64encode(f"Patient reports {word} after meals.".encode()).decode()
    binary = requests.post(f"{upstream.base_url}/Binary", headers=headers, timeout=60, json={
        "resourceType": "Binary", "contentType": "text/plain", "data": text})
    assert binary.status_code == 201, binary.text[:300]
    binary_id = binary.json()["id"]
    doc = requests.post(f"{upstream.base_url}/DocumentReference", headers=headers, timeout=60, json={
        "resourceType": "DocumentReference", "status": "current",
        "subject": {"reference": f"Patient/{BIG}"}, "date": "2020-01-01T00:00:00Z",
        "content": [{"attachment": {"contentType": "text/plain",
                                    "url": f"{upstream.base_url}/Binary/{binary_id}"}}]})
    assert doc.status_code == 201, doc.text[:300]
    doc_id = doc.json()["id"]
    try:
        found = bundle_of(adapter_for(upstream).get(
            f"/fhir/DocumentReference?patient={BIG}&_content={word}&_count=3"))
        assert ids(found)[:1] == [f"DocumentReference/{doc_id}"]
        assert found["total"] == 1
    finally:
        requests.delete(f"{upstream.base_url}/DocumentReference/{doc_id}", timeout=60)
        requests.delete(f"{upstream.base_url}/Binary/{binary_id}", timeout=60)


def test_a_resource_written_a_moment_ago_is_found(upstream):
    """HAPI reuses a search's results for 60 s by default; the adapter asks for fresh ones
    (Cache-Control: no-cache), so a Condition written between two searches is found."""
    rest = adapter_for(upstream)
    word = f"zq{uuid.uuid4().hex[:8]}"
    url = f"/fhir/Condition?patient={BIG}&_content={word}"
    assert bundle_of(rest.get(url))["total"] == 0
    made = requests.post(f"{upstream.base_url}/Condition", timeout=60, json={
        "resourceType": "Condition", "subject": {"reference": f"Patient/{BIG}"},
        "code": {"text": f"{word} syndrome"}}, headers={"Content-Type": FHIR_JSON, "Accept": FHIR_JSON})
    assert made.status_code == 201, made.text[:300]
    try:
        assert ids(bundle_of(rest.get(url))) == [f"Condition/{made.json()['id']}"]
    finally:
        requests.delete(f"{upstream.base_url}/Condition/{made.json()['id']}", timeout=60)


def test_the_callers_token_is_passed_through(upstream):
    upstream.set_auth(token="Bearer good", forbid="Bearer bad")
    rest = adapter_for(upstream)
    url = f"/fhir/Condition?patient={BIG}&_content=sinusitis"
    assert rest.get(url).status_code == 401
    assert rest.get(url, headers={"Authorization": "Bearer bad"}).status_code == 403
    assert bundle_of(rest.get(url, headers={"Authorization": "Bearer good"}))["total"] > 0
