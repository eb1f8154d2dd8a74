"""The one pipeline every entry point runs: fetch → flatten → recall → rerank → Bundle.

It is split in two halves so the expensive half can run as a Celery task:

- `prepare_search` (API process: it holds the caller's Authorization header) fetches the
  resources, flattens them and keeps the BM25 candidates. Its result is plain JSON.
- `rank_prepared` (a worker, or in-process) scores the candidates with the reranker and
  returns the searchset Bundle. It needs nothing but that JSON and a reranker.

Both take the caller's `adapter.runtime.Runtime` (its caches and models); without one, a
runtime for that call alone is used (nothing is remembered between calls).
"""
from __future__ import annotations

import hashlib
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

from adapter.config import Settings, load_settings
from adapter.deadline import remaining, submit_in_context, upstream_deadline
from adapter.errors import NotFound, UpstreamNotFound
from adapter.fhir.bundle import add_passage_extensions, searchset
from adapter.fhir.flatten import (attachment_urls, cached_text, flatten_documents,
                                  validation_outcome)
from adapter.fhir.search_params import filters_for
from adapter.fhir.source import FhirSource
from adapter.identity import caller_identity
from adapter.metrics import timed_stage
from adapter.models import Document, FetchResult, Outcome, Scored, SearchRequest
from adapter.rerank.base import Reranker, ScoreResult
from adapter.rerank.usage import bundle_usage_extension, usage_of
from adapter.runtime import Runtime
from adapter.search.budget import apply_time_budget
from adapter.search.hybrid import first_stage
from adapter.search.ordering import DEFAULT_SORT, order_ranked

log = logging.getLogger(__name__)


