"""Job runners: where a search runs as a job, and how its caller gets the answer.

A job has two parts. `prepare` (fetch, flatten, recall) always runs in the API process: it
holds the caller's Authorization, which never crosses Redis. `rank` (the reranker) runs
where the runner puts it: `InProcessJobRunner` (a thread pool here; demo, one machine) or
`CeleryJobRunner` (adapter.jobs.celery_backend, a Celery task on the model tier's queue).

`start(prepare, model, owner)` answers at once with a job id and runs `prepare` in the
background (`Prefer: respond-async`: the 202 never waits for the upstream); `submit(payload,
model, owner)` starts from an already prepared payload. `X-Progress` names the stage:
fetching, recall, queued, reranking n/m.

Job ids are 192 random bits and are the capability: the id in the Content-Location URL is
the only way to a job. It is never logged and never stored: Redis keys, Celery task ids and
log lines use `job_ref(id)`, a digest that cannot be turned back into a readable URL. An
authenticated job is in addition bound to its caller (`owner`); anyone else, an unknown id,
a cancelled job and an expired one all read as `NotFound`.
"""
from __future__ import annotations

import hashlib
import logging
import secrets
import threading
import time
from abc import ABC, abstractmethod
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from adapter.config import Settings
from adapter.errors import CallerBusy, NotFound, error_answer
from adapter.jobs.work import job_error, rank_job
from adapter.runtime import Runtime

if TYPE_CHECKING:
    from adapter.errors import AdapterError

log = logging.getLogger(__name__)

#: prepare(stage) -> payload; it calls stage("recall") etc. as it goes.
Prepare = Callable[[Callable[[str], None]], dict[str, Any]]


def new_job_id() -> str:
    """An unguessable job id (192 random bits): the capability to read the job."""
    return secrets.token_urlsafe(24)


def job_ref(job_id: str) -> str:
    """The name a job has in Redis, Celery and logs: a digest of its id (not reversible)."""
    return hashlib.sha256(job_id.encode("utf-8")).hexdigest()[:32]


@dataclass
class JobStatus:
    """Where a job stands. `state`: "preparing" | "queued" | "running" | "done" | "failed"."""

    state: str
    done: int = 0
    total: int | None = None
    bundle: dict[str, Any] | None = None
    error: dict[str, Any] | None = None  # {"status", "code", "message"}
    worker: str | None = None
    stage: str | None = None  # while preparing: "fetching" | "recall"
    #: True for the first read of a finished job's answer only (metrics count a job once)
    first_read: bool = False
    #: seconds the job waited in its queue before a worker started it (finished jobs)
    queue_wait_s: float | None = None

    @property
    def finished(self) -> bool:
        return self.state in ("done", "failed")

    def progress_text(self) -> str:
        """The X-Progress header: "fetching", "recall", "queued", "reranking 40/120", "done"."""
        if self.state == "preparing":
            return self.stage or "fetching"
        if self.state == "running" and self.total is not None:
            return f"reranking {self.done}/{self.total}"
        return "reranking" if self.state == "running" else self.state


def not_found(job_id: str) -> NotFound:
    return NotFound(f"no job {job_id[:40]!r} for this caller: it never existed, was cancelled, "
                    "expired, or belongs to another Authorization", expression="job")


