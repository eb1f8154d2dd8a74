"""Searches as jobs: the FHIR async pattern's back end.

    routing.py        model → tier queue; a worker's --tiers → the queues it consumes
    envelope.py       seal / unseal: what crosses Redis, compressed and encrypted; the kept key
    runners.py        JobRunner, JobStatus, the in-process runner, job ids and refs
    celery_runner.py  the runner on Celery + Redis (records, 503s, status, cancel)
    task.py           the rerank job body and its Celery task
    app.py            the Celery app factory
    heartbeat.py      worker and job heartbeats in Redis; stale jobs handed over
    worker.py         what a worker process runs (`fhir-rerank worker`, `celery -A celery_app`)
    devices.py        `fhir-rerank worker --devices`: one supervised worker per GPU

`live_workers(settings) -> {queue: count}` is what the readiness check asks.
"""
from adapter.jobs.heartbeat import live_workers
from adapter.jobs.runners import (InProcessJobRunner, JobRunner, JobStatus, job_ref,
                                  make_job_runner, new_job_id)

__all__ = ["InProcessJobRunner", "JobRunner", "JobStatus", "job_ref", "live_workers",
           "make_job_runner", "new_job_id"]
