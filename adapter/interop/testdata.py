"""The kit's synthetic test patient, built in code (no real person; every run gets a new tag).

36 Observations, 12 Conditions and 8 DocumentReferences, spread over two years, categories and
statuses so each filter scenario has a known subset to expect. Three notes carry made-up
marker words found nowhere else: one as a `Binary` fetched by URL, one as base64 `data`, and
one note (≈ 10,000 tokens) longer than the reranker's default `max_length`, scored as chunks.
"""
from __future__ import annotations

import base64
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

TAG_SYSTEM = "urn:fhir-rerank:interop"
LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
OBS_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
COND_CATEGORY = "http://terminology.hl7.org/CodeSystem/condition-category"
COND_CLINICAL = "http://terminology.hl7.org/CodeSystem/condition-clinical"
DOC_CATEGORY = "http://hl7.org/fhir/us/core/CodeSystem/us-core-documentreference-category"

#: Made-up words, each only in one note: they prove that note's text reached the ranking.
URL_MARKER, BASE64_MARKER, LONG_MARKER = "zorbelium", "quintavex", "marathonic"

_OBSERVATIONS = [  # (LOINC code, display, category, value, unit)
    ("4548-4", "Hemoglobin A1c/Hemoglobin.total in Blood", "laboratory", 7.2, "%"),
    ("2339-0", "Glucose [Mass/volume] in Blood", "laboratory", 110, "mg/dL"),
    ("8867-4", "Heart rate", "vital-signs", 72, "/min"),
    ("8480-6", "Systolic blood pressure", "vital-signs", 128, "mm[Hg]"),
    ("29463-7", "Body weight", "vital-signs", 81, "kg"),
    ("2093-3", "Cholesterol [Mass/volume] in Serum or Plasma", "laboratory", 190, "mg/dL"),
]
_CONDITIONS = [  # (SNOMED code, display)
    ("195967001", "Asthma"), ("59621000", "Essential hypertension"),
    ("16114001", "Fracture of ankle"), ("44054006", "Type 2 diabetes mellitus"),
    ("55822004", "Hyperlipidemia"), ("37796009", "Migraine"),
    ("235595009", "Gastroesophageal reflux disease"), ("239873007", "Osteoarthritis of knee"),
    ("10509002", "Acute bronchitis"), ("36971009", "Sinusitis"), ("271737000", "Anemia"),
    ("414916001", "Obesity"),
]
_NOTE_TYPES = [("11506-3", "Progress note"), ("11488-4", "Consult note"),
               ("18842-5", "Discharge summary")]
_SHORT_NOTES = [
    f"Wheezing and shortness of breath at night; asthma inhaler refilled. {BASE64_MARKER}.",
    None,  # the Binary, fetched by URL
    None,  # the long note
    "Knee pain on stairs, worse in the morning; physiotherapy referral for osteoarthritis.",
    "Discharged after an ankle fracture; cast for six weeks, crutches, follow up in clinic.",
    "Superseded draft: blood pressure review, lifestyle advice given.",
    "Heartburn after meals improved on a proton pump inhibitor.",
    "Headaches twice a month with aura; migraine diary started.",
]
BINARY_TEXT = (f"Cardiology consult: palpitations on exertion, {URL_MARKER} pattern on the "
               "ambulatory ECG, no syncope. Echo normal. Plan: beta blocker, review in 3 months.")
_LONG_SENTENCES = [
    "The patient reports intermittent chest tightness after climbing two flights of stairs.",
    "Home blood pressure readings ranged from 128 to 146 systolic over the past fortnight.",
    "Medication reconciliation confirmed adherence to the inhaled corticosteroid.",
    "Diet history shows high sodium intake; counselling on salt reduction was provided.",
    "Sleep is fragmented by nocturnal cough two or three nights a week.",
    "No fever, weight loss or night sweats; appetite preserved.",
    "Examination: scattered expiratory wheeze, no crackles, heart sounds normal.",
]


def _b64(text: str) -> str:
    return base64.b64encode(text.encode("utf-8")).decode("ascii")


def long_note_text(sentences: int = 700) -> str:
    """A note of ≈ 10,000 Qwen tokens: over the reranker's default max_length of 8,192."""
    body = " ".join(_LONG_SENTENCES[i % len(_LONG_SENTENCES)] for i in range(sentences))
    return f"Annual review ({LONG_MARKER}). {body}"


@dataclass
class TestRecord:
    """The transaction Bundle plus the truth the scenarios check the server's answers against."""

    tag: str
    bundle: dict[str, Any]
    resources: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # type -> resources
    markers: dict[str, int] = field(default_factory=dict)  # marker word -> DocumentReference index

    def expected(self, rtype: str, keep: Callable[[dict[str, Any]], bool]) -> list[int]:
        """Indexes (in `resources[rtype]`) of the resources a filter should keep."""
        return [i for i, r in enumerate(self.resources[rtype]) if keep(r)]


def _meta(tag: str) -> dict[str, Any]:
    return {"tag": [{"system": TAG_SYSTEM, "code": tag}]}


def new_tag() -> str:
    """A fresh tag for one run's test patient (its identifier and every resource's meta.tag)."""
    return f"interop-{uuid.uuid4().hex[:12]}"


