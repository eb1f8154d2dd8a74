"""Flattening FHIR R4 resources to text: every HL7 example, decoded attachments, odd data."""
from __future__ import annotations

import base64
import json
import logging
from pathlib import Path

import pytest

from adapter.fhir.attachments import MAX_ATTACHMENT_CHARS
from adapter.fhir.flatten import flatten_documents, flatten_resource, validation_problems
from adapter.models import RESOURCE_TYPES

FIXTURES = Path(__file__).resolve().parent.parent / "fhir_fixtures"
HL7 = FIXTURES / "hl7-r4-examples"


def _hl7_examples() -> list[tuple[str, dict]]:
    """(label, resource) for every ranked-type resource in the HL7 examples, Bundles included."""
    found = []
    for path in sorted(HL7.glob("*.json")):
        data = json.loads(path.read_text())
        if data["resourceType"] == "Bundle":
            for i, entry in enumerate(data.get("entry", [])):
                res = entry.get("resource", {})
                if res.get("resourceType") in RESOURCE_TYPES:
                    found.append((f"{path.stem}#{i}", res))
        elif data["resourceType"] in RESOURCE_TYPES:
            found.append((path.stem, data))
    return found


HL7_EXAMPLES = _hl7_examples()


def _hl7(name: str) -> dict:
    return json.loads((HL7 / f"{name}.json").read_text())


def _b64(text: str) -> str:
    return base64.b64encode(text.encode("utf-8")).decode("ascii")


def _docref(attachment: dict, **extra) -> dict:
    return {"resourceType": "DocumentReference", "id": "doc1", "status": "current",
            "content": [{"attachment": attachment}], **extra}


def test_the_examples_cover_all_three_types_single_files_and_bundles() -> None:
    types = {res["resourceType"] for _, res in HL7_EXAMPLES}
    assert types == set(RESOURCE_TYPES)
    assert any("#" in label for label, _ in HL7_EXAMPLES)  # found inside Bundles too
    assert len(HL7_EXAMPLES) > 200


@pytest.mark.parametrize("label,resource", HL7_EXAMPLES, ids=[lbl for lbl, _ in HL7_EXAMPLES])
def test_every_hl7_example_flattens_to_text_and_validates_as_r4(label: str, resource: dict) -> None:
    text = flatten_resource(resource)
    first = text.split("\n")[0]
    assert first.startswith(resource["resourceType"])
    assert len(text.split("\n")) >= 2, text  # more than the header
    # R4B accepts R4 examples (R5 would reject DocumentReference.context and others)
    assert validation_problems(resource) == []


def test_blood_pressure_has_both_components_with_units() -> None:
    text = flatten_resource(_hl7("Observation-blood-pressure"))
    lines = text.split("\n")
    assert lines[0] == "Observation: Blood pressure systolic & diastolic"
    assert "LOINC 85354-9" in lines[1]
    systolic = next(line for line in lines if "Systolic blood pressure" in line)
    diastolic = next(line for line in lines if "Diastolic blood pressure" in line)
    assert systolic.startswith("Component: ") and "107 mmHg (mm[Hg])" in systolic
    assert "LOINC 8480-6" in systolic and "interpretation: Normal" in systolic
    assert diastolic.startswith("Component: ") and "60 mmHg (mm[Hg])" in diastolic
    assert "Body site: Right arm (SNOMED CT 368209003)" in lines
    assert "Effective: 2012-09-17" in lines
    assert "Generated Narrative" not in text  # narrative skipped when there is content


def test_quantity_value_interpretation_and_reference_range() -> None:
    lines = flatten_resource(_hl7("Observation-f001")).split("\n")
    assert "Value: 6.3 mmol/l" in lines  # code mmol/L only differs in case: not repeated
    assert "Interpretation: High" in lines
    assert "Reference range: 3.1 mmol/l to 6.2 mmol/l" in lines
    assert "Performer: A. Langeveld" in lines
    assert not any("Practitioner/" in line for line in lines)  # reference ids are not text


