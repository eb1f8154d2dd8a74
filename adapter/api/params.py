"""Search parameters: which are ours, which pass upstream as filters, and their validation.

Parses a query string (or a FHIR Parameters body) into a `SearchRequest` plus the list of
parameters actually used (for the Bundle's self link) and warnings for ignored ones.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from adapter.config import Settings
from adapter.errors import BadRequest, NotAcceptable, UnsupportedParameter
from adapter.fhir.search_params import filters_for
from adapter.models import RESOURCE_TYPES, Outcome, SearchRequest
from adapter.search.budget import add_budget_param
from adapter.search.ordering import parse_sort

#: Parameters the adapter itself understands (not sent upstream).
OWN_PARAMS = ("_content", "query", "patient", "subject", "_type", "_count", "_offset",
              "recall", "instruction", "model", "_sort", "_format", "_pretty",
              "rerank_budget_s")
JSON_FORMATS = ("json", "application/json", "application/fhir+json")


@dataclass
class ParsedSearch:
    request: SearchRequest
    used: list[tuple[str, str]] = field(default_factory=list)
    outcomes: list[Outcome] = field(default_factory=list)


def _int_param(name: str, value: str, low: int, high: int, fix: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise BadRequest(f"`{name}` must be a whole number, got {value!r}; {fix}",
                         expression=name) from None
    if not low <= number <= high:
        raise BadRequest(f"`{name}`={number} is outside {low}..{high}; {fix}", expression=name)
    return number


def _patient_id(name: str, value: str) -> str:
    ref = value.strip()
    if ref.startswith("Patient/"):
        ref = ref[len("Patient/"):]
    elif "/" in ref:
        raise BadRequest(f"`{name}` must be a Patient id or Patient/<id>, got a reference to "
                         f"another type", expression=name)
    if not ref:
        raise BadRequest(f"`{name}` is empty; give a Patient id", expression=name)
    return ref


def check_format(fmt: str | None) -> None:
    if fmt and fmt.lower() not in JSON_FORMATS:
        raise NotAcceptable(f"_format={fmt} is not supported; this server speaks "
                            "application/fhir+json only", expression="_format")


def parse_search(pairs: list[tuple[str, str]], settings: Settings, *,
                 types: tuple[str, ...] | None, strict: bool,
                 query_param: str = "_content") -> ParsedSearch:
    """Validate parameters. `types` fixed by the route (type search) or None ($rerank: `_type`)."""
    check_parameter_count(len(pairs), settings.max_parameters)
    values: dict[str, list[str]] = {}
    for name, value in pairs:
        values.setdefault(name, []).append(value)
    parsed_types = types
    if types is None:
        requested: list[str] = []
        for raw in values.get("_type", []):
            requested += [t.strip() for t in raw.split(",") if t.strip()]
        for t in requested:
            if t not in RESOURCE_TYPES:
                raise BadRequest(f"`_type` {t!r} is not supported; use any of "
                                 f"{', '.join(RESOURCE_TYPES)}", expression="_type")
        parsed_types = tuple(t for t in RESOURCE_TYPES if t in requested) or RESOURCE_TYPES
    assert parsed_types is not None

    query_values = values.get(query_param, [])
    query = " ".join(v.strip() for v in query_values).strip()
    if not query:
        raise BadRequest(f"`{query_param}` is required: give the question to rank by, e.g. "
                         f"{query_param}=chest%20pain", expression=query_param)
    check_length(query_param, query, settings.max_question_chars, "max_question_chars")
    check_format((values.get("_format") or [None])[-1])

    req = SearchRequest(query=query, types=parsed_types, count=settings.default_count,
                        recall=settings.recall)
    used: list[tuple[str, str]] = [(query_param, query)]
    outcomes: list[Outcome] = []
    if types is None and values.get("_type"):
        used.append(("_type", ",".join(parsed_types)))
    for name in ("patient", "subject"):
        if values.get(name):
            req.patient = _patient_id(name, values[name][-1])
            used.append(("patient", req.patient))
            break
    if values.get("_count"):
        req.count = _int_param("_count", values["_count"][-1], 1, settings.max_count,
                               f"ask for at most {settings.max_count} per page and follow `next`")
    if values.get("_offset"):
        req.offset = _int_param("_offset", values["_offset"][-1], 0, 10**9,
                                "use the `next` link of the previous page")
    if values.get("recall"):
        req.recall = _int_param("recall", values["recall"][-1], 1, settings.max_recall,
                                f"rerank at most {settings.max_recall} candidates")
        used.append(("recall", str(req.recall)))
    if values.get("instruction"):
        req.instruction = values["instruction"][-1].strip() or None
        check_length("instruction", req.instruction or "", settings.max_instruction_chars,
                     "max_instruction_chars")
        if req.instruction:
            used.append(("instruction", req.instruction))
    if values.get("model"):
        model = values["model"][-1].strip()
        if model not in settings.models_allowed:
            raise BadRequest(f"`model` {model!r} is not served here; use one of "
                             f"{', '.join(settings.models_allowed)}", expression="model")
        req.model = model
        used.append(("model", model))
    if values.get("_sort"):
        req.sort = parse_sort(values["_sort"])
        used.append(("_sort", ",".join(req.sort)))
    add_budget_param(req, values, used, settings)

    allowed_filters = set().union(*(filters_for(t) for t in parsed_types))
    for name, value in pairs:
        base = name.split(":", 1)[0]
        if base in OWN_PARAMS or name in OWN_PARAMS:
            continue
        if base in allowed_filters:
            req.filters.append((name, value))
            used.append((name, value))
            continue
        message = (f"unknown search parameter `{name}` was ignored; supported filters for "
                   f"{', '.join(parsed_types)} are listed in /fhir/metadata")
        if strict:
            raise UnsupportedParameter(message.replace("was ignored", "is not supported")
                                       + " (Prefer: handling=strict)", expression=name)
        outcomes.append(Outcome("warning", "not-supported", message, (name,)))
    if settings.require_patient and not req.patient:
        raise BadRequest("`patient` is required: this server searches one patient's record "
                         "(e.g. patient=123, or Patient/123/$rerank); searches across patients "
                         "need require_patient = false", expression="patient")
    return ParsedSearch(req, used, outcomes)


def check_parameter_count(count: int, limit: int) -> None:
    if count > limit:
        raise BadRequest(f"{count} parameters is more than max_parameters = {limit}; send fewer "
                         "(unknown ones are ignored anyway)", expression="parameter")


def check_length(name: str, value: str, limit: int, setting: str) -> None:
    if len(value) > limit:
        raise BadRequest(f"`{name}` is {len(value)} characters, more than {setting} = {limit}; "
                         "ask a shorter question", expression=name)


def json_depth(text: str) -> int:
    """How deeply arrays/objects nest in a JSON text (brackets inside strings not counted)."""
    skeleton = _BRACKETS_ONLY.sub("", _JSON_STRING.sub('""', text))
    depth = deepest = 0
    for char in skeleton:
        depth += 1 if char in "[{" else -1
        deepest = max(deepest, depth)
    return deepest


_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_BRACKETS_ONLY = re.compile(r"[^\[\]{}]+")


def parse_json_body(raw: bytes, max_depth: int) -> Any:
    """The request body as JSON, refusing bodies nested deeper than `max_depth` (400)."""
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise BadRequest("the POST body is not UTF-8 JSON; send a FHIR Parameters resource "
                         "with Content-Type: application/fhir+json") from None
    depth = json_depth(text)
    if depth > max_depth:
        raise BadRequest(f"the JSON body nests {depth} levels, more than max_json_depth = "
                         f"{max_depth}; a Parameters resource needs about 4", expression="body")
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        raise BadRequest("the POST body is not JSON; send a FHIR Parameters resource with "
                         "Content-Type: application/fhir+json") from None


def parameters_to_pairs(body: Any, max_parameters: int | None = None) -> list[tuple[str, str]]:
    """A FHIR Parameters resource (POST $rerank) as (name, value) pairs."""
    if not isinstance(body, dict) or body.get("resourceType") != "Parameters":
        raise BadRequest("the POST body must be a FHIR Parameters resource "
                         '({"resourceType": "Parameters", "parameter": [...]})')
    params = body.get("parameter") or []
    if not isinstance(params, list):
        raise BadRequest("Parameters.parameter must be a list of {\"name\": ..., \"valueString\": "
                         "...} entries", expression="Parameters.parameter")
    if max_parameters is not None:
        check_parameter_count(len(params), max_parameters)
    pairs: list[tuple[str, str]] = []
    for index, param in enumerate(params):
        where = f"Parameters.parameter[{index}]"
        if not isinstance(param, dict) or not isinstance(param.get("name"), str):
            raise BadRequest(f"{where} needs a `name`", expression=where)
        value = None
        for key, raw in param.items():
            if key.startswith("value"):
                if isinstance(raw, dict) and "reference" in raw:
                    value = str(raw["reference"])
                elif isinstance(raw, (str, int, float, bool)) and not isinstance(raw, bool):
                    value = str(raw)
                elif isinstance(raw, bool):
                    value = "true" if raw else "false"
        if value is None:
            raise BadRequest(f"{where} ({param['name']}) needs a value[x] such as valueString",
                             expression=where)
        pairs.append((param["name"], value))
    return pairs
