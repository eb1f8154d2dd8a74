"""The one place errors become answers (no view builds error JSON by hand): an
OperationOutcome for the FHIR routes, `{"error": {"message", "type", "code"}}` for the
rerank API (`/rerank`, `/v1/rerank`, `/v2/rerank`, `/v1/models`)."""
from __future__ import annotations

import logging

from flask import Flask, Response, current_app, json, request
from werkzeug.exceptions import HTTPException

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
    """The rerank API's error answer (the shape OpenAI-style clients read)."""
    kind = _API_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    body = {"error": {"message": message, "type": kind, "code": code.replace("-", "_")}}
    return Response(json.dumps(body), status=status, headers=headers or {},
                    content_type="application/json")


def _for_rerank_api() -> bool:
    from adapter.api.rerank_api import is_rerank_api_path

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
        elif status == 413:
            message = (f"the request body is larger than max_body_bytes = "
                       f"{current_app.config.get('MAX_CONTENT_LENGTH')} bytes; send less or "
                       "raise the setting")
        return outcome_response(status, code, message, headers=headers)

    @app.errorhandler(Exception)
    def _bug(exc: Exception) -> Response:
        answer = error_answer(exc)
        if _for_rerank_api():
            return api_error_response(answer.status, answer.message, answer.code)
        return answer_response(answer)