def test_condition_statuses_onset_and_abatement() -> None:
    lines = flatten_resource(_hl7("Condition-f201")).split("\n")
    assert lines[0] == "Condition: Fever"
    assert "Clinical status: resolved" in lines
    assert "Verification status: confirmed" in lines
    assert "Onset: 2013-04-02" in lines
    assert "Abatement: around April 9, 2013" in lines
    assert "Severity: Mild (SNOMED CT 255604002)" in lines
    assert any(line.startswith("Evidence: ") and "Temperature" in line for line in lines)


def test_sampled_data_is_summarised_not_dumped() -> None:
    resource = _hl7("Observation-ekg")
    text = flatten_resource(resource)
    samples = resource["component"][0]["valueSampledData"]["data"]
    assert f"{len(samples.split())} samples" in text and "every 10 ms" in text
    assert samples[:40] not in text


def test_synthea_bulk_note_is_decoded() -> None:
    path = FIXTURES / "synthea-bulk" / "DocumentReference.000.ndjson"
    with path.open() as lines:
        resource = json.loads(next(lines))
    data = resource["content"][0]["attachment"]["data"]
    note = base64.b64decode(data).decode("utf-8")
    text = flatten_resource(resource)
    assert text.startswith("DocumentReference: ")
    assert "Category: Clinical Note" in text
    assert data[:60] not in text  # the base64 itself is not the text
    for line in [ln.strip() for ln in note.splitlines() if len(ln.strip()) > 20][:5]:
        assert line in text


def test_html_attachment_is_stripped() -> None:
    page = ("<html><head><title>t</title><style>p {color: red}</style></head><body>"
            "<h1>Discharge summary</h1><script>alert('x')</script>"
            "<p>Aspirin 81&nbsp;mg &amp; statin</p><ul><li>Follow up in 2 weeks</li></ul></body></html>")
    text = flatten_resource(_docref({"contentType": "text/html; charset=utf-8", "data": _b64(page)}))
    assert "Discharge summary" in text and "Aspirin 81 mg & statin" in text
    assert "Follow up in 2 weeks" in text
    assert "<" not in text and "alert" not in text and "color" not in text


def test_markdown_and_charset_attachments_are_decoded() -> None:
    markdown = "# Plan\n\n- **Metformin** 500 mg, see [guide](http://x.example/g)\n"
    text = flatten_resource(_docref({"contentType": "text/markdown", "data": _b64(markdown)}))
    assert "Plan\nMetformin 500 mg, see guide" in text
    latin = base64.b64encode("Café crème".encode("latin-1")).decode()
    text = flatten_resource(_docref({"contentType": "text/plain; charset=ISO-8859-1", "data": latin}))
    assert "Café crème" in text


def test_binary_attachment_is_named_not_decoded() -> None:
    pdf = base64.b64encode(b"%PDF-1.4\x00\x01" * 10).decode()
    text = flatten_resource(_docref({"contentType": "application/pdf", "data": pdf, "size": 12288}))
    assert "[attachment application/pdf, 12 kB, not decoded]" in text
    assert "%PDF" not in text


def test_invalid_base64_is_named_not_raised() -> None:
    text = flatten_resource(_docref({"contentType": "text/plain", "data": "!!not base64!!"}))
    assert "[attachment text/plain, invalid base64, not decoded]" in text


def test_url_attachment_uses_the_loader() -> None:
    bundle = _hl7("Bundle-xds")
    docref = next(e["resource"] for e in bundle["entry"]
                  if e["resource"]["resourceType"] == "DocumentReference")
    binaries = {e["fullUrl"]: e["resource"] for e in bundle["entry"]
                if e["resource"]["resourceType"] == "Binary"}
    asked = []

    def load_binary(url: str) -> tuple[str, bytes] | None:
        asked.append(url)
        binary = binaries.get(url) or next((b for u, b in binaries.items()
                                            if url.endswith(b["id"])), None)
        return (binary["contentType"], base64.b64decode(binary["data"])) if binary else None

    text = flatten_resource(docref, attachment_loader=load_binary)
    assert asked == [docref["content"][0]["attachment"]["url"]]
    assert "asdasdasdasdasd" in text
    assert "[attachment text/plain at a url, not loaded]" in flatten_resource(docref)

    def broken_loader(url: str) -> tuple[str, bytes] | None:
        raise OSError("connection refused")

    assert "could not be loaded" in flatten_resource(docref, attachment_loader=broken_loader)


