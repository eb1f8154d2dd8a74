"""The time budget turning into a candidate count, and `_sort` by relevance and clinical date."""
from __future__ import annotations

import pytest

from adapter.api.params import parse_search
from adapter.config import load_settings
from adapter.errors import BadRequest
from adapter.fhir.clinical_date import clinical_date, parse_fhir_datetime
from adapter.models import Document, Scored
from adapter.search.budget import apply_time_budget, candidates_within
from adapter.search.ordering import order_ranked, parse_sort

MICAH = "720b9118-3153-40c8-b162-cd963506be0e"


@pytest.mark.parametrize("lengths,speed,budget,expected", [
    ([100, 200, 300, 400], 100.0, 3.0, 2),     # 300 tokens allowed: 100 + 200 fit, + 300 not
    ([100, 200, 300, 400], 100.0, 10.0, 4),    # exactly 1,000 tokens: the whole record fits
    ([100, 200, 300, 400], 100.0, 9.99, 3),
    ([100, 200, 300, 400], 100.0, 0.5, 1),     # nothing fits: still one, so the search answers
    ([], 100.0, 1.0, 0),
    ([50] * 1000, 2000.0, 5.0, 200),           # 10,000 tokens / 50 per candidate
])
def test_budget_turns_into_a_candidate_count(lengths, speed, budget, expected):
    assert candidates_within(lengths, speed, budget) == expected


def test_budget_needs_a_positive_speed_and_time():
    with pytest.raises(ValueError):
        candidates_within([10], 0.0, 1.0)


def _docs(n: int) -> list[Document]:
    return [Document(f"Observation/o{i}", "Observation", f"finding {i} " * (5 + 10 * i),
                     {"resourceType": "Observation", "id": f"o{i}"}) for i in range(n)]


def test_time_budget_with_the_qwen3_engine_keeps_what_its_measured_speed_allows(tiny_model_dir):
    from adapter.rerank.qwen3 import Qwen3Reranker

    reranker = Qwen3Reranker(str(tiny_model_dir), device="cpu", dtype="float32")
    speed = reranker.tokens_per_s
    assert speed and speed > 0  # measured at warm-up
    docs = _docs(8)
    lengths = reranker.token_lengths("kidney function", [d.text for d in docs])
    assert lengths == sorted(lengths) and lengths[0] > 5  # whole sequences, longer docs longer
    budget = (sum(lengths[:3]) + 0.5) / speed  # three candidates' tokens, not four
    req = {"query": "kidney function", "instruction": None, "rerank_budget_s": budget}
    kept, scores, outcomes = apply_time_budget(req, docs, list(range(8)), reranker)
    assert [d.id for d in kept] == ["Observation/o0", "Observation/o1", "Observation/o2"]
    assert scores == [0, 1, 2]
    assert len(outcomes) == 1 and "3 of the 8 candidates" in outcomes[0].diagnostics
    assert "the 3 best by the first stage were reranked and 5 were left out" in \
        outcomes[0].diagnostics
    assert "raise `rerank_budget_s`" in outcomes[0].diagnostics
    whole = sum(lengths) / speed
    assert f"about {whole:.1f} s would rerank all" in outcomes[0].diagnostics or whole >= 10
    assert outcomes[0].expression == ("rerank_budget_s",)
    whole = {**req, "rerank_budget_s": sum(lengths) * 1.01 / reranker.tokens_per_s}
    assert apply_time_budget(whole, docs, list(range(8)), reranker)[0] == docs  # fits: whole
    off = {**req, "rerank_budget_s": 0.0}
    assert apply_time_budget(off, docs, list(range(8)), reranker)[0] == docs


def test_a_remembered_cut_says_the_speed_it_was_decided_on(tiny_model_dir):
    """The next page reuses the cut; the speed (a running average) may have moved since. The
    outcome gives the speed and tokens that decided the cut, never a speed at which every
    candidate would have fitted."""
    from adapter.lru import LRU
    from adapter.rerank.qwen3 import Qwen3Reranker

    reranker = Qwen3Reranker(str(tiny_model_dir), device="cpu", dtype="float32")
    docs = _docs(8)
    lengths = reranker.token_lengths("kidney function", [d.text for d in docs])
    speed = reranker.tokens_per_s
    req = {"query": "kidney function", "instruction": None,
           "rerank_budget_s": (sum(lengths[:3]) + 0.5) / speed}
    cache: LRU = LRU(16, "budget-test")
    first = apply_time_budget(req, docs, list(range(8)), reranker, cache)[2][0].diagnostics
    reranker.loaded.tokens_per_s = speed * 1000  # later real calls ran far faster
    again = apply_time_budget(req, docs, list(range(8)), reranker, cache)
    assert len(again[0]) == 3 and again[2][0].diagnostics == first
    assert first.startswith("total 3: ") and f"{speed:.0f} tokens/s" in first
    assert f"all {sum(lengths)} tokens" in first


def test_no_model_no_speed_limit():
    from adapter.rerank.keyword import KeywordReranker

    req = {"query": "q", "rerank_budget_s": 0.001}
    assert apply_time_budget(req, _docs(5), [0.0] * 5, KeywordReranker())[0] == _docs(5)


