"""Judged data for `fhir-rerank eval`: topics (JSON) and qrels (TREC), read and checked.

Topics: `{"topics": [{"qid", "query", "patient", optional "_type", optional "instruction"}]}`
(a bare list of topics is accepted too). Qrels: TREC lines `qid 0 ResourceType/id grade`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import ir_measures

from adapter.errors import BadRequest


@dataclass(frozen=True)
class Topic:
    """One judged question about one patient."""

    qid: str
    query: str
    patient: str | None = None
    types: tuple[str, ...] = ()
    instruction: str | None = None


def load_topics(path: str | Path) -> list[Topic]:
    """Read a topics file; a clear error names the topic and field that is wrong."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise BadRequest(f"--topics {path}: cannot read it as JSON ({exc}); give a file like "
                         '{"topics": [{"qid": "q1", "query": "LDL", "patient": "123"}]}',
                         expression="topics") from None
    raw = data.get("topics") if isinstance(data, dict) else data
    if not isinstance(raw, list) or not raw:
        raise BadRequest(f"--topics {path}: no `topics` list found", expression="topics")
    topics: list[Topic] = []
    for index, item in enumerate(raw):
        if not isinstance(item, dict) or not item.get("qid") or not item.get("query"):
            raise BadRequest(f"--topics {path}: topic #{index} needs a `qid` and a `query`",
                             expression="topics")
        types = item.get("_type") or ()
        if isinstance(types, str):
            types = [t.strip() for t in types.split(",") if t.strip()]
        topics.append(Topic(str(item["qid"]), str(item["query"]), item.get("patient"),
                            tuple(types), item.get("instruction")))
    return topics


def load_qrels(path: str | Path) -> dict[str, dict[str, int]]:
    """TREC qrels as {qid: {doc_id: grade}} (read by ir-measures)."""
    if not Path(path).is_file():
        raise BadRequest(f"--qrels {path}: no such file; give TREC qrels "
                         "(`qid 0 Observation/123 1` per line)", expression="qrels")
    qrels: dict[str, dict[str, int]] = {}
    try:
        for qrel in ir_measures.read_trec_qrels(str(path)):
            qrels.setdefault(qrel.query_id, {})[qrel.doc_id] = int(qrel.relevance)
    except (ValueError, IndexError) as exc:
        raise BadRequest(f"--qrels {path}: not TREC qrels ({exc}); each line is "
                         "`qid 0 ResourceType/id grade`", expression="qrels") from None
    return qrels
