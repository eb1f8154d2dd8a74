"""Benchmark: this tree's BM25Index against another version's, in one process, alternating.

    git show <commit>:adapter/search/bm25.py > /tmp/old_bm25.py
    .venv/bin/python bench/bm25_compare.py /tmp/old_bm25.py [--docs 10000] [--rounds 5]

Builds each index over the same synthetic corpus (bench/recall.py's, from the fixtures) and
runs bench/recall.py's 10 queries; prints the best round of each: build, mean query, and
build + all queries. Alternating rounds keep a busy machine's noise out of the ratio.
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for extra in (ROOT, ROOT / "bench"):
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))

import recall as recall_bench  # noqa: E402
from adapter.fhir.flatten import flatten_resource  # noqa: E402
from adapter.search import bm25 as current  # noqa: E402
from adapter.search.tokenize import tokenize  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("old", type=Path, help="the other version's adapter/search/bm25.py")
    parser.add_argument("--docs", type=int, default=10000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    spec = importlib.util.spec_from_file_location("old_bm25", args.old)
    old = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(old)  # type: ignore[union-attr]
    texts = [flatten_resource(r) for r in recall_bench.fixture_resources()]
    tokens = [tokenize(d.text) for d in recall_bench.synthetic_corpus(texts, args.docs)]
    for module in (old, current):  # warm up (the lexicon loads on the first query)
        module.BM25Index(tokenized=tokens[:10]).scores("warm up")
    rows: dict[str, list[tuple[float, float, float]]] = {"other": [], "this tree": []}
    for _ in range(args.rounds):
        for name, module in (("other", old), ("this tree", current)):
            start = time.perf_counter()
            index = module.BM25Index(tokenized=tokens)
            build = time.perf_counter() - start
            queries = []
            for query in recall_bench.QUERIES:
                start = time.perf_counter()
                index.scores(query)
                queries.append(time.perf_counter() - start)
            rows[name].append((build, statistics.mean(queries), build + sum(queries)))
    print(f"{'':<10} {'build s':>8} {'query ms':>9} {'build + 10 queries s':>21}")
    for name, got in rows.items():
        print(f"{name:<10} {min(r[0] for r in got):>8.3f} {min(r[1] for r in got) * 1000:>9.2f} "
              f"{min(r[2] for r in got):>21.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
