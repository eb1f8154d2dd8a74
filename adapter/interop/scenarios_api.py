"""Scenarios about the adapter's API on this server: Authorization, attachments, `$rerank`
GET and POST, the FHIR async pattern, and the model path (tiny Qwen3 checkpoint).

Each function takes the `InteropContext` and returns a note (pass), or raises
`ScenarioSkipped` / `ScenarioFailed` with the reason.
"""
from __future__ import annotations

import time
import uuid
from urllib.parse import urlsplit

from adapter.interop.context import (AdapterAnswer, InteropContext, ScenarioFailed,
                                     ScenarioSkipped, resource_ids)
from adapter.interop.loader import LoadedPatient
from adapter.interop.testdata import BASE64_MARKER, LONG_MARKER, URL_MARKER
from adapter.models import RESOURCE_TYPES

ASYNC_WAIT_S = 60.0


def _server_requires_auth(ctx: InteropContext, patient: LoadedPatient) -> bool:
    """Whether the server refuses a read without credentials (probed once)."""
    if ctx.server_requires_auth is None:
        response = ctx.call.get(f"Patient/{patient.patient_id}", auth=False)
        ctx.server_requires_auth = response.status_code in (401, 403)
        ctx.profile.auth = (f"reads without credentials answer {response.status_code}"
                            + ("" if ctx.server_requires_auth else " (no auth enforced)"))
        if response.status_code == 401 and "WWW-Authenticate" not in response.headers:
            ctx.finding("401-without-www-authenticate", "the server answers 401 without a "
                        "WWW-Authenticate header; the adapter passes the 401 on without one")
    return ctx.server_requires_auth


def _auth_search(ctx: InteropContext, patient: LoadedPatient, auth: bool | str) -> AdapterAnswer:
    return ctx.adapter_get("/fhir/Condition", [("patient", patient.patient_id),
                                               ("_content", "asthma")], auth=auth)


def auth_pass_through(ctx: InteropContext) -> str:
    patient = ctx.need_patient()
    if not ctx.authorization:
        _server_requires_auth(ctx, patient)
        raise ScenarioSkipped("no --token given and the server reads without one")
    if not _server_requires_auth(ctx, patient):
        raise ScenarioSkipped("the server answers without credentials, so pass-through "
                              "cannot be observed")
    answer = _auth_search(ctx, patient, True)
    if answer.status != 200:
        raise ScenarioFailed(f"with the token the adapter answered {answer.status} "
                             f"({answer.issue()})")
    return "the server needs a token; the adapter's upstream calls carried the caller's"


def _auth_refused(ctx: InteropContext, auth: bool | str, what: str) -> str:
    patient = ctx.need_patient()
    if not _server_requires_auth(ctx, patient):
        raise ScenarioSkipped("the server has no auth (reads without credentials succeed)")
    answer = _auth_search(ctx, patient, auth)
    code = (answer.body.get("issue") or [{}])[0].get("code")
    if answer.status not in (401, 403) or code not in ("security", "login", "forbidden"):
        raise ScenarioFailed(f"{what}: expected 401/403 passed through as an "
                             f"OperationOutcome, got {answer.status} ({answer.issue()})")
    www = "with" if "WWW-Authenticate" in answer.headers else "without"
    return f"{what}: {answer.status} {code} OperationOutcome, {www} WWW-Authenticate"


def auth_missing_token(ctx: InteropContext) -> str:
    return _auth_refused(ctx, False, "no Authorization")


def auth_wrong_token(ctx: InteropContext) -> str:
    return _auth_refused(ctx, f"Bearer interop-wrong-{uuid.uuid4().hex}", "a wrong token")


def _marker_first(ctx: InteropContext, marker: str, what: str) -> str:
    patient = ctx.need_patient()
    answer = ctx.adapter_get("/fhir/DocumentReference", [("patient", patient.patient_id),
                                                         ("_content", marker)])
    matches = answer.matches()
    if answer.status != 200 or not matches:
        raise ScenarioFailed(f"the adapter answered {answer.status} ({answer.issue()})")
    scores = [e["search"]["score"] for e in matches]
    ranked_first = resource_ids(matches)[0] == patient.marker_id(marker)
    if not ranked_first or (len(scores) > 1 and scores[0] <= scores[1]):
        raise ScenarioFailed(f"{what} not read: a word found only there did not put its "
                             "DocumentReference first")
    return f"{what} read: its DocumentReference ranks first for a word found only there"


def attachment_by_url(ctx: InteropContext) -> str:
    return _marker_first(ctx, URL_MARKER, "the Binary attachment (by URL)")


def attachment_base64(ctx: InteropContext) -> str:
    return _marker_first(ctx, BASE64_MARKER, "the base64 attachment")


def _all_ids(patient: LoadedPatient, types: tuple[str, ...] = RESOURCE_TYPES) -> set[str]:
    return {rid for t in types for rid in patient.ids[t]}


def rerank_get(ctx: InteropContext) -> str:
    """GET Patient/<id>/$rerank over the three types, paged by the adapter's next links."""
    patient = ctx.need_patient()
    first, entries = ctx.adapter_all_pages(
        f"/fhir/Patient/{patient.patient_id}/$rerank",
        [("query", "asthma inhaler wheezing"), ("_count", "10"), ("recall", "200")])
    want, got = _all_ids(patient), resource_ids(entries)
    types = {e["resource"]["resourceType"] for e in entries}
    if first.body.get("total") != len(want) or set(got) != want or len(got) != len(set(got)):
        raise ScenarioFailed(f"expected {len(want)} distinct resources over the pages, got "
                             f"{len(set(got))} distinct of {len(got)} (total "
                             f"{first.body.get('total')})")
    if types != set(RESOURCE_TYPES):
        raise ScenarioFailed(f"the ranking holds only {', '.join(sorted(types))}")
    return f"{len(want)} resources of 3 types over {-(-len(got) // 10)} pages of 10"


