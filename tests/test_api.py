"""The FHIR API end to end: Flask app → FHIR source → flatten → BM25 → reranker → Bundle.

Most tests run against the real Node FHIR server over HTTP (`fhir` fixture); a few use the
embedded file source over fhir_fixtures/ (the demo's default).
"""
from __future__ import annotations

import json
import logging
import socket
from urllib.parse import parse_qsl, urlsplit

import pytest

from adapter import create_app
from adapter.config import load_settings
from adapter.fhir.source import FhirSource

BIG = "79a66c97-6131-3213-f3c9-4606946ab056"  # Synthea bulk patient: 708 notes, 219 conditions
FHIR_JSON = "application/fhir+json"


def make_client(**overrides):
    settings = load_settings({"reranker": "none", **overrides}, env={})
    return create_app(settings).test_client()


@pytest.fixture()
def rest(fhir):
    return make_client(fhir_base_url=fhir.base_url, fhir_retries=1, fhir_backoff=0.01,
                       fhir_timeout=5)


@pytest.fixture(scope="module")
def files():
    return make_client()


def bundle_of(resp, status=200):
    assert resp.status_code == status, resp.get_data(as_text=True)[:500]
    assert resp.content_type.startswith(FHIR_JSON)
    return resp.get_json()


def matches(bundle):
    return [e for e in bundle.get("entry", []) if e["search"]["mode"] == "match"]


def outcome_issues(bundle):
    return [i for e in bundle.get("entry", []) if e["search"]["mode"] == "outcome"
            for i in e["resource"]["issue"]]


def assert_outcome(resp, status, code, expression=None):
    assert resp.status_code == status, resp.get_data(as_text=True)[:500]
    body = resp.get_json()
    assert body["resourceType"] == "OperationOutcome"
    issue = body["issue"][0]
    assert issue["code"] == code and issue["severity"] == "error" and issue["diagnostics"]
    if expression:
        assert expression in issue.get("expression", [])
    return issue


def test_metadata_and_operation_definition(files):
    cap = bundle_of(files.get("/fhir/metadata"))
    assert cap["resourceType"] == "CapabilityStatement" and cap["fhirVersion"] == "4.0.1"
    types = {r["type"]: r for r in cap["rest"][0]["resource"]}
    for t in ("DocumentReference", "Observation", "Condition"):
        names = {p["name"] for p in types[t]["searchParam"]}
        assert {"_content", "patient", "_count", "_lastUpdated"} <= names
    assert "date" in {p["name"] for p in types["Observation"]["searchParam"]}
    assert "clinical-status" in {p["name"] for p in types["Condition"]["searchParam"]}
    op = cap["rest"][0]["operation"][0]
    assert op["name"] == "rerank"
    opdef = bundle_of(files.get("/fhir/OperationDefinition/rerank"))
    assert opdef["resourceType"] == "OperationDefinition" and opdef["code"] == "rerank"
    assert op["definition"] == opdef["url"]


def test_type_search_over_rest_server(rest, fhir):
    resp = rest.get(f"/fhir/Condition?patient={BIG}&_content=heart%20disease&_count=5")
    bundle = bundle_of(resp)
    entries = matches(bundle)
    # keyword order (reranker = none): total counts the records holding a word of the question
    assert bundle["type"] == "searchset" and 5 <= bundle["total"] <= 100
    assert len(entries) == 5
    assert all(e["resource"]["resourceType"] == "Condition" for e in entries)
    assert all(e["fullUrl"].startswith(fhir.base_url + "/Condition/") for e in entries)
    scores = [e["search"]["score"] for e in entries]
    assert scores == sorted(scores, reverse=True) and all(0 <= s <= 1 for s in scores)
    self_link = next(link["url"] for link in bundle["link"] if link["relation"] == "self")
    query = dict(parse_qsl(urlsplit(self_link).query))
    assert query["_sort"] == "_score" and query["_content"] == "heart disease"
    assert query["patient"] == BIG
    infos = [i["diagnostics"] for i in outcome_issues(bundle)]
    said = [d for d in infos if "hold a word of the question" in d]
    assert len(said) == 1 and said[0].startswith("keyword order (reranker = none)")
    # one number: the outcome's count is the Bundle's total
    assert f"total {bundle['total']}: the {bundle['total']} of 219 resources that hold" in said[0]
    assert not any("reranked" in d for d in infos)  # what happened is said once, truthfully


