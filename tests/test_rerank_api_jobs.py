"""The rerank API on the Celery machinery: a real Redis and a real worker on the tier's queue
answer the same as the in-process pool, and no query or document text reaches the logs."""
from __future__ import annotations

import pytest

from adapter import create_app
from adapter.config import load_settings

pytestmark = pytest.mark.usefixtures("single_torch_thread")
QUERY = "zz-secret-query heart failure"
DOCS = ["Ejection fraction 30 %, zz-secret-doc", "Knee arthroscopy", "BNP raised, oedema"]


def test_celery_and_in_process_answer_alike(redis_server, celery_workers, tiny_model_dir,
                                            caplog):
    model = str(tiny_model_dir)
    base = {"reranker": "qwen3", "model": model, "models_allowed": [model], "device": "cpu",
            "dtype": "float32", "max_length": 512}
    worker = celery_workers.start("rerank-api", ["rerank.default"],
                                  {**base, "redis_url": redis_server.url})
    body = {"model": model, "query": QUERY, "documents": DOCS, "return_documents": True}
    with caplog.at_level("INFO"):
        queued = create_app(load_settings({**base, "redis_url": redis_server.url}, env={}))
        resp = queued.test_client().post("/v2/rerank", json=body)
    assert resp.status_code == 200, resp.get_data(as_text=True)
    local = create_app(load_settings(base, env={})).test_client().post("/v2/rerank", json=body)
    strip = lambda a: {k: v for k, v in a.items() if k != "id"}  # noqa: E731
    assert strip(resp.get_json()) == strip(local.get_json())
    logs = worker.log() + "\n".join(r.getMessage() for r in caplog.records)
    assert "zz-secret" not in logs
