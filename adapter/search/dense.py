"""Qwen3-Embedding through transformers: the model card's embeddings, computed in batches.

The maths is the official recipe: a query is embedded as "Instruct: {task}\\nQuery:{query}",
a document as its plain text; the checkpoint's own tokenizer adds what it adds (the released
Qwen3-Embedding tokenizers append `<|endoftext|>`), truncating to `max_length`; the vector is
the last hidden state at the last real token ("last-token pooling"), L2-normalised in float32,
so cosine similarity is a dot product. What changes is only how it is computed: texts are
sorted by length and packed into right-padded batches under a padded-token budget, each row
reading its own last real position (the card pads on the left and reads position −1; RoPE is
relative and padding is masked, so both give the same vectors).

Models load once per runtime (`adapter.runtime.ModelStore`, keyed by checkpoint, device and
dtype) with transformers' real classes (`AutoModel` → `Qwen3Model`), like the reranker.
Document vectors are cached in the runtime's `Caches.vectors` per resource version *and* a
digest of the text embedded: a document's text may hold an attachment only the caller's
credentials could read (adapter.fhir.flatten caches such text per caller), and a vector is a
function of its text alone, so a caller is only ever given the vector of the very text their
own access built, never one made from text another caller could read and they could not.
"""
from __future__ import annotations

import hashlib
import logging
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

import torch

from adapter.errors import ModelLoadError
from adapter.fhir.flatten import version_key
from adapter.lru import LRU
from adapter.models import Document
from adapter.rerank.qwen3 import load_attempt, load_qwen3_checkpoint, pack_by_tokens

if TYPE_CHECKING:
    from adapter.caches import ModelStore

logger = logging.getLogger(__name__)

EMBEDDING_TIERS = {"0.6B": "Qwen/Qwen3-Embedding-0.6B", "4B": "Qwen/Qwen3-Embedding-4B",
                   "8B": "Qwen/Qwen3-Embedding-8B"}
QUERY_FORMAT = "Instruct: {task}\nQuery:{query}"
DEFAULT_TASK = ("Given a clinician's question about a patient, retrieve the parts of the "
                "patient's record that answer it")


def resolve_embedding_id(name: str) -> str:
    """Tier alias (`0.6B`, `4B`, `8B`, any case) → Hugging Face id; ids and paths pass through."""
    text = name.strip()
    return EMBEDDING_TIERS.get(text.upper(), text)


@dataclass
class LoadedEmbedder:
    """A Qwen3Model + tokenizer pair, loaded once per runtime."""

    model: Any
    tokenizer: Any
    device: torch.device
    model_id: str
    lock: threading.Lock = field(default_factory=threading.Lock)


def _load_failure(name: str, model_id: str, exc: BaseException) -> ModelLoadError:
    tried, reason = load_attempt(model_id, exc)
    return ModelLoadError(
        f"could not load Qwen3-Embedding {name!r}: tried {tried}: {reason}. Fix: download it "
        f"once with network access, set `embedder` to a local directory holding a "
        f"Qwen3-Embedding checkpoint, or set embedder = \"\" for keyword recall only.")


def load_embedding_model(name: str, device: str, dtype: torch.dtype,
                         models: "ModelStore | None" = None) -> LoadedEmbedder:
    """The Qwen3-Embedding checkpoint `name` on `device` in `dtype`: from `models` (loaded
    there once), or loaded now when none is given."""
    model_id = resolve_embedding_id(name)
    if models is None:
        return _load_embedding_model(name, model_id, device, dtype)
    return models.get_or_load(("embedding", model_id, device, str(dtype)),
                              lambda: _load_embedding_model(name, model_id, device, dtype))


def _load_embedding_model(name: str, model_id: str, device: str, dtype: torch.dtype
                          ) -> LoadedEmbedder:
    from transformers import AutoModel

    try:
        model, tokenizer = load_qwen3_checkpoint(model_id, AutoModel, device, dtype)
    except Exception as exc:  # hub/offline/IO/format errors all mean "cannot load"
        raise _load_failure(name, model_id, exc) from exc
    model.to(device).eval()
    loaded = LoadedEmbedder(model, tokenizer, next(model.parameters()).device, model_id)
    logger.info("loaded Qwen3-Embedding %s on %s (%s)", model_id, device, dtype)
    return loaded


