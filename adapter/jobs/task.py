"""The rerank job's Celery task (its body, `rank_job`, is in adapter.jobs.work).

The task holds no logic (that is `adapter.jobs.work`): it opens the payload that `adapter.pipeline.prepare_search` built in
the API process, calls `rank_prepared` with the worker's reranker and returns the sealed
Bundle. While it runs it keeps a heartbeat and a lease in Redis (adapter.jobs.heartbeat), so
a job whose worker died is handed to another one, and a duplicate delivery of a job that a
live worker is running is dropped. A failure is stored as the job's OperationOutcome
(`error_answer`, the mapping HTTP uses too) and logged as a failure, never as "succeeded".
"""
from __future__ import annotations

import logging
import os
import time
from typing import Any

from celery import Celery, shared_task, states
from celery.exceptions import Ignore, SoftTimeLimitExceeded

from adapter.config import Settings, load_settings
from adapter.errors import JobTimeout, ModelLoadError, RerankerUnavailable
from adapter.jobs.envelope import PayloadKeyError, seal, unseal
from adapter.jobs.heartbeat import JobBeat, claim_lease, job_key, redis_time, stamp_once
from adapter.jobs.routing import TASK_NAME, rerank_queue
from adapter.jobs.runners import JobCancelled
from adapter.jobs.work import job_error, rank_job
from adapter.runtime import Runtime

log = logging.getLogger(__name__)

#: Settings that change what a job's scores are. The API sends its values with each job
#: (`needs`); a worker whose values differ does not score it (see `rerank`). The device,
#: batch size and CUDA graphs change speed, not the answer, and may differ per worker.
SCORING_SETTINGS = ("reranker", "dtype", "max_length", "attention", "instruction",
                    "long_documents", "max_chunks_per_doc", "overlap_tokens",
                    "max_tokens_per_call", "remote_url", "remote_model")


def scoring_settings(settings: Settings) -> dict[str, Any]:
    """The values of SCORING_SETTINGS: what a job needs of the worker that scores it."""
    return {name: getattr(settings, name) for name in SCORING_SETTINGS}


def settings_differ(needs: dict[str, Any], settings: Settings) -> list[str]:
    """The scoring settings whose value here differs from what a job needs, as
    `name (API x, worker y)`; empty when this worker may score the job."""
    mine = scoring_settings(settings)
    out = []
    for name in SCORING_SETTINGS:
        if name in needs and needs[name] != mine[name]:
            shown = (f"API {needs[name]!r:.40}, worker {mine[name]!r:.40}"
                     if name not in ("instruction", "remote_url") else "values differ")
            out.append(f"{name} ({shown})")
    return out


def _timed_out(exc: BaseException, settings: Settings) -> BaseException:
    """Celery's soft time limit as the JobTimeout a caller reads; other errors as they are."""
    if isinstance(exc, SoftTimeLimitExceeded):
        return JobTimeout(f"reranking took longer than task_soft_time_limit "
                          f"({settings.task_soft_time_limit} s); lower `recall` or use a "
                          "faster model tier")
    return exc


def is_transient(exc: BaseException) -> bool:
    """Errors worth a retry with backoff: a model that could not load, a GPU out of memory."""
    if isinstance(exc, PayloadKeyError):
        return False
    return isinstance(exc, (RerankerUnavailable, ModelLoadError)) or \
        type(exc).__name__ == "OutOfMemoryError"


class _TaskProgress:
    """on_progress for a Celery task: PROGRESS state (throttled), and the cancel check."""

    def __init__(self, task: Any, client: Any, ref: str, interval: float = 0.2) -> None:
        self.task, self.client, self.ref, self.interval = task, client, ref, interval
        self._last = 0.0

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if done < total and now - self._last < self.interval:
            return
        self._last = now
        if not self.client.exists(job_key(self.ref)):
            raise JobCancelled()
        self.task.update_state(state="PROGRESS", meta={"done": done, "total": total})


def _settings_of(app: Celery) -> Settings:
    settings = getattr(app, "fhir_settings", None)
    return settings if settings is not None else load_settings()


def runtime_of(app: Celery) -> Runtime:
    """The worker app's runtime (its caches and models), made on first use when the app was
    built without one."""
    runtime = getattr(app, "fhir_runtime", None)
    if runtime is None:
        runtime = app.fhir_runtime = Runtime(_settings_of(app))
    return runtime


#: seconds a worker whose scoring settings differ waits before it hands a job back
BOUNCE_PAUSE_S = 0.2


