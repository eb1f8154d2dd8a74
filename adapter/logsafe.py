"""Keeping patient data out of log lines: URL paths are logged without their query string,
with patient ids masked (`/fhir/Patient/123/$rerank` → `/fhir/Patient/*/$rerank`) and job
ids masked (`/fhir/_async/<id>` → `/fhir/_async/*`: a job id is the capability to read it)."""
from __future__ import annotations

import re

_PATIENT_IN_PATH = re.compile(r"(/Patient/)[^/?]+")
_JOB_IN_PATH = re.compile(r"(/_async/)[^/?]+")


def redact_path(path: str) -> str:
    path = path.split("?", 1)[0]
    return _JOB_IN_PATH.sub(r"\1*", _PATIENT_IN_PATH.sub(r"\1*", path))