class Qwen3Embedder:
    """Unit vectors of queries and documents, as the Qwen3-Embedding model card computes them."""

    def __init__(self, loaded: LoadedEmbedder, *, task: str | None = None,
                 max_length: int = 8192, batch_tokens: int = 16384,
                 vectors: LRU[torch.Tensor] | None = None) -> None:
        if max_length < 2 or batch_tokens < 1:
            raise ValueError(f"max_length {max_length} and batch_tokens {batch_tokens} must be "
                             "positive (max_length at least 2)")
        self.loaded, self.task = loaded, task or DEFAULT_TASK
        self.max_length, self.batch_tokens = max_length, batch_tokens
        #: document vectors per (this model + settings, resource version); none: not cached
        self.vectors = vectors if vectors is not None else LRU(0)
        #: names this model + settings in cache keys
        self.cache_id = f"{loaded.model_id}|{loaded.device}|{loaded.model.dtype}|{max_length}"

    def describe(self) -> str:
        dtype = str(self.loaded.model.dtype).replace("torch.", "")
        return f"Qwen3-Embedding ({self.loaded.model_id}, {self.loaded.device}, {dtype})"

    def query_text(self, query: str, task: str | None = None) -> str:
        return QUERY_FORMAT.format(task=task or self.task, query=query)

    def embed_queries(self, queries: Sequence[str], task: str | None = None) -> torch.Tensor:
        """(n, hidden) float32 unit vectors of instruction-formatted queries."""
        return self.embed([self.query_text(q, task) for q in queries])

    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        """(n, hidden) float32 unit vectors of `texts` as given (documents: plain text)."""
        hidden = self.loaded.model.config.hidden_size
        if not texts:
            return torch.zeros((0, hidden), dtype=torch.float32)
        lm = self.loaded
        ids = lm.tokenizer(list(texts), padding=False, truncation=True,
                           max_length=self.max_length, return_attention_mask=False)["input_ids"]
        out = torch.zeros((len(ids), hidden), dtype=torch.float32)
        with lm.lock, torch.inference_mode():
            for batch in pack_by_tokens([max(len(s), 1) for s in ids], self.batch_tokens):
                out[batch] = self._embed_batch([ids[i] for i in batch])
        return out

    def _embed_batch(self, seqs: list[list[int]]) -> torch.Tensor:
        lm = self.loaded
        pad = lm.tokenizer.pad_token_id or 0
        seqs = [s or [pad] for s in seqs]  # a tokenizer without EOS can give [] for ""
        rows, width = len(seqs), max(len(s) for s in seqs)
        ids = torch.full((rows, width), pad, dtype=torch.long)
        mask = torch.zeros((rows, width), dtype=torch.long)
        for r, seq in enumerate(seqs):
            ids[r, :len(seq)] = torch.tensor(seq)
            mask[r, :len(seq)] = 1
        states = lm.model(input_ids=ids.to(lm.device),
                          attention_mask=mask.to(lm.device)).last_hidden_state
        last = torch.tensor([len(s) - 1 for s in seqs], device=lm.device)
        pooled = states[torch.arange(rows, device=lm.device), last].float()
        return torch.nn.functional.normalize(pooled, p=2, dim=1).cpu()

    def document_vectors(self, documents: Sequence[Document]) -> torch.Tensor:
        """(n, hidden) unit vectors of the documents' flattened text, cached per version and
        text (see the module docstring: never another caller's text's vector)."""
        keys = [(self.cache_id, version_key(d.resource, d.full_url),
                 hashlib.sha256(d.text.encode("utf-8", "surrogatepass")).hexdigest())
                for d in documents]
        vectors: list[torch.Tensor | None] = [self.vectors.get(k) for k in keys]
        missing = [i for i, v in enumerate(vectors) if v is None]
        if missing:
            fresh = self.embed([documents[i].text for i in missing])
            for row, i in enumerate(missing):
                vectors[i] = fresh[row].clone()
                self.vectors.put(keys[i], vectors[i])
        logger.debug("dense: %d of %d document vectors from cache", len(documents) - len(missing),
                     len(documents))
        hidden = self.loaded.model.config.hidden_size
        return torch.stack(vectors) if vectors else torch.zeros((0, hidden))  # type: ignore[arg-type]

    def rank(self, query: str, documents: Sequence[Document]) -> list[tuple[int, float]]:
        """(position in `documents`, cosine) for every document, best first, ties by id."""
        if not documents:
            return []
        cosines = (self.document_vectors(documents) @ self.embed_queries([query])[0]).tolist()
        order = sorted(range(len(documents)), key=lambda i: (-cosines[i], documents[i].id, i))
        return [(i, cosines[i]) for i in order]
