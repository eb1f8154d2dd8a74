"""FHIR routes: metadata, type search by meaning, and the $rerank operation."""
from __future__ import annotations

import logging
from typing import Any, Callable

from flask import Blueprint, Response, request

from adapter.version import __version__
from adapter.api.capability import capability_statement, operation_definition
from adapter.api.async_routes import answer_with_job
from adapter.api.errors import fhir_response
from adapter.api.hosts import api_base
from adapter.api.params import check_format, parameters_to_pairs, parse_json_body, parse_search
from adapter.api.state import state
from adapter.errors import NotAcceptable, NotFound
from adapter.models import RESOURCE_TYPES
from adapter.pipeline import LinkContext, prepare_search

log = logging.getLogger(__name__)
bp = Blueprint("fhir", __name__, url_prefix="/fhir")


@bp.before_request
def _negotiate() -> None:
    """Only FHIR JSON is spoken: an explicit XML (or other) request is a 406."""
    check_format(request.args.get("_format"))
    accept = request.accept_mimetypes
    if request.headers.get("Accept") and not (
            accept.best_match(["application/fhir+json", "application/json"])):
        raise NotAcceptable(f"Accept: {request.headers['Accept'][:80]} cannot be served; this "
                            "server answers application/fhir+json only")


def _prefer(token: str) -> bool:
    return any(part.strip().lower() == token
               for part in request.headers.get("Prefer", "").split(","))


@bp.get("/metadata")
def metadata() -> Response:
    return fhir_response(capability_statement(api_base(), __version__))


@bp.get("/OperationDefinition/rerank")
def rerank_definition() -> Response:
    return fhir_response(operation_definition(api_base()))


@bp.get("/<resource_type>")
def type_search(resource_type: str) -> Response:
    if resource_type not in RESOURCE_TYPES:
        raise NotFound(f"resource type {resource_type!r} is not searched by this server; use "
                       f"{', '.join(RESOURCE_TYPES)} or $rerank", expression=resource_type)
    pairs = list(request.args.items(multi=True))
    return _search(pairs, types=(resource_type,), endpoint=resource_type,
                   query_param="_content")


@bp.get("/<resource_type>/<resource_id>")
def read_resource(resource_type: str, resource_id: str) -> Response:
    """Read one resource from an embedded (file) source, so Bundle fullUrls resolve (and the
    Patient, for the chart-search app's banner)."""
    read = getattr(state().source, "read", None)
    if resource_type not in (*RESOURCE_TYPES, "Patient") or read is None:
        raise NotFound(f"{resource_type}/{resource_id} is not served here; read resources at "
                       "the FHIR server named in each entry's fullUrl")
    resource = read(resource_type, resource_id)
    if resource is None:
        raise NotFound(f"{resource_type}/{resource_id} is not known", expression="id")
    return fhir_response(resource)


@bp.route("/$rerank", methods=["GET", "POST"])
def rerank_operation() -> Response:
    return _search(_operation_pairs(), types=None, endpoint="$rerank", query_param="query")


@bp.route("/Patient/<patient_id>/$rerank", methods=["GET", "POST"])
def patient_rerank(patient_id: str) -> Response:
    pairs = [(k, v) for k, v in _operation_pairs() if k not in ("patient", "subject")]
    pairs.append(("patient", patient_id))
    return _search(pairs, types=None, endpoint=f"Patient/{patient_id}/$rerank",
                   query_param="query")


def _operation_pairs() -> list[tuple[str, str]]:
    pairs = list(request.args.items(multi=True))
    if request.method == "POST":
        settings = state().settings
        body = parse_json_body(request.get_data(cache=False), settings.max_json_depth)
        pairs += parameters_to_pairs(body, settings.max_parameters)
    return pairs


def _search(pairs: list[tuple[str, str]], *, types: tuple[str, ...] | None, endpoint: str,
            query_param: str) -> Response:
    app_state = state()
    settings = app_state.settings
    parsed = parse_search(pairs, settings, types=types, strict=_prefer("handling=strict"),
                          query_param=query_param)
    req = parsed.request
    req.authorization = request.headers.get("Authorization")
    used = [p for p in parsed.used if not (endpoint.startswith("Patient/") and p[0] == "patient")]
    links = LinkContext(api_base(), endpoint, used)
    source, param_outcomes = app_state.source, [o.to_json() for o in parsed.outcomes]

    def prepare(on_stage: Callable[[str], None]) -> dict[str, Any]:
        """Fetch, flatten, recall: in this request, or in the background for respond-async."""
        payload = prepare_search(req, source, settings, links, on_stage=on_stage,
                                 runtime=app_state.runtime)
        payload["outcomes"] = param_outcomes + payload["outcomes"]
        return payload

    return answer_with_job(prepare, req.model or settings.model)
