"""Every error the adapter raises on purpose, and the FHIR answer each one becomes.

    AdapterError                      500 exception  (base; never raised bare)
    ├── BadRequest                    400 invalid    (bad parameter, body or header)
    │   └── UnsupportedParameter      400 not-supported (unknown parameter under handling=strict)
    ├── NotAcceptable                 406 not-supported (XML or another format asked for)
    ├── NotFound                      404 not-found  (unknown patient, job, resource type)
    ├── TooCostly                     422 too-costly (over-limit work)
    ├── UpstreamError                 502 transient  (FHIR server unreachable or malformed)
    │   ├── UpstreamAuthError         401/403 passed through from the FHIR server
    │   ├── UpstreamNotFound          404 not-found
    │   ├── UpstreamThrottled         429 throttled
    │   ├── UpstreamGone              410 paging cache expired (re-run once, then 502)
    │   └── UpstreamTimeout           504 timeout
    ├── QueueUnavailable              503 transient  (Redis / the task queue is down)
    ├── RerankerUnavailable           503 transient  (model could not be loaded)
    └── ModelLoadError                raised at load time; names what was tried and the fix

One Flask error handler (adapter.api.errors) turns any of them into an OperationOutcome.
No view builds error JSON by hand.
"""
from __future__ import annotations


class AdapterError(Exception):
    """Base class. `status` and `code` say how the API answers it."""

    status: int = 500
    code: str = "exception"

    def __init__(self, message: str, *, expression: str | None = None,
                 status: int | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
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


class RerankerUnavailable(AdapterError):
    status, code = 503, "transient"


class ModelLoadError(AdapterError):
    """A reranker model could not be loaded. The message names what was tried and the fix."""

    status, code = 503, "transient"
