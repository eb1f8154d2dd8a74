"""Per-caller fairness: a cap on a caller's unfinished jobs (`max_jobs_per_caller`) and on its
synchronous calls being scored (`max_sync_per_caller`), each a 429 with Retry-After and an
OperationOutcome naming the setting; other callers are not affected.

Before, one token queued 400 async jobs in 3.6 s and another caller's search then waited 24 s
behind them. Real parts: the Flask app, real redis-server and a real Celery worker (its pool
kept warming, tests/slow_boot_app.py, so queued jobs stay queued), and an upstream FHIR
server that accepts connections and never answers (jobs stay "fetching").
"""
from __future__ import annotations

import socket
import threading
import time

import pytest

from adapter import create_app
from adapter.config import load_settings
from adapter.config import settings_env
from test_job_handover import SlowBootWorker, _wait_for

ASYNC = {"Prefer": "respond-async"}
A = {"Authorization": "Bearer caller-a"}
B = {"Authorization": "Bearer caller-b"}
SEARCH = "/fhir/Condition?patient=p1&_content=pain"


@pytest.fixture(scope="module")
def silent_upstream():
    """A FHIR base URL whose server accepts connections and never answers."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(512)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}/fhir"
    sock.close()


def base(upstream, **extra):
    return {"fhir_base_url": upstream, "fhir_timeout": 30, "fhir_retries": 0,
            "upstream_deadline": 30, "reranker": "none", "max_jobs_per_caller": 3, **extra}


def outcome_of(resp):
    body = resp.get_json(force=True)
    assert body["resourceType"] == "OperationOutcome", body
    return body["issue"][0]


def check_jobs_cap(first, second=None):
    """Caller A: 3 jobs accepted (spread over two API processes when `second`), the 4th and
    more 429; caller B still 202; a DELETE frees a place."""
    second = second or first
    paths = []
    for i in range(3):
        resp = (first if i % 2 == 0 else second).get(SEARCH, headers={**A, **ASYNC})
        assert resp.status_code == 202, resp.get_data(as_text=True)[:300]
        paths.append(resp.headers["Content-Location"].split("localhost", 1)[1])
    refused = [first.get(SEARCH, headers={**A, **ASYNC}) for _ in range(20)]
    assert {r.status_code for r in refused} == {429}
    issue = outcome_of(refused[0])
    assert "max_jobs_per_caller = 3" in issue["diagnostics"], issue
    assert issue["code"] == "throttled" and int(refused[0].headers["Retry-After"]) >= 1
    assert second.get(SEARCH, headers={**A, **ASYNC}).status_code == 429
    other = second.get(SEARCH, headers={**B, **ASYNC})
    assert other.status_code == 202, "another caller is not held back"
    assert first.delete(paths[0], headers=A).status_code == 202
    assert second.get(SEARCH, headers={**A, **ASYNC}).status_code == 202


def test_in_process_jobs_cap(silent_upstream):
    app = create_app(load_settings(base(silent_upstream), env={}))
    check_jobs_cap(app.test_client())


@pytest.fixture(scope="module")
def warming_worker(redis_server, silent_upstream, tmp_path_factory, tiny_model_dir):
    """A live worker on rerank.default (heartbeats) whose pool never gets to a job."""
    settings = base(silent_upstream, redis_url=redis_server.url, reranker="qwen3",
                    model=str(tiny_model_dir), models_allowed=[str(tiny_model_dir)],
                    device="cpu", task_time_limit=8, task_soft_time_limit=6, sync_wait=4)
    worker = SlowBootWorker("caps-warming", ["rerank.default"], settings_env(settings),
                            tmp_path_factory.mktemp("caps"), slow_s=600)
    worker.start(wait=False)
    _wait_for(lambda: "ready." in worker.log(), 90, worker)
    yield settings
    worker.stop()


def test_celery_jobs_cap_holds_across_api_processes(warming_worker):
    apps = [create_app(load_settings(warming_worker, env={})).test_client() for _ in range(2)]
    check_jobs_cap(*apps)


def test_synchronous_calls_per_caller(warming_worker):
    """max_sync_per_caller = 1: while caller A's rerank waits to be scored, A's next
    synchronous call is 429 at once; B's is not."""
    settings = {**warming_worker, "max_sync_per_caller": 1, "max_jobs_per_caller": 16}
    client = create_app(load_settings(settings, env={})).test_client()
    body = {"model": settings["model"], "query": "q", "documents": ["a", "b"]}
    results: dict[str, int] = {}
    waiting = threading.Thread(
        target=lambda: results.update(a=client.post("/v1/rerank", json=body,
                                                    headers=A).status_code))
    waiting.start()
    time.sleep(1.0)  # A's call is queued behind the warming pool
    start = time.monotonic()
    again = client.post("/v1/rerank", json=body, headers=A)
    assert again.status_code == 429, again.get_data(as_text=True)[:300]
    assert time.monotonic() - start < 2.0
    assert "max_sync_per_caller = 1" in again.get_data(as_text=True)
    assert int(again.headers["Retry-After"]) >= 1
    other = client.post("/v1/rerank", json=body, headers=B)
    assert other.status_code != 429, "another caller is not held back"
    waiting.join(timeout=30)
    assert results.get("a") not in (None, 429)
    after = client.post("/v1/rerank", json=body, headers=A)
    assert after.status_code != 429, "the slot is given back when the call ends"
