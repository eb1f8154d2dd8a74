"""Jobs on Celery + Redis, against real parts: a real redis-server, real `celery worker` and
`fhir-rerank worker` subprocesses loading the tiny Qwen3 checkpoints, the real Flask app and
the real test FHIR server. Fault cases: a worker SIGKILLed mid-job, Redis stopped and
restarted, cancel, another caller, expiry, sync-to-async promotion.
"""
from __future__ import annotations

import json
import logging
import re
import time
import uuid

import pytest
import redis
from cryptography.fernet import Fernet

from adapter import create_app
from adapter.identity import caller_identity
from adapter.config import load_settings
from adapter.jobs import job_ref
from adapter.jobs.celery_backend import CeleryJobRunner
from adapter.jobs.envelope import unseal
from adapter.jobs.heartbeat import job_key
from fixtures_jobs import comparable_bundle
from fixtures_model import tiny_checkpoint

BIG = "79a66c97-6131-3213-f3c9-4606946ab056"  # Synthea bulk patient: 708 notes, 219 conditions
SEARCH = f"/fhir/Condition?patient={BIG}&_content=diabetes&_count=10&recall=40"
LONG_SEARCH = f"/fhir/DocumentReference?patient={BIG}&_content=diabetes&recall=300"
ASYNC = {"Prefer": "respond-async"}
pytestmark = pytest.mark.usefixtures("single_torch_thread")
ANYONE = caller_identity(None)
RESULT_EXPIRES = 6
log = logging.getLogger(__name__)


@pytest.fixture(scope="module")
def models(tiny_model_dir):
    """Two tiny checkpoints (seeds 0 and 1): the second one is routed to the 4B tier."""
    return str(tiny_model_dir), str(tiny_checkpoint(seed=1))


def job_settings(redis_server, fhir_server, models, **extra):
    tiny, tiny2 = models
    return {"redis_url": redis_server.url, "fhir_base_url": fhir_server.base_url,
            "reranker": "qwen3", "model": tiny, "models_allowed": [tiny, tiny2],
            "model_queues": [f"{tiny2}=4B"], "device": "cpu", "max_length": 512,
            "batch_tokens": 256, "max_recall": 1000, "result_expires": RESULT_EXPIRES,
            "redis_timeout": 1.0, **extra}


@pytest.fixture(scope="module")
def settings(redis_server, fhir_server, models):
    return job_settings(redis_server, fhir_server, models)


@pytest.fixture(scope="module")
def workers(celery_workers, settings):
    """One `celery -A celery_app worker` on rerank.default, one `fhir-rerank worker --tiers 4B`."""
    default = celery_workers.start("jobs-default", ["rerank.default"], settings, wait=False)
    tier4b = celery_workers.start("jobs-4b", [], settings, wait=False, tiers=["4B"])
    default.wait_ready()
    tier4b.wait_ready()
    return {"default": default, "4B": tier4b}


def client_for(settings, **extra):
    return create_app(load_settings({**settings, **extra}, env={})).test_client()


@pytest.fixture()
def client(settings, workers):
    return client_for(settings)


def inprocess_bundle(settings, url):
    """The same search answered by the in-process runner (no Redis): the reference answer."""
    resp = client_for(settings, redis_url="", sync_wait=600).get(url)  # a loaded CI machine
    assert resp.status_code == 200, resp.get_data(as_text=True)[:300]
    return resp.get_json()


def job_path(resp) -> str:
    assert resp.status_code == 202, resp.get_data(as_text=True)[:300]
    match = re.fullmatch(r"http://localhost/fhir/_async/([A-Za-z0-9_-]{32})",
                         resp.headers["Content-Location"])
    assert match, resp.headers["Content-Location"]
    return "/fhir/_async/" + match.group(1)


