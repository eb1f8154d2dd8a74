"""The one place errors become OperationOutcomes (no view builds error JSON by hand)."""
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


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(AdapterError)
    def _adapter_error(exc: AdapterError) -> Response:
        log.info("answered %s %s", exc.status, type(exc).__name__)
        return answer_response(error_answer(exc))

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> Response:
        status = exc.code or 500
        code = _HTTP_CODES.get(status, "invalid" if status < 500 else "exception")
        message = exc.description or exc.name
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
        return answer_response(error_answer(exc))
