"""The clinical lexicon for query expansion: data files beside this module, loaded once.

Files (tab-separated, `|` between alternatives, `#` starts a comment line; see README.md):

- `concepts/*.tsv`: `id  terms  also  lay  related`. `terms` are the English names records
  use, `also` abbreviations and spellings records may use too: both trigger the concept and
  are added to the query. `lay` (everyday words: "sugar", "heart attack") only trigger it.
  `related` terms are only added (at a lower weight), never trigger.
- `i18n/<lang>.tsv`: `id  term|term` — the concept's names in another language (triggers).
- `ambiguous.tsv`: `abbreviation  id  context|context` — one line per sense of an abbreviation
  that must not expand on its own (see expand.py for the rule).
- `stopwords/<lang>.txt`: function words, whitespace-separated (`#` starts a comment); they never rank.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from adapter.search.tokenize import fold, tokenize

POWER = 2.0
HERE = Path(__file__).resolve().parent
LANGUAGES = ("es", "fr", "de", "pt", "zh")
_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff]")
_WORDS = re.compile(r"[^\W_]+", re.UNICODE)


@dataclass
class Concept:
    """One clinical concept: its English names, what triggers it, and what it adds."""

    id: str
    terms: list[str]
    also: list[str]
    lay: list[str]
    related: list[str]
    translations: dict[str, list[str]] = field(default_factory=dict)
    expansion_tokens: list[str] = field(default_factory=list)
    related_tokens: list[str] = field(default_factory=list)
    #: token → share of the expansion weight (1.0 for a token only this concept uses)
    specificity: dict[str, float] = field(default_factory=dict)


@dataclass
class Lexicon:
    """Concepts by id, trigger forms → concept ids, ambiguous abbreviations, stopwords."""

    concepts: dict[str, Concept]
    order: list[str]
    triggers: dict[str, list[str]]
    ambiguous: dict[str, list[tuple[str, set[str]]]]
    stopwords: frozenset[str]

    @staticmethod
    def is_cjk(form: str) -> bool:
        return bool(_CJK.search(form))


def trigger_form(text: str) -> str:
    """How a trigger is matched: CJK text folded as is; other text as folded words."""
    folded = fold(text).strip()
    return folded if _CJK.search(folded) else " ".join(_WORDS.findall(folded))


def _rows(path: Path) -> list[list[str]]:
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            rows.append([cell.strip() for cell in line.split("\t")])
    return rows


def _alternatives(cell: str) -> list[str]:
    return [part.strip() for part in cell.split("|") if part.strip()]


def _tokens(texts: list[str], stopwords: frozenset[str]) -> list[str]:
    out: list[str] = []
    for text in texts:
        out.extend(t for t in tokenize(text) if t not in stopwords and t not in out
                   and not (len(t) == 1 and t.isascii()))  # "LDL-C" must not add "c"
    return out


@lru_cache(maxsize=4)
def load_lexicon(root: Path = HERE) -> Lexicon:
    """Read and check the lexicon; a broken file is a programming error (ValueError)."""
    stopwords = frozenset(word for path in sorted((root / "stopwords").glob("*.txt"))
                          for line in path.read_text(encoding="utf-8").splitlines()
                          for word in tokenize(line.split("#", 1)[0]))  # comments are not words
    concepts: dict[str, Concept] = {}
    for path in sorted((root / "concepts").glob("*.tsv")):
        for row in _rows(path):
            row += [""] * (5 - len(row))
            cid, terms, also, lay, related = row[:5]
            if not cid or not terms or cid in concepts:
                raise ValueError(f"{path.name}: concept {cid!r} is empty or repeated")
            concepts[cid] = Concept(cid, _alternatives(terms), _alternatives(also),
                                    _alternatives(lay), _alternatives(related))
    for lang in LANGUAGES:
        for row in _rows(root / "i18n" / f"{lang}.tsv"):
            if row[0] not in concepts or len(row) < 2:
                raise ValueError(f"i18n/{lang}.tsv: unknown concept {row[0]!r}")
            concepts[row[0]].translations.setdefault(lang, []).extend(_alternatives(row[1]))
    ambiguous: dict[str, list[tuple[str, set[str]]]] = {}
    for row in _rows(root / "ambiguous.tsv"):
        abbreviation, cid, context = (row + ["", "", ""])[:3]
        if cid not in concepts:
            raise ValueError(f"ambiguous.tsv: unknown concept {cid!r}")
        words = {w for c in _alternatives(context) for w in trigger_form(c).split()}
        ambiguous.setdefault(trigger_form(abbreviation), []).append((cid, words))
    triggers: dict[str, list[str]] = {}
    for concept in concepts.values():
        forms = concept.terms + concept.also + concept.lay + [t for ts in concept.translations.values()
                                                for t in ts]
        for form in forms:
            key = trigger_form(form)
            if key in ambiguous:
                raise ValueError(f"{concept.id}: {form!r} is listed as ambiguous; "
                                 "give it context in ambiguous.tsv instead")
            if key and key not in stopwords and concept.id not in triggers.get(key, []):
                triggers.setdefault(key, []).append(concept.id)
        concept.expansion_tokens = _tokens(concept.terms + concept.also, stopwords)
    for concept in concepts.values():  # a related term that names a concept brings its names
        related = list(concept.related)
        for term in concept.related:
            for other in triggers.get(trigger_form(term), []):
                if other != concept.id:
                    related.extend(concepts[other].terms + concepts[other].also)
        concept.related_tokens = [t for t in _tokens(related, stopwords)
                                  if t not in concept.expansion_tokens]
    _set_specificity(concepts)
    return Lexicon(concepts, list(concepts), triggers, ambiguous, stopwords)


def _set_specificity(concepts: dict[str, Concept]) -> None:
    """A token many concepts share ("blood", "serum", "count") says little about any one of
    them: weigh it by its inverse concept frequency, (log(C / cf) / log C)², 1.0 when unique.
    A one-word name of the concept ("glucose", "LDL") is its head: it takes the square root
    of that (1.0 when unique, "glucose" 0.81, "blood" 0.50)."""
    frequency: dict[str, int] = {}
    for concept in concepts.values():
        for token in concept.expansion_tokens:
            frequency[token] = frequency.get(token, 0) + 1
    total = max(len(concepts), 2)
    for concept in concepts.values():
        heads = {tokens[0] for tokens in (tokenize(n) for n in concept.terms + concept.also)
                 if len(tokens) == 1}
        concept.specificity = {
            token: (math.log(total / frequency.get(token, 1)) / math.log(total)) ** POWER
            for token in set(concept.expansion_tokens) | set(concept.related_tokens)}
        concept.specificity.update({
            token: math.log(total / frequency.get(token, 1)) / math.log(total)
            for token in heads})