def test_keyword_order_lists_only_matches_and_says_when_recall_cuts(rest):
    url = f"/fhir/Condition?patient={BIG}&_content=disorder%20of%20the%20sinus&_count=5"
    whole = bundle_of(rest.get(url + "&recall=500"))
    assert 5 < whole["total"] < 219  # every Condition fits the budget; only matches are listed
    cut = bundle_of(rest.get(url + "&recall=3"))
    assert cut["total"] == 3
    said = [i["diagnostics"] for i in outcome_issues(cut)]
    assert any(f"total 3: the best 3 by BM25 of the {whole['total']} resources (of 219) that "
               "hold a word of the question (recall=3); raise `recall`" in d for d in said)
    nothing = bundle_of(rest.get(f"/fhir/Condition?patient={BIG}&_content=of%20the%20and"))
    assert nothing["total"] == 0 and matches(nothing) == []  # stopwords match nothing


def test_paging_is_stable_and_complete(rest):
    base = f"/fhir/Condition?patient={BIG}&_content=stress%20employment&recall=30"
    whole = matches(bundle_of(rest.get(base + "&_count=30")))
    seen = []
    url = base + "&_count=7"
    while url:
        page = bundle_of(rest.get(url))
        seen += matches(page)
        nxt = [link["url"] for link in page["link"] if link["relation"] == "next"]
        url = urlsplit(nxt[0])._replace(scheme="", netloc="").geturl() if nxt else None
    assert [e["fullUrl"] for e in seen] == [e["fullUrl"] for e in whole]
    assert len(seen) == 30


def test_rerank_operation_get_post_and_patient_instance(rest):
    got = bundle_of(rest.get(f"/fhir/$rerank?query=sinusitis&patient={BIG}"
                             "&_type=Condition,DocumentReference&_count=50"))
    types = {e["resource"]["resourceType"] for e in matches(got)}
    assert types == {"Condition", "DocumentReference"}
    body = {"resourceType": "Parameters", "parameter": [
        {"name": "query", "valueString": "sinusitis"},
        {"name": "patient", "valueReference": {"reference": f"Patient/{BIG}"}},
        {"name": "_type", "valueCode": "Condition"},
        {"name": "_type", "valueCode": "DocumentReference"},
        {"name": "_count", "valueInteger": 50}]}
    posted = bundle_of(rest.post("/fhir/$rerank", data=json.dumps(body),
                                 content_type=FHIR_JSON))
    instance = bundle_of(rest.get(f"/fhir/Patient/{BIG}/$rerank?query=sinusitis"
                                  "&_type=Condition,DocumentReference&_count=50"))
    ids = [e["fullUrl"] for e in matches(got)]
    assert ids == [e["fullUrl"] for e in matches(posted)] == [e["fullUrl"] for e in
                                                                 matches(instance)]


def test_filters_reach_the_fhir_server(rest, fhir):
    bundle_of(rest.get(f"/fhir/Condition?patient={BIG}&_content=x&clinical-status=active"))
    sent = [r for r in fhir.requests() if r["path"].endswith("/Condition")]
    assert sent and "clinical-status=active" in sent[-1]["query"]


def test_filters_go_only_to_the_types_that_define_them(rest, fhir):
    bundle_of(rest.get(f"/fhir/$rerank?query=x&patient={BIG}&clinical-status=active"
                       "&date=ge2000"))
    sent = {r["path"].rsplit("/", 1)[1]: r["query"] for r in fhir.requests()
            if r["path"].rsplit("/", 1)[1] in ("Condition", "Observation", "DocumentReference")}
    assert "clinical-status=active" in sent["Condition"]
    assert "clinical-status" not in sent["Observation"] + sent["DocumentReference"]
    assert "date=ge2000" in sent["Observation"] and "date" not in sent["Condition"]
    assert all("query=" not in q and "_content" not in q for q in sent.values())


def test_unknown_parameter_warns_or_fails_when_strict(rest):
    bundle = bundle_of(rest.get(f"/fhir/Condition?patient={BIG}&_content=x&colour=red"))
    warned = [i for i in outcome_issues(bundle) if i["code"] == "not-supported"]
    assert warned and warned[0]["expression"] == ["colour"] and warned[0]["severity"] == "warning"
    strict = rest.get(f"/fhir/Condition?patient={BIG}&_content=x&colour=red",
                      headers={"Prefer": "handling=strict"})
    assert_outcome(strict, 400, "not-supported", "colour")


@pytest.mark.parametrize("url,status,code,expr", [
    (f"/fhir/Condition?patient={BIG}", 400, "invalid", "_content"),
    (f"/fhir/Condition?patient={BIG}&_content=x&_count=zero", 400, "invalid", "_count"),
    ("/fhir/$rerank?query=x&_type=Patient", 400, "invalid", "_type"),
    ("/fhir/Patient?_content=x", 404, "not-found", None),
    ("/fhir/Condition?patient=no-such-patient&_content=x", 404, "not-found", "patient"),
    ("/fhir/Condition?_content=x&_format=xml", 406, "not-supported", None),
    ("/fhir/Condition?_content=x", 400, "invalid", "patient"),
])
def test_errors_are_operation_outcomes(rest, url, status, code, expr):
    assert_outcome(rest.get(url), status, code, expr)


