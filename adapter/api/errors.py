"""The one place errors become answers (no view builds error JSON by hand): an
OperationOutcome for the FHIR routes; for the rerank API (`/rerank`, `/v1/rerank`,
`/v2/rerank`, `/v1/models`) one JSON object in the shapes its clients read:
`{"message": ..., "detail": ..., "error": {"message", "type", "code"}}` (`message`: Cohere's
API; `detail`: Jina's, whose LangChain/LlamaIndex clients raise `RuntimeError(resp["detail"])`;
`error`: vLLM / OpenAI-style). The Cohere SDK raises its typed error per status
(`BadRequestError` …) with this body as `body`."""
from __future__ import annotations

import logging

from flask import Flask, Response, current_app, json, request
from werkzeug.exceptions import HTTPException

from adapter.api.rerank_api import is_rerank_api_path
from adapter.errors import AdapterError, ErrorAnswer, error_answer
from adapter.fhir.bundle import operation_outcome
from adapter.models import Outcome

log = logging.getLogger(__name__)
FHIR_JSON = "application/fhir+json; charset=utf-8"

_HTTP_CODES = {404: "not-found", 405: "not-supported", 413: "too-costly", 414: "too-costly",
               415: "not-supported", 431: "too-costly"}


def fhir_response(body: dict, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(json.dumps(body), status=status, headers=headers or {}, mimetype=None,
                    content_type=FHIR_JSON)


def outcome_response(status: int, code: str, message: str, *, expression: str | None = None,
                     severity: str = "error", headers: dict[str, str] | None = None,
                     id_: str | None = None) -> Response:
    expr = (expression,) if expression else ()
    body = operation_outcome([Outcome(severity, code, message, expr)], id_=id_)
    return fhir_response(body, status, headers)


def answer_response(answer: ErrorAnswer) -> Response:
    """The OperationOutcome for an `error_answer` (HTTP errors and failed jobs alike)."""
    return outcome_response(answer.status, answer.code, answer.message,
                            expression=answer.expression, headers=answer.headers,
                            id_=answer.incident)


_API_TYPES = {400: "invalid_request_error", 401: "authentication_error",
              403: "permission_error", 404: "not_found_error", 405: "invalid_request_error",
              413: "invalid_request_error", 415: "invalid_request_error",
              422: "invalid_request_error", 429: "rate_limit_error"}


def api_error_response(status: int, message: str, code: str,
                       headers: dict[str, str] | None = None) -> Response:
    """The rerank API's error answer (the shapes Cohere, Jina and OpenAI-style clients read:
    see the module doc)."""
    kind = _API_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    body = {"message": message, "detail": message,
            "error": {"message": message, "type": kind, "code": code.replace("-", "_")}}
    return Response(json.dumps(body), status=status, headers=headers or {},
                    content_type="application/json")


def _unreadable_body(exc: Exception) -> bool:
    """True for gunicorn's errors while the app reads the body (a malformed chunk, a trailer
    or a client gone mid-body): the caller's fault, a 400, never a 500."""
    try:
        from gunicorn.http import errors as http_errors
    except ImportError:  # pragma: no cover - gunicorn is a dependency; --dev runs werkzeug
        return False
    return isinstance(exc, (http_errors.ParseException, http_errors.NoMoreData))


BODY_UNREADABLE = ("the request body could not be read: its chunked encoding is malformed or "
                   "it ended early; send the body whole, with Content-Length or well-formed "
                   "chunks")


def _for_rerank_api() -> bool:
    return is_rerank_api_path(request.path)


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(AdapterError)
    def _adapter_error(exc: AdapterError) -> Response:
        log.info("answered %s %s", exc.status, type(exc).__name__)
        answer = error_answer(exc)
        if _for_rerank_api():
            return api_error_response(answer.status, answer.message,
                                      exc.api_code or answer.code, answer.headers)
        return answer_response(answer)

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> Response:
        status = exc.code or 500
        code = _HTTP_CODES.get(status, "invalid" if status < 500 else "exception")
        message = exc.description or exc.name
        if status == 413:
            message = (f"the request body is larger than max_body_bytes = "
                       f"{current_app.config.get('MAX_CONTENT_LENGTH')} bytes; send less or "
                       "raise the setting")
        if _for_rerank_api():
            return api_error_response(status, message, code)
        headers: dict[str, str] = {}
        if status == 404:
            message = ("no such endpoint; see /fhir/metadata for the resource types and "
                       "operations served")
        elif status == 405:
            allowed = ", ".join(getattr(exc, "valid_methods", None) or [])
            message = f"{request.method} is not allowed here; allowed: {allowed}"
            headers["Allow"] = allowed
        return outcome_response(status, code, message, headers=headers)

    @app.errorhandler(Exception)
    def _bug(exc: Exception) -> Response:
        if _unreadable_body(exc):
            log.info("answered 400: unreadable request body (%s)", type(exc).__name__)
            if _for_rerank_api():
                return api_error_response(400, BODY_UNREADABLE, "invalid_body")
            return outcome_response(400, "invalid", BODY_UNREADABLE)
        answer = error_answer(exc)
        if _for_rerank_api():
            return api_error_response(answer.status, answer.message, answer.code)
        return answer_response(answer)
