"""The rerank API for clients outside FHIR: `POST /rerank`, `/v1/rerank` (Jina / Cohere v1),
`/v2/rerank` (Cohere v2) and `GET /v1/models`, JSON in and out.

Each call is one job on the same machinery as the FHIR searches (Celery queue per tier, or
the in-process pool); the call waits for it (up to `task_time_limit`). Bearer keys from
`api_keys` guard these routes when set. Errors are
`{"message", "detail", "error": {"message", "type", "code"}}` (what Cohere, Jina and
OpenAI-style clients read; built in adapter.api.errors, like every other error answer).
"""
from __future__ import annotations

import hmac
import json
import logging
from typing import Any

from flask import Blueprint, Response, jsonify, request

from adapter.identity import caller_identity
from adapter.api.rerank_jobs import format_answer, models_list, parse_rerank_request
from adapter.api.state import state
from adapter.api.params import json_depth
from adapter.errors import AdapterError, BadRequest, UpstreamTimeout, Unauthorized
from adapter.metrics import QUEUE_WAIT
from adapter.rerank.usage import Usage, count_usage, format_usd

log = logging.getLogger(__name__)
bp = Blueprint("rerank_api", __name__)
API_PATHS = ("/rerank", "/v1/rerank", "/v2/rerank", "/v1/models")


def is_rerank_api_path(path: str) -> bool:
    return path.rstrip("/") in API_PATHS


@bp.before_request
def _check_api_key() -> None:
    keys = state().settings.api_keys
    if not keys:
        return
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not any(
            hmac.compare_digest(token.strip().encode(), k.encode()) for k in keys):
        raise Unauthorized("a valid API key is required: send `Authorization: Bearer <key>` "
                           "with one of the server's `api_keys`", api_code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})


def parse_api_body(raw: bytes, max_depth: int) -> Any:
    """The body as JSON, None when it is not JSON (`parse_rerank_request` says so); nesting
    deeper than `max_depth` is a 400 before the parser recurses (a rerank body needs 3)."""
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        return None
    depth = json_depth(text)
    if depth > max_depth:
        raise BadRequest(f"the JSON body nests {depth} levels, more than max_json_depth = "
                         f"{max_depth}; a rerank request needs 3 (documents as objects)",
                         expression="body", api_code="invalid_json")
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None


def _rerank(route: str) -> Response:
    app_state = state()
    settings = app_state.settings
    body = parse_api_body(request.get_data(cache=False), settings.max_json_depth)
    payload = parse_rerank_request(body, route, settings)
    jobs, owner = app_state.jobs, caller_identity(request.headers.get("Authorization"))
    job_id = jobs.submit(payload, payload["model"], owner)
    status = jobs.wait(job_id, owner, settings.task_time_limit)
    if not status.finished:
        jobs.cancel(job_id, owner)
        raise UpstreamTimeout(f"reranking took longer than task_time_limit "
                              f"({settings.task_time_limit} s); send fewer documents",
                              api_code="timeout")
    jobs.forget(job_id)
    if status.state == "failed" or status.bundle is None:
        err = status.error or {"status": 500, "code": "exception", "message": "the job failed"}
        raise AdapterError(err["message"], status=int(err["status"]),
                           api_code=err.get("code"))
    answer = format_answer(payload, status.bundle)
    count_usage(Usage(**status.bundle["usage"]), "rerank")
    if status.queue_wait_s is not None:
        QUEUE_WAIT.observe(status.queue_wait_s)
    response = jsonify(answer)
    response.headers["X-Usage-Tokens"] = str(answer["usage"]["total_tokens"])
    response.headers["X-Usage-Cost-USD"] = format_usd(answer["usage"]["cost_usd"])
    return response


@bp.post("/rerank")
def rerank_plain() -> Response:
    return _rerank("rerank")


@bp.post("/v1/rerank")
def rerank_v1() -> Response:
    return _rerank("v1")


@bp.post("/v2/rerank")
def rerank_v2() -> Response:
    return _rerank("v2")


@bp.get("/v1/models")
def list_models() -> Response:
    return jsonify(models_list(state().settings))