def test_xml_accept_is_406_and_bad_parameters_body_is_400(rest):
    assert_outcome(rest.get(f"/fhir/Condition?patient={BIG}&_content=x",
                            headers={"Accept": "application/fhir+xml"}), 406, "not-supported")
    assert_outcome(rest.post("/fhir/$rerank", data="{not json", content_type=FHIR_JSON),
                   400, "invalid")
    assert_outcome(rest.post("/fhir/$rerank", data=json.dumps({"resourceType": "Bundle"}),
                             content_type=FHIR_JSON), 400, "invalid")


def test_upstream_auth_is_passed_through(rest, fhir):
    fhir.set_auth(token="Bearer good", forbid="Bearer bad")
    url = f"/fhir/Condition?patient={BIG}&_content=x"
    assert_outcome(rest.get(url), 401, "security")
    assert_outcome(rest.get(url, headers={"Authorization": "Bearer bad"}), 403, "security")
    assert bundle_of(rest.get(url, headers={"Authorization": "Bearer good"}))["total"] > 0
    assert all(r["authorization"] == "Bearer good" for r in fhir.requests()[-2:])


@pytest.mark.parametrize("fault,status,code", [
    ({"status": 429, "times": 10}, 429, "throttled"),
    ({"status": 503, "times": 10}, 502, "transient"),
    ({"malformed": True, "times": 10}, 502, "transient"),
    ({"delay": 3, "times": 10}, 504, "timeout"),
])
def test_upstream_failures_map_to_status(fhir, fault, status, code):
    client = make_client(fhir_base_url=fhir.base_url, fhir_retries=1, fhir_backoff=0.01,
                         fhir_timeout=1)
    fhir.inject_fault(path_contains="Condition", **fault)
    assert_outcome(client.get(f"/fhir/Condition?patient={BIG}&_content=x"), status, code)


def test_upstream_unreachable_is_502():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = make_client(fhir_base_url=f"http://127.0.0.1:{port}/fhir", fhir_retries=1,
                         fhir_backoff=0.01)
    assert_outcome(client.get("/fhir/Condition?patient=p1&_content=x"), 502, "transient")


class _BrokenSource(FhirSource):
    """A source with a bug in it: stands for any unexpected exception inside the pipeline."""

    def search(self, resource_type, params, authorization=None, limit=None):
        name = "Jane" + " Doe"  # built at run time, like patient data in a real bug
        raise KeyError(name)  # its message must not reach the log

    def patient_exists(self, patient_id, authorization=None):
        return True


def test_a_bug_is_an_outcome_with_an_incident_id(caplog):
    app = create_app(load_settings({"reranker": "none"}, env={}), source=_BrokenSource())
    with caplog.at_level(logging.INFO):
        issue = assert_outcome(app.test_client().get("/fhir/Condition?patient=p1&_content=x"), 500,
                               "exception")
    incident = issue["diagnostics"].split()[2].rstrip(";")
    assert incident in caplog.text and "Traceback" not in issue["diagnostics"]
    assert "Jane Doe" not in caplog.text


def test_no_patient_data_in_logs(rest, caplog):
    with caplog.at_level(logging.INFO):
        bundle_of(rest.get(f"/fhir/$rerank?query=secret%20question&patient={BIG}&_count=3"))
    assert "secret" not in caplog.text and BIG not in caplog.text


def test_file_source_is_the_embedded_default(files):
    bundle = bundle_of(files.get(f"/fhir/DocumentReference?patient={BIG}&_content="
                                 "emergency%20department&_count=3"))
    assert bundle["total"] == 100 and len(matches(bundle)) == 3
    first = matches(bundle)[0]
    assert first["fullUrl"].startswith("http://localhost/fhir/DocumentReference/")
    read = bundle_of(files.get(first["fullUrl"].replace("http://localhost", "")))
    assert read == first["resource"]
    assert_outcome(files.get("/fhir/Condition/no-such-id"), 404, "not-found")


