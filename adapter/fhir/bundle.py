"""FHIR answers built by the adapter: searchset Bundles and OperationOutcomes."""
from __future__ import annotations

import uuid
from datetime import datetime, timezone
from typing import Any, Iterable
from urllib.parse import urlencode

from adapter.models import Outcome, Scored


def operation_outcome(issues: Iterable[Outcome], *, id_: str | None = None) -> dict[str, Any]:
    """An OperationOutcome resource holding the given issues."""
    body: dict[str, Any] = {"resourceType": "OperationOutcome",
                            "issue": [_issue_json(o) for o in issues]}
    if id_:
        body["id"] = id_
    return body


def _issue_json(outcome: Outcome) -> dict[str, Any]:
    issue: dict[str, Any] = {"severity": outcome.severity, "code": outcome.code,
                             "diagnostics": outcome.diagnostics}
    if outcome.expression:
        issue["expression"] = list(outcome.expression)
    return issue


def page_url(base: str, endpoint: str, params: list[tuple[str, str]], offset: int,
             count: int) -> str:
    """The URL of one page of a ranked result: the parameters used, plus paging and `_sort`
    (the one used, `_score` when none was given)."""
    sort = next((v for k, v in reversed(params) if k == "_sort"), "_score")
    keep = [(k, v) for k, v in params if k not in ("_offset", "_count", "_sort")]
    keep += [("_count", str(count)), ("_offset", str(offset)), ("_sort", sort)]
    return f"{base.rstrip('/')}/{endpoint.lstrip('/')}?{urlencode(keep)}"


def searchset(ranked: list[Scored], *, base: str, endpoint: str,
              params: list[tuple[str, str]], count: int, offset: int,
              outcomes: list[Outcome] | None = None) -> dict[str, Any]:
    """A searchset Bundle for one page of a relevance-ordered list.

    `ranked` is the whole ranked list (best first); the page is ranked[offset:offset+count].
    Entries carry `fullUrl` (the upstream URL), `search.mode=match` and `search.score`.
    Warnings travel as one OperationOutcome entry with `search.mode=outcome`.
    """
    total = len(ranked)
    page = ranked[offset:offset + count]
    links = [{"relation": "self", "url": page_url(base, endpoint, params, offset, count)}]
    if offset > 0:
        links.append({"relation": "first", "url": page_url(base, endpoint, params, 0, count)})
        links.append({"relation": "previous",
                      "url": page_url(base, endpoint, params, max(0, offset - count), count)})
    if offset + count < total:
        links.append({"relation": "next",
                      "url": page_url(base, endpoint, params, offset + count, count)})
    entries: list[dict[str, Any]] = []
    for item in page:
        doc = item.document
        entries.append({
            "fullUrl": doc.full_url or f"{doc.id}",
            "resource": doc.resource,
            "search": {"mode": "match", "score": float(item.score)},
        })
    if outcomes:
        entries.append({
            "fullUrl": f"urn:uuid:{uuid.uuid4()}",
            "resource": operation_outcome(outcomes),
            "search": {"mode": "outcome"},
        })
    return {
        "resourceType": "Bundle",
        "id": str(uuid.uuid4()),
        "meta": {"lastUpdated": datetime.now(timezone.utc).isoformat(timespec="seconds")},
        "type": "searchset",
        "total": total,
        "link": links,
        "entry": entries,
    }


PASSAGE_URL = "https://fhir-rerank.example.org/StructureDefinition/best-passage"
PASSAGE_TEXT_URL = "https://fhir-rerank.example.org/StructureDefinition/best-passage-text"


def add_passage_extensions(bundle: dict[str, Any], spans: dict[str, tuple[int, int] | None],
                           texts: dict[str, str] | None = None) -> None:
    """On each match entry scored as chunks, `search.extension` with the best chunk's
    [start, end) characters in the document's flattened text (e.g. a note's best passage),
    then, when `texts` holds the flattened text, a `best-passage-text` extension with that
    passage itself: a client such as the chart-search app shows it without re-flattening."""
    for entry in bundle["entry"]:
        resource = entry.get("resource", {})
        key = f"{resource.get('resourceType')}/{resource.get('id')}"
        span = spans.get(key)
        if span is not None and entry["search"].get("mode") == "match":
            entry["search"]["extension"] = [{"url": PASSAGE_URL, "extension": [
                {"url": "start", "valueInteger": span[0]},
                {"url": "end", "valueInteger": span[1]}]}]
            passage = (texts or {}).get(key, "")[span[0]:span[1]].strip()
            if passage:
                entry["search"]["extension"].append({"url": PASSAGE_TEXT_URL,
                                                     "valueString": passage})
