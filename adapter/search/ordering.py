"""`_sort` for ranked results: relevance, clinical date, or both (FHIR's comma list).

Allowed keys: `_score` (relevance, best first; `-_score` is read the same way), `date`
(oldest first) and `-date` (most recent first), dates as `adapter.fhir.clinical_date` reads
them. Keys apply left to right, each breaking the ties of the one before; resource id breaks
the last ties so paging is stable. Resources without a date sort after those with one in
either direction. `_sort=_score,-date` is relevance with recency breaking ties; `_sort=-date`
is the candidates by date, relevance breaking ties among equal dates.
"""
from __future__ import annotations

from typing import Any, Sequence

from adapter.errors import BadRequest
from adapter.fhir.clinical_date import clinical_date
from adapter.models import Scored

SORT_KEYS = ("_score", "-_score", "date", "-date")
DEFAULT_SORT = ("_score",)


def parse_sort(values: Sequence[str]) -> tuple[str, ...]:
    """The `_sort` parameter values (each a comma list) → keys; a 400 naming `_sort` when bad."""
    keys: list[str] = []
    for raw in values:
        for key in (k.strip() for k in raw.split(",")):
            if key not in SORT_KEYS:
                raise BadRequest(f"`_sort` value {key[:40]!r} is not supported; use a comma list "
                                 f"of {', '.join(SORT_KEYS)} (e.g. _sort=_score,-date)",
                                 expression="_sort")
            field = key.lstrip("-")
            if any(k.lstrip("-") == field for k in keys):
                raise BadRequest(f"`_sort` names {field} twice; give each of _score and date "
                                 "at most once", expression="_sort")
            keys.append(key)
    return tuple(keys) or DEFAULT_SORT


def order_ranked(ranked: list[Scored], sort: Sequence[str] = DEFAULT_SORT) -> list[Scored]:
    """`ranked` ordered by the `_sort` keys, then by resource id."""
    dates = {id(item): clinical_date(item.document.resource) for item in ranked}

    def key(item: Scored) -> tuple[Any, ...]:
        parts: list[Any] = []
        for name in sort:
            if name.lstrip("-") == "_score":
                parts.append(-item.score)
            else:
                when = dates[id(item)]
                missing = when is None
                value = 0.0 if when is None else (-when if name.startswith("-") else when)
                parts.extend((missing, value))
        if not any(name.lstrip("-") == "_score" for name in sort):
            parts.append(-item.score)
        parts.append(item.document.id)
        return tuple(parts)

    return sorted(ranked, key=key)