def test_exact_bm25_order_on_a_tiny_record(tmp_path):
    def cond(i, text):
        return {"resource": {"resourceType": "Condition", "id": f"c{i}",
                             "subject": {"reference": "Patient/p1"},
                             "code": {"text": text}}}
    bundle = {"resourceType": "Bundle", "type": "collection", "entry": [
        cond(1, "seasonal allergic rhinitis"), cond(2, "type 2 diabetes mellitus"),
        cond(3, "diabetes insipidus after diabetes screening"), cond(4, "fracture of ankle"),
        cond(5, "migraine"), cond(6, "asthma")]}
    bundle["entry"][5]["resource"]["onsetColour"] = "red"  # not FHIR R4: read leniently
    (tmp_path / "b.json").write_text(json.dumps(bundle))
    client = make_client(fhir_data=str(tmp_path))
    got = bundle_of(client.get("/fhir/Condition?patient=p1&_content=diabetes"))
    order = [e["resource"]["id"] for e in matches(got)]
    # c3 says "diabetes" twice; c2 once, but also "type 2 … mellitus", which the lexicon adds
    # for "diabetes" (weighted below the user's word); the rest never say it and are not listed
    assert order == ["c2", "c3"]
    assert got["total"] == 2
    alone = bundle_of(client.get("/fhir/Condition?patient=p1&_content=insipidus"))
    assert [e["resource"]["id"] for e in matches(alone)] == ["c3"]
    listing = make_client(fhir_data=str(tmp_path), keyword_list_unmatched=True)
    every = bundle_of(listing.get("/fhir/Condition?patient=p1&_content=diabetes"))
    assert [e["resource"]["id"] for e in matches(every)] == ["c2", "c3", "c1", "c4", "c5", "c6"]
    assert every["total"] == 6 and [e["search"]["score"] for e in matches(every)][2:] == [0.0] * 4
    assert any("BM25 keyword score" in i["diagnostics"] for i in outcome_issues(got))
    lenient = [i for i in outcome_issues(got) if "did not validate" in i["diagnostics"]]
    assert len(lenient) == 1 and lenient[0]["diagnostics"].endswith("Condition/c6")


def test_qwen3_scores_in_the_bundle_are_the_models_scores(fhir, tiny_model_dir):
    from adapter.rerank.qwen3 import Qwen3Reranker

    client = make_client(fhir_base_url=fhir.base_url, reranker="qwen3",
                         model=str(tiny_model_dir), device="cpu", dtype="float32",
                         models_allowed=[str(tiny_model_dir)])
    bundle = bundle_of(client.get(f"/fhir/Condition?patient={BIG}&_content=asthma&recall=12"
                                  "&_count=12"))
    entries = matches(bundle)
    engine = Qwen3Reranker(str(tiny_model_dir), device="cpu", dtype="float32",
                           instruction=load_settings(env={}).instruction)
    from adapter.fhir.flatten import flatten_resource

    expected = engine.score("asthma", [flatten_resource(e["resource"]) for e in entries],
                            instruction=None).scores
    got = [e["search"]["score"] for e in entries]
    assert got == pytest.approx(expected, abs=1e-6)
    assert got == sorted(got, reverse=True)

    # Paging: the next page reuses the ranking's scores instead of running the model again.
    from adapter.api.state import state_of

    scores = state_of(client.application).runtime.caches.scores
    scores.clear()
    url = f"/fhir/Condition?patient={BIG}&_content=asthma&recall=12&_count=6"
    first = bundle_of(client.get(url))
    second = bundle_of(client.get(url + "&_offset=6"))
    assert len(scores) == 1
    assert [e["search"]["score"] for e in matches(first) + matches(second)] == got


def test_unloadable_model_falls_back_with_warning_or_fails_when_required(tmp_path):
    missing = str(tmp_path / "no-model-here")
    client = make_client(reranker="qwen3", model=missing, models_allowed=[missing])
    bundle = bundle_of(client.get(f"/fhir/Condition?patient={BIG}&_content=x&_count=2"))
    assert any("BM25 order" in i["diagnostics"] for i in outcome_issues(bundle))
    strict = make_client(reranker="qwen3", model=missing, reranker_required=True)
    assert_outcome(strict.get(f"/fhir/Condition?patient={BIG}&_content=x"), 503, "transient")


def test_truncated_and_empty_documents_are_reported(tmp_path, tiny_model_dir):
    note = "Shortness of breath on exertion. " * 200  # far longer than max_length below
    docs = [{"resource": {"resourceType": "Condition", "id": "long",
                          "subject": {"reference": "Patient/p1"}, "code": {"text": note}}},
            {"resource": {"resourceType": "Condition", "id": "short",
                          "subject": {"reference": "Patient/p1"},
                          "code": {"text": "Asthma"}}}]
    (tmp_path / "b.json").write_text(json.dumps({"resourceType": "Bundle", "type": "collection",
                                                 "entry": docs}))
    client = make_client(fhir_data=str(tmp_path), reranker="qwen3", model=str(tiny_model_dir),
                         device="cpu", max_length=256, models_allowed=[str(tiny_model_dir)],
                         long_documents="truncate")
    bundle = bundle_of(client.get("/fhir/Condition?patient=p1&_content=breathless"))
    assert bundle["total"] == 2
    too_long = [i for i in outcome_issues(bundle) if i["code"] == "too-long"]
    assert len(too_long) == 1 and too_long[0]["diagnostics"].startswith("1 document(s)")
