"""Keeping patient data out of log lines: a URL path is logged without its query string and
with every segment that could name a patient or a job masked — ids after a resource type
(`/fhir/Patient/123/$rerank` → `/fhir/Patient/*/$rerank`, `/fhir/Condition/abc` →
`/fhir/Condition/*`), job ids (`/fhir/_async/*`: an id is the capability to read the job)
and, under this API's `/fhir`, any segment that is not a known name (`/fhir/*`)."""
from __future__ import annotations

from adapter.models import RESOURCE_TYPES

_KNOWN = frozenset({*RESOURCE_TYPES, "Patient", "Binary", "OperationDefinition", "metadata",
                    "_async", "_history", "_search", "rerank", "$rerank", "healthz", "readyz",
                    "metrics"})
_ID_FOLLOWS = frozenset({*RESOURCE_TYPES, "Patient", "Binary", "_async", "_history"})


def redact_path(path: str) -> str:
    segments = path.split("?", 1)[0].split("/")
    api = len(segments) > 1 and segments[1] == "fhir"
    out: list[str] = []
    for index, segment in enumerate(segments):
        previous = segments[index - 1] if index else ""
        if previous in _ID_FOLLOWS and segment:
            out.append("*")
        elif api and index > 1 and segment and segment not in _KNOWN:
            out.append("*")
        else:
            out.append(segment)
    return "/".join(out)
