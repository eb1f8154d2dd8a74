"""The file FHIR source over real fixture files: every expected count is computed in the test
straight from the raw JSON, independently of adapter.fhir.files."""
from __future__ import annotations

import base64
import json
import logging
import shutil
from datetime import datetime, timezone
from pathlib import Path

import pytest

from adapter.config import load_settings
from adapter.errors import BadRequest
from adapter.fhir.files import FhirFileSource

FIXTURES = Path(__file__).resolve().parent.parent / "fhir_fixtures"
BUNDLE = next((FIXTURES / "synthea-r4-bundles").glob("Parker_Casper_*.json"))
BULK = FIXTURES / "synthea-bulk"


def _bundle_resources(resource_type: str) -> list[dict]:
    bundle = json.loads(BUNDLE.read_text())
    return [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == resource_type]


def _bulk(resource_type: str) -> list[dict]:
    return [json.loads(line) for line in (BULK / f"{resource_type}.000.ndjson").read_text().splitlines()]


def _utc(text: str) -> datetime:
    value = datetime.fromisoformat(text)
    return value.astimezone(timezone.utc) if value.tzinfo else value.replace(tzinfo=timezone.utc)


@pytest.fixture(scope="module")
def subset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One Synthea transaction Bundle plus the Bulk NDJSON, in a nested folder."""
    root = tmp_path_factory.mktemp("fhir-data")
    (root / "bundles").mkdir()
    shutil.copy(BUNDLE, root / "bundles" / BUNDLE.name)
    shutil.copytree(BULK, root / "bulk" / "deep")
    return root


@pytest.fixture(scope="module")
def source(subset: Path) -> FhirFileSource:
    return FhirFileSource(subset)


def test_bundle_patient_filter_resolves_urn_uuid(source: FhirFileSource) -> None:
    patient_id = _bundle_resources("Patient")[0]["id"]
    observations = _bundle_resources("Observation")
    expected = sorted(o["id"] for o in observations
                      if o["subject"]["reference"] == f"urn:uuid:{patient_id}")
    assert len(expected) == 268
    for value in (patient_id, f"Patient/{patient_id}"):
        found = source.search("Observation", [("patient", value)])
        assert sorted(r["id"] for r in found.resources) == expected
        assert {r["subject"]["reference"] for r in found.resources} == {f"Patient/{patient_id}"}
        assert found.full_urls[0] == f"Observation/{found.resources[0]['id']}"
        assert found.outcomes == []
    # The encounter references inside the Bundle were resolved too (to real Encounter ids).
    encounter_ids = {e["id"] for e in _bundle_resources("Encounter")}
    refs = {r["encounter"]["reference"] for r in source.search("Observation", []).resources}
    assert refs and {ref.split("/", 1)[1] for ref in refs} <= encounter_ids
    assert all(ref.startswith("Encounter/") for ref in refs)


def test_ndjson_patient_filter_and_subject(source: FhirFileSource) -> None:
    notes = _bulk("DocumentReference")
    per_patient: dict[str, int] = {}
    for note in notes:
        per_patient[note["subject"]["reference"]] = per_patient.get(note["subject"]["reference"], 0) + 1
    reference, expected = max(per_patient.items(), key=lambda kv: kv[1])
    patient_id = reference.split("/", 1)[1]
    assert len(source.search("DocumentReference", [("patient", patient_id)]).resources) == expected
    assert len(source.search("DocumentReference", [("subject", reference)]).resources) == expected
    second = next(r for r in sorted(per_patient) if r != reference)
    both = source.search("DocumentReference", [("patient", f"{patient_id},{second}")])
    assert len(both.resources) == expected + per_patient[second]
    assert source.search("DocumentReference", [("patient", "no-such-patient")]).resources == []


def test_code_filter_token_forms(source: FhirFileSource) -> None:
    observations = _bundle_resources("Observation")

    def count(system: str | None, codes: set[str]) -> int:
        return sum(any(c["code"] in codes and (system is None or c.get("system") == system)
                       for c in o["code"]["coding"]) for o in observations)

    expected = count("http://loinc.org", {"8302-2"})
    assert expected > 0
    assert len(source.search("Observation", [("code", "http://loinc.org|8302-2")]).resources) == expected
    assert len(source.search("Observation", [("code", "8302-2")]).resources) == expected
    assert source.search("Observation", [("code", "http://snomed.info/sct|8302-2")]).resources == []
    assert source.search("Observation", [("code", "|8302-2")]).resources == []  # it has a system
    either = count(None, {"8302-2", "29463-7"})
    assert either > expected
    assert len(source.search("Observation", [("code", "8302-2,29463-7")]).resources) == either
    loinc_all = count("http://loinc.org", {c["code"] for o in observations for c in o["code"]["coding"]})
    assert len(source.search("Observation", [("code", "http://loinc.org|")]).resources) == loinc_all


def test_category_and_status_filters(source: FhirFileSource) -> None:
    observations = _bundle_resources("Observation")
    vitals = sum(any(c["code"] == "vital-signs" for cat in o.get("category", []) for c in cat["coding"])
                 for o in observations)
    found = source.search("Observation", [("category", "vital-signs"), ("status", "final")])
    assert len(found.resources) == vitals == 50
    conditions = _bundle_resources("Condition") + _bulk("Condition")
    active = sum(c["clinicalStatus"]["coding"][0]["code"] == "active" for c in conditions)
    assert 0 < active < len(conditions)
    assert len(source.search("Condition", [("clinical-status", "active")]).resources) == active
    notes = source.search("DocumentReference", [("category", "clinical-note"), ("type", "34117-2")])
    assert len(notes.resources) == sum(
        any(c["code"] == "34117-2" for c in n["type"]["coding"]) for n in _bulk("DocumentReference"))


def test_date_filters_with_prefixes_and_partial_dates(source: FhirFileSource) -> None:
    observations = _bundle_resources("Observation")

    def obs_count(test) -> int:  # Observation date = effective[x] or issued, any may match
        return sum(any(test(_utc(o[k])) for k in ("effectiveDateTime", "issued") if k in o)
                   for o in observations)

    start_2015, start_2016 = datetime(2015, 1, 1, tzinfo=timezone.utc), datetime(2016, 1, 1, tzinfo=timezone.utc)
    in_2015 = obs_count(lambda d: start_2015 <= d < start_2016)
    assert in_2015 > 0
    assert len(source.search("Observation", [("date", "2015")]).resources) == in_2015
    assert len(source.search("Observation", [("date", "ge2015-01-01"), ("date", "lt2016")]).resources) == in_2015
    assert len(source.search("Observation", [("date", "ge2016")]).resources) == obs_count(lambda d: d >= start_2016)
    assert len(source.search("Observation", [("date", "lt2015-01")]).resources) == obs_count(lambda d: d < start_2015)
    assert len(source.search("Observation", [("date", "ne2015")]).resources) == len(observations) - in_2015
    # DocumentReference: date or context.period; a period counts in 1988 when it lies in it.
    notes = _bulk("DocumentReference")
    y88, y89 = datetime(1988, 1, 1, tzinfo=timezone.utc), datetime(1989, 1, 1, tzinfo=timezone.utc)

    def in_1988(n: dict) -> bool:
        period = n.get("context", {}).get("period", {})
        return (y88 <= _utc(n["date"]) < y89) or (
            "start" in period and "end" in period and y88 <= _utc(period["start"]) and _utc(period["end"]) < y89)
    expected = sum(in_1988(n) for n in notes)
    assert expected > 100
    assert len(source.search("DocumentReference", [("date", "eq1988")]).resources) == expected
    after = sum(_utc(n["date"]) >= y89 or ("end" in n.get("context", {}).get("period", {})
                                           and _utc(n["context"]["period"]["end"]) >= y89) for n in notes)
    assert len(source.search("DocumentReference", [("date", "sa1988")]).resources) == after


def test_bad_date_is_a_bad_request_and_unknown_parameter_a_warning(source: FhirFileSource) -> None:
    with pytest.raises(BadRequest) as caught:
        source.search("Observation", [("date", "ge2015-13-45")])
    assert caught.value.expression == "date" and "ge2015-13-45" in caught.value.message
    everything = source.search("Condition", [])
    ignored = source.search("Condition", [("_content", "diabetes"), ("_content", "again"), ("_count", "5")])
    assert len(ignored.resources) == len(everything.resources) == 15 + 555
    assert [o.expression for o in ignored.outcomes] == [("_content",)]
    assert ignored.outcomes[0].severity == "warning" and "ignored" in ignored.outcomes[0].diagnostics


def test_limit_warns_and_results_are_copies(source: FhirFileSource) -> None:
    capped = source.search("DocumentReference", [], limit=7)
    assert len(capped.resources) == len(capped.full_urls) == 7
    assert capped.outcomes[0].code == "incomplete" and "stopped at 7 resources" in capped.outcomes[0].diagnostics
    exact = source.search("Condition", [("patient", _bundle_resources("Patient")[0]["id"])], limit=15)
    assert len(exact.resources) == 15 and exact.outcomes == []  # exactly at the cap: no warning
    capped.resources[0]["status"] = "changed"
    assert source.read("DocumentReference", capped.resources[0]["id"])["status"] != "changed"


def test_bad_files_and_lines_are_skipped_without_logging_content(tmp_path: Path,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    good = _bulk("Condition")[:3]
    lines = [json.dumps(good[0]), "{not json SECRET-LINE", json.dumps(good[1]), '{"no": "type"}', "",
             json.dumps(good[2])]
    (tmp_path / "Condition.ndjson").write_text("\n".join(lines))
    (tmp_path / "broken.json").write_text('{"resourceType": "Patient", "name": "SECRET-FILE"')
    (tmp_path / "notfhir.json").write_text('{"hello": "world"}')
    (tmp_path / "readme.txt").write_text("ignored")
    with caplog.at_level(logging.DEBUG, logger="adapter.fhir.files"):
        loaded = FhirFileSource(tmp_path)
    assert loaded.count() == loaded.count("Condition") == 3
    assert [r["id"] for r in loaded.search("Condition", []).resources] == [g["id"] for g in good]
    text = caplog.text
    assert "broken.json" in text and "line 2" in text and "line 4" in text and "notfhir.json" in text
    assert "SECRET" not in text


def test_binary_attachment_patients_and_settings(tmp_path: Path) -> None:
    hl7 = FIXTURES / "hl7-r4-examples"
    for name in ("Binary-f006.json", "Patient-example.json", "Observation-f001.json", "Patient-f001.json"):
        shutil.copy(hl7 / name, tmp_path / name)
    loaded = FhirFileSource.from_settings(load_settings({"fhir_data": str(tmp_path)}, env={}))
    raw = json.loads((hl7 / "Binary-f006.json").read_text())
    assert loaded.fetch_attachment("Binary/f006") == (raw["contentType"], base64.b64decode(raw["data"]))
    assert loaded.fetch_attachment("Binary/missing") is None
    assert loaded.fetch_attachment("http://elsewhere.example/Binary/f006") is None
    small = FhirFileSource(tmp_path, max_attachment_bytes=1000)
    assert small.fetch_attachment("Binary/f006") is None
    assert loaded.patients() == ["f001", "example"]  # f001 has an Observation
    assert loaded.patient_exists("example") and loaded.patient_exists("Patient/f001")
    assert not loaded.patient_exists("nobody")
    assert loaded.read("Observation", "f001")["subject"]["reference"] == "Patient/f001"
    assert loaded.read("Observation", "nope") is None


def test_whole_fixture_folder_loads(caplog: pytest.LogCaptureFixture) -> None:
    expected: set[tuple[str, str]] = set()
    for path in FIXTURES.rglob("*.json"):
        data = json.loads(path.read_text())
        entries = data.get("entry", []) if data["resourceType"] == "Bundle" else [{"resource": data}]
        for entry in (e for e in entries if "resource" in e):  # POSTed entries: id from urn:uuid
            rid = entry["resource"].get("id") or entry.get("fullUrl", "").removeprefix("urn:uuid:")
            expected.add((entry["resource"]["resourceType"], rid))
    for path in FIXTURES.rglob("*.ndjson"):
        expected |= {(r["resourceType"], r["id"]) for r in map(json.loads, path.read_text().splitlines())}
    with caplog.at_level(logging.INFO, logger="adapter.fhir.files"):
        everything = FhirFileSource(FIXTURES)
    assert everything.count() == len(expected)
    assert everything.count("DocumentReference") == len({e for e in expected if e[0] == "DocumentReference"})
    assert "loaded" in caplog.text
    with pytest.raises(ValueError, match="does not exist"):
        FhirFileSource(FIXTURES / "no-such-folder")