def test_attachment_text_is_capped() -> None:
    big = "word " * (MAX_ATTACHMENT_CHARS // 2)
    text = flatten_resource(_docref({"contentType": "text/plain", "data": _b64(big)}))
    assert MAX_ATTACHMENT_CHARS < len(text) < MAX_ATTACHMENT_CHARS + 500
    assert "attachment text cut" in text


def test_odd_resource_still_flattens_and_is_reported_lenient(caplog) -> None:
    odd = {
        "resourceType": "Observation", "id": "odd-1", "status": ["final"],  # wrong type
        "category": "laboratory",  # a string where a list of CodeableConcepts belongs
        "valueQuantity": {"value": "7.5", "unit": "%"},  # decimal as a string
        "triggeredBy": [{"observation": {"display": "Earlier HbA1c"}, "type": "reflex"}],  # R5
        "futureField": {"text": "Something new"},  # unknown
        "component": {"code": {"text": "Lone component"}, "valueString": "present"},
        "note": "not a list", "interpretation": [None, 3, {"coding": "nope"}],
        "content": [{"attachment": {"contentType": "text/plain", "data": "!!not base64!!"}}],
        # no `code` at all
    }
    with caplog.at_level(logging.INFO):
        text = flatten_resource(odd)
        docs, outcomes = flatten_documents([odd])
    lines = text.split("\n")
    assert lines[0] == "Observation"
    assert "Value: 7.5 %" in lines and "Category: laboratory" in lines
    assert "Triggered by: Earlier HbA1c; reflex" in lines
    assert "Future field: Something new" in lines
    assert "Component: Lone component = present" in lines
    assert "Note: not a list" in lines
    assert [d.id for d in docs] == ["Observation/odd-1"] and docs[0].text == text
    lenient = [o for o in outcomes if o.severity == "information"]
    assert len(lenient) == 1 and "Observation/odd-1" in lenient[0].diagnostics
    assert "HbA1c" not in caplog.text and "Something new" not in caplog.text  # no content in logs


def test_r5_shaped_resources_keep_their_content() -> None:
    r5_doc = {"resourceType": "DocumentReference", "id": "r5", "status": "current",
              "context": [{"reference": "Encounter/1"}],  # R5: a list of references
              "event": [{"concept": {"text": "Colonoscopy"}}], "modality": [{"text": "Endoscopy"}],
              "content": [{"attachment": {"contentType": "text/plain", "data": _b64("Polyp removed")},
                           "profile": [{"valueCoding": {"display": "Plain text"}}]}]}
    assert flatten_resource(r5_doc).split("\n") == [
        "DocumentReference", "Status: current", "Event: Colonoscopy", "Modality: Endoscopy",
        "Polyp removed"]  # attachment text stays last, after unknown fields
    r5_condition = {"resourceType": "Condition", "id": "c5", "code": {"text": "Asthma"},
                    "clinicalStatus": {"coding": [{"code": "active"}]},
                    "participant": [{"function": {"text": "Informant"},
                                     "actor": {"reference": "Practitioner/1", "display": "Dr. Who"}}],
                    "evidence": [{"concept": {"text": "Wheezing"}}]}
    lines = flatten_resource(r5_condition).split("\n")
    assert "Evidence: Wheezing" in lines and "Participant: Informant; Dr. Who" in lines
    docs, outcomes = flatten_documents([r5_doc, r5_condition])
    assert [d.id for d in docs] == ["DocumentReference/r5", "Condition/c5"]
    assert "2 resource(s)" in outcomes[-1].diagnostics  # R4B rejects both: read leniently


@pytest.mark.parametrize("junk", [None, [], "Observation", {"resourceType": 5},
                                  {"resourceType": "Observation", "code": {"coding": [[{}]]}},
                                  {"resourceType": "Condition", "onsetAge": [1, 2], "stage": "x"}])
def test_junk_never_raises(junk) -> None:
    assert isinstance(flatten_resource(junk), str)


def test_narrative_is_used_only_when_nothing_else() -> None:
    bare = {"resourceType": "Condition", "id": "c1", "status": "x",
            "text": {"status": "generated", "div": "<div><p>Asthma, mild</p><script>x()</script></div>"}}
    assert flatten_resource(bare) == "Condition\nStatus: x\nNarrative: Asthma, mild"


def test_flatten_documents_ids_urls_and_skips() -> None:
    bundle = json.loads((FIXTURES / "synthea-r4-bundles").glob("Janene_*.json").__next__().read_text())
    resources = [e["resource"] for e in bundle["entry"]]
    urls = [e["fullUrl"] for e in bundle["entry"]]
    docs, outcomes = flatten_documents(resources, full_urls=urls)
    ranked = [r for r in resources if r["resourceType"] in RESOURCE_TYPES]
    assert [d.id for d in docs] == [f"{r['resourceType']}/{r['id']}" for r in ranked]
    assert all(d.text and d.resource is r for d, r in zip(docs, ranked))
    assert docs[0].full_url == urls[resources.index(ranked[0])]
    skipped = [o for o in outcomes if o.code == "not-supported"]
    assert len(skipped) == len(resources) - len(ranked)
    assert all(o.severity == "warning" for o in skipped)
    patient = next(r for r in resources if r["resourceType"] == "Patient")
    family = patient["name"][0]["family"]
    assert f"Patient/{patient['id']}" in " ".join(o.diagnostics for o in skipped)
    assert not any(family in o.diagnostics for o in outcomes)  # no patient data in outcomes
    assert not any(o.severity == "information" for o in outcomes)  # all valid R4


def test_flatten_documents_skips_missing_ids_and_repeats() -> None:
    obs = _hl7("Observation-f001")
    no_id = {k: v for k, v in obs.items() if k != "id"}
    docs, outcomes = flatten_documents([obs, no_id, obs, {"foo": 1}])
    assert [d.id for d in docs] == ["Observation/f001"]
    assert [o.code for o in outcomes] == ["incomplete", "duplicate", "not-supported"]
    assert "an Observation without an id" in outcomes[0].diagnostics


def test_resources_without_meta_are_cached_by_content() -> None:
    """File sources and servers without meta: the same content is flattened once; a changed
    resource under the same id gets its own text, never the old one."""
    from adapter.runtime import Caches

    caches = Caches(100)
    cache = caches.flattened
    cond = {"resourceType": "Condition", "id": "nometa-1",
            "code": {"text": "Chronic sinusitis"}, "subject": {"reference": "Patient/p"}}
    first, _ = flatten_documents([cond], validate=False, caches=caches)
    cached = len(cache)
    assert cached == 1
    again, _ = flatten_documents([json.loads(json.dumps(cond))], validate=False, caches=caches)
    assert len(cache) == cached and again[0].text == first[0].text
    changed = dict(cond, code={"text": "Acute bronchitis"})
    third, _ = flatten_documents([changed], validate=False, caches=caches)
    assert "bronchitis" in third[0].text.lower() and "sinusitis" not in third[0].text.lower()
    assert len(cache) == cached + 1
    flatten_documents([changed], validate=False)  # no caches given: nothing is kept
    assert len(cache) == cached + 1 and len(Caches(0).flattened) == 0
    # R4B problems are cached per version too, starting from an empty cache
    flatten_documents([cond, dict(changed, id="nometa-2")], validate=True, caches=caches)
    assert len(caches.problems) == 2