def poll(client, path, headers=None, timeout=60.0):
    deadline = time.monotonic() + timeout
    seen: list[str] = []
    while time.monotonic() < deadline:
        resp = client.get(path, headers=headers or {})
        if resp.status_code != 202:
            return resp, seen
        assert re.fullmatch(r"fetching|recall|queued|reranking( \d+/\d+)?",
                            resp.headers["X-Progress"])
        assert int(resp.headers["Retry-After"]) >= 1
        seen.append(resp.headers["X-Progress"])
        time.sleep(0.05)
    raise AssertionError(f"job not done after {timeout} s; progress {seen[-3:]}")


def wait_for_progress(client, path, headers=None, timeout=60.0) -> tuple[int, int]:
    """Until X-Progress says "reranking k/n" with 0 < k; returns (k, n)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        resp = client.get(path, headers=headers or {})
        found = re.fullmatch(r"reranking (\d+)/(\d+)", resp.headers.get("X-Progress", ""))
        if found and int(found.group(1)) > 0:
            return int(found.group(1)), int(found.group(2))
        assert resp.status_code == 202, "the job ended before it could be interrupted"
        time.sleep(0.02)
    raise AssertionError("no progress reported")


def scores(bundle) -> list[float]:
    return [e["search"]["score"] for e in bundle["entry"] if e["search"]["mode"] == "match"]


def runner(client) -> CeleryJobRunner:
    return client.application.extensions["fhir_rerank"].jobs


def _samples() -> tuple[float, float]:
    from prometheus_client import REGISTRY

    done = REGISTRY.get_sample_value("fhir_rerank_jobs_total", {"state": "done"}) or 0.0
    waits = REGISTRY.get_sample_value("fhir_rerank_job_queue_wait_seconds_count") or 0.0
    return done, waits


def test_async_lifecycle_matches_sync_and_inprocess(client, settings, workers):
    expected = comparable_bundle(inprocess_bundle(settings, SEARCH))
    done_before, waits_before = _samples()
    sync = client.get(SEARCH)
    assert sync.status_code == 200, sync.get_data(as_text=True)[:300]
    path = job_path(client.get(SEARCH, headers=ASYNC))
    done, progress = poll(client, path)
    assert done.status_code == 200 and progress, "the first poll should still be a 202"
    assert client.get(path).get_json() == done.get_json()  # readable until it expires
    status = runner(client).status(path.rsplit("/", 1)[1], ANYONE)
    assert status.worker == workers["default"].hostname
    assert status.first_read is False and 0 <= status.queue_wait_s < 60
    assert comparable_bundle(done.get_json()) == comparable_bundle(sync.get_json()) == expected
    # Two jobs finished: each counted once (with its queue wait), however often it was read.
    assert _samples() == (done_before + 2, waits_before + 2)


def test_model_routes_to_its_tier_queue(client, settings, workers, models):
    tiny, tiny2 = models
    url = SEARCH + f"&model={tiny2}"
    expected = inprocess_bundle(settings, url)
    path = job_path(client.get(url, headers=ASYNC))
    done, _ = poll(client, path)
    assert done.status_code == 200
    job_id = path.rsplit("/", 1)[1]
    assert runner(client).status(job_id, ANYONE).worker == workers["4B"].hostname
    assert re.match(r"rerank-\d+@", workers["4B"].hostname)
    assert f"job {job_ref(job_id)[:12]}: reranking with a model" in workers["4B"].log()
    assert comparable_bundle(done.get_json()) == comparable_bundle(expected)
    assert scores(done.get_json()) != scores(inprocess_bundle(settings, SEARCH))


def test_only_the_creator_reads_and_cancel_stops_the_task(client, workers, redis_server):
    alice, bob = {"Authorization": "Bearer alice"}, {"Authorization": "Bearer bob"}
    path = job_path(client.get(LONG_SEARCH, headers={**ASYNC, **alice}))
    job_id = path.rsplit("/", 1)[1]
    for who in (bob, {}):
        assert client.get(path, headers=who).status_code == 404
        assert client.delete(path, headers=who).status_code == 404
    done, total = wait_for_progress(client, path, alice)
    assert done < total
    assert client.delete(path, headers=alice).status_code == 202
    assert client.get(path, headers=alice).status_code == 404
    log = workers["default"]
    deadline = time.monotonic() + 20
    while f"job {job_ref(job_id)[:12]} cancelled while running" not in log.log():
        assert time.monotonic() < deadline, log.log()[-2000:]
        time.sleep(0.1)
    store = redis.Redis.from_url(redis_server.url)
    # Nothing of the job is left: no record, no result. Celery 5.7 workers that process the
    # revoke broadcast after the task forgot its state (any worker, on any queue) write a bare
    # REVOKED state (TaskRevokedError, no Bundle); the task logs the cancel before it forgets.
    meta_key = f"celery-task-meta-{job_ref(job_id)}"
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        meta = store.get(meta_key)
        if meta is None or json.loads(meta).get("status") == "REVOKED":
            break
        time.sleep(0.05)
    assert meta is None or (json.loads(meta)["status"] == "REVOKED" and
                            b"entry" not in meta and BIG.encode() not in meta), meta
    assert not store.exists(job_key(job_ref(job_id)))
    started = time.monotonic()
    assert client.get(SEARCH).status_code == 200 and time.monotonic() - started < 15


def test_anonymous_job_id_is_a_capability_never_logged_or_stored(client, workers,
                                                                  redis_server, caplog):
    """An anonymous job is read through its own id only; the id is in no log line of the API
    or the worker and in no Redis key or value (Redis, Celery and logs use its digest)."""
    caplog.set_level(logging.INFO)
    path = job_path(client.get(SEARCH, headers=ASYNC))
    done, _ = poll(client, path)
    assert done.status_code == 200
    job_id = path.rsplit("/", 1)[1]
    assert client.get("/fhir/_async/" + job_id[::-1]).status_code == 404
    assert client.get(path, headers={"Authorization": "Bearer bob"}).status_code == 404
    store = redis.Redis.from_url(redis_server.url)
    keys = [k.decode() for k in store.scan_iter(count=1000)]
    assert any(job_ref(job_id) in k for k in keys) and not any(job_id in k for k in keys)
    for key in keys:
        if store.type(key) == b"string":
            assert job_id.encode() not in store.get(key)
        elif store.type(key) == b"hash":
            assert job_id.encode() not in b"".join(store.hgetall(key).values())
    assert job_id not in caplog.text
    for worker in workers.values():
        assert job_id not in worker.log()
    assert job_ref(job_id) in workers["default"].log()  # the worker did log the job, by ref


def test_results_expire(client, workers, redis_server):
    path = job_path(client.get(SEARCH, headers=ASYNC))
    done, _ = poll(client, path)
    assert done.status_code == 200
    job_id = path.rsplit("/", 1)[1]
    store = redis.Redis.from_url(redis_server.url)
    assert 0 < store.ttl(f"celery-task-meta-{job_ref(job_id)}") <= RESULT_EXPIRES
    time.sleep(RESULT_EXPIRES + 0.5)
    assert client.get(path).status_code == 404
    assert not store.exists(f"celery-task-meta-{job_ref(job_id)}") and not store.exists(job_key(job_ref(job_id)))


def test_sync_call_is_promoted_to_async(settings, workers):
    client = client_for(settings, sync_wait=0.05)
    # a question not asked before: a repeated one is answered from the ranking cache at once
    resp = client.get(SEARCH.replace("_content=diabetes", "_content=glucose%20control"))
    path = job_path(resp)
    assert resp.headers["X-Progress"] and resp.headers["Retry-After"]
    done, _ = poll(client, path)
    assert done.status_code == 200 and done.get_json()["type"] == "searchset"


def test_key_mismatch_fails_at_once_without_retries(settings, workers):
    """The API encrypts, the rerank.default worker has no key: a 503 job error, no retry."""
    client = client_for(settings, payload_key=Fernet.generate_key().decode())
    path = job_path(client.get(SEARCH, headers=ASYNC))
    failed, _ = poll(client, path)
    assert failed.status_code == 503, failed.get_data(as_text=True)[:300]
    assert "FHIR_RERANK_PAYLOAD_KEY" in failed.get_json()["issue"][0]["diagnostics"]
    job_id = path.rsplit("/", 1)[1]
    text = workers["default"].log()
    assert f"job {job_ref(job_id)[:12]}: transient" not in text
    # The worker reports the job as failed, not as a task that "succeeded".
    assert f"job {job_ref(job_id)[:12]} failed: 503 transient (PayloadKeyError)" in text
    assert not [line for line in text.splitlines()
                if job_ref(job_id) in line and "succeeded" in line]


def test_sigkilled_worker_job_completes_once_encrypted(celery_workers, redis_server,
                                                       fhir_server, models):
    """Two workers on one queue, DEFAULT broker settings (visibility timeout 3600 s); the
    whole worker running the job (main process and children) is SIGKILLed mid-way. Its
    heartbeat stops, the other worker takes the job over within job_stale_after + one beat,
    and the client sees exactly one Bundle."""
    tiny, tiny2 = models
    key = Fernet.generate_key().decode()
    settings = job_settings(redis_server, fhir_server, models, payload_key=key,
                            model_queues=[f"{tiny}=sigkill", f"{tiny2}=4B"], result_expires=120)
    assert "broker_visibility_timeout" not in settings  # the default, 3600 s
    first = celery_workers.start("kill-1", ["rerank.sigkill"], settings, wait=False)
    second = celery_workers.start("kill-2", ["rerank.sigkill"], settings, wait=False)
    first.wait_ready()
    second.wait_ready()
    client = client_for(settings)
    expected = inprocess_bundle(settings, LONG_SEARCH)
    path = job_path(client.get(LONG_SEARCH, headers=ASYNC))
    job_id = path.rsplit("/", 1)[1]
    done, total = wait_for_progress(client, path)
    assert done < total
    running = [w for w in (first, second) if f"job {job_ref(job_id)[:12]}: reranking" in w.log()]
    assert len(running) == 1
    victim, survivor = running[0], (second if running[0] is first else first)
    victim.kill()
    killed_at = time.monotonic()
    finished, progress = poll(client, path, timeout=90)
    took = time.monotonic() - killed_at
    log.info("SIGKILL at %d/%d; Bundle after %.1f s; polls after the kill said %s", done, total,
             took, sorted(set(progress)))
    assert took < 60, f"the job took {took:.0f} s to be finished by the other worker"
    assert finished.status_code == 200, finished.get_data(as_text=True)[:300]
    assert f"job {job_ref(job_id)[:12]}: reranking" in survivor.log()
    assert runner(client).status(job_id, ANYONE).worker == survivor.hostname
    assert comparable_bundle(finished.get_json()) == comparable_bundle(expected)
    # What sits in Redis is encrypted with the key: the result opens only with it.
    stored = json.loads(redis.Redis.from_url(redis_server.url).get(f"celery-task-meta-{job_ref(job_id)}"))
    assert set(stored["result"]["result"]) == {"fernet"} and BIG not in json.dumps(stored)
    assert comparable_bundle(unseal(stored["result"]["result"], key)) == comparable_bundle(expected)
    # The victim restarts; the answered job is not run again and stays the same Bundle.
    victim.restart()
    time.sleep(1.0)
    again = client.get(path)
    assert again.status_code == 200 and again.get_json() == finished.get_json()
    assert f"job {job_ref(job_id)[:12]}: reranking" not in victim.log()
    victim.stop()
    survivor.stop()


def test_a_tier_no_worker_consumes_is_503_naming_the_command(settings, workers, models):
    from adapter.jobs import live_workers

    tiny, tiny2 = models
    client = client_for(settings, model_queues=[f"{tiny}=nobody", f"{tiny2}=4B"])
    for headers in ({}, ASYNC):
        resp = client.get(SEARCH, headers=headers)
        assert resp.status_code == 503, resp.get_data(as_text=True)[:300]
        issue = resp.get_json()["issue"][0]
        assert "no worker consumes the nobody tier" in issue["diagnostics"]
        assert "`fhir-rerank worker --tiers rerank.nobody`" in issue["diagnostics"]
        assert resp.headers["Retry-After"]
    live = live_workers(load_settings(settings, env={}))
    assert live.get("rerank.default") == 1 and live.get("rerank.4B") == 1
    assert "rerank.nobody" not in live


def test_worker_tiers_with_a_local_model_directory(celery_workers, settings, tmp_path):
    """`fhir-rerank worker --tiers 0.6B` with `model` a local copy of the 0.6B model consumes
    the queue the API routes that model to. (The directory holds the 0.6B config only, so
    the worker serves BM25 order with a warning; what is tested is the routing.)"""
    import json as json_

    local = tmp_path / "qwen3-reranker-0.6b"
    local.mkdir()
    (local / "config.json").write_text(json_.dumps(
        {"model_type": "qwen3", "hidden_size": 1024, "num_hidden_layers": 28}))
    local_settings = {**settings, "model": str(local), "models_allowed": [str(local)],
                      "model_queues": []}
    worker = celery_workers.start("tier-local", [], local_settings, tiers=["0.6B"])
    try:
        client = client_for(local_settings)
        resp = client.get(SEARCH, headers=ASYNC)
        done, _ = poll(client, job_path(resp))
        assert done.status_code == 200, done.get_data(as_text=True)[:300]
        job_id = job_path(resp).rsplit("/", 1)[1]
        assert runner(client).status(job_id, ANYONE).worker == worker.hostname
    finally:
        worker.stop()


def test_redis_down_is_503_then_recovers(client, workers, redis_server):
    """Last in the module: Redis restarts empty."""
    path = job_path(client.get(SEARCH, headers=ASYNC))
    redis_server.stop()
    try:
        for attempt in (lambda: client.get(SEARCH), lambda: client.get(path),
                        lambda: client.delete(path)):
            started = time.monotonic()
            resp = attempt()
            log.info("Redis down: %s in %.2f s", resp.status_code, time.monotonic() - started)
            assert time.monotonic() - started < 5
            assert resp.status_code == 503, resp.get_data(as_text=True)[:300]
            issue = resp.get_json()["issue"][0]
            assert issue["code"] == "transient" and "Redis" in issue["diagnostics"]
            assert resp.headers["Retry-After"]
    finally:
        redis_server.start()
    started = time.monotonic()
    resp = client.get(SEARCH)
    # Redis came back empty: until the workers' next heartbeat (job_heartbeat_interval) the
    # API sees no worker for the tier and says so with a 503 naming the command.
    while resp.status_code == 503 and time.monotonic() - started < 10:
        assert "fhir-rerank worker --tiers" in resp.get_json()["issue"][0]["diagnostics"]
        time.sleep(0.5)
        resp = client.get(SEARCH)
    log.info("Redis back: %s in %.2f s", resp.status_code, time.monotonic() - started)
    assert resp.status_code == 200, resp.get_data(as_text=True)[:300]
    assert resp.get_json()["type"] == "searchset"


def test_a_job_record_is_stamped_once_and_never_brought_back(redis_server):
    """First read / first start: one caller wins; a record a cancel deleted stays deleted."""
    from adapter.jobs.heartbeat import stamp_once

    db = redis.Redis.from_url(redis_server.url, decode_responses=True)
    key = job_key("stamp-test-" + uuid.uuid4().hex[:8])
    db.hset(key, "owner", "x")
    db.expire(key, 60)
    assert stamp_once(db, key, "delivered", "1") is True
    assert stamp_once(db, key, "delivered", "1") is False
    assert db.hget(key, "delivered") == "1" and 0 < db.ttl(key) <= 60
    db.delete(key)
    assert stamp_once(db, key, "delivered", "1") is False and not db.exists(key)
