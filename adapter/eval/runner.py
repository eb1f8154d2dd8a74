"""Run judged topics through the real pipeline and score the rankings with ir-measures.

Each topic goes through `parse_search` → `prepare_search` (→ `rank_prepared` for the final
stage), the code a `$rerank` call runs, so the numbers measure what users get:

- `recall`: the candidate list handed to the reranker, in recall order.
- `final`: the Bundle's `match` entries, in the order a caller sees them.

Metrics come from ir-measures (nDCG@10, R@10, R@100, RR = MRR). A judged topic with no
result scores 0 on every metric; topics without judgments are not scored. Per resource type,
R@100 of the judged resources of that type in mixed-type searches (topics without `_type`,
or with several) shows whether one type buries another ("notes bury the diagnoses").
"""
from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from typing import Any, Iterable, TextIO

import ir_measures
from ir_measures import RR, R, nDCG

from adapter.api.params import parse_search
from adapter.config import Settings
from adapter.eval.data import Topic
from adapter.fhir.source import FhirSource
from adapter.pipeline import LinkContext, prepare_search, rank_prepared
from adapter.runtime import Runtime
from adapter.rerank.base import Reranker

log = logging.getLogger(__name__)

MEASURES = (nDCG @ 10, R @ 10, R @ 100, RR)
MEASURE_NAMES = ("nDCG@10", "R@10", "R@100", "MRR")
BY_TYPE_DEPTH = 100


@dataclass
class EvalResult:
    """Per-query and overall metrics, plus the rankings that produced them."""

    stage: str
    per_query: dict[str, dict[str, float]] = field(default_factory=dict)
    overall: dict[str, float] = field(default_factory=dict)
    rankings: dict[str, list[str]] = field(default_factory=dict)
    unjudged: list[str] = field(default_factory=list)
    #: resource type → {"R@100": mean over mixed-type topics judging that type, "topics": n}
    by_type: dict[str, dict[str, float]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"stage": self.stage, "overall": self.overall, "per_query": self.per_query,
                "recall_by_type": self.by_type, "unjudged_topics": self.unjudged}


def rank_topic(topic: Topic, source: FhirSource, reranker: Reranker, settings: Settings,
               stage: str, depth: int, runtime: Runtime | None = None) -> list[str]:
    """The ranked resource ids ("Type/id") one topic gets at `stage`, best first."""
    pairs = [("query", topic.query), ("_count", str(min(depth, settings.max_count)))]
    if topic.patient:
        pairs.append(("patient", topic.patient))
    if topic.types:
        pairs.append(("_type", ",".join(topic.types)))
    if topic.instruction:
        pairs.append(("instruction", topic.instruction))
    parsed = parse_search(pairs, settings, types=None, strict=True, query_param="query")
    links = LinkContext("urn:fhir-rerank:eval", "$rerank", parsed.used)
    runtime = runtime or Runtime(settings)
    payload = prepare_search(parsed.request, source, settings, links, runtime=runtime)
    if stage == "recall":
        return [c["document"]["id"] for c in payload["candidates"]][:depth]
    bundle = rank_prepared(payload, reranker, settings=settings, runtime=runtime)
    return [f"{e['resource']['resourceType']}/{e['resource']['id']}"
            for e in bundle.get("entry", []) if e["search"]["mode"] == "match"][:depth]


def as_run(rankings: dict[str, list[str]]) -> dict[str, dict[str, float]]:
    """Rankings as an ir-measures run whose scores keep the exact order (n, n-1, … 1)."""
    return {qid: {doc: float(len(docs) - i) for i, doc in enumerate(docs)}
            for qid, docs in rankings.items()}


def score_rankings(rankings: dict[str, list[str]], qrels: dict[str, dict[str, int]],
                   stage: str = "final") -> EvalResult:
    """Per-query and mean metrics over the judged topics (missing results score 0)."""
    result = EvalResult(stage, rankings=rankings)
    judged = [qid for qid in rankings if qid in qrels]
    result.unjudged = [qid for qid in rankings if qid not in qrels]
    for qid in judged:
        result.per_query[qid] = {name: 0.0 for name in MEASURE_NAMES}
    names = dict(zip(MEASURES, MEASURE_NAMES))
    run = {qid: docs for qid, docs in as_run(rankings).items() if qid in qrels and docs}
    sub_qrels = {qid: qrels[qid] for qid in judged}
    for metric in ir_measures.iter_calc(list(MEASURES), sub_qrels, run):
        result.per_query[metric.query_id][names[metric.measure]] = float(metric.value)
    if judged:
        result.overall = {name: sum(q[name] for q in result.per_query.values()) / len(judged)
                          for name in MEASURE_NAMES}
    return result


