"""Caller isolation against the real Node FHIR server: text built from an attachment that
only one caller's token may read is never served to another caller, whichever searched
first; the caller's token goes only to URLs under the FHIR base."""
from __future__ import annotations

import base64
import uuid

import pytest
import requests

from adapter import create_app
from adapter.config import load_settings
from adapter.api.state import state_of
from fixtures_jobs import comparable_bundle

ALICE, BOB = {"Authorization": "Bearer alice"}, {"Authorization": "Bearer bob"}
SECRET_WORD = "zebracanary"
FHIR_JSON = {"Content-Type": "application/fhir+json", "Accept": "application/fhir+json"}


def _put(base: str, resource: dict) -> dict:
    url = f"{base}/{resource['resourceType']}/{resource['id']}"
    resp = requests.put(url, json=resource, headers=FHIR_JSON, timeout=10)
    assert resp.status_code in (200, 201), resp.text[:300]
    return resp.json()


@pytest.fixture()
def secret_record(fhir):
    """A patient with two notes; one note's text sits in a Binary only Alice may read."""
    tag = uuid.uuid4().hex[:10]
    pid, binary = f"iso-{tag}", f"iso-secret-{tag}"
    base = fhir.base_url
    made = [_put(base, {"resourceType": "Patient", "id": pid}),
            _put(base, {"resourceType": "Binary", "id": binary, "contentType": "text/plain",
                        "data": base64.b64encode(f"the {SECRET_WORD} biopsy result".encode())
                        .decode()})]
    for doc_id, content in ((f"iso-doc-{tag}", {"attachment": {
            "contentType": "text/plain", "url": f"Binary/{binary}"}}),
            (f"iso-plain-{tag}", {"attachment": {"contentType": "text/plain", "data":
                                  base64.b64encode(b"routine visit, no findings").decode()}})):
        made.append(_put(base, {
            "resourceType": "DocumentReference", "id": doc_id, "status": "current",
            "subject": {"reference": f"Patient/{pid}"}, "content": [content]}))
    assert made[-1]["meta"]["versionId"]  # versioned: the flattened-text cache applies
    fhir.protect_binary(binary, ALICE["Authorization"])
    yield pid, f"DocumentReference/iso-doc-{tag}"
    for resource in reversed(made):
        requests.delete(f"{base}/{resource['resourceType']}/{resource['id']}", timeout=10)


def _clear_caches(app) -> None:
    state_of(app).runtime.caches.clear()


def _search(client, pid: str, headers: dict) -> dict:
    resp = client.get(f"/fhir/DocumentReference?patient={pid}&_content={SECRET_WORD}",
                      headers=headers)
    assert resp.status_code == 200, resp.get_data(as_text=True)[:300]
    return resp.get_json()


def _score_of(bundle: dict, doc: str) -> float:
    return next(e["search"]["score"] for e in bundle["entry"]
                if e.get("resource", {}).get("id") == doc.split("/")[1])


def test_attachment_text_is_never_shared_across_callers(fhir, secret_record):
    pid, doc = secret_record
    # keyword order lists every candidate (score 0 without the word), so each is compared
    app = create_app(load_settings({"reranker": "none", "fhir_base_url": fhir.base_url,
                                    "fhir_retries": 0, "keyword_list_unmatched": True},
                                   env={}))
    client = app.test_client()
    # Each caller alone, caches empty: the reference answers.
    _clear_caches(app)
    alone = {"alice": _search(client, pid, ALICE)}
    _clear_caches(app)
    alone["bob"] = _search(client, pid, BOB)
    _clear_caches(app)
    alone["anonymous"] = _search(client, pid, {})
    assert _score_of(alone["alice"], doc) > _score_of(alone["bob"], doc)  # Alice reads it
    assert _score_of(alone["bob"], doc) == _score_of(alone["anonymous"], doc)

    # Alice first, then the others: they must not be ranked on Alice's attachment text.
    _clear_caches(app)
    _search(client, pid, ALICE)
    for who, headers in (("bob", BOB), ("anonymous", {})):
        assert comparable_bundle(_search(client, pid, headers)) == \
            comparable_bundle(alone[who]), f"{who} was ranked on Alice's attachment"
    # Bob first: his "could not be loaded" is not cached for Alice.
    _clear_caches(app)
    _search(client, pid, BOB)
    assert comparable_bundle(_search(client, pid, ALICE)) == comparable_bundle(alone["alice"])
    # And the Binary was asked for with each caller's own token only.
    binary_calls = [r["authorization"] for r in fhir.requests() if "/Binary/" in r["path"]]
    assert set(binary_calls) <= {ALICE["Authorization"], BOB["Authorization"], None}
    assert ALICE["Authorization"] in binary_calls and BOB["Authorization"] in binary_calls


def test_dense_vectors_are_never_shared_across_callers(fhir, secret_record, tiny_embedding_dir):
    """Issue 16 item 3: the document-vector cache follows the flattened-text cache's rule —
    Bob is never given the vector of text built from Alice's attachment."""
    import torch

    from adapter.fhir.client import FhirRestSource
    from adapter.fhir.flatten import flatten_documents
    from adapter.identity import caller_identity
    from adapter.runtime import Runtime

    pid, doc = secret_record
    settings = load_settings({"embedder": str(tiny_embedding_dir), "device": "cpu",
                              "dtype": "float32", "fhir_base_url": fhir.base_url,
                              "fhir_retries": 0}, env={})
    runtime = Runtime(settings)
    embedder = runtime.embedder()
    source = FhirRestSource.from_settings(settings)

    def documents(headers: dict) -> list:
        token = headers.get("Authorization")
        fetched = source.search("DocumentReference", [("patient", f"Patient/{pid}")], token)
        docs, _ = flatten_documents(fetched.resources, fetched.full_urls,
                                    lambda url: source.fetch_attachment(url, token),
                                    validate=False, caller=caller_identity(token),
                                    caches=runtime.caches)
        return sorted(docs, key=lambda d: d.id)

    alice_docs = documents(ALICE)
    secret = [d.id for d in alice_docs].index(doc)
    assert SECRET_WORD in alice_docs[secret].text
    alice = embedder.document_vectors(alice_docs)
    bob_docs = documents(BOB)
    assert SECRET_WORD not in bob_docs[secret].text  # the flattened text was not shared
    bob = embedder.document_vectors(bob_docs)
    fresh = embedder.embed([d.text for d in bob_docs])  # Bob's own text, no cache
    assert torch.allclose(bob, fresh, atol=1e-5), "Bob got a vector of another caller's text"
    assert not torch.allclose(bob[secret], alice[secret], atol=1e-5)
    # Text both callers built alike (no attachment) is one vector, embedded once.
    plain = 1 - secret
    assert torch.equal(bob[plain], alice[plain]) and len(runtime.caches.vectors) == 3
