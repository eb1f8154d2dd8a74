"""Measure the first stage on judged questions: keyword (BM25) recall vs BM25 + dense (RRF).

    .venv/bin/python bench/first_stage.py --embedder DIR_OR_ID [--topics T.json --qrels Q.txt
        --fhir-data DIR --recall 100 --device cpu --dtype float32]

For every topic the pipeline's own `prepare_search` runs over the FHIR files (the same call the
API makes), once with `embedder = ""` and once with the given embedder; the candidate list it
hands to the reranker is judged with ir-measures: R@10, R@100, nDCG@10 (first-stage order).
Defaults: ../shared/eval over ../shared/fhir-data/synthea-r4-bundles. A temporary harness
until `fhir-rerank eval` exists; with tiny random weights it only shows that fusion runs.
Needs ir-measures (a dependency, for `fhir-rerank eval`).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent.parent / "shared"


def run(settings, topics, recall: int) -> dict[str, dict[str, float]]:
    from adapter.api.params import parse_search
    from adapter.fhir import make_source
    from adapter.pipeline import LinkContext, prepare_search

    source = make_source(settings)
    run_scores: dict[str, dict[str, float]] = {}
    for topic in topics:
        pairs = [("query", topic["query"]), ("patient", topic["patient"]), ("recall", str(recall))]
        parsed = parse_search(pairs, settings, types=None, strict=True, query_param="query")
        payload = prepare_search(parsed.request, source, settings,
                                 LinkContext("urn:eval", "$rerank", parsed.used))
        n = len(payload["candidates"])
        run_scores[topic["qid"]] = {c["document"]["id"]: float(n - rank)
                                    for rank, c in enumerate(payload["candidates"])}
    return run_scores


def main() -> int:
    import ir_measures
    from ir_measures import R, nDCG

    from adapter.config import load_settings

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--embedder", required=True)
    ap.add_argument("--topics", default=str(SHARED / "eval" / "topics.json"))
    ap.add_argument("--qrels", default=str(SHARED / "eval" / "qrels.txt"))
    ap.add_argument("--fhir-data", default=str(SHARED / "fhir-data" / "synthea-r4-bundles"))
    ap.add_argument("--recall", type=int, default=100)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args()
    topics = json.loads(Path(args.topics).read_text())["topics"]
    qrels = list(ir_measures.read_trec_qrels(args.qrels))
    measures = [R @ 10, R @ 100, nDCG @ 10]
    rows = {}
    for label, embedder in (("keyword (BM25)", ""), ("BM25 + dense (RRF)", args.embedder)):
        settings = load_settings({"fhir_data": args.fhir_data, "reranker": "none",
                                  "embedder": embedder, "device": args.device,
                                  "dtype": args.dtype}, env={})
        started = time.perf_counter()
        scores = run(settings, topics, args.recall)
        seconds = time.perf_counter() - started
        agg = ir_measures.calc_aggregate(measures, qrels, scores)
        rows[label] = (agg, seconds)
    print(f"{len(topics)} topics, recall={args.recall}, first-stage candidate order")
    print(f"{'':22} {'R@10':>7} {'R@100':>7} {'nDCG@10':>8} {'seconds':>8}")
    for label, (agg, seconds) in rows.items():
        print(f"{label:22} {agg[R @ 10]:7.3f} {agg[R @ 100]:7.3f} {agg[nDCG @ 10]:8.3f} "
              f"{seconds:8.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
