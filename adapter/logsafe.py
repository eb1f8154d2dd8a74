"""Keeping patient data out of log lines: URL paths are logged without their query string and
with patient ids masked (`/fhir/Patient/123/$rerank` → `/fhir/Patient/*/$rerank`)."""
from __future__ import annotations

import re

_PATIENT_IN_PATH = re.compile(r"(/Patient/)[^/?]+")


def redact_path(path: str) -> str:
    return _PATIENT_IN_PATH.sub(r"\1*", path.split("?", 1)[0])
