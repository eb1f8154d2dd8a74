"""Benchmark: what the adapter adds on top of fetching the record.

    .venv/bin/python bench/e2e.py [--json PATH] [--queries 10] [--sizes 1000,10000,100000]

Starts the real Node test FHIR server loaded with fhir_fixtures/, picks the largest fixture
patient, and times in the same run:
  (a) a bare fetch of the three types by the adapter's REST client (`search_many`), and
  (b) a full adapter search through the Flask app — fetch, flatten, BM25, Bundle — with the
      BM25-only reranker (`reranker = "none"`), for 10 different queries;
then prints the ratio b/a (target ≤ 1.3 on the 2-core build machine). (b) runs twice per
query: as a follow-up question on a record already searched (the flatten / token / index
caches warm, keyed by resource version) and as the record's first search (caches emptied). It also prints
flatten throughput and BM25 build + query time at 1k / 10k / 100k documents (bench/recall.py).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path
from urllib.parse import quote

ROOT = Path(__file__).resolve().parent.parent
for extra in (ROOT, ROOT / "tests", ROOT / "bench"):
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))

from adapter import create_app  # noqa: E402
from adapter.config import load_settings  # noqa: E402
from adapter.fhir.client import FhirRestSource  # noqa: E402
from adapter.models import RESOURCE_TYPES  # noqa: E402
from adapter.api.state import state_of  # noqa: E402
from fhirserver import FhirTestServer, fixture_load_paths, fixture_patients  # noqa: E402
import recall as recall_bench  # noqa: E402

QUERIES = ["chronic sinusitis", "kidney disease stage 3", "anemia", "stress at work",
           "emergency department visit", "diabetes medication metformin", "blood pressure",
           "urinary tract infection", "social isolation", "awaiting kidney transplant"]


def _median_time(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run(n_queries: int = 10, sizes: tuple[int, ...] = (1000, 10000, 100000)) -> dict:
    server = FhirTestServer()
    base = server.start(fixture_load_paths())
    try:
        patient = fixture_patients(server)[0]
        settings = load_settings({"fhir_base_url": base, "reranker": "none"}, env={})
        source = FhirRestSource.from_settings(settings)
        searches = [(t, [("patient", patient["id"])]) for t in RESOURCE_TYPES]
        fetched = sum(len(r.resources) for r in source.search_many(searches).values())
        app = create_app(settings)
        client = app.test_client()
        queries = (QUERIES * ((n_queries // len(QUERIES)) + 1))[:n_queries]

        def full_search(query: str) -> None:
            resp = client.get(f"/fhir/$rerank?query={quote(query)}&patient={patient['id']}"
                              "&_count=20")
            assert resp.status_code == 200, resp.get_data(as_text=True)[:300]

        full_search(queries[0])  # warm-up: imports, first connection
        bare, warm, cold = [], [], []
        for query in queries:  # interleaved, so server-side drift hits every column alike
            bare.append(_median_time(lambda: source.search_many(searches), 1))
            warm.append(_median_time(lambda q=query: full_search(q), 1))
            state_of(app).runtime.caches.clear()  # a first search: nothing flattened yet
            cold.append(_median_time(lambda q=query: full_search(q), 1))
    finally:
        server.stop()
    recall_numbers = recall_bench.run(sizes)
    return {
        "date": date.today().isoformat(),
        "machine": f"{platform.processor() or platform.machine()}, {platform.system()}",
        "patient_resources": fetched,
        "queries": n_queries,
        "bare_fetch_s": statistics.median(bare),
        "full_search_s": statistics.median(warm),
        "full_search_cold_s": statistics.median(cold),
        "ratio_full_over_fetch": statistics.median(warm) / statistics.median(bare),
        "ratio_cold_over_fetch": statistics.median(cold) / statistics.median(bare),
        "recall": recall_numbers,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", default=str(ROOT / "bench" / "results" / "e2e.json"))
    parser.add_argument("--queries", type=int, default=10)
    parser.add_argument("--sizes", default="1000,10000,100000")
    args = parser.parse_args(argv)
    result = run(args.queries, tuple(int(s) for s in args.sizes.split(",")))
    print(f"largest fixture patient: {result['patient_resources']} resources "
          f"(DocumentReference + Observation + Condition)")
    print(f"{'step':<44}{'median s':>10}")
    print(f"{'(a) bare fetch of the three types':<44}{result['bare_fetch_s']:>10.3f}")
    print(f"{'(b) full adapter search (BM25-only)':<44}{result['full_search_s']:>10.3f}")
    print(f"{'(b cold) the same, caches emptied first':<44}{result['full_search_cold_s']:>10.3f}")
    print(f"{'ratio b/a (target <= 1.3)':<44}{result['ratio_full_over_fetch']:>10.2f}")
    print(f"{'ratio b cold/a':<44}{result['ratio_cold_over_fetch']:>10.2f}")
    print()
    print(recall_bench.format_table(result["recall"]))
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
