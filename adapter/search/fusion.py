"""Reciprocal rank fusion (Cormack, Clarke & Büttcher, SIGIR 2009): one ranking from several.

A document's fused score is the sum over the rankings that hold it of 1 / (k + rank), rank
counted from 1. k = 60 is the paper's value and the common default (Elasticsearch, OpenSearch,
Vespa); a larger k flattens the difference between the top ranks. Only ranks are used, so
BM25 scores and cosines need no common scale. A document missing from a ranking simply gets
nothing from it.
"""
from __future__ import annotations

from typing import Any, Callable, Hashable, Sequence, TypeVar

T = TypeVar("T", bound=Hashable)

RRF_K = 60


def reciprocal_rank_fusion(rankings: Sequence[Sequence[T]], k: int = RRF_K,
                           tiebreak: Callable[[T], Any] | None = None) -> list[tuple[T, float]]:
    """(item, fused score) best first; equal scores ordered by `tiebreak(item)` (default: item).

    Each ranking lists items best first; an item repeated within one ranking counts once, at
    its best rank.
    """
    if k < 0:
        raise ValueError(f"rrf k of {k} is negative; use k >= 0 (60 is the usual value)")
    fused: dict[T, float] = {}
    for ranking in rankings:
        seen: set[T] = set()
        for rank, item in enumerate(ranking, start=1):
            if item in seen:
                continue
            seen.add(item)
            fused[item] = fused.get(item, 0.0) + 1.0 / (k + rank)
    key = tiebreak or (lambda item: item)
    return sorted(fused.items(), key=lambda pair: (-pair[1], key(pair[0])))
