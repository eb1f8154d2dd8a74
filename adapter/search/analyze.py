"""Words as clinicians write them: the question's language, stemming, and which words count.

BM25 (adapter/search/bm25.py) indexes *terms*, not raw tokens: each token of
`adapter.search.tokenize` goes through the Snowball stemmer of the text's language
(PyStemmer, the C build of the Snowball algorithms: English, Spanish, French, German,
Portuguese), so "kidneys" finds "kidney", "depressive" finds "depression", "alcoholism" finds
"alcohol", "infecciones" finds "infección". Tokens shorter than `MIN_STEM` letters, numbers
and CJK text are kept as they are (Chinese and Japanese need no stemming; "MI", "Na", "ER"
must stay themselves).

A record's language is its FHIR `language` (e.g. "es-MX"), English when absent. A question's
language is guessed from its own words (`question_language`): characters of a script, the
function words of each language, and the lexicon's translated names; English when nothing
says otherwise. Only that language's function words are dropped from the question
(`is_stopword`), and never a word the user wrote in capitals inside a question that is not
all capitals: "history of MI", "ALL relapse", "AS on echo" keep "mi", "all", "as".
"""
from __future__ import annotations

import re
import threading
import Stemmer

#: lexicon language code → Snowball algorithm (Chinese: none)
SNOWBALL = {"en": "english", "es": "spanish", "fr": "french", "de": "german", "pt": "portuguese"}
LANGUAGES = ("en", "es", "fr", "de", "pt", "zh")
DEFAULT_LANGUAGE = "en"
MIN_STEM = 4  # shorter tokens are abbreviations or function words: never stemmed

_STEMMERS: dict[str, "Stemmer.Stemmer"] = {}
_LOCK = threading.Lock()  # a PyStemmer object is not safe to share between threads
_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff]")
_WORD = re.compile(r"[^\W\d_]+")
_LETTERS_ONLY = re.compile(r"^[^\W\d_]+$")
_MARKS = {  # letters that only some of the languages write (after NFKC, before folding)
    "es": "ñ¿¡",
    "fr": "çœèêëàâîïùûÿ",
    "de": "äöüß",
    "pt": "ãõç",
}


def language_of(code: str | None) -> str:
    """A BCP-47 tag ("es-MX", "pt_BR", "EN") → one of `LANGUAGES`; others and None → English."""
    if not code or not isinstance(code, str):
        return DEFAULT_LANGUAGE
    primary = code.replace("_", "-").split("-", 1)[0].strip().lower()
    return primary if primary in LANGUAGES else DEFAULT_LANGUAGE


_MEMO: dict[str, dict[str, str]] = {}  # language → token → stem: a pure function's memo
_MEMO_LIMIT = 200_000  # words per language; past it the memo starts again


def _stem_new(token: str, language: str) -> str:
    algorithm = SNOWBALL.get(language)
    if algorithm is None or len(token) < MIN_STEM or not _LETTERS_ONLY.match(token) \
            or _CJK.search(token):
        out = token
    else:
        with _LOCK:
            stemmer = _STEMMERS.get(algorithm)
            if stemmer is None:
                stemmer = _STEMMERS[algorithm] = Stemmer.Stemmer(algorithm)
            out = stemmer.stemWord(token)
    memo = _MEMO.setdefault(language, {})
    if len(memo) >= _MEMO_LIMIT:
        memo.clear()
    memo[token] = out
    return out


def stem(token: str, language: str = DEFAULT_LANGUAGE) -> str:
    """The Snowball stem of one folded token in `language`; short, numeric and CJK tokens,
    and languages without a stemmer, give the token itself."""
    found = _MEMO.get(language, {}).get(token)
    return found if found is not None else _stem_new(token, language)


def stems(tokens: list[str], language: str = DEFAULT_LANGUAGE) -> list[str]:
    """`stem` of each token, in order (the memo read in one comprehension: indexing a chart
    stems hundreds of thousands of tokens, most of them seen before)."""
    memo = _MEMO.setdefault(language, {})
    get = memo.get
    return [found if (found := get(t)) is not None else _stem_new(t, language) for t in tokens]


def question_language(question: str, stopwords: dict[str, frozenset[str]],
                      names: dict[str, frozenset[str]] | None = None) -> str:
    """The question's language: CJK script → "zh"; otherwise the language with the most
    evidence among letters only it writes (ñ, ß, ã…), its function words and its lexicon
    names (`names[lang]`, folded words); English wins ties and empty evidence."""
    if _CJK.search(question):
        return "zh"
    from adapter.search.tokenize import fold

    lowered = question.lower()
    words = [fold(w) for w in _WORD.findall(lowered)]
    score = {lang: 0.0 for lang in SNOWBALL}
    for lang, marks in _MARKS.items():
        score[lang] += sum(0.5 for ch in lowered if ch in marks)
    for lang in SNOWBALL:
        function_words = stopwords.get(lang, frozenset())
        known = (names or {}).get(lang, frozenset())
        for word in words:
            if word in function_words:
                score[lang] += 1.0
            if word in known:
                score[lang] += 1.0
    best = max(score.values())
    if best <= 0.0 or score[DEFAULT_LANGUAGE] >= best:
        return DEFAULT_LANGUAGE
    return min(lang for lang, value in score.items() if value == best)  # deterministic


def written_as_abbreviation(question: str) -> frozenset[str]:
    """Folded words the user wrote in capitals (2+ letters) inside a question that is not
    all capitals: "history of MI" → {"mi"}; "HISTORY OF MI" → {} (nothing stands out)."""
    words = _WORD.findall(question)
    if not words or all(w.isupper() for w in words if len(w) > 1):
        return frozenset()
    from adapter.search.tokenize import fold

    return frozenset(fold(w) for w in words if len(w) > 1 and w.isupper())
