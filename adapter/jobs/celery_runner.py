"""Jobs as Celery tasks on Redis, routed by model tier (adapter.jobs.routing).

A small record per job in Redis (`fhir-rerank:job:<ref>`: owner identity, model, queue,
stage, the sealed payload until it is answered) lets only the creator read or cancel it and
lets another worker take over a job whose worker died (adapter.jobs.heartbeat). A down
Redis is `QueueUnavailable` (503); so is a tier no live worker consumes, naming the command
that starts one. Never a 500.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from typing import Any

from adapter.config import Settings
from adapter.errors import QueueUnavailable
from adapter.jobs.app import make_celery
from adapter.jobs.envelope import seal, unseal
from adapter.jobs.heartbeat import (JOB_KEY_PREFIX, LiveWorkers, job_key, redis_time,
                                    stamp_once)
from adapter.jobs.routing import queue_for_model, rerank_queue, tier_of, worker_command
from adapter.jobs.runners import JobCancelled, JobRunner, JobStatus, job_ref, not_found
from adapter.jobs.task import TASK_NAME, scoring_settings
from adapter.runtime import Runtime

log = logging.getLogger(__name__)
_JOB_ID = re.compile(r"[A-Za-z0-9_-]{32}")
#: KEYS[1] the caller's set of job refs. Drops refs whose record is gone or finished (and
#: any older than a job can live), then adds ARGV[4] unless ARGV[3] (> 0) are left: -1.
_COUNT_CALLER_JOB = """
redis.call('zremrangebyscore', KEYS[1], '-inf', ARGV[2])
local live = 0
for _, ref in ipairs(redis.call('zrange', KEYS[1], 0, -1)) do
  local key = ARGV[5] .. ref
  if redis.call('exists', key) == 0 or redis.call('hget', key, 'finished') then
    redis.call('zrem', KEYS[1], ref)
  else
    live = live + 1
  end
end
if tonumber(ARGV[3]) > 0 and live >= tonumber(ARGV[3]) then return -1 end
redis.call('zadd', KEYS[1], ARGV[1], ARGV[4])
redis.call('expire', KEYS[1], ARGV[6])
return live + 1
"""


def caller_jobs_key(owner: str) -> str:
    """The Redis set of a caller's job refs (the owner is already a digest or "anonymous")."""
    return "fhir-rerank:caller:" + hashlib.sha256(owner.encode("utf-8")).hexdigest()[:32]


PREPARE_TTL_S = 600  # a record whose API process died while preparing it goes away


def _queue_errors() -> tuple[type[BaseException], ...]:
    from celery.exceptions import BackendError
    from kombu.exceptions import OperationalError
    from redis.exceptions import RedisError

    return (OperationalError, RedisError, BackendError, ConnectionError, TimeoutError)


