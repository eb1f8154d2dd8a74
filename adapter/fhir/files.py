"""The file FHIR source: Bundles, single resources and Bulk NDJSON on disk, searched in memory.

Everything under the directory is loaded once, at construction: `*.json` files holding a Bundle
(any type) or a single resource, and `*.ndjson` files (FHIR Bulk Data, one resource a line),
recursively. In transaction Bundles the entries point at each other through `urn:uuid:` fullUrls;
those references are rewritten to `Type/id`, so `subject.reference` reads `Patient/<id>` as it
would on a server. Bad files and lines are skipped with a warning (never content nor names).

`full_urls` are relative `Type/id` references: there is no server URL to give, and the API knows
its own public base. Searches honour the standard filters the pipeline passes upstream (patient,
subject, _id, code/type, category, status, clinical-status, verification-status, date); any
other parameter is ignored with a warning Outcome, and the API decides how strict to be.
"""
from __future__ import annotations

import base64
import pickle
import json
import logging
import re
from collections import Counter, defaultdict
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from adapter.errors import BadRequest
from adapter.fhir.client import limit_outcome
from adapter.fhir.source import FhirSource
from adapter.models import RESOURCE_TYPES, FetchResult, Outcome

if TYPE_CHECKING:
    from adapter.config import Settings

log = logging.getLogger(__name__)

Resource = dict[str, Any]
Predicate = Callable[[Resource], bool]

# Token search parameters: (resource type, parameter) → element holding the code(s).
TOKEN_ELEMENTS: dict[tuple[str, str], str] = {
    ("Observation", "code"): "code", ("Condition", "code"): "code",
    ("DocumentReference", "type"): "type",
    ("Observation", "category"): "category", ("Condition", "category"): "category",
    ("DocumentReference", "category"): "category",
    ("Observation", "status"): "status", ("DocumentReference", "status"): "status",
    ("Condition", "clinical-status"): "clinicalStatus",
    ("Condition", "verification-status"): "verificationStatus",
}
# `date` is matched on any of these elements ("x[x]" = every choice type of x).
DATE_ELEMENTS: dict[str, tuple[str, ...]] = {
    "Observation": ("effective[x]", "issued"),
    "Condition": ("recordedDate", "onset[x]"),
    "DocumentReference": ("date", "context.period"),
}
SILENTLY_IGNORED = frozenset({"_count", "_sort", "_format", "_pretty"})
UTC = timezone.utc
FOREVER = (datetime.min.replace(tzinfo=UTC), datetime.max.replace(tzinfo=UTC))
_DATE = re.compile(r"(\d{4})(?:-(\d{2})(?:-(\d{2})(?:T(\d{2}):(\d{2})(?::(\d{2})(\.\d+)?)?"
                   r"(Z|[+-]\d{2}:\d{2})?)?)?)?")
_PREFIX = re.compile(r"(eq|ne|lt|gt|le|ge|sa|eb)?(.*)")


