"""One deadline for a search's upstream work, against the real Node FHIR server's fault
injection: a stalled body is a 504 within `upstream_deadline` and is not retried; hanging
attachments are fetched concurrently, not one after another."""
from __future__ import annotations

import base64
import time
import uuid

import pytest

from adapter import create_app
from adapter.config import load_settings

BIG = "79a66c97-6131-3213-f3c9-4606946ab056"


def client_for(fhir, **extra):
    settings = {"reranker": "none", "fhir_base_url": fhir.base_url, "fhir_retries": 3,
                "fhir_backoff": 0.2, **extra}
    return create_app(load_settings(settings, env={})).test_client()


def test_a_stalled_upstream_body_is_a_504_within_the_deadline(fhir):
    client = client_for(fhir, fhir_timeout=30, upstream_deadline=2)
    fhir.inject_fault(stall=20, times=5, path_contains="Condition")
    started = time.monotonic()
    resp = client.get(f"/fhir/Condition?patient={BIG}&_content=diabetes")
    took = time.monotonic() - started
    assert resp.status_code == 504, resp.get_data(as_text=True)[:300]
    issue = resp.get_json()["issue"][0]
    assert issue["code"] == "timeout" and "upstream_deadline (2 s)" in issue["diagnostics"]
    assert took < 3.5, f"answered after {took:.1f} s"
    condition_calls = [r for r in fhir.requests() if r["path"].endswith("/Condition")]
    assert len(condition_calls) == 1  # a read timeout is not retried


def test_a_slow_but_complete_answer_within_the_deadline_is_served(fhir):
    client = client_for(fhir, fhir_timeout=5, upstream_deadline=10)
    fhir.inject_fault(delay=1, times=1, path_contains="Condition")
    resp = client.get(f"/fhir/Condition?patient={BIG}&_content=diabetes")
    assert resp.status_code == 200 and resp.get_json()["total"] > 0


@pytest.fixture()
def hanging_attachments(fhir):
    tag = uuid.uuid4().hex[:8]
    pid = f"hang-{tag}"
    made = [fhir.put({"resourceType": "Patient", "id": pid})]
    for i in range(4):
        made.append(fhir.put({"resourceType": "Binary", "id": f"hang-{tag}-{i}",
                              "contentType": "text/plain",
                              "data": base64.b64encode(f"note {i}".encode()).decode()}))
        made.append(fhir.put({
            "resourceType": "DocumentReference", "id": f"hang-doc-{tag}-{i}",
            "status": "current", "subject": {"reference": f"Patient/{pid}"},
            "content": [{"attachment": {"contentType": "text/plain",
                                        "url": f"Binary/hang-{tag}-{i}"}}]}))
    yield pid, tag
    for resource in reversed(made):
        fhir.delete(resource["resourceType"], resource["id"])


def test_attachments_are_fetched_concurrently_within_the_deadline(fhir, hanging_attachments):
    pid, tag = hanging_attachments
    fhir.inject_fault(delay=1.5, times=4, path_contains=f"Binary/hang-{tag}")
    client = client_for(fhir, fhir_timeout=10, upstream_deadline=20)
    started = time.monotonic()
    resp = client.get(f"/fhir/DocumentReference?patient={pid}&_content=note")
    took = time.monotonic() - started
    assert resp.status_code == 200
    assert took < 4.5, f"4 attachments of 1.5 s each took {took:.1f} s: not concurrent"
    assert resp.get_json()["entry"][0]["search"]["score"] > 0  # their text was read

    # A deadline shorter than the attachments: the search still answers, in time, and the
    # attachments it could not wait for are named as not loaded.
    fhir.inject_fault(delay=3, times=4, path_contains=f"Binary/hang-{tag}")
    client = client_for(fhir, fhir_timeout=10, upstream_deadline=1.5)
    started = time.monotonic()
    resp = client.get(f"/fhir/DocumentReference?patient={pid}&_content=note")
    assert resp.status_code == 200 and time.monotonic() - started < 2.5


def _poll(client, path, headers=None, timeout=30.0):
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        resp = client.get(path, headers=headers or {})
        if resp.status_code != 202:
            return resp, seen
        seen.append(resp.headers["X-Progress"])
        time.sleep(0.05)
    raise AssertionError(f"still running: {seen[-3:]}")


def test_respond_async_answers_before_the_upstream_does(fhir):
    """The whole search is the job: the 202 comes at once while the upstream takes 3 s, and
    X-Progress names the stage; an upstream refusal becomes the job's answer."""
    client = client_for(fhir, fhir_timeout=10, upstream_deadline=20)
    fhir.inject_fault(delay=3, times=1, path_contains="Condition")
    url = f"/fhir/Condition?patient={BIG}&_content=diabetes"
    started = time.monotonic()
    resp = client.get(url, headers={"Prefer": "respond-async"})
    assert resp.status_code == 202 and time.monotonic() - started < 1.0
    assert resp.headers["X-Progress"] == "fetching"
    path = resp.headers["Content-Location"].removeprefix("http://localhost")
    done, seen = _poll(client, path)
    assert done.status_code == 200 and done.get_json()["total"] > 0
    assert "fetching" in seen and time.monotonic() - started >= 3

    fhir.set_auth(token="Bearer right")
    resp = client.get(url, headers={"Prefer": "respond-async", "Authorization": "Bearer wrong"})
    assert resp.status_code == 202
    failed, _ = _poll(client, resp.headers["Content-Location"].removeprefix("http://localhost"),
                      headers={"Authorization": "Bearer wrong"})
    assert failed.status_code == 401 and failed.get_json()["issue"][0]["code"] == "security"


def test_finished_unpolled_jobs_are_bounded_in_memory(fhir):
    client = client_for(fhir, max_finished_jobs=2)
    jobs = client.application.extensions["fhir_rerank"].jobs
    paths = []
    for word in ("diabetes", "asthma", "fracture"):
        resp = client.get(f"/fhir/Condition?patient={BIG}&_content={word}",
                          headers={"Prefer": "respond-async"})
        path = resp.headers["Content-Location"].removeprefix("http://localhost")
        assert jobs.wait(path.rsplit("/", 1)[1], "anonymous", 30).finished
        paths.append(path)
    client.get(f"/fhir/Condition?patient={BIG}&_content=cough", headers={"Prefer": "respond-async"})
    assert client.get(paths[0]).status_code == 404  # the oldest unpolled one was dropped
    assert [client.get(p).status_code for p in paths[1:]] == [200, 200]