@dataclass
class LinkContext:
    """Where the answer lives, for the Bundle's self/next/previous links."""

    base: str                      # e.g. "http://127.0.0.1:8080/fhir"
    endpoint: str                  # e.g. "Observation" or "$rerank"
    params: list[tuple[str, str]] = field(default_factory=list)  # parameters actually used

    def to_json(self) -> dict[str, Any]:
        return {"base": self.base, "endpoint": self.endpoint,
                "params": [list(p) for p in self.params]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "LinkContext":
        return cls(data["base"], data["endpoint"], [tuple(p) for p in data["params"]])


def upstream_params(request: SearchRequest, resource_type: str) -> list[tuple[str, str]]:
    """The FHIR search parameters sent upstream for one type: patient plus the filters that
    type defines (`$rerank?clinical-status=active` filters Conditions, not Observations —
    a server such as HAPI refuses a parameter the type does not have)."""
    params: list[tuple[str, str]] = []
    if request.patient:
        params.append(("patient", request.patient))
    known = filters_for(resource_type)
    params.extend((name, value) for name, value in request.filters
                  if name.split(":", 1)[0] in known)
    return params


def collect_documents(request: SearchRequest, source: FhirSource, settings: Settings,
                      runtime: Runtime | None = None) -> tuple[list[Document], list[Outcome]]:
    """Fetch the requested types concurrently and flatten them, all the upstream work (pages
    and attachments) within one `upstream_deadline`; past it, a 504.

    Returns (documents, outcomes). An unknown patient is a 404.
    """
    caches = (runtime or Runtime(settings)).caches
    with upstream_deadline(settings.upstream_deadline):
        return _collect_documents(request, source, settings, caches)


def _collect_documents(request: SearchRequest, source: FhirSource, settings: Settings,
                       caches: Any) -> tuple[list[Document], list[Outcome]]:
    searches = [(t, upstream_params(request, t)) for t in request.types]
    limit = settings.max_resources
    with timed_stage("fetch"):
        results: dict[str, FetchResult] = source.search_many(
            searches, authorization=request.authorization, limit=limit)
    outcomes: list[Outcome] = []
    documents: list[Document] = []
    caller = caller_identity(request.authorization)  # scopes text built from attachments
    attachment_loader = prefetch_attachments(
        source, request.authorization, caller,
        [(r, u) for t in request.types for r, u in zip(results[t].resources,
                                                       results[t].full_urls)],
        caches.flattened)
    for resource_type in request.types:
        result = results[resource_type]
        outcomes.extend(result.outcomes)
        with timed_stage("flatten"):
            docs, flat_outcomes = flatten_documents(result.resources, result.full_urls,
                                                    attachment_loader=attachment_loader,
                                                    validate=False, caller=caller,
                                                    caches=caches)
        documents.extend(d for d in docs if d.type == resource_type)
        outcomes.extend(flat_outcomes)
    if request.patient and not documents:
        try:
            exists = source.patient_exists(request.patient, request.authorization)
        except UpstreamNotFound:
            exists = False
        if not exists:
            raise NotFound(f"Patient/{request.patient} is not known to the FHIR server; "
                           "check the `patient` parameter", expression="patient")
    return documents, outcomes


ATTACHMENT_FETCHES = 8  # attachments fetched at once for one search


def prefetch_attachments(source: FhirSource, authorization: str | None, caller: str,
                         resources: list[tuple[dict, str]], cache: Any = None
                         ) -> Callable[[str], tuple[str, bytes] | None]:
    """Fetch, concurrently and within the search's deadline, the attachments (by URL) of the
    resources whose text this caller has not cached; the loader flatten then reads from."""
    wanted: list[str] = []
    for resource, full_url in resources:
        found = attachment_urls(resource)  # most resources have none: skip the cache lookup
        if found and cached_text(resource, full_url, caller, cache) is None:
            wanted.extend(found)
    urls = list(dict.fromkeys(wanted))
    fetched: dict[str, tuple[str, bytes] | None] = {}
    if urls:
        with ThreadPoolExecutor(max_workers=min(ATTACHMENT_FETCHES, len(urls)),
                                thread_name_prefix="fhir-attachment") as pool:
            futures = {url: submit_in_context(pool, source.fetch_attachment, url, authorization)
                       for url in urls}
            for url, future in futures.items():
                fetched[url] = future.result()

    def load(url: str) -> tuple[str, bytes] | None:
        if url in fetched:
            return fetched[url]
        left = remaining()
        if left is not None and left <= 0:
            return None
        return source.fetch_attachment(url, authorization)
    return load


def prepare_search(request: SearchRequest, source: FhirSource, settings: Settings,
                   links: LinkContext, on_stage: Callable[[str], None] | None = None, *,
                   runtime: Runtime | None = None) -> dict[str, Any]:
    """Fetch, flatten and recall; return the JSON payload that `rank_prepared` consumes.
    `on_stage("recall")` is called once the upstream work is done (async job progress)."""
    runtime = runtime or Runtime(settings)
    if on_stage:
        on_stage("fetching")
    documents, outcomes = collect_documents(request, source, settings, runtime)
    if on_stage:
        on_stage("recall")
    for doc in documents:  # sources without URLs of their own (files) give "Type/id"
        if doc.full_url and "://" not in doc.full_url and not doc.full_url.startswith("urn:"):
            doc.full_url = f"{links.base}/{doc.full_url}"
    with timed_stage("recall"):  # the order matters only when a time budget cuts it
        candidates, matched, recall_outcomes = first_stage(
            request.query, documents, request.recall, settings,
            ordered=request.rerank_budget_s > 0, runtime=runtime)
    outcomes.extend(recall_outcomes)
    lenient = validation_outcome([d for d, _, _ in candidates],  # R4B check, candidates only
                                 runtime.caches.problems)
    if lenient:
        outcomes.append(lenient)
    return {
        "request": request.to_json(),
        "links": links.to_json(),
        "candidates": [{"document": d.to_json(), "recall_score": float(s), "matched": m}
                       for d, s, m in candidates],
        "searched": len(documents),
        "matched": matched,
        "list_unmatched": settings.keyword_list_unmatched,
        "first_stage": ("BM25 + dense (RRF)" if settings.embedder and not recall_outcomes
                        else "BM25"),
        "outcomes": [o.to_json() for o in outcomes],
    }


def rank_prepared(payload: dict[str, Any], reranker: Reranker,
                  on_progress: Callable[[int, int], None] | None = None,
                  settings: Settings | None = None, *, runtime: Runtime | None = None
                  ) -> dict[str, Any]:
    """Score the prepared candidates with `reranker` and build the searchset Bundle (with
    the usage, cost and scoring model in `meta.extension`, best passages on entries).
    `runtime` keeps whole rankings (the next page is not scored again) and budget cuts."""
    settings = settings or (runtime.settings if runtime else load_settings())
    caches = runtime.caches if runtime else None
    req = payload["request"]
    links = LinkContext.from_json(payload["links"])
    outcomes = [Outcome.from_json(o) for o in payload["outcomes"]]
    # Keyword order lists only resources that hold a word of the question; a model sees all.
    kept = [c for c in payload["candidates"] if reranker.is_model or c.get("matched", True)
            or payload.get("list_unmatched")]
    docs = [Document.from_json(c["document"]) for c in kept]
    recall_scores = [c["recall_score"] for c in kept]
    docs, recall_scores, budget_outcomes = apply_time_budget(
        req, docs, recall_scores, reranker, caches.budgets if caches is not None else None)
    if docs:
        with timed_stage("rerank"):
            result = _score(reranker, req["query"], req.get("instruction"), docs,
                            on_progress, caches.scores if caches is not None else None)
    else:
        result = reranker.score(req["query"], [])  # still says whether it is keyword order
        if on_progress:
            on_progress(0, 0)
    keyword = result.keyword_reason is not None
    stage = _stage_outcome(payload, req, len(docs), not keyword,
                           result.keyword_reason if result.fallback else None)
    outcomes.extend([stage] if stage else [])
    outcomes.extend(budget_outcomes)
    outcomes.extend(result_outcomes(result))
    scores = keyword_order(recall_scores, result.scores) if keyword and docs else result.scores
    spans = {d.id: span for d, span, n in zip(docs, result.spans, result.chunks) if n > 1}
    ranked = [Scored(d, s, r) for d, s, r in zip(docs, scores, recall_scores)]
    ranked = order_ranked(ranked, req.get("sort") or DEFAULT_SORT)
    bundle = searchset(ranked, base=links.base, endpoint=links.endpoint, params=links.params,
                       count=req["count"], offset=req["offset"], outcomes=outcomes)
    usage = usage_of(result, settings, scoring_model(result, req.get("model") or settings.model))
    bundle["meta"]["extension"] = bundle_usage_extension(usage)
    add_passage_extensions(bundle, spans, {d.id: d.text for d in docs if d.id in spans})
    return bundle


def scoring_model(result: ScoreResult, requested: str) -> str:
    """The name the Bundle gives the scorer: the requested model, or "bm25" for keyword order."""
    return "bm25" if result.keyword_reason is not None else requested


def keyword_order(recall_scores: list[float], candidate_scores: list[float]) -> list[float]:
    """Scores for keyword order: recall's own BM25 (idf within the record's documents of the
    same type, the same weighted query), scaled to [0, 1] by the best. Only when no candidate
    scored at all do the `none` backend's scores over the candidates stand in."""
    top = max(recall_scores, default=0.0)
    if top <= 0.0:
        return candidate_scores
    return [r / top for r in recall_scores]


def _stage_outcome(payload: dict[str, Any], req: dict[str, Any], listed: int, is_model: bool,
                   fallback: str | None) -> Outcome | None:
    """One outcome saying what happened: the recall cut before a model, or keyword order. Its
    first number is the Bundle's `total` (`listed`: the resources ranked), and the counts
    after it add up to that number."""
    searched = payload.get("searched", len(payload["candidates"]))
    matched = payload.get("matched", listed)
    candidates = len(payload["candidates"])
    if is_model:
        if searched <= candidates:
            return None  # every resource was reranked: nothing to say
        held, stage = min(matched, candidates), payload.get("first_stage", "BM25")
        how = (f"the {held} best by BM25 of the {matched} that hold a word of the question"
               if matched > candidates else f"the {held} that hold a word of the question")
        if not held:
            how = "none holds a word of the question"
        if candidates > held:
            how += f"{' and' if held else ', so'} {candidates - held} that hold none"
        if stage != "BM25":  # fused candidates need not hold a word: no split to give
            how = f"the {candidates} best by {stage} ({matched} hold a word of the question)"
        lead = f"total {listed}: " if listed == candidates else ""  # else the budget says why
        return Outcome("information", "informational",
                       f"{lead}{candidates} of the {searched} resources searched were reranked "
                       f"(recall={req['recall']}): {how}; raise `recall` to rerank more",
                       ("recall",))
    shown = min(matched, listed)
    if not matched:
        found = (f"total {listed}: none of the {searched} resources holds a word of the question "
                 "(stopwords do not count); try other words, or a reranker model")
    elif matched > shown:
        found = (f"total {listed}: the best {shown} by BM25 of the {matched} resources (of "
                 f"{searched}) that hold a word of the question (recall={req['recall']}); "
                 "raise `recall` to list more")
    else:
        found = (f"total {listed}: the {matched} of {searched} resources that hold a word of "
                 "the question (stopwords and words no record has do not count)")
    if payload.get("list_unmatched") and listed > shown:
        found += (f", then {listed - shown} that hold none, with score 0 "
                  "(keyword_list_unmatched = true)")
    if fallback:
        return Outcome("warning", "processing",
                       f"results are in BM25 keyword order, not reranked: {fallback}; {found}")
    return Outcome("information", "informational",
                   "keyword order (reranker = none): search.score is a BM25 keyword score "
                   f"scaled to [0, 1], not a model's relevance; {found}",
                   ("recall",) if matched > shown else ())


def _score(reranker: Reranker, query: str, instruction: str | None, docs: list[Document],
           on_progress: Callable[[int, int], None] | None, cache: Any = None) -> ScoreResult:
    """The reranker's result, or the one `cache` (a runtime's `Caches.scores`) kept for the
    same ranking: the next page of a result (same query, same candidates) is answered without
    scoring again. Keyed by the reranker instance (one per model and settings in a runtime)
    and a digest of query, instruction and the candidates' ids and texts."""
    digest = hashlib.sha256()
    for part in (query, instruction or "", *(f"{d.id}\0{d.text}" for d in docs)):
        digest.update(part.encode("utf-8"))
        digest.update(b"\1")
    key = (reranker.instance_id, digest.hexdigest())
    cached = cache.get(key) if cache is not None else None
    if cached is not None:
        if on_progress:
            on_progress(len(docs), len(docs))
        return cached
    result = reranker.score(query, [d.text for d in docs], instruction=instruction,
                            on_progress=on_progress)
    if len(result.scores) != len(docs):
        raise RuntimeError(f"reranker {reranker.name} returned {len(result.scores)} scores "
                           f"for {len(docs)} documents")
    if cache is not None:
        cache.put(key, result)
    return result


def result_outcomes(result: ScoreResult) -> list[Outcome]:
    """The warnings and notes a scoring result gives a Bundle (keyword order and a model
    that could not load are said once, by `_stage_outcome`)."""
    out: list[Outcome] = []
    if result.truncated_docs:
        out.append(Outcome("warning", "too-long",
                           f"{result.truncated_docs} document(s) were longer than the model "
                           f"reads (max_length, max_chunks_per_doc) and were cut "
                           f"({result.truncated_tokens} tokens dropped); their scores only "
                           "reflect the part read"))
    if result.chunked_docs:
        out.append(Outcome("information", "informational",
                           f"{result.chunked_docs} long document(s) were scored as overlapping "
                           "chunks; each one's score is its best chunk's, whose span the entry's "
                           "best-passage extension gives"))
    if result.empty_docs:
        out.append(Outcome("information", "informational",
                           f"{len(result.empty_docs)} document(s) had no text; they were scored "
                           "as empty documents"))
    return out
