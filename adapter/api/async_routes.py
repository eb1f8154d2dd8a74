"""The FHIR asynchronous request pattern over the job runner.

Every search entry point answers through `answer_with_job(prepare, model)`:
- `Prefer: respond-async` → `202 Accepted` + `Content-Location: <base>/_async/<job-id>` at
  once: fetch, flatten and recall run in the background in this process (the Authorization
  stays here), then the rerank where the runner puts it;
- otherwise the search is prepared in this request and the call waits up to `sync_wait`
  seconds for the ranking: `200` + Bundle when done in time, else the same `202` answer.
`GET <base>/_async/<id>` → `202` + `X-Progress` (fetching, recall, queued, reranking n/m) +
`Retry-After` while running, `200` + Bundle when done, the job's error as an OperationOutcome
when it failed. `DELETE` → `202`, then 404. The id is the capability (never logged); a job
created with an Authorization is in addition readable only with the same one.
"""
from __future__ import annotations

import logging
from typing import Any

from flask import Blueprint, Response, request

from adapter.api.errors import fhir_response, outcome_response
from adapter.identity import caller_identity
from adapter.api.hosts import api_base
from adapter.api.state import state
from adapter.jobs import JobStatus
from adapter.jobs.runners import Prepare
from adapter.metrics import JOBS, QUEUE_WAIT
from adapter.rerank.usage import count_usage, usage_from_bundle

log = logging.getLogger(__name__)
bp = Blueprint("fhir_async", __name__, url_prefix="/fhir")
POLL_PATH = "_async"


def _owner() -> str:
    return caller_identity(request.headers.get("Authorization"))


def _prefers_async() -> bool:
    return any(part.strip().lower() == "respond-async"
               for part in request.headers.get("Prefer", "").split(","))


def job_url(job_id: str) -> str:
    return f"{api_base()}/{POLL_PATH}/{job_id}"


def _accepted(job_id: str, status: JobStatus | None = None) -> Response:
    progress = status.progress_text() if status else "fetching"
    retry_after = "1" if status is not None and status.state == "running" else "2"
    return outcome_response(
        202, "informational",
        "the search is running as a job; poll the Content-Location URL for the Bundle",
        severity="information",
        headers={"Content-Location": job_url(job_id), "X-Progress": progress,
                 "Retry-After": retry_after})


def job_response(job_id: str, status: JobStatus) -> Response:
    """The HTTP answer for a job's status: 202 + progress, 200 + Bundle, or the error."""
    if status.finished and status.first_read:  # once per job, however often it is read
        JOBS.labels(status.state).inc()
        if status.queue_wait_s is not None:
            QUEUE_WAIT.observe(status.queue_wait_s)
    if status.state == "done" and status.bundle is not None:
        usage = usage_from_bundle(status.bundle)
        if usage and status.first_read:
            count_usage(usage, "fhir")
        return fhir_response(status.bundle, headers=usage.headers() if usage else None)
    if status.state == "failed":
        err = status.error or {"status": 500, "code": "exception", "message": "the job failed"}
        return outcome_response(int(err["status"]), err["code"], err["message"],
                                expression=err.get("expression"), id_=err.get("incident"))
    return _accepted(job_id, status)


def answer_with_job(prepare: Prepare, model: str) -> Response:
    """Run the search as a job and answer per the FHIR async pattern (see above)."""
    app_state = state()
    jobs, owner = app_state.jobs, _owner()
    if _prefers_async():
        job_id = jobs.start(prepare, model, owner)
        JOBS.labels("submitted").inc()
        return _accepted(job_id)
    payload: dict[str, Any] = prepare(lambda stage: None)
    job_id = jobs.submit(payload, model, owner)
    JOBS.labels("submitted").inc()
    status = jobs.wait(job_id, owner, app_state.settings.sync_wait)
    if not status.finished:
        log.info("a job passed sync_wait (%.1f s); answering 202", app_state.settings.sync_wait)
        return _accepted(job_id, status)
    response = job_response(job_id, status)
    jobs.forget(job_id)  # answered in full: keep no copy of the patient data around
    return response


@bp.get(f"/{POLL_PATH}/<job_id>")
def poll_job(job_id: str) -> Response:
    return job_response(job_id, state().jobs.status(job_id, _owner()))


@bp.delete(f"/{POLL_PATH}/<job_id>")
def cancel_job(job_id: str) -> Response:
    state().jobs.cancel(job_id, _owner())
    JOBS.labels("cancelled").inc()
    return outcome_response(202, "informational", "the job was cancelled",
                            severity="information")
