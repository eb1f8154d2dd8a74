"""Unit tests: parameter validation, Parameters bodies, settings precedence, Bundle links."""
from __future__ import annotations

import pytest

from adapter.api.params import parameters_to_pairs, parse_search
from adapter.config import load_settings
from adapter.errors import BadRequest, NotAcceptable, UnsupportedParameter
from adapter.fhir.bundle import searchset
from adapter.models import Document, Scored


@pytest.fixture()
def settings():
    return load_settings({"reranker": "none"}, env={})


def test_query_required_names_parameter(settings):
    with pytest.raises(BadRequest) as err:
        parse_search([("patient", "p1")], settings, types=("Condition",), strict=False)
    assert err.value.expression == "_content" and "required" in err.value.message


@pytest.mark.parametrize("name,value", [("_count", "0"), ("_count", "abc"), ("_count", "100000"),
                                        ("recall", "-1"), ("_offset", "-5")])
def test_bad_numbers_are_400_naming_the_parameter(settings, name, value):
    with pytest.raises(BadRequest) as err:
        parse_search([("_content", "x"), (name, value)], settings, types=("Condition",),
                     strict=False)
    assert err.value.expression == name


def test_filters_pass_through_and_unknown_warn(settings):
    parsed = parse_search([("_content", "a1c"), ("patient", "Patient/p1"), ("date", "ge2020"),
                           ("code:text", "glucose"), ("colour", "red")], settings,
                          types=("Observation",), strict=False)
    assert parsed.request.patient == "p1"
    assert parsed.request.filters == [("date", "ge2020"), ("code:text", "glucose")]
    assert [o.expression for o in parsed.outcomes] == [("colour",)]
    with pytest.raises(UnsupportedParameter) as err:
        parse_search([("_content", "a1c"), ("colour", "red")], settings,
                     types=("Observation",), strict=True)
    assert err.value.status == 400 and err.value.expression == "colour"


def test_type_specific_filter_is_unknown_for_other_types(settings):
    parsed = parse_search([("_content", "x"), ("patient", "p1"), ("clinical-status", "active")],
                          settings,
                          types=("Observation",), strict=False)
    assert parsed.request.filters == [] and parsed.outcomes


def test_type_subset_and_model_allowlist(settings):
    parsed = parse_search([("query", "x"), ("patient", "p1"), ("_type", "Condition,Observation")],
                          settings,
                          types=None, strict=False, query_param="query")
    assert parsed.request.types == ("Observation", "Condition")
    with pytest.raises(BadRequest):
        parse_search([("query", "x"), ("_type", "Patient")], settings, types=None,
                     strict=False, query_param="query")
    with pytest.raises(BadRequest) as err:
        parse_search([("query", "x"), ("model", "70B")], settings, types=None, strict=False,
                     query_param="query")
    assert "0.6B" in err.value.message


def test_patient_is_required_unless_configured_otherwise(settings):
    with pytest.raises(BadRequest) as err:
        parse_search([("_content", "x")], settings, types=("Condition",), strict=False)
    assert err.value.expression == "patient" and "require_patient" in err.value.message
    settings.require_patient = False
    parsed = parse_search([("_content", "x")], settings, types=("Condition",), strict=False)
    assert parsed.request.patient is None


def test_xml_format_is_406(settings):
    with pytest.raises(NotAcceptable):
        parse_search([("_content", "x"), ("_format", "xml")], settings, types=("Condition",),
                     strict=False)


def test_parameters_body():
    body = {"resourceType": "Parameters", "parameter": [
        {"name": "query", "valueString": "chest pain"},
        {"name": "patient", "valueReference": {"reference": "Patient/p9"}},
        {"name": "_count", "valueInteger": 5}]}
    assert parameters_to_pairs(body) == [("query", "chest pain"), ("patient", "Patient/p9"),
                                         ("_count", "5")]
    for bad in ({"resourceType": "Bundle"}, {"resourceType": "Parameters",
                                             "parameter": [{"name": "query"}]}, [1, 2]):
        with pytest.raises(BadRequest):
            parameters_to_pairs(bad)


def test_settings_precedence(tmp_path):
    cfg = tmp_path / "site.toml"
    cfg.write_text('port = 9000\nrecall = 50\n')
    env = {"FHIR_RERANK_CONFIG": str(cfg), "FHIR_RERANK_RECALL": "70",
           "FHIR_RERANK_MODELS_ALLOWED": "0.6B, 8B", "FHIR_RERANK_RERANKER_REQUIRED": "yes"}
    s = load_settings({"recall": 80}, env=env)
    assert (s.port, s.recall, s.models_allowed, s.reranker_required) == (9000, 80,
                                                                         ["0.6B", "8B"], True)
    assert load_settings(env=env).recall == 70
    with pytest.raises(ValueError):
        load_settings({"no_such_setting": 1}, env={})
    with pytest.raises(ValueError):
        load_settings(env={"FHIR_RERANK_PORT": "eighty"})


def _scored(n):
    return [Scored(Document(f"Condition/{i}", "Condition", "t", {"resourceType": "Condition",
                                                                   "id": str(i)}), 1 - i / 10)
            for i in range(n)]


def test_searchset_paging_links():
    bundle = searchset(_scored(7), base="http://x/fhir", endpoint="Condition",
                       params=[("_content", "a b")], count=3, offset=3)
    rel = {link["relation"]: link["url"] for link in bundle["link"]}
    assert bundle["total"] == 7 and len(bundle["entry"]) == 3
    assert "_offset=6" in rel["next"] and "_offset=0" in rel["previous"]
    assert "_sort=_score" in rel["self"] and "_content=a+b" in rel["self"]
    last = searchset(_scored(7), base="http://x/fhir", endpoint="Condition", params=[],
                     count=3, offset=6)
    assert "next" not in {link["relation"] for link in last["link"]}
    assert [e["search"]["score"] for e in bundle["entry"]] == [0.7, 0.6, 0.5]


def test_default_toml_and_settings_defaults_agree():
    from adapter.config import Settings

    assert load_settings(env={}) == Settings()


def test_settings_env_gives_another_process_the_same_settings():
    from adapter.config import settings_env

    overrides = {"models_allowed": ["0.6B", "4B"], "reranker_required": True, "recall": 40,
                 "upstream_deadline": 7.5, "model": "4B", "device": None}
    env = settings_env(overrides)
    assert "FHIR_RERANK_DEVICE" not in env and env["FHIR_RERANK_RERANKER_REQUIRED"] == "true"
    assert load_settings(env=env) == load_settings(overrides, env={})
