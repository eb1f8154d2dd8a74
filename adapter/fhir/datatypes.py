"""FHIR data types in raw JSON → short readable text (CodeableConcept, Quantity, Range, …).

Every function takes whatever the JSON holds (right type or not) and returns "" rather than
raising, so odd upstream data degrades to less text, never to an error.
"""
from __future__ import annotations

from typing import Any, Callable

from adapter.fhir.attachments import attachment_to_text

AttachmentLoader = Callable[[str], "tuple[str, bytes] | None"]

_SYSTEM_NAMES = {
    "http://loinc.org": "LOINC", "http://snomed.info/sct": "SNOMED CT",
    "http://hl7.org/fhir/sid/icd-10": "ICD-10", "http://hl7.org/fhir/sid/icd-10-cm": "ICD-10-CM",
    "http://hl7.org/fhir/sid/icd-9-cm": "ICD-9-CM", "http://unitsofmeasure.org": "UCUM",
    "http://www.nlm.nih.gov/research/umls/rxnorm": "RxNorm", "http://hl7.org/fhir/sid/cvx": "CVX",
    "http://www.ama-assn.org/go/cpt": "CPT", "http://hl7.org/fhir/sid/ndc": "NDC",
}
_MAX_GENERIC_CHARS = 500


def scalar_text(value: Any) -> str:
    """A primitive as text ("" for anything that is not one); floats keep their JSON form."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        if isinstance(value, float):  # JSON form; 6 significant digits for long synthetic ones
            text = repr(value)
            return format(value, ".6g") if len(text) > 10 else text
        return str(value)
    return value.strip() if isinstance(value, str) else ""


def system_name(system: Any) -> str:
    """Short name of a code system URI: LOINC, SNOMED CT, …, else its last path segment."""
    system = scalar_text(system)
    if not system:
        return ""
    if system in _SYSTEM_NAMES:
        return _SYSTEM_NAMES[system]
    if system.startswith("urn:oid:"):
        return "OID " + system[8:]
    tail = system.rstrip("/").rsplit("/", 1)[-1]
    return tail or system


def as_list(value: Any) -> list[Any]:
    """A repeating element as a list (a lone object, as odd data sends, becomes one item)."""
    return value if isinstance(value, list) else [value] if isinstance(value, dict) else []


def _dedupe(parts: list[str]) -> list[str]:
    seen: set[str] = set()
    out = []
    for part in parts:
        if part and part.casefold() not in seen:
            seen.add(part.casefold())
            out.append(part)
    return out


def coding_text(coding: Any, with_code: bool = True) -> str:
    """"display (SYSTEM code)"; without `with_code` just the display (or the bare code)."""
    if not isinstance(coding, dict):
        return scalar_text(coding)
    display, code = scalar_text(coding.get("display")), scalar_text(coding.get("code"))
    if not with_code:
        return display or code
    tag = " ".join(p for p in (system_name(coding.get("system")), code) if p)
    if display and tag:
        return f"{display} ({tag})"
    return display or tag


def concept_text(concept: Any, with_code: bool = True) -> str:
    """CodeableConcept → its text and every coding ("; "-joined, duplicates dropped)."""
    if isinstance(concept, list):
        return "; ".join(_dedupe([concept_text(c, with_code) for c in concept]))
    if not isinstance(concept, dict):
        return scalar_text(concept)
    if "coding" not in concept and "text" not in concept and ("code" in concept or "display" in concept):
        return coding_text(concept, with_code)  # a bare Coding where a concept was expected
    if "coding" not in concept and "text" not in concept:
        return generic_text(concept)  # e.g. an R5 CodeableReference {concept, reference}
    text = scalar_text(concept.get("text"))
    parts = [text] if text else []
    where = {text.casefold(): 0} if text else {}  # display → its part, to add codes, not repeats
    for coding in as_list(concept.get("coding")):
        display = scalar_text(coding.get("display")) if isinstance(coding, dict) else ""
        if display and display.casefold() in where:
            if with_code:
                tag = " ".join(p for p in (system_name(coding.get("system")),
                                           scalar_text(coding.get("code"))) if p)
                parts[where[display.casefold()]] += f" ({tag})" if tag else ""
            continue
        if display:
            where[display.casefold()] = len(parts)
        parts.append(coding_text(coding, with_code))
    return "; ".join(_dedupe(parts))


def concept_short(concept: Any) -> str:
    """Main name of a concept: its text, else the first display, else the first code."""
    if isinstance(concept, list):
        return next((s for s in map(concept_short, concept) if s), "")
    if not isinstance(concept, dict):
        return scalar_text(concept)
    if scalar_text(concept.get("text")):
        return scalar_text(concept.get("text"))
    codings = concept.get("coding") if isinstance(concept.get("coding"), list) else [concept]
    names = [coding_text(c, with_code=False) for c in codings if isinstance(c, dict)]
    return next((n for n in names if n), "")


def quantity_text(quantity: Any) -> str:
    """"120 mmHg (mm[Hg])": comparator, value, unit, and the UCUM code when it differs."""
    if not isinstance(quantity, dict):
        return scalar_text(quantity)
    value = scalar_text(quantity.get("comparator")) + scalar_text(quantity.get("value"))
    unit, code = scalar_text(quantity.get("unit")), scalar_text(quantity.get("code"))
    text = " ".join(p for p in (value, unit or code) if p)
    ucum = scalar_text(quantity.get("system")) in ("", "http://unitsofmeasure.org")
    return f"{text} ({code})" if ucum and unit and code and code.casefold() != unit.casefold() else text


def range_text(rng: Any) -> str:
    if not isinstance(rng, dict):
        return scalar_text(rng)
    low, high = quantity_text(rng.get("low")), quantity_text(rng.get("high"))
    if low and high:
        return f"{low} to {high}"
    return f"at least {low}" if low else f"at most {high}" if high else ""


def period_text(period: Any) -> str:
    if not isinstance(period, dict):
        return scalar_text(period)
    start, end = scalar_text(period.get("start")), scalar_text(period.get("end"))
    if start and end:
        return f"{start} to {end}"
    return f"from {start}" if start else f"until {end}" if end else ""


def sampled_data_text(sampled: Any) -> str:
    """A summary, not the samples: count, interval, dimensions and the value range."""
    if not isinstance(sampled, dict):
        return scalar_text(sampled)
    raw = sampled.get("data") if isinstance(sampled.get("data"), str) else ""
    numbers = []
    for token in raw.split():
        try:
            numbers.append(float(token))
        except ValueError:
            pass  # E / L / U markers (error, below / above detection limit)
    parts = [f"sampled data, {len(raw.split())} samples"]
    if scalar_text(sampled.get("period")):
        parts.append(f"every {scalar_text(sampled.get('period'))} ms")
    if scalar_text(sampled.get("dimensions")):
        parts.append(f"{scalar_text(sampled.get('dimensions'))} dimensions")
    origin = sampled.get("origin") if isinstance(sampled.get("origin"), dict) else {}
    if numbers:
        try:
            factor = float(sampled.get("factor", 1) or 1)
            base = float(origin.get("value", 0) or 0)
            lo, hi = base + factor * min(numbers), base + factor * max(numbers)
            unit = scalar_text(origin.get("unit")) or scalar_text(origin.get("code"))
            parts.append(f"range {lo:g} to {hi:g} {unit}".rstrip())
        except (TypeError, ValueError):
            pass
    return ", ".join(parts)


def ratio_text(ratio: Any) -> str:
    if not isinstance(ratio, dict):
        return scalar_text(ratio)
    num, den = quantity_text(ratio.get("numerator")), quantity_text(ratio.get("denominator"))
    return f"{num} / {den}" if num and den else num or den


def reference_text(reference: Any) -> str:
    """A Reference's display text only; the raw id says nothing to a reader."""
    if isinstance(reference, list):
        return "; ".join(_dedupe([reference_text(r) for r in reference]))
    if isinstance(reference, dict):
        return scalar_text(reference.get("display"))
    return ""


