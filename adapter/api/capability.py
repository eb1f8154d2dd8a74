"""The CapabilityStatement and the $rerank OperationDefinition served by the adapter."""
from __future__ import annotations

from typing import Any

from adapter.fhir.search_params import filters_for
from adapter.models import RESOURCE_TYPES

OWN_SEARCH_PARAMS = [
    ("_content", "string", "The question to rank by (required): free text in any language"),
    ("patient", "reference", "The patient whose record is searched"),
    ("_count", "number", "Entries per page (ranked list paging with next/previous)"),
    ("recall", "number", "BM25 candidate budget handed to the reranker"),
    ("instruction", "string", "Reranker instruction overriding the clinical default"),
    ("model", "string", "Reranker tier (see the server's allowlist)"),
    ("_sort", "string", "Order of the ranked results: a comma list of _score (relevance, the "
                        "default), date (oldest first) or -date (most recent first), each "
                        "breaking the ties of the one before, e.g. _sort=_score,-date"),
    ("rerank_budget_s", "number", "Seconds of reranking: candidates are cut to what the "
                                  "reranker's measured speed scores in time (0 = off)"),
]
_TYPES = {"reference": "reference", "string": "string", "number": "number", "token": "token",
          "date": "date", "quantity": "quantity"}
_DATE_PARAMS = {"date", "period", "onset-date", "abatement-date", "recorded-date",
                "_lastUpdated", "value-date"}
_STRING_PARAMS = {"value-string"}
_REF_PARAMS = {"author", "custodian", "encounter", "performer", "device", "focus", "based-on",
               "derived-from", "has-member", "part-of", "specimen", "asserter", "evidence",
               "relatesto"}


def _param_type(name: str) -> str:
    if name in _DATE_PARAMS:
        return "date"
    if name in _STRING_PARAMS:
        return "string"
    if name in _REF_PARAMS:
        return "reference"
    if name == "value-quantity":
        return "quantity"
    return "token"


def operation_definition(base: str) -> dict[str, Any]:
    def param(name: str, use: str, min_: int, max_: str, type_: str, doc: str) -> dict[str, Any]:
        return {"name": name, "use": use, "min": min_, "max": max_, "type": type_,
                "documentation": doc}

    return {
        "resourceType": "OperationDefinition",
        "id": "rerank",
        "url": f"{base}/OperationDefinition/rerank",
        "name": "Rerank",
        "title": "Search a patient's record by meaning",
        "status": "active",
        "kind": "operation",
        "code": "rerank",
        "system": True,
        "type": False,
        "instance": False,
        "resource": ["Patient"],
        "affectsState": False,
        "description": ("BM25 recall then Qwen3-Reranker scoring of a patient's DocumentReference, "
                        "Observation and Condition resources; returns a searchset Bundle ordered "
                        "by relevance with search.score in [0,1]. Also at Patient/[id]/$rerank."),
        "parameter": [
            param("query", "in", 1, "1", "string", "The question to rank by"),
            param("patient", "in", 0, "1", "string", "Patient id (or use Patient/[id]/$rerank)"),
            param("_type", "in", 0, "*", "code", "Subset of " + ", ".join(RESOURCE_TYPES)),
            param("_count", "in", 0, "1", "integer", "Entries per page"),
            param("recall", "in", 0, "1", "integer", "BM25 candidate budget"),
            param("instruction", "in", 0, "1", "string", "Reranker instruction"),
            param("model", "in", 0, "1", "string", "Reranker tier from the allowlist"),
            param("_sort", "in", 0, "1", "string",
                  "Comma list of _score, date, -date (e.g. _score,-date); default _score"),
            param("rerank_budget_s", "in", 0, "1", "decimal",
                  "Seconds of reranking; candidates cut to what fits (0 = off)"),
            param("return", "out", 1, "1", "Bundle", "searchset Bundle ordered by relevance"),
        ],
    }


def capability_statement(base: str, software_version: str) -> dict[str, Any]:
    resources = []
    for rtype in RESOURCE_TYPES:
        params = [{"name": n, "type": t, "documentation": d} for n, t, d in OWN_SEARCH_PARAMS]
        params += [{"name": n, "type": _param_type(n),
                    "documentation": "Passed to the FHIR server as a filter"}
                   for n in filters_for(rtype)]
        resources.append({"type": rtype, "interaction": [{"code": "search-type"}],
                          "searchParam": params})
    resources.append({"type": "Patient", "operation": [
        {"name": "rerank", "definition": f"{base}/OperationDefinition/rerank"}]})
    return {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": "2026-11-26",
        "kind": "instance",
        "software": {"name": "fhir-rerank-adapter", "version": software_version},
        "implementation": {"description": "FHIR Rerank Adapter", "url": base},
        "fhirVersion": "4.0.1",
        "format": ["application/fhir+json"],
        "rest": [{
            "mode": "server",
            "resource": resources,
            "operation": [{"name": "rerank", "definition": f"{base}/OperationDefinition/rerank"}],
        }],
    }
