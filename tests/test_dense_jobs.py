"""Issue 11 item 8: with dense recall, a time budget and `_sort`, what crosses Redis still holds
no Authorization. Real redis-server, real FHIR test server, the tiny checkpoints. The job goes
to a queue whose only worker has announced itself (a heartbeat, as a busy worker leaves) but
never takes the message, so the task message can be read in Redis where it waits."""
from __future__ import annotations

import base64
import json
import time

import redis

from adapter.config import load_settings
from adapter.jobs.envelope import ensure_payload_key, unseal
from adapter.jobs.heartbeat import workers_key
from test_jobs import ASYNC, BIG, client_for, job_path, job_settings

TOKEN = "Bearer dense-recall-secret-token-8"


def test_task_message_with_dense_recall_holds_no_authorization(redis_server, fhir_server,
                                                               tiny_model_dir,
                                                               tiny_embedding_dir):
    tiny = str(tiny_model_dir)
    settings = job_settings(redis_server, fhir_server, (tiny, tiny), model_queues=[f"{tiny}=parked"],
                            embedder=str(tiny_embedding_dir), dtype="float32",
                            embedder_max_length=128)
    db = redis.Redis.from_url(redis_server.url)
    db.zadd(workers_key("rerank.parked"), {"announced-but-busy@test": time.time() + 600})
    client = client_for(settings)
    url = (f"/fhir/DocumentReference?patient={BIG}&_content=diabetes%20follow-up"
           "&_sort=_score,-date&rerank_budget_s=5&recall=30")
    path = job_path(client.get(url, headers={**ASYNC, "Authorization": TOKEN}))
    deadline = time.monotonic() + 180  # the API prepares (fetch, flatten, dense) before sending
    while not (waiting := db.lrange("rerank.parked", 0, -1)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert len(waiting) == 1
    message = json.loads(waiting[0])
    args = json.loads(base64.b64decode(message["body"]))[0]
    payload = unseal(args[0], ensure_payload_key(load_settings(settings, env={})))
    request = payload["request"]
    assert request["sort"] == ["_score", "-date"] and request["rerank_budget_s"] == 5.0
    assert "authorization" not in request and len(payload["candidates"]) == 30
    assert payload["first_stage"] == "BM25 + dense (RRF)"
    secret = TOKEN.split()[1].encode()
    for key in db.scan_iter():
        kind = db.type(key)
        values = (db.lrange(key, 0, -1) if kind == b"list" else
                  list(db.hgetall(key).values()) if kind == b"hash" else
                  [db.get(key)] if kind == b"string" else [])
        assert all(secret not in (v or b"") for v in values), key
    assert secret not in json.dumps(payload).encode()
    assert client.delete(path, headers={"Authorization": TOKEN}).status_code == 202
    db.delete("rerank.parked", workers_key("rerank.parked"))