def annotation_text(note: Any) -> str:
    if isinstance(note, list):
        return "\n".join(t for t in (annotation_text(n) for n in note) if t)
    return scalar_text(note.get("text")) if isinstance(note, dict) else scalar_text(note)


def generic_text(value: Any, depth: int = 0) -> str:
    """Best-effort text of any JSON value (unknown fields, R5-isms): texts, displays, scalars."""
    if depth > 6:
        return ""
    if isinstance(value, list):
        text = "; ".join(_dedupe([generic_text(v, depth + 1) for v in value]))
    elif isinstance(value, dict):
        if scalar_text(value.get("display")) or scalar_text(value.get("text")) or "coding" in value:
            text = concept_text(value)
        elif "value" in value and ("unit" in value or "code" in value):
            text = quantity_text(value)
        else:
            skip = {"reference", "system", "id", "url", "extension", "modifierExtension", "data", "div"}
            text = "; ".join(_dedupe([generic_text(v, depth + 1)
                                      for k, v in value.items() if k not in skip]))
    else:
        text = scalar_text(value)
    return text[:_MAX_GENERIC_CHARS]


_TYPED = {
    "Quantity": quantity_text, "Age": quantity_text, "Duration": quantity_text,
    "Count": quantity_text, "Distance": quantity_text, "SimpleQuantity": quantity_text,
    "Money": quantity_text, "CodeableConcept": concept_text, "Coding": coding_text,
    "Range": range_text, "Ratio": ratio_text, "Period": period_text,
    "SampledData": sampled_data_text, "Reference": reference_text,
}


def choice_text(element: Any, prefix: str, loader: AttachmentLoader | None = None) -> str:
    """The `prefix[x]` choice of an element (valueQuantity, onsetAge, …) as text."""
    if not isinstance(element, dict):
        return ""
    for key, value in element.items():
        if key.startswith(prefix) and len(key) > len(prefix) and key[len(prefix)].isupper():
            kind = key[len(prefix):]
            if kind == "Attachment":
                return attachment_to_text(value, loader)
            if kind in _TYPED:
                return _TYPED[kind](value)
            return scalar_text(value) or generic_text(value)
    return ""
