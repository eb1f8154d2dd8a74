"""`fhir-rerank eval`: metrics through ir-measures on a hand-computed example, and the command
end to end over the committed fixtures with qrels made from the data."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import ir_measures
import pytest

from adapter.config import load_settings
from adapter.eval.data import Topic, load_topics
from adapter.eval.runner import evaluate, score_rankings
from adapter.fhir import make_source
from adapter.models import SearchRequest
from adapter.pipeline import LinkContext, collect_documents, prepare_search, rank_prepared
from adapter.rerank.keyword import KeywordReranker

ROOT = Path(__file__).resolve().parent.parent
BIG = "79a66c97-6131-3213-f3c9-4606946ab056"


def test_metrics_match_a_hand_computed_example() -> None:
    qrels = {"q1": {"a": 1, "b": 1}, "q2": {"c": 1}, "q3": {"d": 1}}
    rankings = {"q1": ["a", "x", "b"], "q2": ["x", "y", "c"], "q3": [], "unjudged": ["a"]}
    result = score_rankings(rankings, qrels)
    # q1: DCG = 1/log2(2) + 1/log2(4) = 1.5; ideal = 1 + 1/log2(3)
    assert result.per_query["q1"]["nDCG@10"] == pytest.approx(1.5 / (1 + 1 / math.log2(3)))
    assert result.per_query["q1"]["R@10"] == 1.0 and result.per_query["q1"]["MRR"] == 1.0
    # q2: one relevant at rank 3: nDCG = (1/log2(4)) / 1 = 0.5, MRR = 1/3
    assert result.per_query["q2"]["nDCG@10"] == pytest.approx(0.5)
    assert result.per_query["q2"]["MRR"] == pytest.approx(1 / 3)
    # q3 is judged but got nothing: it scores 0 and still counts in the mean
    assert result.per_query["q3"] == {"nDCG@10": 0.0, "R@10": 0.0, "R@100": 0.0, "MRR": 0.0}
    assert result.unjudged == ["unjudged"]
    assert result.overall["MRR"] == pytest.approx((1 + 1 / 3 + 0) / 3)
    assert result.overall["R@100"] == pytest.approx(2 / 3)


@pytest.fixture(scope="module")
def judged(tmp_path_factory) -> tuple[Path, Path, dict[str, set[str]]]:
    """Topics over the fixtures; a Condition is relevant when its code text names the
    question's concept (computed from the data, not written down)."""
    settings = load_settings({}, env={})
    docs, _ = collect_documents(SearchRequest(query="x", patient=BIG, types=("Condition",)),
                                make_source(settings), settings)
    relevant = {
        "sinus": {d.id for d in docs if "sinusitis" in d.text.split("\n")[0].lower()},
        "kidney": {d.id for d in docs if "kidney" in d.text.split("\n")[0].lower()},
    }
    assert all(relevant.values())
    folder = tmp_path_factory.mktemp("eval")
    topics = {"about": "test", "topics": [
        {"qid": "sinus", "query": "sinus infection", "patient": BIG, "_type": "Condition"},
        {"qid": "kidney", "query": "CKD", "patient": BIG, "_type": ["Condition"]},
        {"qid": "nojudgments", "query": "stress", "patient": BIG}]}
    (folder / "topics.json").write_text(json.dumps(topics))
    (folder / "qrels.txt").write_text("".join(f"{q} 0 {d} 1\n" for q, ids in relevant.items()
                                              for d in sorted(ids)))
    return folder / "topics.json", folder / "qrels.txt", relevant