class FhirFileSource(FhirSource):
    """FHIR resources from files on disk, answering the same calls as a FHIR server."""

    def __init__(self, path: Path | str, *, max_resources: int = 5000,
                 max_attachment_bytes: int = 1_000_000) -> None:
        self.path = Path(path)
        self.max_resources = max_resources
        self.max_attachment_bytes = max_attachment_bytes
        self._resources: dict[str, dict[str, Resource]] = defaultdict(dict)
        self._by_patient: dict[str, dict[str, list[Resource]]] = defaultdict(
            lambda: defaultdict(list))
        self._skipped: Counter[str] = Counter()
        self._load()

    @classmethod
    def from_settings(cls, settings: Settings) -> "FhirFileSource":
        """A source over `settings.data_dir()` (fhir_data, or the bundled fhir_fixtures/)."""
        return cls(settings.data_dir(), max_resources=settings.max_resources,
                   max_attachment_bytes=settings.max_attachment_bytes)

    def describe(self) -> str:
        return f"FhirFileSource({self.path}, {self.count()} resources)"

    def count(self, resource_type: str | None = None) -> int:
        """How many resources (of one type, or all) were loaded."""
        types = [resource_type] if resource_type else list(self._resources)
        return sum(len(self._resources.get(t, {})) for t in types)

    def _load(self) -> None:
        if not self.path.exists():
            raise ValueError(f"fhir_data {self.path} does not exist; point fhir_data at a "
                             "directory of FHIR Bundles (*.json) or Bulk NDJSON (*.ndjson)")
        files = [self.path] if self.path.is_file() else sorted(
            p for p in self.path.rglob("*") if p.suffix in (".json", ".ndjson") and p.is_file())
        for file in files:
            if file.suffix == ".ndjson":
                self._load_ndjson(file)
                continue
            try:
                data = json.loads(file.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, ValueError):
                self._skip(file, "not readable JSON")
                continue
            if isinstance(data, dict) and data.get("resourceType") == "Bundle":
                self._add_bundle(data, file)
            elif not self._add(data):
                self._skip(file, "not a FHIR resource with resourceType and id")
        counts = ", ".join(f"{t} {len(r)}" for t, r in sorted(self._resources.items()))
        log.info("loaded %d FHIR resources from %d files under %s (%s); skipped: %s",
                 self.count(), len(files), self.path, counts or "none",
                 dict(self._skipped) or "nothing")

    def _skip(self, file: Path, why: str, kind: str = "files", count: int = 1) -> None:
        """Count and log a skip; the file is named at DEBUG only (named after patients)."""
        log.warning("skipped part of a data file: %s (its name is logged at DEBUG)", why)
        log.debug("skipped file: %s", file)
        self._skipped[kind] += count

    def _load_ndjson(self, file: Path) -> None:
        try:
            lines = file.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError):
            self._skip(file, "not readable UTF-8")
            return
        for number, line in enumerate(lines, start=1):
            try:
                added = not line.strip() or self._add(json.loads(line))
            except ValueError:
                added = False
            if not added:
                self._skip(file, f"line {number} is not a FHIR resource", "lines")

    def _add_bundle(self, bundle: Resource, file: Path) -> None:
        entries = [e for e in bundle.get("entry") or []
                   if isinstance(e, dict) and isinstance(e.get("resource"), dict)]
        targets: dict[str, str] = {}  # fullUrl → Type/id, for urn:uuid: references
        for entry in entries:
            resource, full_url = entry["resource"], entry.get("fullUrl")
            if not isinstance(full_url, str):
                continue
            if "id" not in resource and full_url.startswith("urn:uuid:"):  # POST without id
                resource["id"] = full_url.removeprefix("urn:uuid:")
            if isinstance(resource.get("resourceType"), str) and resource.get("id"):
                targets[full_url] = f"{resource['resourceType']}/{resource['id']}"
        for entry in entries:
            _resolve_references(entry["resource"], targets)
        skipped = len(bundle.get("entry") or []) - sum(self._add(e["resource"]) for e in entries)
        if skipped:
            self._skip(file, f"{skipped} Bundle entries without id", "bundle entries", skipped)

    def _add(self, resource: Any) -> bool:
        """Store one resource; False when it has no resourceType/id. Duplicates: first wins."""
        if not isinstance(resource, dict):
            return False
        rtype, rid = resource.get("resourceType"), resource.get("id")
        if not isinstance(rtype, str) or not isinstance(rid, str) or not rid:
            return False
        if rid in self._resources[rtype]:
            self._skipped["duplicates"] += 1
            return True
        self._resources[rtype][rid] = resource
        for patient in _patient_ids(resource):
            self._by_patient[rtype][patient].append(resource)
        return True


    def search(self, resource_type: str, params: list[tuple[str, str]],
               authorization: str | None = None, limit: int | None = None) -> FetchResult:
        """Resources of `resource_type` matching every parameter, in load order, up to `limit`.

        Copies are returned, so callers may change them. Unsupported parameters are ignored
        with a warning Outcome; a malformed value of a supported one is a BadRequest.
        """
        limit = self.max_resources if limit is None else limit
        outcomes: list[Outcome] = []
        predicates: list[Predicate] = []
        for name, value in params:
            if name in SILENTLY_IGNORED:
                continue
            predicate = self._patient_predicate(resource_type, value) if name == "patient" \
                else _predicate(resource_type, name, value)
            if predicate is None:
                if not any(name in o.expression for o in outcomes):
                    outcomes.append(Outcome(
                        "warning", "not-supported",
                        f"search parameter `{name}` is not supported for {resource_type} by "
                        "the file source; it was ignored", (name,)))
                continue
            predicates.append(predicate)
        candidates = self._resources.get(resource_type, {}).values()
        matches = [r for r in candidates if all(p(r) for p in predicates)]
        if len(matches) > limit:
            del matches[limit:]
            outcomes.append(limit_outcome(limit))
        log.debug("file search %s: %d matches", resource_type, len(matches))
        return FetchResult(_copy(matches), outcomes,
                           [f"{resource_type}/{r['id']}" for r in matches])

    def _patient_predicate(self, resource_type: str, value: str) -> Predicate:
        """`patient=<id>|Patient/<id>[,…]`: membership in the patient index (subject/patient)."""
        ids = [reference_key(v.strip()).removeprefix("Patient/") for v in value.split(",")]
        by_patient = self._by_patient.get(resource_type, {})
        found = {id(r) for pid in ids for r in by_patient.get(pid, ())}
        return lambda r: id(r) in found

    def patient_exists(self, patient_id: str, authorization: str | None = None) -> bool:
        """True when Patient/<id> was loaded."""
        return patient_id.removeprefix("Patient/") in self._resources.get("Patient", {})

    def fetch_attachment(self, url: str, authorization: str | None = None
                         ) -> tuple[str, bytes] | None:
        """(contentType, data) of a loaded Binary given as `Binary/<id>`; None otherwise."""
        rtype, _, rid = url.lstrip("/").partition("/")
        binary = self._resources.get("Binary", {}).get(rid) if rtype == "Binary" else None
        if binary is None:
            log.debug("attachment not among the loaded Binary resources")
            return None
        try:
            data = base64.b64decode(binary.get("data") or "")
        except ValueError:
            log.warning("a Binary's data is not valid base64; skipped")
            return None
        if len(data) > self.max_attachment_bytes:
            log.warning("a Binary is over max_attachment_bytes=%d; skipped", self.max_attachment_bytes)
            return None
        return str(binary.get("contentType") or "application/octet-stream"), data

    def read(self, resource_type: str, resource_id: str) -> Resource | None:
        """A copy of one loaded resource, or None."""
        found = self._resources.get(resource_type, {}).get(resource_id)
        return _copy(found) if found is not None else None

    def patients(self) -> list[str]:
        """Ids of the loaded Patients, those with the most clinical resources first (then id)."""
        def clinical(pid: str) -> int:
            return sum(len(self._by_patient.get(t, {}).get(pid, ())) for t in RESOURCE_TYPES)
        return sorted(self._resources.get("Patient", {}), key=lambda p: (-clinical(p), p))