def rerank_post(ctx: InteropContext) -> str:
    """POST $rerank with a Parameters body naming the patient and two types."""
    patient = ctx.need_patient()
    body = {"resourceType": "Parameters", "parameter": [
        {"name": "query", "valueString": "ankle fracture discharge"},
        {"name": "patient", "valueReference": {"reference": f"Patient/{patient.patient_id}"}},
        {"name": "_type", "valueString": "Condition,DocumentReference"},
        {"name": "_count", "valueInteger": 100}]}
    answer = ctx.adapter_request("POST", "/fhir/$rerank", body=body)
    if answer.status != 200:
        raise ScenarioFailed(f"the adapter answered {answer.status} ({answer.issue()})")
    want = _all_ids(patient, ("Condition", "DocumentReference"))
    got = set(resource_ids(answer.matches()))
    if got != want:
        raise ScenarioFailed(f"expected the {len(want)} Conditions and DocumentReferences, got "
                             f"{len(got & want)} of them and {len(got - want)} others")
    return f"{len(want)} Conditions and DocumentReferences from a Parameters body"


def async_pattern(ctx: InteropContext) -> str:
    """Prefer: respond-async → 202 + Content-Location → poll → 200 Bundle; DELETE → 202, 404."""
    patient = ctx.need_patient()
    start = ctx.adapter_get(f"/fhir/Patient/{patient.patient_id}/$rerank",
                            [("query", "blood pressure"), ("_count", "5")],
                            headers={"Prefer": "respond-async"})
    location = start.headers.get("Content-Location")
    if start.status != 202 or not location:
        raise ScenarioFailed(f"expected 202 + Content-Location, got {start.status}")
    poll_path = urlsplit(location).path
    deadline, polls, answer = time.monotonic() + ASYNC_WAIT_S, 0, start
    while time.monotonic() < deadline:
        answer = ctx.adapter_get(poll_path)
        polls += 1
        if answer.status != 202:
            break
        time.sleep(min(float(answer.headers.get("Retry-After", "1")), 0.2))
    if answer.status != 200 or answer.body.get("type") != "searchset":
        raise ScenarioFailed(f"polling ended with {answer.status} ({answer.issue()})")
    if answer.body.get("total") != patient.total:
        raise ScenarioFailed(f"the polled Bundle has total {answer.body.get('total')}, "
                             f"expected {patient.total}")
    cancel = ctx.adapter_request("DELETE", poll_path)
    after = ctx.adapter_get(poll_path)
    if cancel.status != 202 or after.status != 404:
        raise ScenarioFailed(f"DELETE answered {cancel.status} and the next poll {after.status} "
                             "(expected 202, then 404)")
    return f"202 → {polls} poll(s) → 200 Bundle; DELETE 202, then 404"


def _model_settings(ctx: InteropContext) -> dict[str, str]:
    if not ctx.model_dir:
        raise ScenarioSkipped(ctx.model_problem or "no reranker checkpoint")
    return {"reranker": "qwen3", "model": ctx.model_dir, "device": "cpu",
            "reranker_required": True}


def model_rerank(ctx: InteropContext) -> str:
    """$rerank through the Qwen3 engine (tiny random weights): every resource scored."""
    patient = ctx.need_patient()
    answer = ctx.adapter_get(f"/fhir/Patient/{patient.patient_id}/$rerank",
                             [("query", "asthma"), ("_count", "200"), ("recall", "200")],
                             **_model_settings(ctx))
    if answer.status != 200:
        raise ScenarioFailed(f"the adapter answered {answer.status} ({answer.issue()})")
    scores = [e["search"]["score"] for e in answer.matches()]
    if len(scores) != patient.total or any(not 0 <= s <= 1 for s in scores):
        raise ScenarioFailed(f"{len(scores)} scores for {patient.total} resources, or a score "
                             "outside [0, 1]")
    if "processing" in answer.outcome_codes():
        raise ScenarioFailed("the Bundle says the model was not used (BM25 fallback)")
    return f"{len(scores)} resources scored by the Qwen3 engine"


def long_note_whole(ctx: InteropContext) -> str:
    """The long note is scored whole as overlapping chunks, its best passage on the entry
    (or, with long_documents = truncate, cut at max_length with a too-long warning)."""
    patient = ctx.need_patient()
    answer = ctx.adapter_get("/fhir/DocumentReference", [("patient", patient.patient_id),
                                                         ("_content", LONG_MARKER)],
                             **_model_settings(ctx))
    if answer.status != 200:
        raise ScenarioFailed(f"the adapter answered {answer.status} ({answer.issue()})")
    if "too-long" in answer.outcome_codes():
        return "the long note was cut at max_length and a too-long warning says so"
    passages = [e for e in answer.matches() for x in e["search"].get("extension", [])
                if x.get("url", "").endswith("best-passage")]
    if not passages:
        raise ScenarioFailed("the long note was neither scored whole (no best-passage "
                             "extension on its entry) nor reported as cut (no too-long warning)")
    return "the long note was scored whole as chunks; its best passage is on the entry"
