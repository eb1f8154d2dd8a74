"""Job runners: where a prepared search is ranked, and how its caller gets the answer.

`make_job_runner(settings)` picks one:
- `CeleryJobRunner` when `redis_url` is set: the job is a Celery task on the model tier's
  queue; a small record in Redis (`fhir-rerank:job:<id>`: owner identity, model, queue) lets
  only the creator read or cancel it. A down Redis is `QueueUnavailable` (503), never a 500.
- `InProcessJobRunner` otherwise: the same job body (`adapter.tasks.rank_job`) on a small
  thread pool inside the API process (demo, single-machine install).

Job ids are 192 random bits (url-safe base64). Anyone but the owner, an unknown id, a
cancelled job and an expired one all read as `NotFound`.
"""
from __future__ import annotations

import logging
import re
import secrets
import threading
import time
from abc import ABC, abstractmethod
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from adapter.config import Settings
from adapter.errors import NotFound, QueueUnavailable
from adapter.tasks import (JobCancelled, TASK_NAME, job_error, job_key, make_celery,
                           queue_for_model, rank_job, rerank_queue, seal, unseal)

log = logging.getLogger(__name__)
_JOB_ID = re.compile(r"[A-Za-z0-9_-]{32}")


def new_job_id() -> str:
    """An unguessable job id (192 random bits)."""
    return secrets.token_urlsafe(24)


@dataclass
class JobStatus:
    """Where a job stands. `state`: "queued" | "running" | "done" | "failed"."""

    state: str
    done: int = 0
    total: int | None = None
    bundle: dict[str, Any] | None = None
    error: dict[str, Any] | None = None  # {"status", "code", "message"}
    worker: str | None = None

    @property
    def finished(self) -> bool:
        return self.state in ("done", "failed")

    def progress_text(self) -> str:
        """The X-Progress header: "queued", "reranking 40/120", "done", "failed"."""
        if self.state == "running" and self.total is not None:
            return f"reranking {self.done}/{self.total}"
        return "reranking" if self.state == "running" else self.state


def _not_found(job_id: str) -> NotFound:
    return NotFound(f"no job {job_id[:40]!r} for this caller: it never existed, was cancelled, "
                    "expired, or belongs to another Authorization", expression="job")


class JobRunner(ABC):
    """Submit a prepared search, read its status, cancel it. Owner = `caller_identity(...)`."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    @abstractmethod
    def submit(self, payload: dict[str, Any], model: str, owner: str) -> str:
        """Queue the job; return its id."""

    @abstractmethod
    def status(self, job_id: str, owner: str) -> JobStatus:
        """The job's state; `NotFound` for anyone but its owner."""

    @abstractmethod
    def cancel(self, job_id: str, owner: str) -> None:
        """Stop the job and forget it; later reads are `NotFound`."""

    @abstractmethod
    def forget(self, job_id: str) -> None:
        """Drop a job whose answer was already given (synchronous calls)."""

    def wait(self, job_id: str, owner: str, timeout: float) -> JobStatus:
        """Poll until the job is finished or `timeout` seconds passed; the last status."""
        deadline = time.monotonic() + timeout
        pause = 0.01
        while True:
            status = self.status(job_id, owner)
            left = deadline - time.monotonic()
            if status.finished or left <= 0:
                return status
            time.sleep(min(pause, left))
            pause = min(pause * 1.5, 0.025)  # a finished job is seen within 25 ms

    def close(self) -> None:
        """Release threads and connections."""


# --- in-process --------------------------------------------------------------------------

@dataclass
class _LocalJob:
    owner: str
    cancelled: threading.Event = field(default_factory=threading.Event)
    future: Future | None = None
    done: int = 0
    total: int | None = None
    started: bool = False
    finished_at: float | None = None


