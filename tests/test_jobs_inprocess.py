"""Jobs without Redis: queue routing, the payload envelope, and the FHIR async pattern over the
in-process runner (the embedded default), with the real tiny Qwen3 checkpoint and the file
source over fhir_fixtures/."""
from __future__ import annotations

import re
import time

import pytest
from cryptography.fernet import Fernet

from adapter import create_app
from adapter.config import load_settings
from adapter.errors import RerankerUnavailable
from adapter.jobs import InProcessJobRunner, new_job_id
from adapter.jobs.envelope import check_payload_key, seal, unseal
from adapter.jobs.routing import models_for_queues, queue_for_model, worker_queues
from fixtures_jobs import comparable_bundle

BIG = "79a66c97-6131-3213-f3c9-4606946ab056"  # Synthea bulk patient: 708 notes, 219 conditions
SEARCH = f"/fhir/Condition?patient={BIG}&_content=diabetes&_count=10&recall=40"
ASYNC = {"Prefer": "respond-async"}
pytestmark = pytest.mark.usefixtures("single_torch_thread")
PROGRESS = re.compile(r"fetching|recall|queued|reranking( \d+/\d+)?")


def make_app(tiny_model_dir, **overrides):
    settings = load_settings({"reranker": "qwen3", "model": str(tiny_model_dir),
                              "models_allowed": [str(tiny_model_dir)], "device": "cpu",
                              "max_length": 512, "batch_tokens": 256, **overrides}, env={})
    return create_app(settings)


def job_path(resp) -> str:
    assert resp.status_code == 202, resp.get_data(as_text=True)[:300]
    location = resp.headers["Content-Location"]
    match = re.fullmatch(r"http://localhost/fhir/_async/([A-Za-z0-9_-]{32})", location)
    assert match, location
    return "/fhir/_async/" + match.group(1)


def poll(client, path, headers=None, timeout=60.0):
    """Poll until not 202; every 202 must carry X-Progress and Retry-After."""
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        resp = client.get(path, headers=headers or {})
        if resp.status_code != 202:
            return resp, seen
        assert PROGRESS.fullmatch(resp.headers["X-Progress"]), resp.headers["X-Progress"]
        assert int(resp.headers["Retry-After"]) >= 1
        seen.append(resp.headers["X-Progress"])
        time.sleep(0.02)
    raise AssertionError(f"job still running after {timeout} s: {seen[-3:]}")


def test_queue_routing_rule(tmp_path):
    local = str(tmp_path / "qwen3-4b")
    settings = load_settings({"model": "0.6B", "models_allowed": ["0.6B", "8B", local, "x/y"],
                              "model_queues": [f"{local}=4B"]}, env={})
    assert queue_for_model(settings, "0.6B") == "rerank.0.6B"
    assert queue_for_model(settings, "Qwen/Qwen3-Reranker-8B") == "rerank.8B"
    assert queue_for_model(settings, local) == "rerank.4B"
    assert queue_for_model(settings, "x/y") == "rerank.default"
    assert worker_queues(settings, ["4B", "default", local]) == ["rerank.4B", "rerank.default"]
    assert models_for_queues(settings, ["rerank.4B"]) == [local]
    assert models_for_queues(settings, ["rerank.0.6B", "rerank.8B"]) == ["0.6B", "8B"]


def test_envelope_is_compressed_and_encrypted_with_a_key():
    payload = {"request": {"query": "Jane Doe's chest pain"}, "candidates": ["x" * 5000]}
    plain = seal(payload, "")
    assert "Jane" not in str(plain) and len(str(plain)) < 1000
    assert unseal(plain, "") == payload
    key, other = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    sealed = seal(payload, key)
    assert set(sealed) == {"fernet"} and unseal(sealed, key) == payload
    with pytest.raises(RerankerUnavailable, match="same FHIR_RERANK_PAYLOAD_KEY"):
        unseal(sealed, other)
    with pytest.raises(RerankerUnavailable, match="no payload_key"):
        unseal(sealed, "")
    with pytest.raises(ValueError, match="Fernet.generate_key"):
        check_payload_key("not-a-key")


def test_job_ids_are_unguessable():
    ids = {new_job_id() for _ in range(1000)}
    assert len(ids) == 1000 and all(re.fullmatch(r"[A-Za-z0-9_-]{32}", i) for i in ids)


def test_async_lifecycle_matches_the_sync_answer(tiny_model_dir):
    app = make_app(tiny_model_dir)
    client = app.test_client()
    sync = client.get(SEARCH)
    assert sync.status_code == 200
    path = job_path(client.get(SEARCH, headers=ASYNC))
    done, progress = poll(client, path)
    assert done.status_code == 200 and done.get_json()["resourceType"] == "Bundle"
    assert comparable_bundle(done.get_json()) == comparable_bundle(sync.get_json())
    assert done.get_json()["total"] > 10 and len(done.get_json()["entry"]) >= 10
    from test_jobs import _samples

    before = _samples()
    assert client.get(path).status_code == 200  # readable again until it expires
    assert _samples() == before  # a finished job is counted once, not per read
    from adapter.identity import caller_identity

    status = app.extensions["fhir_rerank"].jobs.status(path.rsplit("/", 1)[1],
                                                       caller_identity(None))
    assert status.first_read is False and 0 <= status.queue_wait_s < 30


