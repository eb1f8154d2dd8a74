"""Tokenizer rules, BM25 scores against the formula, exact rankings on tiny corpora, recall."""
from __future__ import annotations

import math
import random

import pytest

from adapter.errors import BadRequest
from adapter.models import Document
from adapter.search.bm25 import BM25Index, bm25_scores, normalise_scores, recall
from adapter.search.tokenize import tokenize


def _docs(texts: dict[str, str]) -> list[Document]:
    return [Document(f"Condition/{key}", "Condition", text, {}) for key, text in texts.items()]


# ---------------------------------------------------------------- tokenizer

@pytest.mark.parametrize("text,tokens", [
    ("Café", ["cafe"]),
    ("CAFÉ crème BRÛLÉE", ["cafe", "creme", "brulee"]),
    ("A1c/Hemoglobin.total", ["a1c", "hemoglobin", "total"]),
    ("HbA1c 7.5% on 2012-09-17", ["hba1c", "7.5", "on", "2012", "09", "17"]),
    ("LOINC 4548-4, mm[Hg]", ["loinc", "4548", "4", "mm", "hg"]),
    ("ＢＭＩ　２５", ["bmi", "25"]),  # full-width → ASCII (NFKC)
    ("Straße", ["strasse"]),  # case folding, not just lower()
    ("blood_pressure", ["blood", "pressure"]),
    ("", []),
    ("  ;;; -- ", []),
])
def test_tokenize_rules(text: str, tokens: list[str]) -> None:
    assert tokenize(text) == tokens


def test_ascii_fast_path_agrees_with_the_unicode_path() -> None:
    text = "BP 120/80 mm[Hg]; HbA1c 7.5 % (LOINC 4548-4) x_y 1.2.3"
    assert tokenize(text + " é") == tokenize(text) + ["e"]  # " é" forces the Unicode path


def test_cjk_gives_unigrams_and_bigrams() -> None:
    assert tokenize("糖尿病") == ["糖", "尿", "病", "糖尿", "尿病"]
    assert tokenize("高血圧 test") == ["高", "血", "圧", "高血", "血圧", "test"]
    assert tokenize("혈압") == ["혈", "압", "혈압"]  # Hangul syllables survive accent folding
    assert tokenize("ガス") == ["ガ", "ス", "ガス"]  # kana voicing mark kept


def test_chinese_and_japanese_queries_match_their_documents() -> None:
    texts = ["Condition: Diabetes mellitus type 2", "诊断: 2型糖尿病, 血糖控制不佳",
             "Observation: Blood pressure 150/95", "診断: 高血圧症、降圧薬を継続",
             "胸痛で救急外来を受診"]
    zh = bm25_scores("糖尿病", texts)
    ja = bm25_scores("高血圧", texts)
    assert max(range(len(texts)), key=zh.__getitem__) == 1 and zh[1] > 0
    assert max(range(len(texts)), key=ja.__getitem__) == 3 and ja[3] > 0
    assert ja[0] == ja[2] == 0.0
    assert zh[1] > zh[0] > zh[2]  # the English diabetes record, through the lexicon, lower


# ---------------------------------------------------------------- BM25 scores

def _reference_bm25(query: list[str], corpus: list[list[str]], k1=1.5, b=0.75,
                    idf_of: str = "lucene") -> list[float]:
    """BM25 written out from the formula: Lucene's idf log(1 + (N - n + 0.5)/(n + 0.5)), or
    Okapi's (Robertson) idf floored at 0, i.e. rank-bm25 with epsilon = 0."""
    n_docs = len(corpus)
    avgdl = sum(map(len, corpus)) / n_docs
    out = []
    for doc in corpus:
        score = 0.0
        for term in query:
            df = sum(term in d for d in corpus)
            ratio = (n_docs - df + 0.5) / (df + 0.5)
            idf = math.log(1 + ratio) if idf_of == "lucene" else max(0.0, math.log(ratio))
            tf = doc.count(term)
            score += idf * tf * (k1 + 1) / (tf + k1 * (1 - b + b * len(doc) / avgdl))
        out.append(score)
    return out


CORPUS = {
    "a": "chest pain radiating to left arm",
    "b": "chest x-ray",
    "c": "abdominal pain after meals",
    "d": "blood pressure 120/80 blood",
    "e": "fever and cough",
    "f": "headache",
}


