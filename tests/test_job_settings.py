"""A job names the scoring settings it needs; a worker with other settings does not score it.

Real redis-server, real `celery -A celery_app worker` subprocesses on the tiny checkpoint, the
real rerank API. Before, a job was scored by whichever worker consumed its queue, whatever
that worker's instruction, max_length or chunking: a fresh clone's `make test` once got
0.538 from a worker another module had started and 0.527 in-process.
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from adapter import create_app
from adapter.config import load_settings

pytestmark = pytest.mark.usefixtures("single_torch_thread")
BODY_DOCS = ["Ejection fraction 30 %", "Knee arthroscopy", "BNP raised, oedema"]
OTHER_INSTRUCTION = "Judge whether the document is about orthopaedics"
HANDED_BACK = "scoring settings differ from the API's: instruction (values differ)"


def base(tiny_model_dir, redis_url=""):
    model = str(tiny_model_dir)
    return {"reranker": "qwen3", "model": model, "models_allowed": [model], "device": "cpu",
            "dtype": "float32", "max_length": 512, "redis_url": redis_url}


def rerank(settings, query="heart failure"):
    app = create_app(load_settings(settings, env={}))
    resp = app.test_client().post("/v2/rerank", json={"model": settings["model"], "query": query,
                                                      "documents": BODY_DOCS})
    return resp


def scores(resp):
    assert resp.status_code == 200, resp.get_data(as_text=True)[:400]
    return [(r["index"], round(r["relevance_score"], 6)) for r in resp.get_json()["results"]]


def test_a_worker_with_other_scoring_settings_hands_the_job_to_one_with_the_apis(
        redis_server, celery_workers, tiny_model_dir):
    api = base(tiny_model_dir, redis_server.url)
    expected = scores(rerank({**api, "redis_url": ""}))
    assert scores(rerank({**api, "redis_url": "", "instruction": OTHER_INSTRUCTION})) != expected
    # Only the worker with other settings consumes the queue at first, so it is the one that
    # takes the first job (with two consumers, which one takes it is up to the broker).
    other = celery_workers.start("other-settings", ["rerank.default"],
                                 {**api, "instruction": OTHER_INSTRUCTION,
                                  "job_stale_after": 300})
    same = None
    try:
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(rerank, {**api, "sync_wait": 120})
            deadline = time.monotonic() + 60
            while HANDED_BACK not in other.log() and time.monotonic() < deadline \
                    and not first.done():
                time.sleep(0.2)
            assert HANDED_BACK in other.log(), other.log()[-2000:]
            same = celery_workers.start("same-settings", ["rerank.default"], api)
            assert scores(first.result(timeout=180)) == expected
        for query in ("knee", "oedema"):
            assert scores(rerank(api, query)) == scores(rerank({**api, "redis_url": ""}, query))
    finally:
        if same is not None:
            same.stop()
        other.stop()


def test_with_no_worker_of_the_apis_settings_the_job_fails_naming_them(
        redis_server, celery_workers, tiny_model_dir):
    api = base(tiny_model_dir, redis_server.url)
    other = celery_workers.start("other-length", ["rerank.default"],
                                 {**api, "max_length": 256, "job_stale_after": 3})
    try:
        start = time.monotonic()
        resp = rerank({**api, "sync_wait": 30})
        took = time.monotonic() - start
        assert resp.status_code == 503, resp.get_data(as_text=True)[:400]
        text = resp.get_data(as_text=True)
        assert "max_length (API 512, worker 256)" in text and "same settings" in text, text
        assert took < 20, took
        assert "job " in other.log() and "failed: 503 transient (scoring settings" in other.log()
    finally:
        other.stop()