def test_budget_parameter_and_setting():
    settings = load_settings({"require_patient": False, "max_recall": 700}, env={})
    parsed = parse_search([("query", "x"), ("rerank_budget_s", "2.5")], settings, types=None,
                          strict=True, query_param="query")
    assert parsed.request.rerank_budget_s == 2.5 and parsed.request.recall == 700
    assert ("rerank_budget_s", "2.5") in parsed.used
    explicit = parse_search([("query", "x"), ("rerank_budget_s", "2"), ("recall", "40")],
                            settings, types=None, strict=True, query_param="query")
    assert explicit.request.recall == 40
    plain = parse_search([("query", "x")], settings, types=None, strict=True, query_param="query")
    assert plain.request.rerank_budget_s == 0.0 and plain.request.recall == settings.recall
    configured = load_settings({"require_patient": False, "rerank_budget_s": 4.0}, env={})
    assert parse_search([("query", "x")], configured, types=None, strict=True,
                        query_param="query").request.rerank_budget_s == 4.0
    for bad in ("-1", "fast", "nan", "100000"):
        with pytest.raises(BadRequest) as err:
            parse_search([("query", "x"), ("rerank_budget_s", bad)], settings, types=None,
                         strict=True, query_param="query")
        assert err.value.expression == "rerank_budget_s"


def test_api_reports_a_budget_cut(tiny_model_dir):
    from test_api import bundle_of, make_client, matches, outcome_issues

    client = make_client(reranker="qwen3", model=str(tiny_model_dir), device="cpu",
                         dtype="float32")
    url = f"/fhir/Patient/{MICAH}/$rerank?query=kidney&_count=200&rerank_budget_s=0.000001"
    bundle = bundle_of(client.get(url))
    assert len(matches(bundle)) == 1
    notes = [i for i in outcome_issues(bundle) if "rerank_budget_s" in i.get("expression", [])]
    assert len(notes) == 1 and "1 of the" in notes[0]["diagnostics"]
    assert "so the best one by the first stage was reranked and" in notes[0]["diagnostics"]
    assert "rerank_budget_s=1e-06" in bundle["link"][0]["url"]


# --- _sort -----------------------------------------------------------------------------------

@pytest.mark.parametrize("resource,expected", [
    ({"resourceType": "Observation", "effectiveDateTime": "2019-03-02T10:00:00+02:00",
      "issued": "2020-01-01T00:00:00Z"}, "2019-03-02T08:00:00+00:00"),
    ({"resourceType": "Observation", "effectivePeriod": {"end": "2018-05"}}, "2018-05-01"),
    ({"resourceType": "Observation", "effectiveTiming": {"event": ["2017-01-02"]}}, "2017-01-02"),
    ({"resourceType": "Observation", "issued": "2016-07-08T09:10:11.123Z"},
     "2016-07-08T09:10:11.123+00:00"),
    ({"resourceType": "Condition", "onsetPeriod": {"start": "2015"}, "recordedDate": "2019"},
     "2015-01-01"),
    ({"resourceType": "Condition", "onsetString": "childhood", "recordedDate": "2014-02-03"},
     "2014-02-03"),
    ({"resourceType": "DocumentReference", "context": {"period": {"start": "2013-04-05T06:07"}}},
     "2013-04-05T06:07"),
    ({"resourceType": "DocumentReference", "date": "2012-12-12T12:12:12Z",
      "context": {"period": {"start": "2000"}}}, "2012-12-12T12:12:12Z"),
    ({"resourceType": "Observation", "effectiveDateTime": "not a date"}, None),
    ({"resourceType": "Condition"}, None),
])
def test_clinical_date_of_each_type(resource, expected):
    assert clinical_date(resource) == (None if expected is None else parse_fhir_datetime(expected))


def _scored(rid: str, score: float, when: str | None) -> Scored:
    resource = {"resourceType": "Observation", "id": rid}
    if when:
        resource["effectiveDateTime"] = when
    return Scored(Document(f"Observation/{rid}", "Observation", "", resource), score)


RANKED = [_scored("a", 0.9, "2019-01-01"), _scored("b", 0.5, "2021-06-01"),
          _scored("c", 0.5, "2020-01-01"), _scored("d", 0.5, None), _scored("e", 0.1, "2021-06-01")]


@pytest.mark.parametrize("sort,expected", [
    (("_score",), "abcde"),                 # ties (b, c, d) by id
    (("_score", "-date"), "abcde"),         # ties: b (2021), c (2020), d (no date) last
    (("_score", "date"), "acbde"),          # c (2020) before b (2021); d has no date: last
    (("-date",), "becad"),                  # b and e share a date: relevance breaks the tie
    (("date",), "acbed"),
    (("-date", "_score"), "becad"),
])
def test_order_by_sort_keys(sort, expected):
    assert "".join(s.document.id[-1] for s in order_ranked(RANKED, sort)) == expected


