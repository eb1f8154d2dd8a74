"""The rerank API's work, apart from HTTP: request → job payload, payload → scores, → answer.

`parse_rerank_request` checks a Cohere / Jina / SiliconFlow-shaped body and builds the job
payload (kind "rerank-api"; the documents travel in it, nothing of the caller's headers).
The job body that scores such a payload is `adapter.jobs.work.run_rerank_payload` (a Celery
worker or the in-process pool runs it); it returns the `ScoreResult` and its usage as JSON.
`format_answer` turns that into the route's response shape.
"""
from __future__ import annotations

import uuid
from typing import Any

from adapter.config import Settings
from adapter.errors import BadRequest
from adapter.rerank.base import ScoreResult
from adapter.rerank.usage import tier_of

#: every request field the routes understand (the union of Cohere v1/v2, Jina, SiliconFlow)
FIELDS = ("model", "query", "documents", "top_n", "return_documents", "instruction",
          "max_tokens_per_doc", "max_chunks_per_doc", "overlap_tokens", "rank_fields", "priority")
API_VERSIONS = {"rerank": "1", "v1": "1", "v2": "2"}


def allowed_models(settings: Settings) -> list[str]:
    return list(dict.fromkeys([settings.model, *settings.models_allowed]))


def _bad(message: str, field: str, code: str) -> BadRequest:
    return BadRequest(message, expression=field, api_code=code)


