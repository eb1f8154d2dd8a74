"""The one tokenizer BM25 uses for documents and queries alike.

Rules, in order:
- NFKC (full-width letters and digits become ASCII, ligatures split), then case-folding.
- Accent folding: NFKD, combining marks dropped, NFC again ("Café" → "cafe"). The Japanese
  voicing marks (dakuten, handakuten) are kept, and NFC puts Hangul syllables back together.
- Split on anything that is not a letter or digit: "A1c/Hemoglobin.total" → a1c, hemoglobin,
  total; "4548-4" → 4548, 4; "mm[Hg]" → mm, hg; underscores split too.
- A decimal number stays one token: "7.5" → "7.5" (so "HbA1c 7.5" does not match every "7"
  and every "5"); "7.50" and "7.5" stay different tokens.
- Han, Hiragana, Katakana and Hangul runs give character unigrams plus bigrams ("糖尿病" →
  糖, 尿, 病, 糖尿, 尿病): no dictionary is needed and a Chinese or Japanese query matches.
- "SNOMED CT" is one name: the "ct" after "snomed" is dropped, so the flattener's code-system
  label ("(SNOMED CT 44054006)" on every coded record) does not make a question about a CT
  scan match every Condition.
- No stopword list here (the query side drops stopwords: adapter/search/expand.py).
"""
from __future__ import annotations

import re
import unicodedata

_CJK = ("\u1100-\u11ff\u3040-\u309f\u30a0-\u30ff\u3130-\u318f\u31f0-\u31ff\u3400-\u4dbf"
        "\u4e00-\u9fff\ua960-\ua97f\uac00-\ud7af\ud7b0-\ud7ff\uf900-\ufaff\uff66-\uff9f"
        "\U00020000-\U0003134f")
_TOKEN = re.compile(rf"(?P<cjk>[{_CJK}]+)|(?P<number>\d+(?:\.\d+)+)|(?P<word>[^\W_{_CJK}]+)")
_ASCII_TOKEN = re.compile(r"\d+(?:\.\d+)+|[a-z0-9]+")  # the same rules, for ASCII-only text
_KEPT_MARKS = {"\u3099", "\u309a"}  # kana voicing marks: part of the letter, not an accent


def fold(text: str) -> str:
    """NFKC + case fold + accent fold (combining marks dropped, kana voicing kept)."""
    text = unicodedata.normalize("NFKC", text).casefold()
    if text.isascii():
        return text
    decomposed = unicodedata.normalize("NFKD", text)
    kept = "".join(ch for ch in decomposed
                   if ch in _KEPT_MARKS or not unicodedata.combining(ch))
    return unicodedata.normalize("NFC", kept)


def _drop_snomed_ct(tokens: list[str]) -> list[str]:
    return [t for i, t in enumerate(tokens) if not (t == "ct" and i and tokens[i - 1] == "snomed")]


def tokenize(text: str) -> list[str]:
    """Text → BM25 tokens (see the module docstring for the rules). "" → []."""
    if not text:
        return []
    if text.isascii():  # fast path (most FHIR text): NFKC and accent folding change nothing
        lowered = text.lower()
        tokens = _ASCII_TOKEN.findall(lowered)
        return _drop_snomed_ct(tokens) if "snomed" in lowered else tokens
    tokens: list[str] = []
    for match in _TOKEN.finditer(fold(text)):
        cjk = match.group("cjk")
        if cjk is None:
            tokens.append(match.group())
            continue
        tokens.extend(cjk)  # unigrams
        tokens.extend(cjk[i:i + 2] for i in range(len(cjk) - 1))  # bigrams
    return _drop_snomed_ct(tokens) if "snomed" in tokens else tokens