def test_sort_parameter_parsing():
    assert parse_sort(["_score,-date"]) == ("_score", "-date")
    assert parse_sort([" -date "]) == ("-date",)
    assert parse_sort([]) == ("_score",)
    for bad in ("name", "_score,-_lastUpdated", "date,-date", "", "_score,"):
        with pytest.raises(BadRequest) as err:
            parse_sort([bad])
        assert err.value.expression == "_sort"
    with pytest.raises(BadRequest, match="_score, -_score, date, -date"):
        parse_sort(["status"])


def test_api_sort_by_date_links_and_capability():
    from test_api import assert_outcome, bundle_of, make_client, matches

    client = make_client()
    url = f"/fhir/Patient/{MICAH}/$rerank?query=creatinine&_count=10&_sort=-date"
    bundle = bundle_of(client.get(url))
    dates = [clinical_date(e["resource"]) for e in matches(bundle)]
    assert len(dates) == 10 and None not in dates and dates == sorted(dates, reverse=True)
    links = {link["relation"]: link["url"] for link in bundle["link"]}
    assert "_sort=-date" in links["self"] and "_sort=-date" in links["next"]
    by_score = bundle_of(client.get(url.replace("-date", "_score")))
    assert [e["search"]["score"] for e in matches(by_score)] == sorted(
        (e["search"]["score"] for e in matches(by_score)), reverse=True)
    issue = assert_outcome(client.get(url.replace("-date", "-status")), 400, "invalid", "_sort")
    assert "_score" in issue["diagnostics"] and "-date" in issue["diagnostics"]
    cap = bundle_of(client.get("/fhir/metadata"))
    for resource in cap["rest"][0]["resource"][:3]:
        assert {"_sort", "rerank_budget_s"} <= {p["name"] for p in resource["searchParam"]}
    opdef = bundle_of(client.get("/fhir/OperationDefinition/rerank"))
    assert "_sort" in {p["name"] for p in opdef["parameter"]}


# --- hostile inputs (hypothesis) -----------------------------------------------------------

from hypothesis import given, settings as hsettings, strategies as st  # noqa: E402

_SORT_PIECES = st.sampled_from(["_score", "-_score", "date", "-date", "name", "", " ", ",",
                                "-", "DATE", "_lastUpdated", "\x00", "é"])


@hsettings(max_examples=300, deadline=None)
@given(st.lists(st.lists(_SORT_PIECES, max_size=4).map(",".join), max_size=3) | st.lists(st.text()))
def test_sort_parsing_answers_keys_or_a_400_naming_sort(values):
    try:
        keys = parse_sort(values)
    except BadRequest as err:
        assert err.expression == "_sort" and "_score" in err.message
        return
    assert keys and set(keys) <= {"_score", "-_score", "date", "-date"}
    assert len({k.lstrip("-") for k in keys}) == len(keys)


@hsettings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=40), st.none(), st.integers(), st.dictionaries(st.text(), st.text())))
def test_clinical_dates_never_raise_on_odd_data(value):
    assert parse_fhir_datetime(value) is None or isinstance(parse_fhir_datetime(value), float)
    for rtype in ("Observation", "Condition", "DocumentReference"):
        resource = {"resourceType": rtype, "effectiveDateTime": value, "onsetPeriod": value,
                    "issued": value, "date": value, "context": {"period": value}}
        when = clinical_date(resource)
        assert when is None or isinstance(when, float)


@hsettings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=10_000), max_size=50),
       st.floats(min_value=1.0, max_value=1e6), st.floats(min_value=1e-3, max_value=1e3))
def test_budget_count_is_the_longest_fitting_head(lengths, speed, budget):
    kept = candidates_within(lengths, speed, budget)
    allowance = speed * budget
    if not lengths:
        assert kept == 0
        return
    assert 1 <= kept <= len(lengths)
    if sum(lengths[:kept]) > allowance:
        assert kept == 1  # only the floor of one candidate may overrun
    if kept < len(lengths):
        assert sum(lengths[:kept + 1]) > allowance


def test_the_stage_outcome_counts_add_up_to_the_total():
    """One number: the outcome opens with the Bundle's total, and what it says was reranked
    adds up to it (9 candidates hold a word of the question, 91 hold none)."""
    from adapter.pipeline import _stage_outcome

    payload = {"searched": 402, "matched": 9, "candidates": [{}] * 100}
    said = _stage_outcome(payload, {"recall": 100}, 100, True, None).diagnostics
    assert said.startswith("total 100: 100 of the 402 resources searched were reranked")
    assert "the 9 that hold a word of the question and 91 that hold none" in said
    many = _stage_outcome({**payload, "matched": 250}, {"recall": 100}, 100, True, None)
    assert "the 100 best by BM25 of the 250 that hold a word" in many.diagnostics
    keyword = _stage_outcome({**payload, "matched": 250}, {"recall": 100}, 100, False, None)
    assert "total 100: the best 100 by BM25 of the 250 resources (of 402)" in \
        keyword.diagnostics
    whole = _stage_outcome({"searched": 50, "matched": 9, "candidates": [{}] * 9},
                           {"recall": 100}, 9, False, None)
    assert "total 9: the 9 of 50 resources that hold a word" in whole.diagnostics