class CeleryJobRunner(JobRunner):
    """Jobs as Celery tasks on Redis, routed by model tier."""

    def __init__(self, settings: Settings, runtime: Runtime | None = None) -> None:
        super().__init__(settings, runtime)
        import redis

        self.app = make_celery(settings, set_as_current=False)
        self.records = redis.Redis.from_url(
            settings.redis_url, socket_timeout=settings.redis_timeout,
            socket_connect_timeout=settings.redis_timeout, retry_on_timeout=False,
            decode_responses=True)
        self._errors = _queue_errors()
        self.live_workers = LiveWorkers(settings, self.records)

    def _unavailable(self, exc: BaseException) -> QueueUnavailable:
        log.warning("job queue unreachable: %s", type(exc).__name__)
        return QueueUnavailable("the job queue (Redis) is unreachable; retry in a few seconds",
                                headers={"Retry-After": "5"})

    def check_worker(self, queue: str) -> None:
        """503 naming the tier and the command that starts a worker when none consumes it."""
        try:
            live = self.live_workers()
        except self._errors as exc:
            raise self._unavailable(exc) from None
        if not live.get(queue):
            tier = tier_of(queue)
            raise QueueUnavailable(
                f"no worker consumes the {tier} tier (queue {queue}); start one with "
                f"`{worker_command(queue)}`", expression="model", headers={"Retry-After": "5"})

    def _create(self, job_id: str, model: str, owner: str) -> None:
        queue = queue_for_model(self.settings, model)
        self.check_worker(queue)
        record = {"owner": owner, "model": model, "queue": queue, "stage": "fetching",
                  "submitted": f"{time.time():.3f}"}
        key = job_key(job_ref(job_id))
        try:
            self._count_caller_job(owner, job_ref(job_id))
            with self.records.pipeline() as pipe:
                pipe.hset(key, mapping=record).expire(key, PREPARE_TTL_S)
                pipe.execute()
        except self._errors as exc:
            raise self._unavailable(exc) from None

    def _count_caller_job(self, owner: str, ref: str) -> None:
        """Count the job against its caller's `max_jobs_per_caller` (across API processes:
        one set per caller in Redis, checked and added atomically); 429 when at the cap."""
        cap = self.settings.max_jobs_per_caller
        life = PREPARE_TTL_S + self.settings.result_expires + self.settings.task_time_limit
        now = time.time()
        held = self.records.eval(_COUNT_CALLER_JOB, 1, caller_jobs_key(owner), f"{now:.3f}",
                                 f"{now - life:.3f}", str(cap), ref, JOB_KEY_PREFIX, str(life))
        if int(held) < 0:
            raise self._jobs_cap_error()

    def _set_stage(self, job_id: str, stage: str) -> None:
        key = job_key(job_ref(job_id))
        if not self.records.exists(key):
            raise JobCancelled()
        self.records.hset(key, "stage", stage)

    def _fail(self, job_id: str, error: dict[str, Any]) -> None:
        key = job_key(job_ref(job_id))
        if not self.records.exists(key):
            return  # cancelled while it was being prepared
        with self.records.pipeline() as pipe:
            pipe.hset(key, mapping={"error": json.dumps(error), "finished": "1", "stage": ""})
            pipe.expire(key, self.settings.result_expires)
            pipe.execute()

    def submit(self, payload: dict[str, Any], model: str, owner: str,
               job_id: str | None = None) -> str:
        if job_id is None:
            job_id = self._create_sync(model, owner)
        ref = job_ref(job_id)
        queue = queue_for_model(self.settings, model)
        envelope = seal(payload, self.settings.payload_key)
        ttl = self.settings.result_expires + self.settings.task_time_limit
        key = job_key(ref)
        try:
            if not self.records.exists(key):
                return job_id  # cancelled while it was being prepared
            queued = redis_time(self.records)  # the worker stamps "started" on Redis' clock too
            needs = scoring_settings(self.settings)  # a worker scores it only with these
            with self.records.pipeline() as pipe:
                pipe.hset(key, mapping={"stage": "", "envelope": json.dumps(envelope),
                                        "queued": f"{queued:.6f}", "needs": json.dumps(needs)})
                pipe.expire(key, ttl)
                pipe.execute()
            self.app.send_task(TASK_NAME, args=[envelope, model], kwargs={"needs": needs},
                               task_id=ref, queue=rerank_queue(queue),
                               argsrepr="(<payload>, model)", kwargsrepr="{}")
        except self._errors as exc:
            raise self._unavailable(exc) from None
        log.info("job %s queued on %s", ref[:12], queue)
        return job_id

    def _record(self, job_id: str, owner: str) -> dict[str, str]:
        if not _JOB_ID.fullmatch(job_id):
            raise not_found(job_id)
        try:
            record = self.records.hgetall(job_key(job_ref(job_id)))
        except self._errors as exc:
            raise self._unavailable(exc) from None
        if not record or record.get("owner") != owner:
            raise not_found(job_id)
        return record

    def _first_read(self, job_id: str) -> bool:
        """True for exactly one read of a finished job, across every API process (a record
        deleted meanwhile, by a cancel, is not brought back without its expiry)."""
        try:
            return stamp_once(self.records, job_key(job_ref(job_id)), "delivered", "1")
        except self._errors:
            return False

    @staticmethod
    def _queue_wait(record: dict[str, str]) -> float | None:
        try:
            return max(0.0, float(record["started"]) - float(record["queued"]))
        except (KeyError, ValueError):
            return None

    def status(self, job_id: str, owner: str) -> JobStatus:
        record = self._record(job_id, owner)
        if record.get("error"):
            return JobStatus("failed", error=json.loads(record["error"]),
                             first_read=self._first_read(job_id))
        if record.get("stage"):
            return JobStatus("preparing", stage=record["stage"])
        ref = job_ref(job_id)
        try:
            meta = self.app.backend.get_task_meta(ref, cache=False)
        except self._errors as exc:
            raise self._unavailable(exc) from None
        state, info = meta.get("status"), meta.get("result")
        if state == "SUCCESS" and isinstance(info, dict):
            once = {"first_read": self._first_read(job_id),
                    "queue_wait_s": self._queue_wait(record)}
            if "error" in info:
                return JobStatus("failed", error=info["error"], worker=info.get("worker"),
                                 **once)
            bundle = unseal(info["result"], self.settings.payload_key)
            return JobStatus("done", bundle=bundle, worker=info.get("worker"), **once)
        if state == "PROGRESS" and isinstance(info, dict):
            return JobStatus("running", int(info.get("done", 0)), info.get("total"))
        if state in ("STARTED", "RETRY"):
            return JobStatus("running")
        if state == "FAILURE":
            return JobStatus("failed", error=self._failure(ref, info),
                             first_read=self._first_read(job_id),
                             queue_wait_s=self._queue_wait(record))
        if state == "REVOKED" or record.get("finished"):
            raise not_found(job_id)  # result gone (expired) or never to come
        return JobStatus("queued")

    @staticmethod
    def _failure(ref: str, exc: Any) -> dict[str, Any]:
        name = type(exc).__name__
        log.error("job %s failed on the worker: %s", ref[:12], name)
        if name == "TimeLimitExceeded":
            return {"status": 504, "code": "timeout",
                    "message": "reranking passed task_time_limit and was stopped; lower "
                               "`recall` or use a faster model tier"}
        return {"status": 500, "code": "exception",
                "message": f"reranking failed on the worker ({name}); the worker log has details"}

    def cancel(self, job_id: str, owner: str) -> None:
        self._record(job_id, owner)
        self.forget(job_id)
        try:
            self.app.control.revoke(job_ref(job_id))  # a queued copy is dropped; a running
        except self._errors as exc:  # one sees its record gone at the next batch and stops
            raise self._unavailable(exc) from None

    def forget(self, job_id: str) -> None:
        self._sync_leave(job_id)
        ref = job_ref(job_id)
        try:
            self.records.delete(job_key(ref))
            self.app.backend.forget(ref)
        except self._errors as exc:
            raise self._unavailable(exc) from None

    def close(self) -> None:
        super().close()
        self.records.close()
        self.app.close()
