"""Which queue a job goes to, and which queues a worker consumes.

Routing rule (documented in docs/JOBS.md): a request's `model` goes to
  1. `rerank.<tier>` when `model_queues` holds "model=tier" for it (local dirs, custom ids);
  2. `rerank.<alias>` for a tier alias 0.6B / 4B / 8B or `Qwen/Qwen3-Reranker-<alias>`;
  3. `rerank.<alias>` for a local directory holding one of those models (its config.json has
     that tier's shape), so `fhir-rerank worker --tiers 0.6B` with `model = /models/qwen3-0.6b`
     consumes the queue the API sends that model's jobs to;
  4. `rerank.default` for anything else.
"""
from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path

from adapter.config import Settings

TIER_ALIASES = ("0.6B", "4B", "8B")
QUEUE_PREFIX = "rerank."
DEFAULT_QUEUE = "rerank.default"
#: the rerank task's name on the broker (adapter.jobs.celery_backend registers it; queued
#: messages name it, so it must not change)
TASK_NAME = "adapter.jobs.rerank"
_HF_TIER = re.compile(r"Qwen/Qwen3-Reranker-(0\.6B|4B|8B)")


#: (hidden_size, num_hidden_layers) of each Qwen3-Reranker tier, from the models' config.json.
_TIER_SHAPES = {(1024, 28): "0.6B", (2560, 36): "4B", (4096, 36): "8B"}


@lru_cache(maxsize=64)
def local_model_tier(path: str) -> str | None:
    """The tier a local model directory holds, from its config.json; None when not a tier."""
    try:
        config = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict) or config.get("model_type") != "qwen3":
        return None
    return _TIER_SHAPES.get((config.get("hidden_size"), config.get("num_hidden_layers")))


def _tier_queue(tier: str) -> str:
    return tier if tier.startswith(QUEUE_PREFIX) else QUEUE_PREFIX + tier


def tier_of(queue: str) -> str:
    """`rerank.4B` → `4B` (for messages and the worker command)."""
    return queue.removeprefix(QUEUE_PREFIX)


def worker_command(queue: str) -> str:
    """The one command that starts a worker consuming `queue` (the 503 of a job and /readyz
    both name it): `--tiers 4B` for a tier alias or `default`, the queue's own name otherwise
    (a bare custom tier would be read as a model and routed to rerank.default)."""
    tier = tier_of(queue)
    return f"fhir-rerank worker --tiers {tier if tier in (*TIER_ALIASES, 'default') else queue}"


def unrouted_tiers(settings: Settings, tiers: list[str]) -> list[str]:
    """The `--tiers` entries whose queue no allowed model is sent to: a worker there would wait
    forever for jobs."""
    return [t for t in tiers
            if not models_for_queues(settings, [queue_for_tier(settings, t)])]


def _placed(settings: Settings, model: str) -> str | None:
    for entry in settings.model_queues:
        name, sep, tier = entry.rpartition("=")
        if sep and name.strip() == model:
            return _tier_queue(tier.strip())
    return None


def queue_for_model(settings: Settings, model: str) -> str:
    """The queue a job for `model` is sent to (see the module docstring for the rule)."""
    placed = _placed(settings, model)
    if placed:
        return placed
    if model in TIER_ALIASES:
        return QUEUE_PREFIX + model
    match = _HF_TIER.fullmatch(model)
    if match:
        return QUEUE_PREFIX + match.group(1)
    local = local_model_tier(model) if "/" in model or "\\" in model else None
    return QUEUE_PREFIX + local if local else DEFAULT_QUEUE


def queue_for_tier(settings: Settings, tier: str) -> str:
    """A worker's `--tiers` entry → its queue: a tier alias, "default", a queue name, or a model."""
    if tier in TIER_ALIASES or tier == "default" or tier.startswith(QUEUE_PREFIX):
        return _tier_queue(tier)
    return queue_for_model(settings, tier)


def worker_queues(settings: Settings, tiers: list[str]) -> list[str]:
    """The queues for `--tiers` (tier aliases, "default", queue names or model values)."""
    return list(dict.fromkeys(queue_for_tier(settings, t) for t in tiers))


def known_models(settings: Settings) -> list[str]:
    """Every model a request may name: the default model and the allowlist."""
    return list(dict.fromkeys([settings.model, *settings.models_allowed]))


def models_for_queues(settings: Settings, queues: list[str]) -> list[str]:
    """The models a worker consuming `queues` must hold (loaded once per worker process)."""
    return [m for m in known_models(settings) if queue_for_model(settings, m) in queues]


def all_queues(settings: Settings) -> list[str]:
    names = [QUEUE_PREFIX + t for t in TIER_ALIASES] + [DEFAULT_QUEUE]
    names += [queue_for_model(settings, m) for m in known_models(settings)]
    names += [_tier_queue(e.rpartition("=")[2].strip()) for e in settings.model_queues if "=" in e]
    return list(dict.fromkeys(names))