def test_scores_match_the_bm25_formula() -> None:
    texts = list(CORPUS.values())
    # "chest", "pain", "fever", "nothing", "here" are in no lexicon concept and no stopword
    # list, so each weighs 1.0; a repeated word counts once (the query is a set of terms)
    for query in ("chest pain", "pain pain fever", "nothing here"):
        expected = _reference_bm25(list(dict.fromkeys(tokenize(query))),
                                   [tokenize(t) for t in texts])
        assert bm25_scores(query, texts) == pytest.approx(expected, rel=1e-12, abs=1e-12)
        okapi = _reference_bm25(list(dict.fromkeys(tokenize(query))),
                                [tokenize(t) for t in texts], idf_of="robertson")
        assert BM25Index(texts, idf="robertson").scores(query) == pytest.approx(
            okapi, rel=1e-12, abs=1e-12)


def test_scores_come_back_in_input_order() -> None:
    texts = list(CORPUS.values())
    scores = dict(zip(texts, bm25_scores("chest pain", texts)))
    shuffled = texts[::-1]
    assert bm25_scores("chest pain", shuffled) == [scores[t] for t in shuffled]


def test_a_word_in_every_document_still_counts_but_less_than_a_rare_one() -> None:
    """Okapi's idf is 0 (rank-bm25: floored) for a word in half the documents or more; a
    chart's notes repeat its problem list, so Lucene's idf, which stays positive, is used."""
    texts = ["blood glucose", "blood count", "blood pressure", "blood culture"]
    assert BM25Index(texts, idf="robertson").scores("blood") == [0.0] * 4
    every = bm25_scores("blood", texts)
    assert all(s > 0.0 for s in every) and len(set(every)) == 1
    assert bm25_scores("glucose", texts)[0] > every[0]


def test_empty_corpus_and_empty_documents() -> None:
    assert bm25_scores("chest pain", []) == []
    assert bm25_scores("chest pain", ["", "   ", "--"]) == [0.0, 0.0, 0.0]
    assert bm25_scores("", list(CORPUS.values())) == [0.0] * len(CORPUS)
    assert len(BM25Index([])) == 0
    mixed = bm25_scores("fever", ["", "fever and cough", "headache", "rash"])
    assert mixed[0] == 0.0 and mixed[1] > 0.0


# ---------------------------------------------------------------- recall

def test_recall_exact_ranking() -> None:
    docs = _docs(CORPUS)
    ranked = [d.id for d, _ in recall("chest pain", docs, k=3)]
    # a has both terms; b (3 tokens) beats c (4 tokens) on length with one term each
    assert ranked == ["Condition/a", "Condition/b", "Condition/c"]
    ranked = [d.id for d, _ in recall("blood pressure reading", docs, k=1)]
    assert ranked == ["Condition/d"]


def test_recall_keeps_every_document_when_they_fit() -> None:
    docs = _docs(CORPUS)
    result = recall("chest pain", docs, k=len(docs) + 10)
    assert [d.id for d, _ in result] == [f"Condition/{k}" for k in "abcdef"]
    assert [s for _, s in result][3:] == [0.0, 0.0, 0.0]
    assert len(recall("zzz unmatched", docs, k=len(docs))) == len(docs)


def test_recall_ties_are_broken_by_id() -> None:
    docs = _docs({"z": "fever", "m": "fever", "a": "fever", "q": "cough", "r": "rash",
                  "s": "asthma", "t": "gout", "b": "renal failure"})
    result = recall("fever", docs, k=3)
    assert [d.id for d, _ in result] == ["Condition/a", "Condition/m", "Condition/z"]
    assert len({s for _, s in result}) == 1 and result[0][1] > 0.0


def test_recall_on_empty_and_all_empty_corpora() -> None:
    assert recall("fever", [], k=5) == []
    docs = _docs({"c": "", "a": "", "b": ""})
    assert [(d.id, s) for d, s in recall("fever", docs, k=5)] == [
        ("Condition/a", 0.0), ("Condition/b", 0.0), ("Condition/c", 0.0)]
    assert [d.id for d, _ in recall("fever", docs, k=2)] == ["Condition/a", "Condition/b"]


@pytest.mark.parametrize("k", [0, -3, True, 2.5])
def test_recall_rejects_k_below_one_with_the_fix(k) -> None:
    with pytest.raises(BadRequest) as err:
        recall("fever", _docs(CORPUS), k=k)
    assert "at least 1" in err.value.message and err.value.status == 400


