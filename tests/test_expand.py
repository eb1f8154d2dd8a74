"""The weighted keyword query: lexicon expansions, their weights, ambiguity rules, stopwords,
and a question in each supported language finding its concept in the committed fixtures."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from adapter.config import load_settings
from adapter.fhir import make_source
from adapter.models import SearchRequest
from adapter.pipeline import collect_documents
from adapter.search.bm25 import BM25Index, recall
from adapter.search.expand import (EXPANSION_WEIGHT, RELATED_WEIGHT, USER_WEIGHT,
                                   triggered_concepts, weighted_query)
from adapter.search.analyze import stem
from adapter.search.lexicon import HERE, LANGUAGES, load_lexicon


def test_user_words_weigh_most_and_expansions_below_them() -> None:
    weights = weighted_query("LDL")
    assert weights["ldl"] == USER_WEIGHT
    added = {t: w for t, w in weights.items() if t != "ldl"}
    assert {stem(w) for w in ("low", "density", "lipoprotein", "cholesterol")} <= set(added)
    assert all(0.0 < w <= EXPANSION_WEIGHT < USER_WEIGHT for w in added.values())
    lexicon = load_lexicon()
    related = set(lexicon.concepts["ldl"].related_tokens)
    assert related and all(weights[t] <= RELATED_WEIGHT for t in related if t in weights)


def test_a_shared_token_weighs_less_than_a_concept_specific_one() -> None:
    weights = weighted_query("blood sugar")
    assert weights["blood"] == weights["sugar"] == USER_WEIGHT  # the user's words
    glucose = weighted_query("glucosa en sangre")
    assert glucose[stem("glucose")] > glucose["blood"] > 0.0  # "blood" is in many concepts


@pytest.mark.parametrize("query", ["MS", "PT", "CA", "UA", "ED"])
def test_an_ambiguous_abbreviation_alone_stays_the_users_word(query: str) -> None:
    assert triggered_concepts(query) == []
    assert weighted_query(query) == {query.lower(): USER_WEIGHT}


def test_context_picks_one_sense_of_an_ambiguous_abbreviation() -> None:
    assert set(triggered_concepts("PT INR on warfarin")) == {"prothrombin_time", "inr",
                                                             "anticoagulant"}
    assert "physical_therapy" in triggered_concepts("PT rehab session")
    assert "prothrombin_time" not in triggered_concepts("PT rehab session")
    both = triggered_concepts("PT after rehab for bleeding")  # context of two senses
    assert "physical_therapy" not in both and "prothrombin_time" not in both
    assert "multiple_sclerosis" in triggered_concepts("MS relapse")


def test_the_lexicon_refuses_an_ambiguous_abbreviation_as_a_plain_trigger(tmp_path: Path
                                                                          ) -> None:
    root = tmp_path / "lexicon"
    shutil.copytree(HERE, root, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    with (root / "concepts" / "procedures.tsv").open("a", encoding="utf-8") as out:
        out.write("pt_test\tphysio test\tPT\t\t\n")
    with pytest.raises(ValueError, match="ambiguous"):
        load_lexicon(root)


def test_the_lexicon_is_general_and_covers_every_language() -> None:
    lexicon = load_lexicon()
    assert len(lexicon.concepts) >= 300
    for lang in LANGUAGES:
        covered = [c for c in lexicon.concepts.values() if c.translations.get(lang)]
        assert len(covered) >= 60, lang


@pytest.mark.parametrize("word", ["of", "the", "de", "der", "et", "en", "und", "la", "的",
                                  "patient"])
def test_stopwords_never_rank(word: str) -> None:
    assert word not in weighted_query(f"{word} anemia")
    texts = [f"history {word} {word} {word} visit", "anemia of chronic disease", "fracture"]
    scores = BM25Index(texts).scores(f"{word} {word}")
    assert scores == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("word", ["severity", "stage", "method", "date", "type", "content",
                                  "german", "characters"])
def test_the_comments_of_the_stopword_files_are_not_stopwords(word: str) -> None:
    """Words of the files' `#` comments ("Words with clinical meaning (stage, severity,
    method, date) are not listed") once became stopwords; they keep their weight."""
    assert word not in load_lexicon().stopwords
    assert weighted_query(f"{word} anemia")[stem(word)] == USER_WEIGHT


def test_ct_is_the_users_word_and_snomed_ct_is_not_a_ct() -> None:
    weights = weighted_query("CT")
    assert weights["ct"] == USER_WEIGHT and weights[stem("tomography")] == EXPANSION_WEIGHT
    texts = ["Asthma (SNOMED CT 195967001) Onset: 2019", "Imaging: CT of the chest, no nodules",
             "Fracture of ankle (SNOMED CT 16114001)"]
    scores = BM25Index(texts).scores("CT")
    assert scores[1] > 0.0 and scores[0] == scores[2] == 0.0
    assert "ct" not in load_lexicon().stopwords


def test_a_loinc_code_matches_by_its_number_not_its_check_digit() -> None:
    weights = weighted_query("4548-4")
    assert weights == {"4548": USER_WEIGHT}
    texts = ["Hemoglobin A1c (LOINC 4548-4) 6.1 %", "Pain score 4 of 10", "Glucose 4 mmol"]
    scores = BM25Index(texts).scores("4548-4")
    assert scores[0] > 0.0 and scores[1] == scores[2] == 0.0


def test_an_english_plural_is_its_singular_stem() -> None:
    weights = weighted_query("polyps injuries")
    assert weights[stem("polyp")] == weights[stem("injury")] == USER_WEIGHT


@pytest.fixture(scope="module")
def fixture_observations() -> list:
    settings = load_settings({"require_patient": False}, env={})
    documents, _ = collect_documents(SearchRequest(query="x", types=("Observation",)),
                                     make_source(settings), settings)
    assert len(documents) > 500
    return documents


@pytest.mark.parametrize("query,expected", [
    ("presión arterial", ("blood pressure",)), ("colesterol LDL", ("low density lipo", "ldl")),
    ("tension artérielle", ("blood pressure",)), ("glycémie", ("glucose",)),
    ("Blutdruck", ("blood pressure",)), ("Blutzucker", ("glucose",)),
    ("pressão arterial", ("blood pressure",)), ("hemácias", ("erythrocyte", "red cell", "rbc")),
    ("血压", ("blood pressure",)), ("血糖", ("glucose",)),
    ("BUN", ("urea nitrogen",)), ("how tall", ("body height", "body length")),
    ("sugar", ("glucose",)),
])
def test_a_question_in_each_language_finds_its_concept(fixture_observations, query: str,
                                                       expected: tuple[str, ...]) -> None:
    """None of these words is in the records: only the lexicon can find them."""
    top = recall(query, fixture_observations, 5)
    names = [doc.text.split("\n")[0].lower() for doc, _ in top]
    assert all(score > 0.0 for _, score in top)
    assert any(e in names[0] for e in expected), names
    assert sum(any(e in n for e in expected) for n in names) >= 3, names
