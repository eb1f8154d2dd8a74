"""The clinical date of a resource, for `_sort=date` / `_sort=-date`.

Which element says when it happened, first one present wins:
- Observation: effective[x] (dateTime, instant, Period start then end, Timing's first event),
  then `issued`;
- Condition: onset[x] (dateTime, Period start then end), then `recordedDate`;
- DocumentReference: `date`, then `context.period` (start then end).
FHIR dates may be partial (`2019`, `2019-03`) or carry a time and zone; each becomes seconds
since 1970 UTC, a partial date counting from its first instant and a time without a zone
read as UTC. Anything unreadable counts as no date (such resources sort last either way).
"""
from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

_PATHS: dict[str, tuple[tuple[str, ...], ...]] = {
    "Observation": (("effectiveDateTime",), ("effectiveInstant",), ("effectivePeriod", "start"),
                    ("effectivePeriod", "end"), ("effectiveTiming", "event"), ("issued",)),
    "Condition": (("onsetDateTime",), ("onsetPeriod", "start"), ("onsetPeriod", "end"),
                  ("recordedDate",)),
    "DocumentReference": (("date",), ("context", "period", "start"),
                          ("context", "period", "end")),
}


def parse_fhir_datetime(value: Any) -> float | None:
    """A FHIR date/dateTime/instant string → seconds since the epoch (UTC), or None."""
    if not isinstance(value, str) or not value.strip():
        return None
    text = value.strip()
    try:
        if len(text) == 4:
            moment = datetime(int(text), 1, 1)
        elif len(text) == 7:
            moment = datetime(int(text[:4]), int(text[5:7]), 1)
        else:
            moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp()


def clinical_date(resource: dict[str, Any]) -> float | None:
    """When the resource's event happened (see the module docstring), or None."""
    for path in _PATHS.get(str(resource.get("resourceType")), ()):
        value: Any = resource
        for step in path:
            value = value.get(step) if isinstance(value, dict) else None
        if isinstance(value, list):  # Timing.event
            value = value[0] if value else None
        seconds = parse_fhir_datetime(value)
        if seconds is not None:
            return seconds
    return None