def _other_settings(task: Any, client: Any, ref: str, envelope: dict[str, Any], model: str,
                    needs: dict[str, Any], since: float | None, differ: list[str],
                    settings: Settings) -> dict[str, Any] | None:
    """This worker's scoring settings differ from the job's: hand the job back to its queue
    for another worker (None), for up to `job_stale_after` seconds from the first hand-back;
    then the job's answer is a 503 naming the settings."""
    now = redis_time(client)
    if since is None:
        log.warning("job %s: this worker's scoring settings differ from the API's: %s; "
                    "handed back to its queue for a worker with the API's settings",
                    ref[:12], "; ".join(differ))
        since = now
    if now - since < settings.job_stale_after:
        time.sleep(BOUNCE_PAUSE_S)  # another worker waiting on the queue takes it first
        queue = client.hget(job_key(ref), "queue") or \
            (task.request.delivery_info or {}).get("routing_key")
        task.app.send_task(TASK_NAME, args=[envelope, model],
                           kwargs={"needs": needs, "since": since}, task_id=ref,
                           queue=rerank_queue(queue), argsrepr="(<payload>, model)",
                           kwargsrepr="{}")
        return None
    return {"error": {"status": 503, "code": "transient", "expression": "model",
                      "message": "no worker with the API's scoring settings took this job "
                                 f"within job_stale_after = {settings.job_stale_after:g} s; "
                                 f"the worker's differ: {'; '.join(differ)}. Give the API and "
                                 "the workers the same settings (FHIR_RERANK_* or "
                                 "FHIR_RERANK_CONFIG)"}}


@shared_task(bind=True, name=TASK_NAME, acks_late=True, reject_on_worker_lost=True)
def rerank(self: Any, envelope: dict[str, Any], model: str, needs: dict[str, Any] | None = None,
           since: float | None = None) -> dict[str, Any]:
    """Rerank one prepared search. Returns {"result": sealed Bundle, "worker": hostname}.

    `needs`: the API's scoring settings (SCORING_SETTINGS); a worker whose own differ hands
    the job back instead (`since`: when the first worker did)."""
    settings = _settings_of(self.app)
    ref = self.request.id  # the job's ref (a digest of its id), never the id itself
    client = self.app.backend.client
    key = job_key(ref)
    # Cancelled/expired before it ran, or already answered (a copy redelivered after its worker
    # died between storing the result and acking): nothing to do, and no state write, so an
    # answered job's result is never overwritten.
    if not client.expire(key, settings.result_expires + settings.task_time_limit) or \
            self.backend.get_task_meta(ref, cache=False).get("status") == states.SUCCESS:
        raise Ignore()
    differ = settings_differ(needs, settings) if needs else []
    if differ:
        refused = _other_settings(self, client, ref, envelope, model, needs or {}, since,
                                  differ, settings)
        if refused is None:
            raise Ignore()
        refused["worker"] = self.request.hostname
        with client.pipeline() as pipe:
            pipe.hset(key, "finished", "1").hdel(key, "envelope")
            pipe.expire(key, settings.result_expires)
            pipe.execute()
        self.backend.store_result(ref, refused, states.SUCCESS, request=self.request)
        log.error("job %s failed: 503 transient (scoring settings differ)", ref[:12])
        raise Ignore()
    holder = f"{self.request.hostname}/{os.getpid()}"
    if not claim_lease(client, ref, holder, settings):
        log.info("dropped a duplicate delivery of a job a live worker is running")
        raise Ignore()
    stamp_once(client, key, "started", f"{redis_time(client):.6f}")  # queue wait: first start
    failure: BaseException | None = None
    with JobBeat(client, ref, holder, settings):
        log.info("job %s: reranking with %s", ref[:12], model if "/" not in model else "a model")
        self.update_state(state="PROGRESS", meta={"done": 0, "total": None})
        try:
            bundle = rank_job(unseal(envelope, settings.payload_key), model,
                              runtime_of(self.app), _TaskProgress(self, client, ref))
            answer: dict[str, Any] = {"result": seal(bundle, settings.payload_key)}
        except JobCancelled:
            log.info("job %s cancelled while running", ref[:12])
            self.backend.forget(ref)  # a PROGRESS write may have raced the DELETE
            raise Ignore() from None
        except Exception as exc:  # noqa: BLE001 - every failure becomes an OperationOutcome
            if is_transient(exc) and self.request.retries < settings.task_max_retries:
                countdown = 2 ** self.request.retries
                log.warning("job %s: transient %s, retry in %s s", ref[:12],
                            type(exc).__name__, countdown)
                raise self.retry(countdown=countdown,
                                 max_retries=settings.task_max_retries) from None
            failure, answer = exc, {"error": job_error(_timed_out(exc, settings))}
    answer["worker"] = self.request.hostname
    if not client.exists(key):  # cancelled during the last batch: store nothing
        self.backend.forget(ref)
        raise Ignore()
    with client.pipeline() as pipe:  # readable for result_expires from now, like the result
        pipe.hset(key, "finished", "1").hdel(key, "envelope").expire(key, settings.result_expires)
        pipe.execute()
    if failure is not None:
        # Stored as the job's answer, and logged as what it is: a failure, not "succeeded".
        self.backend.store_result(ref, answer, states.SUCCESS, request=self.request)
        log.error("job %s failed: %s %s (%s)", ref[:12], answer["error"]["status"],
                  answer["error"]["code"], type(failure).__name__)
        raise Ignore()
    return answer
