"""Every error the adapter raises on purpose, and the FHIR answer each one becomes.

    AdapterError                      500 exception  (base; never raised bare)
    ├── BadRequest                    400 invalid    (bad parameter, body or header)
    │   └── UnsupportedParameter      400 not-supported (unknown parameter under handling=strict)
    ├── NotAcceptable                 406 not-supported (XML or another format asked for)
    ├── NotFound                      404 not-found  (unknown patient, job, resource type)
    ├── TooCostly                     422 too-costly (over-limit work)
    ├── TooLarge                      413 too-costly (more tokens than one call may score)
    ├── Unauthorized                  401 login      (rerank API: missing or wrong API key)
    ├── UpstreamError                 502 transient  (FHIR server unreachable or malformed)
    │   ├── UpstreamAuthError         401/403 passed through from the FHIR server
    │   ├── UpstreamNotFound          404 not-found
    │   ├── UpstreamThrottled         429 throttled
    │   ├── UpstreamGone              410 paging cache expired (re-run once, then 502)
    │   └── UpstreamTimeout           504 timeout
    ├── QueueUnavailable              503 transient  (Redis down, or no worker for the tier)
    ├── CallerBusy                    429 throttled  (a caller's job or synchronous-call cap)
    ├── JobTimeout                    504 timeout    (a job passed task_soft_time_limit)
    ├── RerankerUnavailable           503 transient  (model could not be loaded)
    └── ModelLoadError                raised at load time; names what was tried and the fix

`error_answer(exc, where)` is the one mapping of any exception to (status, code, message):
the Flask handlers (adapter.api.errors) and failed jobs (adapter.jobs) both use it, so a
failure reads the same whether it happened in the request or on a worker.
No view builds error JSON by hand.
"""
from __future__ import annotations

import logging
import traceback
import uuid
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)


class AdapterError(Exception):
    """Base class. `status` and `code` say how the API answers it."""

    status: int = 500
    code: str = "exception"

    def __init__(self, message: str, *, expression: str | None = None,
                 status: int | None = None, headers: dict[str, str] | None = None,
                 api_code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        #: the rerank API's `error.code` (e.g. "unknown_field"); FHIR answers ignore it
        self.api_code = api_code
        self.expression = expression
        self.headers = headers or {}
        if status is not None:
            self.status = status


class BadRequest(AdapterError):
    status, code = 400, "invalid"


class UnsupportedParameter(BadRequest):
    code = "not-supported"


class NotAcceptable(AdapterError):
    status, code = 406, "not-supported"


class NotFound(AdapterError):
    status, code = 404, "not-found"


class TooCostly(AdapterError):
    status, code = 422, "too-costly"


class TooLarge(AdapterError):
    status, code = 413, "too-costly"


class Unauthorized(AdapterError):
    status, code = 401, "login"


class UpstreamError(AdapterError):
    status, code = 502, "transient"


class UpstreamAuthError(UpstreamError):
    """401 or 403 from the FHIR server; the status is passed through."""

    code = "security"


class UpstreamNotFound(UpstreamError):
    status, code = 404, "not-found"


class UpstreamThrottled(UpstreamError):
    status, code = 429, "throttled"


class UpstreamGone(UpstreamError):
    """410 Gone: HAPI's paging cache expired."""

    status, code = 502, "transient"


class UpstreamTimeout(UpstreamError):
    status, code = 504, "timeout"


class QueueUnavailable(AdapterError):
    status, code = 503, "transient"


class CallerBusy(AdapterError):
    """One caller holds as many unfinished jobs, or synchronous calls, as it may."""

    status, code = 429, "throttled"


class JobTimeout(AdapterError):
    status, code = 504, "timeout"


class RerankerUnavailable(AdapterError):
    status, code = 503, "transient"


class ModelLoadError(AdapterError):
    """A reranker model could not be loaded. The message names what was tried and the fix."""

    status, code = 503, "transient"


@dataclass
class ErrorAnswer:
    """How an error is answered: the OperationOutcome's status, code, message and where."""

    status: int
    code: str
    message: str
    expression: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    incident: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The plain JSON a job result carries (headers stay with the HTTP answer)."""
        out: dict[str, Any] = {"status": self.status, "code": self.code, "message": self.message}
        if self.expression:
            out["expression"] = self.expression
        if self.incident:
            out["incident"] = self.incident
        return out


def error_answer(exc: BaseException, where: str = "server") -> ErrorAnswer:
    """The one mapping of an exception to its answer. An `AdapterError` says its own; anything
    else is a 500 with an incident id, logged here with the exception type and frames — never
    its message, which may quote patient data. `where` names the log to look in."""
    if isinstance(exc, AdapterError):
        return ErrorAnswer(exc.status, exc.code, exc.message, exc.expression, dict(exc.headers))
    incident = uuid.uuid4().hex[:12]
    frames = "".join(traceback.format_tb(exc.__traceback__))
    log.error("internal error %s: %s\n%s", incident, type(exc).__name__, frames)
    return ErrorAnswer(500, "exception", f"internal error {incident}; the {where} log has the "
                       "details under this id", incident=incident)