def _int_field(body: dict[str, Any], name: str, minimum: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _bad(f"`{name}` must be an integer of at least {minimum}, not {value!r}", name,
                   "invalid_value")
    return value


def _check_chars(name: str, value: str, limit: int, setting: str) -> None:
    """Query and instruction go in front of every document: their length is checked first,
    from characters (free to count), before anything is tokenized or queued."""
    if len(value) > limit:
        raise _bad(f"`{name}` is {len(value)} characters, more than {setting} = {limit}; "
                   f"send a shorter {name} (or raise {setting} on the server)", name,
                   f"{name}_too_long")


def _document_texts(body: dict[str, Any], settings: Settings) -> list[str]:
    docs = body.get("documents")
    if not isinstance(docs, list) or not docs:
        raise _bad("`documents` must be a non-empty list of strings or of objects with `text`",
                   "documents", "invalid_documents")
    if len(docs) > settings.max_documents_per_call:
        raise _bad(f"{len(docs)} documents are more than the {settings.max_documents_per_call} "
                   "allowed per call (max_documents_per_call); split them across calls",
                   "documents", "too_many_documents")
    fields = body.get("rank_fields")
    if fields is not None and (not isinstance(fields, list) or
                               not all(isinstance(f, str) for f in fields)):
        raise _bad("`rank_fields` must be a list of field names", "rank_fields", "invalid_value")
    texts: list[str] = []
    for i, doc in enumerate(docs):
        if isinstance(doc, str):
            texts.append(doc)
        elif isinstance(doc, dict) and fields:
            missing = [f for f in fields if f not in doc]
            if missing:
                raise _bad(f"documents[{i}] has no field {missing[0]!r} named in `rank_fields`",
                           "documents", "invalid_documents")
            texts.append("\n".join(f"{f}: {doc[f]}" for f in fields))
        elif isinstance(doc, dict) and isinstance(doc.get("text"), str):
            texts.append(doc["text"])
        else:
            raise _bad(f"documents[{i}] is neither a string nor an object with a string `text`",
                       "documents", "invalid_documents")
    return texts


def parse_rerank_request(body: Any, route: str, settings: Settings) -> dict[str, Any]:
    """A checked job payload for one rerank call; `BadRequest` naming the field otherwise."""
    if not isinstance(body, dict):
        raise _bad("the body must be a JSON object with `query` and `documents`", "body",
                   "invalid_json")
    unknown = [k for k in body if k not in FIELDS]
    if unknown:
        raise _bad(f"unknown field {unknown[0]!r}; this server understands "
                   f"{', '.join(FIELDS)}", unknown[0], "unknown_field")
    model = body.get("model") or settings.model
    if not isinstance(model, str) or model not in allowed_models(settings):
        raise _bad(f"model {model!r} is not served here; use one of "
                   f"{', '.join(allowed_models(settings))} (GET /v1/models)", "model",
                   "model_not_found")
    query = body.get("query")
    if not isinstance(query, str) or not query.strip():
        raise _bad("`query` is empty; give the text to rank the documents by", "query",
                   "empty_query")
    _check_chars("query", query, settings.max_question_chars, "max_question_chars")
    instruction = body.get("instruction")
    if instruction is not None and (not isinstance(instruction, str) or not instruction.strip()):
        raise _bad("`instruction` must be a non-empty string", "instruction", "invalid_value")
    if instruction is not None:
        _check_chars("instruction", instruction, settings.max_instruction_chars,
                     "max_instruction_chars")
    texts = _document_texts(body, settings)
    return_documents = body.get("return_documents", False)
    if not isinstance(return_documents, bool):
        raise _bad("`return_documents` must be true or false", "return_documents",
                   "invalid_value")
    top_n = _int_field(body, "top_n", 1)
    _int_field(body, "priority", 0)  # Cohere v2 scheduling hint: accepted, one queue here
    options = {"max_tokens_per_doc": _int_field(body, "max_tokens_per_doc", 1),
               "max_chunks_per_doc": _int_field(body, "max_chunks_per_doc", 1),
               "overlap_tokens": _int_field(body, "overlap_tokens", 0)}
    return {"kind": "rerank-api", "route": route, "model": model, "query": query,
            "documents": texts, "instruction": instruction, "top_n": top_n,
            "return_documents": return_documents, "options": options}


def _warnings(result: ScoreResult) -> list[str]:
    out = []
    if result.truncated_docs:
        out.append(f"{result.truncated_docs} document(s) were longer than the model reads "
                   f"(max_tokens_per_doc, max_chunks_per_doc) and were cut "
                   f"({result.truncated_tokens} tokens dropped)")
    if result.fallback:
        out.append(f"scores are BM25 keyword scores, not a model's: {result.keyword_reason}")
    return out


def format_answer(payload: dict[str, Any], answer: dict[str, Any]) -> dict[str, Any]:
    """The JSON response for the payload's route from the job's answer."""
    result = ScoreResult.from_json(answer["result"])
    usage = answer["usage"]
    order = sorted(range(len(result.scores)), key=lambda i: (-result.scores[i], i))
    if payload.get("top_n"):
        order = order[:payload["top_n"]]
    results = []
    for i in order:
        item: dict[str, Any] = {"index": i, "relevance_score": result.scores[i]}
        if payload.get("return_documents"):
            item["document"] = {"text": payload["documents"][i]}
        if result.spans[i] is not None:
            start, end = result.spans[i]
            item["span"] = {"start": start, "end": end, "chunks": result.chunks[i]}
        results.append(item)
    tokens = usage["tokens"]
    meta: dict[str, Any] = {"api_version": {"version": API_VERSIONS[payload["route"]]},
                            "billed_units": {"input_tokens": tokens, "search_units": 1}}
    warnings = _warnings(result)
    if warnings:
        meta["warnings"] = warnings
    return {"id": str(uuid.uuid4()), "model": payload["model"], "results": results,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens,
                      "cost_usd": usage["cost_usd"]},
            "tokens": {"input_tokens": tokens, "output_tokens": 0},
            "meta": meta}


def models_list(settings: Settings) -> dict[str, Any]:
    """`GET /v1/models`: the tiers (and models) a call may name."""
    return {"object": "list", "data": [
        {"id": m, "object": "model", "owned_by": "fhir-rerank", "tier": tier_of(settings, m)}
        for m in allowed_models(settings)]}
