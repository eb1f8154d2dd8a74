"""Usage and cost of a scoring call: prompt tokens (from the `ScoreResult`) × the price table.

The price table (`prices_per_million_tokens`) holds "name=USD per million prompt tokens"
entries; a model is priced by its own name, then by its tier (0.6B / 4B / 8B from an alias,
`Qwen/Qwen3-Reranker-<tier>` or a `model_queues` route), then by "default".
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from adapter.metrics import USAGE_COST, USAGE_TOKENS
from adapter.rerank.base import ScoreResult

_HF_TIER = re.compile(r"Qwen/Qwen3-Reranker-(0\.6B|4B|8B)", re.IGNORECASE)
TIERS = ("0.6B", "4B", "8B")
USAGE_URL = "https://fhir-rerank.example.org/StructureDefinition/usage"
MODEL_URL = "https://fhir-rerank.example.org/StructureDefinition/scored-by"


def price_table(settings: Any) -> dict[str, float]:
    """`prices_per_million_tokens` as {name: USD per million tokens}; a bad entry is a
    ValueError that names it."""
    table: dict[str, float] = {}
    for entry in settings.prices_per_million_tokens:
        name, sep, price = entry.rpartition("=")
        try:
            table[name.strip()] = float(price)
        except ValueError:
            sep = ""
        if not sep or not name.strip():
            raise ValueError(f"prices_per_million_tokens entry {entry!r} is not name=USD "
                             "(e.g. \"0.6B=0.01\")")
    return table


def tier_of(settings: Any, model: str) -> str:
    """The tier a model belongs to: an alias, a Qwen3-Reranker id, a `model_queues` route,
    else "default"."""
    for entry in settings.model_queues:
        name, sep, tier = entry.rpartition("=")
        if sep and name.strip() == model:
            return tier.strip().removeprefix("rerank.")
    for tier in TIERS:
        if model.strip().upper() == tier.upper():
            return tier
    match = _HF_TIER.fullmatch(model.strip())
    return next(t for t in TIERS if t.upper() == match.group(1).upper()) if match else "default"


def price_per_million(settings: Any, model: str) -> float:
    table = price_table(settings)
    if model in table:
        return table[model]
    return table.get(tier_of(settings, model), table.get("default", 0.0))


@dataclass(frozen=True)
class Usage:
    """Prompt tokens scored and what they cost at the configured list price."""

    tokens: int
    cost_usd: float
    model: str
    tier: str

    def headers(self) -> dict[str, str]:
        return {"X-Usage-Tokens": str(self.tokens), "X-Usage-Cost-USD": format_usd(self.cost_usd)}

    def to_json(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "cost_usd": self.cost_usd, "model": self.model,
                "tier": self.tier}


def format_usd(cost: float) -> str:
    return f"{cost:.10f}".rstrip("0").rstrip(".") or "0"


def usage_of(result: ScoreResult, settings: Any, model: str) -> Usage:
    """Tokens and cost of one scoring result (keyword order reads no tokens and costs 0)."""
    tokens = result.total_tokens
    cost = tokens * price_per_million(settings, model) / 1_000_000 if tokens else 0.0
    return Usage(tokens, round(cost, 12), model, tier_of(settings, model))


def bundle_usage_extension(usage: Usage) -> list[dict[str, Any]]:
    """Bundle.meta extensions: tokens and cost, and the model (id and tier) that scored."""
    return [
        {"url": USAGE_URL, "extension": [
            {"url": "tokens", "valueInteger": usage.tokens},
            {"url": "costUSD", "valueDecimal": usage.cost_usd}]},
        {"url": MODEL_URL, "extension": [
            {"url": "model", "valueString": usage.model},
            {"url": "tier", "valueString": usage.tier}]},
    ]


def usage_from_bundle(bundle: dict[str, Any]) -> Usage | None:
    """The usage a Bundle carries in meta.extension (for response headers), if any."""
    found: dict[str, Any] = {}
    for ext in bundle.get("meta", {}).get("extension", []):
        if ext.get("url") in (USAGE_URL, MODEL_URL):
            for part in ext.get("extension", []):
                found[part["url"]] = next(v for k, v in part.items() if k.startswith("value"))
    if "tokens" not in found:
        return None
    return Usage(int(found["tokens"]), float(found["costUSD"]), str(found.get("model", "")),
                 str(found.get("tier", "")))


def count_usage(usage: Usage, api: str) -> None:
    """Add an answered call's tokens and cost to the metrics (API processes export them)."""
    USAGE_TOKENS.labels(api, usage.tier).inc(usage.tokens)
    USAGE_COST.labels(api, usage.tier).inc(usage.cost_usd)
