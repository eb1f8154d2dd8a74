"""Plain types passed between the pipeline stages.

Every stage takes and returns these dataclasses (or lists of them) so that stages stay pure
and easy to test, and so that Celery tasks can turn them into JSON and back.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

RESOURCE_TYPES: tuple[str, ...] = ("DocumentReference", "Observation", "Condition")


@dataclass(frozen=True)
class Outcome:
    """One warning/information issue that travels into the Bundle as an OperationOutcome entry."""

    severity: str  # "warning" | "information" | "error"
    code: str  # FHIR issue-type code, e.g. "processing", "not-supported", "incomplete"
    diagnostics: str
    expression: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"severity": self.severity, "code": self.code, "diagnostics": self.diagnostics,
                "expression": list(self.expression)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Outcome":
        return cls(data["severity"], data["code"], data["diagnostics"],
                   tuple(data.get("expression", ())))


@dataclass
class SearchRequest:
    """What the caller asked for, after parameter validation."""

    query: str
    types: tuple[str, ...] = RESOURCE_TYPES
    patient: str | None = None
    count: int = 20
    offset: int = 0
    recall: int = 100
    instruction: str | None = None
    model: str | None = None
    # Standard FHIR search parameters passed upstream as filters, per resource type:
    # a list of (name, value) pairs so repeated parameters survive.
    filters: list[tuple[str, str]] = field(default_factory=list)
    authorization: str | None = None  # passed through to the FHIR server, never logged
    sort: tuple[str, ...] = ("_score",)  # `_sort` keys (adapter.search.ordering)
    rerank_budget_s: float = 0.0  # seconds of reranking; 0 = `recall` alone decides

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["types"] = list(self.types)
        data["filters"] = [list(f) for f in self.filters]
        data["sort"] = list(self.sort)
        data.pop("authorization")
        return data


@dataclass
class Document:
    """One flattened resource: `id` is "Type/id", `text` the flattened text."""

    id: str
    type: str
    text: str
    resource: dict[str, Any]
    full_url: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "type": self.type, "text": self.text,
                "resource": self.resource, "full_url": self.full_url}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Document":
        return cls(data["id"], data["type"], data["text"], data["resource"], data.get("full_url", ""))


@dataclass
class Scored:
    """A document with its final relevance score in [0, 1] (1 = best)."""

    document: Document
    score: float
    recall_score: float | None = None


@dataclass
class FetchResult:
    """Resources returned by a FHIR source for one search, plus any warnings it raised."""

    resources: list[dict[str, Any]]
    outcomes: list[Outcome] = field(default_factory=list)
    full_urls: list[str] = field(default_factory=list)  # parallel to `resources`