def evaluate(topics: list[Topic], qrels: dict[str, dict[str, int]], source: FhirSource,
             reranker: Reranker, settings: Settings, *, stage: str = "final",
             depth: int = 100, progress: bool | None = None,
             runtime: Runtime | None = None) -> EvalResult:
    """Run every topic and score it (with one runtime: a patient's record is flattened and
    indexed once for all its topics); a progress bar on a terminal (stderr) only."""
    from tqdm import tqdm

    show = sys.stderr.isatty() if progress is None else progress
    runtime = runtime or Runtime(settings)
    rankings: dict[str, list[str]] = {}
    for topic in tqdm(topics, desc=f"eval ({stage})", unit="topic", disable=not show):
        rankings[topic.qid] = rank_topic(topic, source, reranker, settings, stage, depth,
                                            runtime)
    result = score_rankings(rankings, qrels, stage)
    mixed = [t.qid for t in topics if len(t.types) != 1]
    result.by_type = recall_by_type(rankings, qrels, mixed)
    return result


def recall_by_type(rankings: dict[str, list[str]], qrels: dict[str, dict[str, int]],
                   qids: Iterable[str], depth: int = BY_TYPE_DEPTH
                   ) -> dict[str, dict[str, float]]:
    """Per resource type: the mean over `qids` (that judge a resource of the type) of the
    share of those judged resources found in the first `depth` of the ranking."""
    shares: dict[str, list[float]] = {}
    for qid in qids:
        judged = [doc for doc, grade in qrels.get(qid, {}).items() if grade > 0]
        top = set(rankings.get(qid, [])[:depth])
        for rtype in sorted({doc.split("/", 1)[0] for doc in judged}):
            of_type = [doc for doc in judged if doc.split("/", 1)[0] == rtype]
            shares.setdefault(rtype, []).append(sum(d in top for d in of_type) / len(of_type))
    return {rtype: {f"R@{depth}": sum(v) / len(v), "topics": len(v)}
            for rtype, v in sorted(shares.items())}


def write_trec_run(rankings: dict[str, list[str]], out: TextIO, tag: str) -> None:
    """TREC run lines `qid Q0 doc rank score tag`; the score column restates the order."""
    for qid, docs in rankings.items():
        for i, doc in enumerate(docs):
            out.write(f"{qid} Q0 {doc} {i + 1} {len(docs) - i} {tag}\n")


def format_table(result: EvalResult, queries: Iterable[tuple[str, str]] = ()) -> str:
    """A plain-text table: one row per judged query (with its question), then the mean."""
    labels = dict(queries)
    rows = [(qid, labels.get(qid, ""), m) for qid, m in result.per_query.items()]
    width = max([5] + [len(q) for q, _, _ in rows])
    qwidth = min(40, max([8] + [len(text) for _, text, _ in rows]))
    head = f"{'qid':<{width}}  {'question':<{qwidth}}  " + "  ".join(
        f"{n:>7}" for n in MEASURE_NAMES)
    lines = [head, "-" * len(head)]
    for qid, text, metrics in rows:
        lines.append(f"{qid:<{width}}  {text[:qwidth]:<{qwidth}}  " + "  ".join(
            f"{metrics[n]:7.3f}" for n in MEASURE_NAMES))
    lines.append("-" * len(head))
    mean = f"mean over {len(rows)} judged topics ({result.stage} stage)"
    lines.append(f"{mean:<{width + qwidth + 2}}  " + "  ".join(
        f"{result.overall.get(n, 0.0):7.3f}" for n in MEASURE_NAMES))
    if result.by_type:
        lines.append(f"R@{BY_TYPE_DEPTH} by type in mixed-type searches: " + ", ".join(
            f"{rtype} {v[f'R@{BY_TYPE_DEPTH}']:.3f} ({v['topics']} topics)"
            for rtype, v in result.by_type.items()))
    return "\n".join(lines)