class JobRunner(ABC):
    """Start or submit a search job, read its status, cancel it. Owner = `caller_identity`."""

    def __init__(self, settings: Settings, runtime: Runtime | None = None) -> None:
        self.settings = settings
        #: the app's caches and models (in-process jobs rank with them)
        self.runtime = runtime or Runtime(settings)
        self._preparers = ThreadPoolExecutor(max_workers=max(1, settings.prepare_workers),
                                             thread_name_prefix="prepare-job")
        #: job id → (owner, since): the synchronous calls being answered in this process
        self._sync_jobs: dict[str, tuple[str, float]] = {}
        self._sync_lock = threading.Lock()

    @abstractmethod
    def submit(self, payload: dict[str, Any], model: str, owner: str,
               job_id: str | None = None) -> str:
        """Queue a prepared job for ranking (a new one, or `job_id` created by `start`)."""

    @abstractmethod
    def _create(self, job_id: str, model: str, owner: str) -> None:
        """Record a job whose payload is being prepared."""

    @abstractmethod
    def _set_stage(self, job_id: str, stage: str) -> None:
        """Record the preparation stage ("fetching", "recall")."""

    @abstractmethod
    def _fail(self, job_id: str, error: dict[str, Any]) -> None:
        """Record that preparing the job failed with this error answer."""

    @abstractmethod
    def status(self, job_id: str, owner: str) -> JobStatus:
        """The job's state; `NotFound` for anyone but its owner."""

    @abstractmethod
    def cancel(self, job_id: str, owner: str) -> None:
        """Stop the job and forget it; later reads are `NotFound`."""

    @abstractmethod
    def forget(self, job_id: str) -> None:
        """Drop a job whose answer was already given (synchronous calls)."""

    # --- per-caller caps (fairness) -------------------------------------------------------

    def _jobs_cap_error(self) -> "AdapterError":
        cap = self.settings.max_jobs_per_caller
        return CallerBusy(f"this caller already has {cap} unfinished jobs (max_jobs_per_caller "
                          f"= {cap}); wait for one to finish (poll or DELETE its "
                          "Content-Location) and retry", expression="max_jobs_per_caller",
                          headers={"Retry-After": "5"})

    def _sync_enter(self, owner: str, job_id: str) -> None:
        """A synchronous call (`submit` of a new job: the caller waits for the answer) takes
        one of the caller's `max_sync_per_caller` slots in this API process until the job is
        forgotten, cancelled, or left to run on as a 202 (`wait`); 429 over the cap."""
        cap = self.settings.max_sync_per_caller
        now = time.monotonic()
        oldest = now - (self.settings.task_time_limit + self.settings.sync_wait + 60)
        with self._sync_lock:  # an entry a failed call left behind lapses after that
            held = sum(1 for who, since in self._sync_jobs.values()
                       if who == owner and since > oldest)
            if cap > 0 and held >= cap:
                raise CallerBusy(
                    f"this caller already has {cap} synchronous searches or reranks being "
                    f"scored (max_sync_per_caller = {cap}); wait for one, or send `Prefer: "
                    "respond-async` and poll", expression="max_sync_per_caller",
                    headers={"Retry-After": "2"})
            self._sync_jobs = {j: v for j, v in self._sync_jobs.items() if v[1] > oldest}
            self._sync_jobs[job_id] = (owner, now)

    def _sync_leave(self, job_id: str) -> None:
        with self._sync_lock:
            self._sync_jobs.pop(job_id, None)

    def _create_sync(self, model: str, owner: str) -> str:
        """A new job for a synchronous call: its slot taken (`_sync_enter`), then recorded;
        the slot is given back when recording fails."""
        job_id = new_job_id()
        self._sync_enter(owner, job_id)
        try:
            self._create(job_id, model, owner)
        except BaseException:
            self._sync_leave(job_id)
            raise
        return job_id

    def start(self, prepare: Prepare, model: str, owner: str) -> str:
        """Answer with a job id at once; prepare (in this process) and rank in the background."""
        job_id = new_job_id()
        self._create(job_id, model, owner)

        def run() -> None:
            try:
                payload = prepare(lambda stage: self._set_stage(job_id, stage))
                self.submit(payload, model, owner, job_id=job_id)
            except Exception as exc:  # noqa: BLE001 - becomes the job's OperationOutcome
                try:
                    self._fail(job_id, error_answer(exc).to_json())
                except Exception as inner:  # noqa: BLE001 - the record is gone or Redis down
                    log.warning("could not record a failed preparation: %s",
                                type(inner).__name__)

        self._preparers.submit(run)
        return job_id

    def wait(self, job_id: str, owner: str, timeout: float) -> JobStatus:
        """Poll until the job is finished or `timeout` seconds passed; the last status."""
        deadline = time.monotonic() + timeout
        pause = 0.01
        try:
            while True:
                status = self.status(job_id, owner)
                left = deadline - time.monotonic()
                if status.finished or left <= 0:
                    break
                time.sleep(min(pause, left))
                pause = min(pause * 1.5, 0.025)  # a finished job is seen within 25 ms
        except BaseException:
            self._sync_leave(job_id)
            raise
        if not status.finished:  # answered 202: no longer a call in progress
            self._sync_leave(job_id)
        return status

    def close(self) -> None:
        """Release threads and connections."""
        self._preparers.shutdown(wait=False, cancel_futures=True)


# --- in-process --------------------------------------------------------------------------

class JobCancelled(Exception):
    """The job was cancelled (DELETE) or forgotten while it ran; stop scoring."""


@dataclass
class _LocalJob:
    owner: str
    model: str
    cancelled: threading.Event = field(default_factory=threading.Event)
    stage: str | None = "fetching"
    done: int = 0
    total: int | None = None
    started: bool = False
    answer: dict[str, Any] | None = None
    finished_at: float | None = None
    queued_at: float | None = None
    started_at: float | None = None
    delivered: bool = False