class InProcessJobRunner(JobRunner):
    """Jobs on a thread pool in this process; results kept `result_expires` seconds."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self._pool = ThreadPoolExecutor(max_workers=max(1, settings.inprocess_workers),
                                        thread_name_prefix="rerank-job")
        self._jobs: dict[str, _LocalJob] = {}
        self._lock = threading.Lock()

    def submit(self, payload: dict[str, Any], model: str, owner: str) -> str:
        job_id, job = new_job_id(), _LocalJob(owner)
        with self._lock:
            self._purge_expired()
            self._jobs[job_id] = job
        job.future = self._pool.submit(self._run, job, payload, model)
        return job_id

    def _run(self, job: _LocalJob, payload: dict[str, Any], model: str) -> dict[str, Any]:
        def on_progress(done: int, total: int) -> None:
            if job.cancelled.is_set():
                raise JobCancelled()
            job.done, job.total = done, total

        job.started = True
        try:
            return {"result": rank_job(payload, model, self.settings, on_progress)}
        except JobCancelled:
            return {"cancelled": True}
        except Exception as exc:  # noqa: BLE001 - becomes an OperationOutcome
            return {"error": job_error(exc, self.settings)}
        finally:
            job.finished_at = time.monotonic()

    def _purge_expired(self) -> None:
        ceil = time.monotonic() - self.settings.result_expires
        for job_id in [j for j, job in self._jobs.items()
                       if job.finished_at is not None and job.finished_at < ceil]:
            del self._jobs[job_id]

    def _job(self, job_id: str, owner: str) -> _LocalJob:
        with self._lock:
            self._purge_expired()
            job = self._jobs.get(job_id)
        if job is None or job.owner != owner:
            raise _not_found(job_id)
        return job

    def status(self, job_id: str, owner: str) -> JobStatus:
        job = self._job(job_id, owner)
        if job.future is not None and job.future.done() and job.finished_at is not None:
            answer = job.future.result()
            if "error" in answer:
                return JobStatus("failed", job.done, job.total, error=answer["error"],
                                 worker="in-process")
            return JobStatus("done", job.done, job.total, bundle=answer["result"],
                             worker="in-process")
        return JobStatus("running" if job.started else "queued", job.done, job.total)

    def cancel(self, job_id: str, owner: str) -> None:
        job = self._job(job_id, owner)
        job.cancelled.set()
        if job.future is not None:
            job.future.cancel()
        self.forget(job_id)

    def forget(self, job_id: str) -> None:
        with self._lock:
            self._jobs.pop(job_id, None)

    def close(self) -> None:
        for job in list(self._jobs.values()):
            job.cancelled.set()
        self._pool.shutdown(wait=False, cancel_futures=True)


# --- Celery on Redis ---------------------------------------------------------------------

def _queue_errors() -> tuple[type[BaseException], ...]:
    from celery.exceptions import BackendError
    from kombu.exceptions import OperationalError
    from redis.exceptions import RedisError

    return (OperationalError, RedisError, BackendError, ConnectionError, TimeoutError)


class CeleryJobRunner(JobRunner):
    """Jobs as Celery tasks on Redis, routed by model tier."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        import redis

        self.app = make_celery(settings, set_as_current=False)
        self.records = redis.Redis.from_url(
            settings.redis_url, socket_timeout=settings.redis_timeout,
            socket_connect_timeout=settings.redis_timeout, retry_on_timeout=False,
            decode_responses=True)
        self._errors = _queue_errors()

    def _unavailable(self, exc: BaseException) -> QueueUnavailable:
        log.warning("job queue unreachable: %s", type(exc).__name__)
        return QueueUnavailable("the job queue (Redis) is unreachable; retry in a few seconds",
                                headers={"Retry-After": "5"})

    def submit(self, payload: dict[str, Any], model: str, owner: str) -> str:
        job_id = new_job_id()
        queue = queue_for_model(self.settings, model)
        ttl = self.settings.result_expires + self.settings.task_time_limit
        record = {"owner": owner, "model": model, "queue": queue, "submitted": f"{time.time():.3f}"}
        try:
            with self.records.pipeline() as pipe:
                pipe.hset(job_key(job_id), mapping=record).expire(job_key(job_id), ttl)
                pipe.execute()
            self.app.send_task(TASK_NAME, args=[seal(payload, self.settings.payload_key), model],
                               task_id=job_id, queue=rerank_queue(queue),
                               argsrepr="(<payload>, model)", kwargsrepr="{}")
        except self._errors as exc:
            raise self._unavailable(exc) from None
        log.info("job %s queued on %s", job_id, queue)
        return job_id

    def _record(self, job_id: str, owner: str) -> dict[str, str]:
        if not _JOB_ID.fullmatch(job_id):
            raise _not_found(job_id)
        try:
            record = self.records.hgetall(job_key(job_id))
        except self._errors as exc:
            raise self._unavailable(exc) from None
        if not record or record.get("owner") != owner:
            raise _not_found(job_id)
        return record

    def status(self, job_id: str, owner: str) -> JobStatus:
        record = self._record(job_id, owner)
        try:
            meta = self.app.backend.get_task_meta(job_id, cache=False)
        except self._errors as exc:
            raise self._unavailable(exc) from None
        state, info = meta.get("status"), meta.get("result")
        if state == "SUCCESS" and isinstance(info, dict):
            if "error" in info:
                return JobStatus("failed", error=info["error"], worker=info.get("worker"))
            bundle = unseal(info["result"], self.settings.payload_key)
            return JobStatus("done", bundle=bundle, worker=info.get("worker"))
        if state == "PROGRESS" and isinstance(info, dict):
            return JobStatus("running", int(info.get("done", 0)), info.get("total"))
        if state in ("STARTED", "RETRY"):
            return JobStatus("running")
        if state == "FAILURE":
            return JobStatus("failed", error=self._failure(job_id, info))
        if state == "REVOKED" or record.get("finished"):
            raise _not_found(job_id)  # result gone (expired) or never to come
        return JobStatus("queued")

    @staticmethod
    def _failure(job_id: str, exc: Any) -> dict[str, Any]:
        name = type(exc).__name__
        log.error("job %s failed on the worker: %s", job_id, name)
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
            self.app.control.revoke(job_id)  # a queued copy is dropped; a running one sees
        except self._errors as exc:          # its record gone at the next batch and stops
            raise self._unavailable(exc) from None

    def forget(self, job_id: str) -> None:
        try:
            self.records.delete(job_key(job_id))
            self.app.backend.forget(job_id)
        except self._errors as exc:
            raise self._unavailable(exc) from None

    def close(self) -> None:
        self.records.close()
        self.app.close()


def make_job_runner(settings: Settings) -> JobRunner:
    """Celery on Redis when `redis_url` is set, else an in-process pool."""
    if settings.redis_url:
        return CeleryJobRunner(settings)
    return InProcessJobRunner(settings)
