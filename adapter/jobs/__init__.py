"""Searches as jobs: the FHIR async pattern's back end.

    routing.py        model → tier queue; a worker's --tiers → the queues it consumes
    envelope.py       seal / unseal: what crosses Redis, compressed and encrypted; the kept key
    work.py           the job body (rank a prepared search or a /v1/rerank call), the scoring
                      settings a job needs of its worker, which failures are retried
    heartbeat.py      worker and job heartbeats and leases in Redis; stale jobs handed over
                      (through a `resend` callable: it knows no Celery)
    runners.py        JobRunner, JobStatus, the in-process runner, job ids and refs
    celery_backend.py the only module that imports celery or kombu: the Celery app, the task,
                      the worker (`fhir-rerank worker`, `celery -A celery_app`) and the runner
                      on Celery + Redis (records, 503s, status, cancel)
    devices.py        `fhir-rerank worker --devices`: one supervised worker per GPU

`live_workers(settings) -> {queue: count}` is what the readiness check asks;
`make_job_runner(settings, runtime)` picks the runner. Imports run one way: routing and
envelope → heartbeat → work → runners → celery_backend → this package (which loads
celery_backend only when redis_url is set); tests/test_layering.py checks there is no cycle
and that no other module imports Celery.
"""
from __future__ import annotations

from adapter.config import Settings
from adapter.jobs.heartbeat import live_workers
from adapter.jobs.runners import InProcessJobRunner, JobRunner, JobStatus, job_ref, new_job_id
from adapter.runtime import Runtime

__all__ = ["InProcessJobRunner", "JobRunner", "JobStatus", "job_ref", "live_workers",
           "make_job_runner", "new_job_id"]


def make_job_runner(settings: Settings, runtime: Runtime | None = None) -> JobRunner:
    """Celery on Redis when `redis_url` is set, else an in-process pool (ranking with
    `runtime`'s models)."""
    if settings.redis_url:
        # Celery and redis load only here: without redis_url nothing imports them.
        from adapter.jobs.celery_backend import CeleryJobRunner

        return CeleryJobRunner(settings, runtime)
    return InProcessJobRunner(settings, runtime)
