"""Patient data at rest in Redis is encrypted by default (issue 16 item 7): with Redis and no
`payload_key`, API and worker seal jobs with a key made on first start and kept in
`state_dir/payload.key` (0600), said in one log line without the key. Canaries in a job's
question and documents are then not recoverable from any Redis key, however its values are
decoded (JSON, base64, zlib, nested), while the job is queued and after it is answered."""
from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import stat
import threading
import time
import uuid
import zlib

import pytest
import redis

from adapter.config import load_settings
from adapter.jobs.celery_backend import CeleryJobRunner
from adapter.jobs.envelope import ensure_payload_key, seal
from adapter.jobs.heartbeat import workers_key
from adapter.api.rerank_jobs import parse_rerank_request


def _readings(value: bytes, depth: int = 0) -> list[bytes]:
    """`value` and everything decoding it gives: JSON strings inside it, base64, zlib."""
    out = [value]
    if depth > 6 or not value:
        return out
    try:
        parsed = json.loads(value)
    except (ValueError, UnicodeDecodeError):
        parsed = None
    stack = [parsed] if isinstance(parsed, (dict, list, str)) else []
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
        elif isinstance(node, str) and node.encode() != value:
            out += _readings(node.encode(), depth + 1)
    try:
        decoded = base64.b64decode(value + b"=" * (-len(value) % 4), validate=False)
    except (binascii.Error, ValueError):
        decoded = b""
    if len(decoded) >= 8 and decoded != value:
        out += _readings(decoded, depth + 1)
    try:
        out += _readings(zlib.decompress(value), depth + 1)
    except zlib.error:
        pass
    return out


def _everything_in(db: redis.Redis) -> list[bytes]:
    found: list[bytes] = []
    for key in db.scan_iter():
        kind = db.type(key)
        values = (db.lrange(key, 0, -1) if kind == b"list" else
                  [v for pair in db.hgetall(key).items() for v in pair] if kind == b"hash" else
                  [db.get(key)] if kind == b"string" else
                  list(db.smembers(key)) if kind == b"set" else
                  [m for m, _ in db.zrange(key, 0, -1, withscores=True)] if kind == b"zset"
                  else [])
        for value in [key, *values]:
            found += _readings(value or b"")
    return found


def test_the_scanner_recovers_a_compressed_canary():
    """Without encryption (the old default) the canary comes back: the scan is not blind."""
    sealed = seal({"query": "canary-xyz"}, "")
    message = json.dumps({"body": base64.b64encode(json.dumps([sealed]).encode()).decode()})
    assert any(b"canary-xyz" in r for r in _readings(message.encode()))
    encrypted = json.dumps([seal({"query": "canary-xyz"}, _fernet())])
    assert not any(b"canary-xyz" in r for r in _readings(encrypted.encode()))


def _fernet() -> str:
    from cryptography.fernet import Fernet

    return Fernet.generate_key().decode()


def test_a_key_is_made_once_kept_0600_and_named_in_one_line(tmp_path, caplog):
    settings = load_settings({"state_dir": str(tmp_path / "state")}, env={})
    with caplog.at_level(logging.INFO, logger="adapter.jobs.envelope"):
        first = ensure_payload_key(settings)
        again = ensure_payload_key(settings)
    path = tmp_path / "state" / "payload.key"
    assert first == again and path.read_text().strip() == first
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    # this logger's lines only: a job thread another test left running may log meanwhile
    lines = [r.getMessage() for r in caplog.records if r.name == "adapter.jobs.envelope"]
    assert len(lines) == 2 and "made now and kept in" in lines[0] and str(path) in lines[0]
    assert "made now" not in lines[1] and str(path) in lines[1]
    assert not any(first in line for line in lines)  # never the key itself
    # An explicit key wins and is said so; the kept one is not read.
    explicit = _fernet()
    assert ensure_payload_key(load_settings({"payload_key": explicit,
                                             "state_dir": str(tmp_path / "state")},
                                            env={})) == explicit


def test_processes_starting_at_once_keep_one_key(tmp_path):
    settings = load_settings({"state_dir": str(tmp_path / "race")}, env={})
    keys: list[str] = []
    threads = [threading.Thread(target=lambda: keys.append(ensure_payload_key(settings)))
               for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(keys) == 8 and len(set(keys)) == 1
    assert os.listdir(tmp_path / "race") == ["payload.key"]  # no temporary file left


def test_no_key_no_start_when_it_cannot_be_kept_safely(tmp_path):
    readable = tmp_path / "shared"
    settings = load_settings({"state_dir": str(readable)}, env={})
    ensure_payload_key(settings)
    (readable / "payload.key").chmod(0o644)
    with pytest.raises(ValueError, match="chmod 600"):
        ensure_payload_key(settings)
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    with pytest.raises(ValueError, match="FHIR_RERANK_PAYLOAD_KEY.*FHIR_RERANK_STATE_DIR"):
        ensure_payload_key(load_settings({"state_dir": str(blocked / "sub")}, env={}))
    with pytest.raises(ValueError, match="Fernet"):
        ensure_payload_key(load_settings({"payload_key": "not-a-key"}, env={}))


def test_job_payloads_and_results_in_redis_hold_no_canary_without_payload_key(
        redis_server, celery_workers, tiny_model_dir, tmp_path, caplog):
    tag = uuid.uuid4().hex[:8]
    question, note = f"cnryq{tag}", f"cnrynote{tag}"
    model = str(tiny_model_dir)
    queue_tier = f"atrest{tag}"
    settings = {"redis_url": redis_server.url, "reranker": "qwen3", "model": model,
                "models_allowed": [model], "model_queues": [f"{model}={queue_tier}"],
                "device": "cpu", "max_length": 256, "batch_tokens": 256,
                "result_expires": 120, "state_dir": str(tmp_path / "state")}
    assert "payload_key" not in settings
    db = redis.Redis.from_url(redis_server.url)
    queue = f"rerank.{queue_tier}"
    db.zadd(workers_key(queue), {"announced@test": time.time() + 600})  # accept, not run yet
    with caplog.at_level(logging.INFO):
        runner = CeleryJobRunner(load_settings(settings, env={}))
    try:
        payload = parse_rerank_request(
            {"model": model, "query": f"{question} chest pain",
             "documents": [f"Patient note: {note} angina on exertion", f"{note} ankle sprain"]},
            "v1", runner.settings)
        job_id = runner.submit(payload, model, "owner")
        deadline = time.monotonic() + 30
        while not db.lrange(queue, 0, -1) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert db.lrange(queue, 0, -1), "the job was not queued"
        queued = _everything_in(db)
        assert not [r for r in queued if question.encode() in r or note.encode() in r]
        assert any("made now and kept in" in r.getMessage() for r in caplog.records)
        # A worker started with the same settings (no payload_key either) reads the same kept
        # key, runs the job, and stores its result encrypted too.
        db.delete(workers_key(queue))
        worker = celery_workers.start(f"atrest{tag}", [queue], settings)
        status = runner.wait(job_id, "owner", 120)
        assert status.finished and status.state != "failed", status.error
        assert len(status.bundle["result"]["scores"]) == 2
        assert "kept in" in worker.log() and runner.settings.payload_key not in worker.log()
        answered = _everything_in(db)
        assert not [r for r in answered if question.encode() in r or note.encode() in r]
        assert any(b"celery-task-meta" in r for r in answered)  # the result was scanned
    finally:
        runner.close()