def _resolve_references(node: Any, targets: dict[str, str]) -> None:
    """Rewrite, in place, every Reference whose target is a Bundle entry's `urn:` fullUrl."""
    if isinstance(node, dict):
        ref = node.get("reference")
        if isinstance(ref, str) and ref.startswith("urn:") and ref in targets:
            node["reference"] = targets[ref]
        for value in node.values():
            if isinstance(value, (dict, list)):
                _resolve_references(value, targets)
    elif isinstance(node, list):
        for item in node:
            _resolve_references(item, targets)


def reference_key(reference: str) -> str:
    """`Type/id` of a relative or absolute reference (history and server base removed)."""
    reference = reference.split("/_history/")[0].rstrip("/")
    return "/".join(reference.split("/")[-2:]) if "/" in reference else reference


def _references(resource: Resource, *elements: str) -> list[str]:
    keys = []
    for element in elements:
        value = resource.get(element)
        for ref in value if isinstance(value, list) else [value]:
            if isinstance(ref, dict) and isinstance(ref.get("reference"), str):
                keys.append(reference_key(ref["reference"]))
    return keys


def _patient_ids(resource: Resource) -> list[str]:
    return [k.removeprefix("Patient/") for k in _references(resource, "subject", "patient")
            if k.startswith("Patient/")]


def _predicate(resource_type: str, name: str, value: str) -> Predicate | None:
    """A test for one search parameter, or None when it is not supported for the type."""
    values = [v.strip() for v in value.split(",") if v.strip()]
    if name == "_id":
        return lambda r: r.get("id") in values
    if name == "subject":  # `Type/id`, or a bare id of any type
        wanted = {reference_key(v) for v in values}
        return lambda r: any(k in wanted or k.split("/")[-1] in wanted
                             for k in _references(r, "subject"))
    element = TOKEN_ELEMENTS.get((resource_type, name))
    if element is not None:
        tokens = [_parse_token(v) for v in values]
        return lambda r: any(_token_matches(r.get(element), t) for t in tokens)
    if name == "date" and resource_type in DATE_ELEMENTS:
        tests = [_parse_date_test(v) for v in values]
        elements = DATE_ELEMENTS[resource_type]
        return lambda r: any(test(span) for span in _date_spans(r, elements) for test in tests)
    return None