def test_recall_top_k_on_a_larger_corpus_matches_a_full_sort() -> None:
    rng = random.Random(7)
    words = "pain fever cough glucose blood pressure rash asthma chest renal".split()
    docs = _docs({f"{i:03d}": " ".join(rng.choices(words, k=rng.randint(1, 8))) for i in range(300)})
    scores = bm25_scores("chest pain glucose", [d.text for d in docs])
    expected = sorted(zip(docs, scores), key=lambda p: (-p[1], p[0].id))[:25]
    assert recall("chest pain glucose", docs, k=25) == expected


# ---------------------------------------------------------------- normalise

def test_normalise_divides_non_negative_scores_by_the_best() -> None:
    assert normalise_scores([0.0, 2.0, 4.0, 1.0]) == [0.0, 0.5, 1.0, 0.25]


def test_normalise_min_max_with_negatives_and_edge_cases() -> None:
    assert normalise_scores([-2.0, 0.0, 2.0]) == [0.0, 0.5, 1.0]
    assert normalise_scores([]) == []
    assert normalise_scores([3.0, 3.0]) == [0.5, 0.5]  # all equal: no evidence either way
    assert normalise_scores([0.0, 0.0, 0.0]) == [0.5, 0.5, 0.5]
    assert normalise_scores([float("nan"), 1.0, 2.0, float("inf")]) == [0.0, 0.5, 1.0, 1.0]


def test_normalise_is_monotone_in_range_and_deterministic() -> None:
    rng = random.Random(11)
    for _ in range(50):
        scores = [rng.choice([rng.uniform(-5, 20), rng.uniform(0, 20), 0.0]) for _ in range(40)]
        norm = normalise_scores(scores)
        assert norm == normalise_scores(list(scores))
        assert all(0.0 <= v <= 1.0 for v in norm)
        assert max(norm) == 1.0
        pairs = sorted(zip(scores, norm))
        assert all(a[1] <= b[1] for a, b in zip(pairs, pairs[1:]))
        assert all(a[1] < b[1] for a, b in zip(pairs, pairs[1:]) if a[0] < b[0])


def test_ranking_scores_separate_a_two_document_record():
    from adapter.search.bm25 import ranking_scores

    texts = ["Observation: Hemoglobin A1c/Hemoglobin.total in Blood 8.1 %",
             "Observation: Heart rate 72 /min"]
    assert BM25Index(texts, idf="robertson").scores("hemoglobin") == [0.0, 0.0]  # Okapi: 0
    scores = ranking_scores("hemoglobin a1c", texts)
    assert scores[0] > 0.0 and scores[1] == 0.0
    assert ranking_scores("", texts) == [0.0, 0.0] and ranking_scores("x", []) == []


def test_postings_index_gives_rank_bm25_okapi_scores() -> None:
    """BM25Index is its own postings index: rank-bm25 is the reference, BM25Okapi for
    Robertson's idf and BM25Okapi with Lucene's idf formula for the default."""
    import numpy as np
    from rank_bm25 import BM25Okapi

    rng = random.Random(7)
    vocab = [f"zq{i}" for i in range(40)]  # in no lexicon concept and no stopword list
    corpus = [rng.choices(vocab, k=rng.randint(0, 30)) for _ in range(300)] + [["zq1"]]
    okapi = BM25Okapi(corpus, k1=1.5, b=0.75, epsilon=0.0)
    robertson = BM25Index(tokenized=corpus, idf="robertson")

    class LuceneIdf(BM25Okapi):  # rank-bm25's extension point: the idf formula
        def _calc_idf(self, nd):
            self.idf = {w: math.log(1 + (self.corpus_size - n + 0.5) / (n + 0.5))
                        for w, n in nd.items()}

    lucene = LuceneIdf(corpus, k1=1.5, b=0.75)
    index = BM25Index(tokenized=corpus)
    for _ in range(20):
        terms = list(dict.fromkeys(rng.choices(vocab, k=rng.randint(1, 5))))
        query = " ".join(terms)
        assert np.allclose(robertson.scores(query), okapi.get_scores(terms), rtol=1e-12,
                           atol=1e-12)
        assert np.allclose(index.scores(query), lucene.get_scores(terms), rtol=1e-12,
                           atol=1e-12)