def test_only_the_creator_reads_or_cancels(tiny_model_dir):
    client = make_app(tiny_model_dir).test_client()
    alice, bob = {"Authorization": "Bearer alice"}, {"Authorization": "Bearer bob"}
    path = job_path(client.get(SEARCH, headers={**ASYNC, **alice}))
    for who in (bob, {}):
        resp = client.get(path, headers=who)
        assert resp.status_code == 404 and resp.get_json()["issue"][0]["code"] == "not-found"
        assert client.delete(path, headers=who).status_code == 404
    done, _ = poll(client, path, headers=alice)
    assert done.status_code == 200
    assert client.delete(path, headers=alice).status_code == 202
    assert client.get(path, headers=alice).status_code == 404
    assert client.get("/fhir/_async/" + new_job_id(), headers=alice).status_code == 404


def test_sync_call_turns_into_202_after_sync_wait(tiny_model_dir):
    client = make_app(tiny_model_dir, sync_wait=0.0).test_client()
    # a question not asked before: a repeated one is answered from the ranking cache at once
    resp = client.get(SEARCH.replace("_content=diabetes", "_content=glucose%20control"))
    assert resp.headers["X-Progress"] in ("queued", "reranking") or \
        resp.headers["X-Progress"].startswith("reranking ")
    done, _ = poll(client, job_path(resp))
    assert done.status_code == 200 and done.get_json()["type"] == "searchset"


def test_finished_jobs_expire(tiny_model_dir):
    client = make_app(tiny_model_dir, result_expires=1).test_client()
    path = job_path(client.get(SEARCH, headers=ASYNC))
    done, _ = poll(client, path)
    assert done.status_code == 200
    time.sleep(1.3)
    assert client.get(path).status_code == 404


def test_cancel_stops_a_running_job(tiny_model_dir):
    app = make_app(tiny_model_dir, inprocess_workers=1, max_recall=1000)
    client = app.test_client()
    big = f"/fhir/DocumentReference?patient={BIG}&_content=diabetes&recall=400"
    path = job_path(client.get(big, headers=ASYNC))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        progress = client.get(path).headers.get("X-Progress", "")
        if re.fullmatch(r"reranking [1-9]\d*/\d+", progress):
            break
        time.sleep(0.01)
    done, total = map(int, progress.split()[1].split("/"))
    assert done < total, "the job finished before it could be cancelled; make it larger"
    assert client.delete(path).status_code == 202
    assert client.get(path).status_code == 404
    # One worker thread: the next job can only finish quickly if the cancelled one stopped.
    started = time.monotonic()
    quick = client.get(SEARCH)
    assert quick.status_code == 200 and time.monotonic() - started < 10


def test_a_failed_job_answers_its_operation_outcome(tiny_model_dir, tmp_path):
    missing = str(tmp_path / "no-such-model")
    client = make_app(tiny_model_dir, models_allowed=[str(tiny_model_dir), missing],
                      reranker_required=True).test_client()
    path = job_path(client.get(SEARCH + f"&model={missing}", headers=ASYNC))
    failed, _ = poll(client, path)
    assert failed.status_code == 503
    issue = failed.get_json()["issue"][0]
    assert issue["code"] == "transient" and "no-such-model" in issue["diagnostics"]
    assert isinstance(client.application.extensions["fhir_rerank"].jobs, InProcessJobRunner)


def test_only_transient_errors_are_retried():
    from adapter.errors import BadRequest, ModelLoadError
    from adapter.jobs.envelope import PayloadKeyError
    from adapter.jobs.work import is_transient

    class OutOfMemoryError(RuntimeError):  # the name torch.cuda uses
        pass

    assert is_transient(ModelLoadError("no weights")) and is_transient(OutOfMemoryError())
    assert is_transient(RerankerUnavailable("model busy"))
    assert not is_transient(PayloadKeyError("other key")) and not is_transient(BadRequest("x"))
    assert not is_transient(KeyError("Jane Doe"))


def test_anonymous_jobs_are_readable_only_by_their_own_id(tiny_model_dir, caplog):
    """Without Authorization the job id is the capability: another anonymous caller holding
    another id reads nothing, and no id reaches a log line (nor the access log's path)."""
    import logging

    from adapter.logsafe import redact_path

    caplog.set_level(logging.INFO)
    client = make_app(tiny_model_dir).test_client()
    mine = job_path(client.get(SEARCH, headers=ASYNC))
    theirs = job_path(client.get(SEARCH.replace("diabetes", "asthma"), headers=ASYNC))
    assert mine != theirs
    assert poll(client, mine)[0].status_code == 200
    assert poll(client, theirs)[0].status_code == 200
    for other in ("/fhir/_async/" + new_job_id(), mine[:-1] + ("A" if mine[-1] != "A" else "B")):
        assert client.get(other).status_code == 404
        assert client.delete(other).status_code == 404
    assert client.get(mine, headers={"Authorization": "Bearer alice"}).status_code == 404
    for path in (mine, theirs):
        job_id = path.rsplit("/", 1)[1]
        assert job_id not in caplog.text
        assert job_id not in redact_path(path) and redact_path(path) == "/fhir/_async/*"


def test_a_local_copy_of_a_tier_routes_to_that_tier(tmp_path):
    import json

    from adapter.jobs.routing import local_model_tier

    shapes = {"0.6B": (1024, 28), "4B": (2560, 36), "8B": (4096, 36), None: (64, 2)}
    for tier, (hidden, layers) in shapes.items():
        local = tmp_path / f"m-{tier}"
        local.mkdir()
        (local / "config.json").write_text(json.dumps(
            {"model_type": "qwen3", "hidden_size": hidden, "num_hidden_layers": layers}))
        settings = load_settings({"model": str(local), "models_allowed": [str(local)]}, env={})
        assert local_model_tier(str(local)) == tier
        assert queue_for_model(settings, str(local)) == f"rerank.{tier or 'default'}"
        if tier:
            assert models_for_queues(settings, worker_queues(settings, [tier])) == [str(local)]