def _parse_token(value: str) -> tuple[str | None, str]:
    """`[system|]code` → (system or None for any, code or '' for any); '|code' = no system."""
    system, bar, code = value.partition("|")
    return (system, code) if bar else (None, value)


def _codings(element: Any) -> list[tuple[str | None, str | None]]:
    """(system, code) pairs of a code, Coding, CodeableConcept or a list of them."""
    if isinstance(element, str):
        return [(None, element)]
    if isinstance(element, list):
        return [pair for item in element for pair in _codings(item)]
    if not isinstance(element, dict):
        return []
    if "coding" in element:
        return _codings(element["coding"])
    return [(element.get("system"), element.get("code"))] if "code" in element else []


def _token_matches(element: Any, token: tuple[str | None, str]) -> bool:
    system, code = token
    for have_system, have_code in _codings(element):
        if system is not None and (have_system or "") != system:
            continue
        if code == "" or have_code == code:
            return True
    return False


def _date_spans(resource: Resource, elements: tuple[str, ...]) -> list[tuple[datetime, datetime]]:
    spans = []
    for element in elements:
        if element.endswith("[x]"):
            stem = element[:-3]
            values = [v for k, v in resource.items() if k.startswith(stem) and k != stem]
        else:
            node: Any = resource
            for part in element.split("."):
                node = node.get(part) if isinstance(node, dict) else None
            values = [node]
        for value in values:
            span = _value_span(value)
            if span is not None:
                spans.append(span)
    return spans


def _value_span(value: Any) -> tuple[datetime, datetime] | None:
    """[start, end) of a date/dateTime/instant string or a Period; None for anything else."""
    if isinstance(value, str):
        return _date_span(value)
    if isinstance(value, dict) and ("start" in value or "end" in value):
        start = _date_span(value["start"]) if isinstance(value.get("start"), str) else None
        end = _date_span(value["end"]) if isinstance(value.get("end"), str) else None
        if (start is None and "start" in value) or (end is None and "end" in value):
            return None
        return (start[0] if start else FOREVER[0], end[1] if end else FOREVER[1])
    return None


def _date_span(text: str) -> tuple[datetime, datetime] | None:
    """[start, end) in UTC of a partial FHIR date/dateTime (2020, 2020-03, …, full instant)."""
    m = _DATE.fullmatch(text.strip())
    if m is None:
        return None
    year, month, day, hour, minute, second, fraction, zone = m.groups()
    try:
        if hour is None:
            start = datetime(int(year), int(month or 1), int(day or 1), tzinfo=UTC)
            if day:
                return start, start + timedelta(days=1)
            if month:
                return start, (start.replace(day=28) + timedelta(days=4)).replace(day=1)
            return start, start.replace(year=start.year + 1)
        tz = UTC if zone in (None, "Z") else datetime.strptime(zone, "%z").tzinfo
        start = datetime(int(year), int(month), int(day), int(hour), int(minute),
                         int(second or 0), int(float(fraction or 0) * 1_000_000),
                         tzinfo=tz).astimezone(UTC)
        step = timedelta(minutes=1) if second is None else \
            timedelta(seconds=1) if fraction is None else timedelta(milliseconds=1)
        return start, start + step
    except (ValueError, OverflowError):
        return None


def _parse_date_test(value: str) -> Callable[[tuple[datetime, datetime]], bool]:
    """A test on a resource's [start, end) span for one `date` value such as `ge2020-01`."""
    m = _PREFIX.fullmatch(value)
    prefix, text = (m.group(1) or "eq", m.group(2)) if m else ("eq", value)
    span = _date_span(text)
    if span is None:
        raise BadRequest(f"date value {value!r} is not a FHIR date; use [prefix]YYYY[-MM[-DD"
                         "[Thh:mm[:ss][Z]]]] with a prefix of eq, ne, lt, gt, le, ge, sa or eb, "
                         "e.g. ge2020-01-01", expression="date")
    lo, hi = span

    def test(target: tuple[datetime, datetime]) -> bool:
        start, end = target
        within = lo <= start and end <= hi
        return {"eq": within, "ne": not within, "gt": end > hi, "lt": start < lo,
                "ge": within or end > hi, "le": within or start < lo,
                "sa": start >= hi, "eb": end <= lo}[prefix]
    return test


def _copy(value: Any) -> Any:
    """A deep copy of loaded JSON data, so callers may change what they get: a pickle round
    trip gives the same result as `copy.deepcopy` on JSON types at a fraction of its cost."""
    return pickle.loads(pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL))