def build_test_record(binary_url: str, tag: str) -> TestRecord:
    """The transaction Bundle for a new test patient; `binary_url` is the note fetched by URL."""
    patient_ref = f"urn:uuid:{uuid.uuid4()}"
    subject = {"reference": patient_ref}
    record = TestRecord(tag, {}, {"Observation": [], "Condition": [], "DocumentReference": []})
    entries = [{"fullUrl": patient_ref, "request": {"method": "POST", "url": "Patient"},
                "resource": {"resourceType": "Patient", "meta": _meta(tag),
                             "identifier": [{"system": TAG_SYSTEM, "value": tag}],
                             "name": [{"family": "Interop", "given": ["Synthetic"]}],
                             "gender": "unknown", "birthDate": "1970-01-01"}}]

    def add(resource: dict[str, Any]) -> None:
        resource["meta"] = _meta(tag)
        record.resources[resource["resourceType"]].append(resource)
        entries.append({"fullUrl": f"urn:uuid:{uuid.uuid4()}", "resource": resource,
                        "request": {"method": "POST", "url": resource["resourceType"]}})

    for i in range(36):
        code, display, category, value, unit = _OBSERVATIONS[i % len(_OBSERVATIONS)]
        add({"resourceType": "Observation", "status": "amended" if i % 9 == 4 else "final",
             "category": [{"coding": [{"system": OBS_CATEGORY, "code": category}]}],
             "code": {"coding": [{"system": LOINC, "code": code, "display": display}],
                      "text": display},
             "subject": subject,
             "effectiveDateTime": f"{2023 + i // 18}-{1 + i % 12:02d}-{1 + i % 28:02d}T09:00:00Z",
             "valueQuantity": {"value": value + i % 5, "unit": unit,
                               "system": "http://unitsofmeasure.org", "code": unit}})
    for i, (code, display) in enumerate(_CONDITIONS):
        status = "resolved" if i % 3 == 2 else "active"
        category = "problem-list-item" if i % 2 == 0 else "encounter-diagnosis"
        add({"resourceType": "Condition",
             "clinicalStatus": {"coding": [{"system": COND_CLINICAL, "code": status}]},
             "category": [{"coding": [{"system": COND_CATEGORY, "code": category}]}],
             "code": {"coding": [{"system": SNOMED, "code": code, "display": display}],
                      "text": display},
             "subject": subject, "onsetDateTime": f"{2012 + i}-03-15"})
    for i, text in enumerate(_SHORT_NOTES):
        type_code, type_display = _NOTE_TYPES[i % len(_NOTE_TYPES)]
        if i == 1:
            attachment = {"contentType": "text/plain", "url": binary_url}
            record.markers[URL_MARKER] = i
        elif i == 2:
            attachment = {"contentType": "text/plain", "data": _b64(long_note_text())}
            record.markers[LONG_MARKER] = i
        else:
            attachment = {"contentType": "text/plain", "data": _b64(text or "")}
        if i == 0:
            record.markers[BASE64_MARKER] = i
        add({"resourceType": "DocumentReference",
             "status": "superseded" if i == 5 else "current",
             "type": {"coding": [{"system": LOINC, "code": type_code, "display": type_display}],
                      "text": type_display},
             "category": [{"coding": [{"system": DOC_CATEGORY, "code": "clinical-note"}]}]
             if i % 4 != 3 else [],
             "subject": subject, "date": f"{2023 + i // 4}-0{1 + i % 9}-10T12:00:00Z",
             "content": [{"attachment": attachment}]})
    record.bundle = {"resourceType": "Bundle", "type": "transaction", "entry": entries}
    return record


def binary_resource(tag: str) -> dict[str, Any]:
    """The Binary a DocumentReference points at by URL."""
    return {"resourceType": "Binary", "meta": _meta(tag), "contentType": "text/plain",
            "data": _b64(BINARY_TEXT)}


def _coded(concepts: Any, code: str) -> bool:
    concepts = concepts if isinstance(concepts, list) else [concepts]
    return any(c.get("code") == code for concept in concepts if isinstance(concept, dict)
               for c in concept.get("coding") or [])


#: Per type: (parameter, value, which of our resources it should keep). The truth comes from
#: the data above, never from the server.
FILTER_CASES: dict[str, list[tuple[str, str, Callable[[dict[str, Any]], bool]]]] = {
    "Observation": [
        ("date", "ge2024-01-01", lambda r: r["effectiveDateTime"] >= "2024"),
        ("code", f"{LOINC}|4548-4", lambda r: _coded(r["code"], "4548-4")),
        ("category", "vital-signs", lambda r: _coded(r["category"], "vital-signs")),
        ("status", "amended", lambda r: r["status"] == "amended"),
    ],
    "Condition": [
        ("onset-date", "ge2018-01-01", lambda r: r["onsetDateTime"] >= "2018"),
        ("code", f"{SNOMED}|195967001", lambda r: _coded(r["code"], "195967001")),
        ("category", "encounter-diagnosis", lambda r: _coded(r["category"], "encounter-diagnosis")),
        ("clinical-status", "resolved", lambda r: _coded(r["clinicalStatus"], "resolved")),
    ],
    "DocumentReference": [
        ("date", "ge2024-01-01", lambda r: r["date"] >= "2024"),
        ("type", f"{LOINC}|11488-4", lambda r: _coded(r["type"], "11488-4")),
        ("category", "clinical-note", lambda r: _coded(r["category"], "clinical-note")),
        ("status", "superseded", lambda r: r["status"] == "superseded"),
    ],
}