class InProcessJobRunner(JobRunner):
    """Jobs on a thread pool in this process. Finished jobs are kept `result_expires`
    seconds, and at most `max_finished_jobs` of them (the oldest unpolled go first)."""

    def __init__(self, settings: Settings, runtime: Runtime | None = None) -> None:
        super().__init__(settings, runtime)
        self._pool = ThreadPoolExecutor(max_workers=max(1, settings.inprocess_workers),
                                        thread_name_prefix="rerank-job")
        self._jobs: OrderedDict[str, _LocalJob] = OrderedDict()
        self._lock = threading.Lock()

    def _create(self, job_id: str, model: str, owner: str) -> None:
        cap = self.settings.max_jobs_per_caller
        with self._lock:
            self._purge()
            if cap > 0 and sum(1 for job in self._jobs.values()
                               if job.owner == owner and job.finished_at is None) >= cap:
                raise self._jobs_cap_error()
            self._jobs[job_id] = _LocalJob(owner, model)

    def _local(self, job_id: str) -> _LocalJob | None:
        with self._lock:
            return self._jobs.get(job_id)

    def _set_stage(self, job_id: str, stage: str) -> None:
        job = self._local(job_id)
        if job is None:
            raise JobCancelled()
        job.stage = stage

    def _fail(self, job_id: str, error: dict[str, Any]) -> None:
        job = self._local(job_id)
        if job is not None:
            job.answer, job.finished_at = {"error": error}, time.monotonic()

    def submit(self, payload: dict[str, Any], model: str, owner: str,
               job_id: str | None = None) -> str:
        if job_id is None:
            job_id = self._create_sync(model, owner)
        job = self._local(job_id)
        if job is None:  # cancelled while it was being prepared
            return job_id
        job.stage = None
        job.queued_at = time.monotonic()
        self._pool.submit(self._run, job, payload, model)
        return job_id

    def _run(self, job: _LocalJob, payload: dict[str, Any], model: str) -> None:
        def on_progress(done: int, total: int) -> None:
            if job.cancelled.is_set():
                raise JobCancelled()
            job.done, job.total = done, total

        job.started, job.started_at = True, time.monotonic()
        try:
            answer = {"result": rank_job(payload, model, self.runtime, on_progress)}
        except JobCancelled:
            answer = {"cancelled": True}
        except Exception as exc:  # noqa: BLE001 - becomes an OperationOutcome
            answer = {"error": job_error(exc, where="server")}
        job.answer, job.finished_at = answer, time.monotonic()

    def _purge(self) -> None:
        """Drop expired finished jobs, and the oldest finished ones over max_finished_jobs."""
        ceil = time.monotonic() - self.settings.result_expires
        finished = [j for j, job in self._jobs.items() if job.finished_at is not None]
        over = len(finished) - max(0, self.settings.max_finished_jobs)
        for index, job_id in enumerate(finished):
            if index < over or self._jobs[job_id].finished_at < ceil:  # type: ignore[operator]
                del self._jobs[job_id]

    def _job(self, job_id: str, owner: str) -> _LocalJob:
        with self._lock:
            self._purge()
            job = self._jobs.get(job_id)
        if job is None or job.owner != owner:
            raise not_found(job_id)
        return job

    def status(self, job_id: str, owner: str) -> JobStatus:
        job = self._job(job_id, owner)
        answer = job.answer
        if answer is not None and ("error" in answer or "result" in answer):
            with self._lock:
                first, job.delivered = not job.delivered, True
            wait = (job.started_at - job.queued_at
                    if job.started_at is not None and job.queued_at is not None else None)
            if "error" in answer:
                return JobStatus("failed", job.done, job.total, error=answer["error"],
                                 worker="in-process", first_read=first, queue_wait_s=wait)
            return JobStatus("done", job.done, job.total, bundle=answer["result"],
                             worker="in-process", first_read=first, queue_wait_s=wait)
        if job.stage is not None:
            return JobStatus("preparing", stage=job.stage)
        return JobStatus("running" if job.started else "queued", job.done, job.total)

    def cancel(self, job_id: str, owner: str) -> None:
        job = self._job(job_id, owner)
        job.cancelled.set()
        self.forget(job_id)

    def forget(self, job_id: str) -> None:
        self._sync_leave(job_id)
        with self._lock:
            job = self._jobs.pop(job_id, None)
        if job is not None:
            job.cancelled.set()

    def close(self) -> None:
        for job in list(self._jobs.values()):
            job.cancelled.set()
        self._pool.shutdown(wait=False, cancel_futures=True)
        super().close()

