"""Benchmark: flatten throughput and BM25 recall cost at 1k / 10k / 100k documents.

    .venv/bin/python bench/recall.py [--json PATH] [--sizes 1000,10000,100000]

Flatten runs over every DocumentReference / Observation / Condition in fhir_fixtures/ (HL7
examples, Synthea Bundles, Synthea bulk NDJSON). The BM25 corpus is synthetic but clinical-like:
flattened fixture texts drawn with a fixed seed, their numbers re-rolled so values vary, plus a
few words from the fixture vocabulary. `run()` returns the numbers as a dict (bench/e2e.py prints
it too).
"""
from __future__ import annotations

import argparse
import json
import platform
import random
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from adapter.fhir.flatten import flatten_documents, flatten_resource  # noqa: E402
from adapter.models import RESOURCE_TYPES, Document  # noqa: E402
from adapter.search.bm25 import BM25Index, recall  # noqa: E402
from adapter.search.tokenize import tokenize  # noqa: E402

FIXTURES = ROOT / "fhir_fixtures"
QUERIES = ["hemoglobin a1c diabetes", "systolic blood pressure high", "chest pain emergency",
           "acute bronchitis cough", "body mass index obesity", "viral sinusitis",
           "history and physical note medications", "糖尿病 血糖"]
SEED = 20261126


def fixture_resources() -> list[dict[str, Any]]:
    """Every ranked-type resource in fhir_fixtures/ (Bundles opened, NDJSON read)."""
    found: list[dict[str, Any]] = []
    for path in sorted(FIXTURES.glob("*/*.json")):
        data = json.loads(path.read_text())
        if data.get("resourceType") == "Bundle":
            found += [e["resource"] for e in data.get("entry", []) if "resource" in e]
        else:
            found.append(data)
    for path in sorted(FIXTURES.glob("*/*.ndjson")):
        found += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in found if r.get("resourceType") in RESOURCE_TYPES]


def _best_of(fn, repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def bench_flatten(resources: list[dict[str, Any]]) -> dict[str, Any]:
    n = len(resources)
    plain = _best_of(lambda: [flatten_resource(r) for r in resources])
    validated = _best_of(lambda: flatten_documents(resources), repeat=2)
    unvalidated = _best_of(lambda: flatten_documents(resources, validate=False), repeat=2)
    return {"resources": n,
            "flatten_resource_per_s": round(n / plain),
            "flatten_documents_per_s": round(n / validated),
            "flatten_documents_no_validation_per_s": round(n / unvalidated)}


def synthetic_corpus(texts: list[str], size: int, seed: int = SEED) -> list[Document]:
    """`size` clinical-like documents made from fixture texts (deterministic for a seed)."""
    rng = random.Random(seed)
    vocab = sorted({t for text in texts[:400] for t in tokenize(text) if t.isalpha()})

    def reroll(match: re.Match) -> str:
        digits = match.group()
        return str(rng.randint(10 ** (len(digits) - 1) if len(digits) > 1 else 0, 10 ** len(digits) - 1))

    docs = []
    for i in range(size):
        base = re.sub(r"\d+", reroll, rng.choice(texts))
        extra = " ".join(rng.choices(vocab, k=5))
        docs.append(Document(f"Observation/s{i:06d}", "Observation", f"{base}\n{extra}", {}))
    return docs


def bench_bm25(texts: list[str], size: int) -> dict[str, Any]:
    docs = synthetic_corpus(texts, size)
    start = time.perf_counter()
    tokens = [tokenize(d.text) for d in docs]
    tokenize_s = time.perf_counter() - start
    start = time.perf_counter()
    index = BM25Index(tokenized=tokens)
    build_s = time.perf_counter() - start
    query_ms = []
    for query in QUERIES:
        start = time.perf_counter()
        index.scores(query)
        query_ms.append((time.perf_counter() - start) * 1000)
    start = time.perf_counter()
    recall(QUERIES[0], docs, k=100)
    recall_s = time.perf_counter() - start
    return {"documents": size, "chars_mean": round(statistics.mean(len(d.text) for d in docs)),
            "tokens_mean": round(statistics.mean(map(len, tokens)), 1),
            "tokenize_s": round(tokenize_s, 3), "build_s": round(build_s, 3),
            "query_ms_mean": round(statistics.mean(query_ms), 2),
            "query_ms_max": round(max(query_ms), 2),
            "recall_k100_end_to_end_s": round(recall_s, 3)}


def run(sizes: tuple[int, ...] = (1000, 10000, 100000)) -> dict:
    """Measure flatten and BM25; returns a JSON-ready dict."""
    resources = fixture_resources()
    texts = [flatten_resource(r) for r in resources]
    return {"machine": {"python": platform.python_version(), "cpu": platform.processor() or
                        platform.machine(), "system": platform.system()},
            "flatten": bench_flatten(resources),
            "bm25": [bench_bm25(texts, size) for size in sizes]}


def format_table(result: dict) -> str:
    f = result["flatten"]
    lines = [f"flatten: {f['resources']} fixture resources; flatten_resource "
             f"{f['flatten_resource_per_s']}/s, flatten_documents {f['flatten_documents_per_s']}/s "
             f"(R4B validation on), {f['flatten_documents_no_validation_per_s']}/s (off)",
             "", f"{'docs':>8} {'chars':>6} {'tokens':>7} {'tokenize s':>11} {'build s':>8} "
             f"{'query ms':>9} {'max ms':>8} {'recall(k=100) s':>16}"]
    for row in result["bm25"]:
        lines.append(f"{row['documents']:>8} {row['chars_mean']:>6} {row['tokens_mean']:>7} "
                     f"{row['tokenize_s']:>11} {row['build_s']:>8} {row['query_ms_mean']:>9} "
                     f"{row['query_ms_max']:>8} {row['recall_k100_end_to_end_s']:>16}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", type=Path, help="also write the results here as JSON")
    parser.add_argument("--sizes", default="1000,10000,100000",
                        help="comma-separated corpus sizes (default 1000,10000,100000)")
    args = parser.parse_args(argv)
    result = run(tuple(int(s) for s in args.sizes.split(",") if s.strip()))
    print(format_table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