def test_eval_command_end_to_end(judged, tmp_path: Path) -> None:
    topics, qrels, relevant = judged
    run, out = tmp_path / "run.trec", tmp_path / "metrics.json"
    proc = subprocess.run([sys.executable, "-m", "adapter.cli", "eval", "--topics", str(topics),
                           "--qrels", str(qrels), "--reranker", "none", "--run", str(run),
                           "--json", str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split()[:2] == ["qid", "question"] and "nDCG@10" in lines[0]
    assert any(line.startswith("sinus ") and "sinus infection" in line for line in lines)
    assert "mean over 2 judged topics (final stage)" in lines[-1]
    assert "eval (final)" not in proc.stderr  # no progress bar when stderr is not a terminal
    rows = [line.split() for line in run.read_text().splitlines()]
    assert {r[0] for r in rows} == {"sinus", "kidney", "nojudgments"}
    sinus = [r for r in rows if r[0] == "sinus"]
    assert [int(r[3]) for r in sinus] == list(range(1, len(sinus) + 1))
    assert all(r[2].startswith("Condition/") for r in sinus)  # _type=Condition honoured
    assert set(r[2] for r in sinus) >= relevant["sinus"]
    # The JSON agrees with ir-measures run over the files that were written
    metrics = json.loads(out.read_text())
    again = {(m.query_id, str(m.measure)): m.value for m in ir_measures.iter_calc(
        [ir_measures.nDCG @ 10, ir_measures.RR], ir_measures.read_trec_qrels(str(qrels)),
        ir_measures.read_trec_run(str(run)))}
    for qid in ("sinus", "kidney"):
        assert metrics["per_query"][qid]["nDCG@10"] == pytest.approx(again[(qid, "nDCG@10")])
        assert metrics["per_query"][qid]["MRR"] == pytest.approx(again[(qid, "RR")])
    assert metrics["per_query"]["kidney"]["R@100"] == 1.0  # "CKD" finds its kidney records
    assert metrics["unjudged_topics"] == ["nojudgments"]


def test_recall_stage_judges_the_candidates_and_final_the_matches(judged) -> None:
    topics, qrels, _ = judged
    settings = load_settings({"reranker": "none"}, env={})
    source, reranker = make_source(settings), KeywordReranker()
    judged_topics = [t for t in load_topics(topics) if t.qid == "sinus"]
    from adapter.eval.data import load_qrels
    recall = evaluate(judged_topics, load_qrels(qrels), source, reranker, settings,
                      stage="recall", depth=1000)
    final = evaluate(judged_topics, load_qrels(qrels), source, reranker, settings,
                     stage="final", depth=1000)
    assert len(recall.rankings["sinus"]) == settings.recall  # the reranker's whole budget
    assert 0 < len(final.rankings["sinus"]) < len(recall.rankings["sinus"])  # matches only
    assert final.rankings["sinus"] == recall.rankings["sinus"][:len(final.rankings["sinus"])]


def test_a_fallback_says_once_that_nothing_was_reranked() -> None:
    settings = load_settings({}, env={})
    request = SearchRequest(query="sinusitis", patient=BIG, types=("Condition",), count=5)
    payload = prepare_search(request, make_source(settings), settings,
                             LinkContext("http://x/fhir", "$rerank"))
    fallback = KeywordReranker(fallback_reason="no weights here")
    bundle = rank_prepared(payload, fallback)
    said = [i["diagnostics"] for e in bundle["entry"] if e["search"]["mode"] == "outcome"
            for i in e["resource"]["issue"]]
    assert len([d for d in said if "not reranked" in d]) == 1
    assert not any("were reranked" in d for d in said)
    holding = sum(c["matched"] for c in payload["candidates"])
    assert bundle["total"] == holding == payload["matched"] > 0


def test_a_bad_topics_file_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "t.json").write_text('{"topics": [{"query": "no qid"}]}')
    (tmp_path / "q.txt").write_text("q 0 Condition/x 1\n")
    proc = subprocess.run([sys.executable, "-m", "adapter.cli", "eval", "--topics",
                           str(tmp_path / "t.json"), "--qrels", str(tmp_path / "q.txt"),
                           "--reranker", "none"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert "topic #0 needs a `qid` and a `query`" in proc.stderr
