"""Qwen3-Reranker through transformers: the model card's scores, computed faster.

The maths is the official recipe (prefix + `<Instruct>/<Query>/<Document>` body truncated on
the right + suffix; P(yes) = softmax([no, yes]) at the last token, in float32); a document longer
than the window is, by default, scored as overlapping token-exact chunks (adapter/rerank/
chunking.py), its score the best chunk's. What changes is only how it is computed:
- the tokens every pair shares (system prefix, instruction, query) run once per call and their
  keys/values are reused by every document (causal attention makes this exact);
- documents are sorted by length and packed into batches under a padded-token budget, right
  padded, each reading its own last position (`attention = "padded"`); or, padding-free, laid
  end to end in one sequence per batch under a flex-attention mask that shows each document
  the shared prefix and itself only (`attention = "packed"`, adapter/rerank/packed.py), on CUDA
  optionally replayed as CUDA graphs over bucketed shapes (`cuda_graphs`);
- no vocabulary logits at all: one float32 dot product with `w_yes − w_no` of the head (tied or
  untied), since sigmoid(l_yes − l_no) = softmax([l_no, l_yes])[1].
"""
from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch

from adapter.errors import ModelLoadError
from adapter.rerank.base import Reranker, ScoreOptions, ScoreResult, require_query
from adapter.rerank.chunking import PromptRows, build_rows
from adapter.rerank.packed import (PREFIX_STEP, StaticPackedRunner, pack_in_order, pack_tails,
                                   packed_forward, prefix_bucket, resolve_attention)

if TYPE_CHECKING:
    from adapter.caches import ModelStore

logger = logging.getLogger(__name__)

MODEL_TIERS = {"0.6B": "Qwen/Qwen3-Reranker-0.6B", "4B": "Qwen/Qwen3-Reranker-4B",
               "8B": "Qwen/Qwen3-Reranker-8B"}
PREFIX = ("<|im_start|>system\nJudge whether the Document meets the requirements based on the "
          "Query and the Instruct provided. Note that the answer can only be \"yes\" or \"no\"."
          "<|im_end|>\n<|im_start|>user\n")
SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
#: the body: the part every document shares (tokenized once per call), then the document's
SHARED = "<Instruct>: {instruction}\n<Query>: {query}\n"
DOC_HEAD = "<Document>: "
BODY = SHARED + DOC_HEAD + "{doc}"
DEFAULT_INSTRUCTION = ("Given a clinician's question about a patient, retrieve the parts of the "
                       "patient's record that answer it")
YES_ID, NO_ID = 9693, 2152
MAX_CONTEXT = 32768


def resolve_model_id(name: str) -> str:
    """Tier alias (`0.6B`, `4B`, `8B`, any case) → Hugging Face id; ids and paths pass through."""
    text = name.strip()
    return MODEL_TIERS.get(text.upper(), text)


def pick_device(device: str = "auto") -> str:
    """`auto` → cuda, then mps, then cpu; an explicit device is checked for availability."""
    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError("device 'cuda' asked for but torch sees no CUDA GPU; "
                             "use device = \"auto\" or \"cpu\"")
    return device


def cpu_supports_bf16() -> bool:
    """True when this CPU has native bf16 matmuls (avx512_bf16 / AMX), where bf16 is ~3× faster."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def pick_dtype(dtype: str, device: str) -> torch.dtype:
    """`auto` → bfloat16 on CUDA and on bf16-capable CPUs, float32 otherwise."""
    if dtype == "auto":
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if device == "cpu" and cpu_supports_bf16():
            return torch.bfloat16
        return torch.float32
    table = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16,
             "fp16": torch.float16, "float32": torch.float32, "fp32": torch.float32}
    if dtype not in table:
        raise ValueError(f"dtype {dtype!r} is not one of auto, bfloat16, float16, float32")
    return table[dtype]


def _attn_implementation(device: str) -> str:
    from transformers.utils import is_flash_attn_2_available

    return "flash_attention_2" if device.startswith("cuda") and is_flash_attn_2_available() else "sdpa"


def _hub_offline() -> bool:
    """HF_HUB_OFFLINE as set now (huggingface_hub reads it only once, at import)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


_hub_probe: dict[str, bool] = {}


def _hub_reachable(timeout: float = 2.0) -> bool:
    """Can this process open a TCP connection to the model hub? (checked once per process)

    Without this, an offline machine that did not set HF_HUB_OFFLINE spends ~25 s in
    huggingface_hub's retries (5 backoffs per file) before falling back to the local cache.
    Behind an HTTP(S) proxy the direct probe says nothing, so the hub is assumed reachable.
    """
    from urllib.parse import urlsplit

    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    if endpoint not in _hub_probe:
        if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY")):
            _hub_probe[endpoint] = True
        else:
            import socket

            parts = urlsplit(endpoint)
            port = parts.port or (443 if parts.scheme == "https" else 80)
            result: list[bool] = []

            def probe() -> None:  # in a thread: a failing DNS lookup ignores socket timeouts
                try:
                    socket.create_connection((parts.hostname or "", port),
                                             timeout=timeout).close()
                    result.append(True)
                except OSError:
                    result.append(False)

            thread = threading.Thread(target=probe, name="hub-probe", daemon=True)
            thread.start()
            thread.join(timeout)
            _hub_probe[endpoint] = bool(result and result[0])
    return _hub_probe[endpoint]


def load_attempt(model_id: str, exc: BaseException) -> tuple[str, str]:
    """(what was tried, why it failed) for a checkpoint that would not load, in one line each:
    a local directory (present or not) or a Hugging Face id with the hub settings in force.
    Shared by the reranker and the embedder loaders."""
    reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300].rstrip(".")
    if Path(model_id).expanduser().exists():
        return f"local directory {model_id!r}", reason
    if model_id.startswith(("/", ".", "~")) or model_id.count("/") > 1:
        return f"local directory {model_id!r}", "no such directory"
    return (f"Hugging Face id {model_id!r} (HF_HUB_OFFLINE={'1' if _hub_offline() else '0'}, "
            f"HF_HOME={os.environ.get('HF_HOME', '~/.cache/huggingface')})"), reason


def _load_failure(name: str, model_id: str, exc: BaseException) -> ModelLoadError:
    """One line: what was tried, why it failed, and the three ways out."""
    tried, reason = load_attempt(model_id, exc)
    if tried.startswith("local directory"):  # the hub has nothing to do with it
        return ModelLoadError(
            f"could not load Qwen3-Reranker {name!r}: tried {tried}: {reason}. Fix: point "
            f"`model` at a directory holding a Qwen3-Reranker checkpoint (config.json, tokenizer "
            f"and weights; `fhir-rerank make-tiny-model DIR` writes a tiny random one), or run "
            f"with `--reranker none` for BM25 order.")
    return ModelLoadError(
        f"could not load Qwen3-Reranker {name!r}: tried {tried}: {reason}. Fix: download it once "
        f"with network access (unset HF_HUB_OFFLINE), set `model` to a local directory holding a "
        f"Qwen3-Reranker checkpoint, or run with `--reranker none` for BM25 order.")


@dataclass
class LoadedModel:
    """A model + tokenizer pair, loaded once per process, and what scoring derives from them."""

    model: Any
    tokenizer: Any
    device: torch.device
    w_diff: torch.Tensor      # float32 (hidden,): lm_head[yes] − lm_head[no]
    b_diff: float             # lm_head bias difference (0 for Qwen3)
    prefix_ids: list[int]
    suffix_ids: list[int]
    max_positions: int
    warmed: bool = False
    #: measured speed (all tokens of the scored sequences / wall seconds): set at warm-up,
    #: then a running average over real calls (adapter.search.budget uses it)
    tokens_per_s: float | None = None
    #: one forward at a time per model: concurrent calls would only fight over the same cores/GPU
    lock: threading.Lock = field(default_factory=threading.Lock)


def prepare_loaded(model: Any, tokenizer: Any, name: str = "model") -> LoadedModel:
    """Check that (model, tokenizer) is a Qwen3 reranker and derive the yes−no projection."""
    yes, no = tokenizer.convert_tokens_to_ids("yes"), tokenizer.convert_tokens_to_ids("no")
    if (yes, no) != (YES_ID, NO_ID) or getattr(model.config, "model_type", "") != "qwen3":
        raise ModelLoadError(
            f"{name!r} is not a Qwen3 reranker (model_type {getattr(model.config, 'model_type', '?')!r},"
            f" yes/no ids {yes}/{no}, expected qwen3 and {YES_ID}/{NO_ID}); point `model` at a "
            f"Qwen3-Reranker checkpoint or run with `--reranker none`")
    model.eval()
    head = model.get_output_embeddings()
    with torch.no_grad():
        w_diff = head.weight[YES_ID].float() - head.weight[NO_ID].float()
        bias = getattr(head, "bias", None)
        b_diff = float(bias[YES_ID].float() - bias[NO_ID].float()) if bias is not None else 0.0
    return LoadedModel(
        model=model, tokenizer=tokenizer, device=head.weight.device, w_diff=w_diff.contiguous(),
        b_diff=b_diff, prefix_ids=tokenizer.encode(PREFIX, add_special_tokens=False),
        suffix_ids=tokenizer.encode(SUFFIX, add_special_tokens=False),
        max_positions=int(getattr(model.config, "max_position_embeddings", MAX_CONTEXT)))


def hub_options(model_id: str) -> dict[str, bool]:
    """`from_pretrained` options for `model_id`: the local cache only when the hub is off
    (HF_HUB_OFFLINE) or unreachable (one 2 s probe, so an offline machine does not wait on
    huggingface_hub's retries); nothing for a local directory or a reachable hub."""
    offline = _hub_offline()
    if not offline and not Path(model_id).expanduser().exists() and not _hub_reachable():
        offline = True
        logger.info("model hub unreachable: loading %s from the local cache only (set "
                    "HF_HUB_OFFLINE=1 to skip this check)", model_id)
    return {"local_files_only": True} if offline else {}


def load_reranker_model(name: str, device: str, dtype: torch.dtype,
                        models: "ModelStore | None" = None) -> LoadedModel:
    """The checkpoint `name` on `device` in `dtype`: from `models` (an
    `adapter.runtime.ModelStore`, which loads it once), or loaded now when none is given."""
    model_id = resolve_model_id(name)
    if models is None:
        return _load_reranker_model(name, model_id, device, dtype)
    return models.get_or_load(("reranker", model_id, device, str(dtype)),
                              lambda: _load_reranker_model(name, model_id, device, dtype))


def load_qwen3_checkpoint(model_id: str, model_class: Any, device: str, dtype: torch.dtype
                          ) -> tuple[Any, Any]:
    """(model, tokenizer) of the Qwen3 checkpoint `model_id` through `model_class`
    (AutoModelForCausalLM for the reranker, AutoModel for the embedder), on the CPU in
    `dtype`; no hub retries on an offline machine (`hub_options`). Raises whatever
    transformers raises, or ValueError for a checkpoint that is not Qwen3: the caller says
    what could not be loaded and how to fix it."""
    from transformers import AutoConfig, AutoTokenizer

    hub = hub_options(model_id)
    config = AutoConfig.from_pretrained(model_id, **hub)
    if getattr(config, "model_type", "") != "qwen3":
        raise ValueError(f"its config says model_type {config.model_type!r}, not 'qwen3'")
    tokenizer = AutoTokenizer.from_pretrained(model_id, **hub)
    model = model_class.from_pretrained(
        model_id, dtype=dtype, attn_implementation=_attn_implementation(device), **hub)
    return model, tokenizer


def _load_reranker_model(name: str, model_id: str, device: str, dtype: torch.dtype
                         ) -> LoadedModel:
    from transformers import AutoModelForCausalLM

    try:
        model, tokenizer = load_qwen3_checkpoint(model_id, AutoModelForCausalLM, device, dtype)
    except Exception as exc:  # hub/offline/IO/format errors all mean "cannot load"
        raise _load_failure(name, model_id, exc) from exc
    model.to(device)
    loaded = prepare_loaded(model, tokenizer, name)
    logger.info("loaded Qwen3-Reranker %s on %s (%s)", model_id, device, dtype)
    return loaded


def _longest_common_prefix(seqs: list[list[int]]) -> int:
    first, n = seqs[0], min(len(s) for s in seqs)
    for seq in seqs[1:]:
        i = 0
        while i < n and seq[i] == first[i]:
            i += 1
        n = i
    return n


def pack_by_tokens(lengths: list[int], budget: int, max_padding: float = 0.1) -> list[list[int]]:
    """Indices sorted longest first, cut into batches of at most `budget` padded tokens
    (rows × longest) where padding stays under `max_padding` of the batch: padded positions are
    pure waste, so a batch only grows while its documents have nearly the same length."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    real = 0
    for i in order:
        if batches:
            rows, longest = len(batches[-1]) + 1, lengths[batches[-1][0]]
            if rows * longest <= budget and rows * longest - real - lengths[i] <= max_padding * rows * longest:
                batches[-1].append(i)
                real += lengths[i]
                continue
        batches.append([i])
        real = lengths[i]
    return batches


class Qwen3Reranker(Reranker):
    """P(yes) of Qwen3-Reranker for each (query, document), as the model card computes it."""

    name = "qwen3"
    is_model = True

    def __init__(self, model: str, device: str = "auto", dtype: str = "auto",
                 max_length: int = 8192, batch_tokens: int = 16384,
                 instruction: str | None = None, warmup: bool = True,
                 loaded: LoadedModel | None = None, options: ScoreOptions | None = None,
                 models: "ModelStore | None" = None,
                 attention: str = "auto", cuda_graphs: bool = False) -> None:
        super().__init__()
        self.model_name = model
        self.device = pick_device(device) if loaded is None else str(loaded.device)
        self.dtype = pick_dtype(dtype, self.device) if loaded is None else loaded.model.dtype
        self.loaded = loaded or load_reranker_model(model, self.device, self.dtype, models)
        fixed = len(self.loaded.prefix_ids) + len(self.loaded.suffix_ids)
        if not fixed < max_length <= min(MAX_CONTEXT, self.loaded.max_positions):
            raise ValueError(f"max_length {max_length} must lie in ({fixed}, {MAX_CONTEXT}]")
        if batch_tokens < 1:
            raise ValueError(f"batch_tokens {batch_tokens} must be positive")
        self.max_length, self.batch_tokens = max_length, batch_tokens
        self.instruction = instruction or DEFAULT_INSTRUCTION
        self.options = options or ScoreOptions()
        #: "padded" or "packed": how batches are laid out (see adapter/rerank/packed.py)
        self.attention = resolve_attention(attention, self.device, self.loaded.model.config)
        #: packed batches at bucketed static shapes, replayed as CUDA graphs (None: eager)
        self.static_runner: StaticPackedRunner | None = None
        if cuda_graphs:
            self._enable_graphs()
        if warmup and not self.loaded.warmed:
            self.score("warm-up", ["warm-up"])
            self._measure_speed()
            self.loaded.warmed = True

    def _enable_graphs(self) -> None:
        """CUDA graphs of packed batches, the length buckets captured now for the default
        instruction's prefix bucket (other prefix buckets on first use). Off CUDA, or with
        padded batches, this is a no-op that says so once."""
        if not self.device.startswith("cuda") or self.attention != "packed":
            logger.info("cuda_graphs applies to packed batches on CUDA only (here: %s, %s); "
                        "running eagerly", self.device, self.attention)
            return
        lm = self.loaded
        self.static_runner = StaticPackedRunner(lm.model, lm.device, self.batch_tokens,
                                                capture=True)
        header = BODY.format(instruction=self.instruction, query="", doc="")
        base = len(lm.prefix_ids) + len(lm.tokenizer.encode(header, add_special_tokens=False))
        with lm.lock, torch.inference_mode():
            self.static_runner.warm([prefix_bucket(base + PREFIX_STEP // 4)])

    #: warm-up speed probe: documents × words, about the size of short clinical records
    SPEED_PROBE = (8, 100)
    #: calls with fewer tokens than this are mostly overhead and do not update the estimate
    SPEED_MIN_TOKENS = 512

    def _measure_speed(self) -> None:
        """Time one synthetic batch so the time budget has a speed before the first search."""
        docs, words = self.SPEED_PROBE
        texts = [" ".join(f"finding{(d * words + w) % 997} value {w}" for w in range(words // 3))
                 for d in range(docs)]
        self.loaded.tokens_per_s = None
        self.score("speed probe for the rerank time budget", texts)

    @property
    def tokens_per_s(self) -> float | None:
        """Measured tokens per second of this model on this device and dtype (None until warm)."""
        return self.loaded.tokens_per_s

    def token_lengths(self, query: str, texts: list[str], instruction: str | None = None
                      ) -> list[int]:
        """Tokens of each (prefix, instruction, query, document, suffix) sequence as scored."""
        return [len(seq) for seq in self.encode_pairs(query, texts, instruction).rows]

    def _note_speed(self, tokens: int, seconds: float) -> None:
        if tokens < self.SPEED_MIN_TOKENS and self.loaded.tokens_per_s is not None:
            return
        speed = tokens / max(seconds, 1e-6)
        old = self.loaded.tokens_per_s
        self.loaded.tokens_per_s = speed if old is None else 0.5 * old + 0.5 * speed

    @classmethod
    def from_settings(cls, settings: Any) -> "Qwen3Reranker":
        """Build from adapter.config.Settings (model, device, dtype, max_length, …)."""
        return cls(settings.model, device=settings.device, dtype=settings.dtype,
                   max_length=settings.max_length, batch_tokens=settings.batch_tokens,
                   instruction=settings.instruction or None,
                   options=ScoreOptions.from_settings(settings),
                   attention=settings.attention, cuda_graphs=settings.cuda_graphs)

    @classmethod
    def from_model(cls, model: Any, tokenizer: Any, **kwargs: Any) -> "Qwen3Reranker":
        """Wrap an already built model (benchmarks with random weights)."""
        return cls(kwargs.pop("model_name", "in-memory"), loaded=prepare_loaded(model, tokenizer),
                   **kwargs)

    def describe(self) -> str:
        dtype = str(self.dtype).replace("torch.", "")
        return f"Qwen3-Reranker ({resolve_model_id(self.model_name)}, {self.device}, {dtype})"

    def encode_pairs(self, query: str, texts: list[str], instruction: str | None = None,
                     options: ScoreOptions | None = None) -> PromptRows:
        """The prompt rows to score: (prefix, body, suffix) per document, a long document as
        overlapping token-exact chunks (or truncated on the right), and what was cut."""
        lm = self.loaded
        shared = SHARED.format(instruction=instruction or self.instruction, query=query)
        return build_rows(lm.tokenizer, lm.prefix_ids, lm.suffix_ids, self.max_length,
                          shared, DOC_HEAD, texts, options or self.options)

    def score(self, query: str, texts: list[str], instruction: str | None = None, *,
              on_progress: Callable[[int, int], None] | None = None,
              options: ScoreOptions | None = None) -> ScoreResult:
        require_query(query)
        model = resolve_model_id(self.model_name)
        if not texts:
            return ScoreResult([], model=model)
        plan = self.encode_pairs(query, texts, instruction, options)
        if plan.truncated_docs:
            logger.info("cut %d of %d documents (%d tokens) to fit max_length %d",
                        plan.truncated_docs, len(texts), plan.truncated_tokens, self.max_length)
        with self.loaded.lock:
            started = time.perf_counter()
            row_scores = self._score_sequences(plan.rows, on_progress)
            self._note_speed(sum(len(r) for r in plan.rows), time.perf_counter() - started)
        scores = [-1.0] * len(texts)
        spans: list[tuple[int, int] | None] = [None] * len(texts)
        for row, doc in enumerate(plan.owner):  # a document's score is its best chunk's
            if row_scores[row] > scores[doc]:
                scores[doc], spans[doc] = row_scores[row], plan.spans[row]
        return ScoreResult(scores, tokens=plan.tokens, spans=spans, chunks=plan.chunks,
                           truncated_docs=plan.truncated_docs,
                           truncated_tokens=plan.truncated_tokens,
                           empty_docs=[i for i, t in enumerate(texts) if not t.strip()],
                           model=model)

    @torch.inference_mode()
    def _score_sequences(self, seqs: list[list[int]],
                         on_progress: Callable[[int, int], None] | None) -> list[float]:
        shared = min(_longest_common_prefix(seqs), min(len(s) for s in seqs) - 1)
        prefix_kv = self._prefix_cache(seqs[0][:shared]) if shared else None
        tails = [s[shared:] for s in seqs]
        scores = [0.0] * len(seqs)
        done = 0
        lengths = [len(t) for t in tails]
        if self.attention == "packed":
            loaded_prefix: dict[int, bool] = {}  # static shapes holding this call's prefix
            batches = pack_in_order(lengths, self.batch_tokens)
            run = lambda part: self._score_packed(part, shared, prefix_kv, loaded_prefix)  # noqa: E731
        else:
            batches = pack_by_tokens(lengths, self.batch_tokens)
            run = lambda part: self._score_batch(part, shared, prefix_kv)  # noqa: E731
        for batch in batches:
            for i, value in zip(batch, run([tails[i] for i in batch])):
                scores[i] = value
            done += len(batch)
            if on_progress:
                on_progress(done, len(seqs))
        return scores

    def _prefix_cache(self, ids: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Keys/values of the tokens every pair shares, computed once."""
        lm = self.loaded
        out = lm.model.model(input_ids=torch.tensor([ids], device=lm.device), use_cache=True)
        return [(layer.keys, layer.values) for layer in out.cache.layers]

    def _score_batch(self, tails: list[list[int]], shared: int,
                     prefix_kv: list[tuple[torch.Tensor, torch.Tensor]] | None) -> list[float]:
        from transformers import DynamicCache

        lm = self.loaded
        rows, width = len(tails), max(len(t) for t in tails)
        pad = lm.tokenizer.pad_token_id or 0
        ids = torch.full((rows, width), pad, dtype=torch.long)
        mask = torch.zeros((rows, shared + width), dtype=torch.long)
        mask[:, :shared] = 1
        for r, tail in enumerate(tails):
            ids[r, :len(tail)] = torch.tensor(tail)
            mask[r, shared:shared + len(tail)] = 1
        positions = (torch.arange(width) + shared).unsqueeze(0).expand(rows, -1)
        cache = None
        if prefix_kv is not None:
            cache = DynamicCache(ddp_cache_data=[(k.expand(rows, -1, -1, -1),
                                                  v.expand(rows, -1, -1, -1))
                                                 for k, v in prefix_kv], config=lm.model.config)
        out = lm.model.model(input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device),
                             position_ids=positions.to(lm.device), cache=cache,
                             use_cache=cache is not None)
        last = torch.tensor([len(t) - 1 for t in tails], device=lm.device)
        hidden = out.last_hidden_state[torch.arange(rows, device=lm.device), last]
        return self._probabilities(hidden)

    def _score_packed(self, tails: list[list[int]], shared: int,
                      prefix_kv: list[tuple[torch.Tensor, torch.Tensor]] | None,
                      loaded_prefix: dict[int, bool]) -> list[float]:
        """One padding-free batch: the tails end to end, each seeing the prefix and itself;
        through the static shapes (CUDA graphs) when they hold it, eagerly otherwise."""
        lm = self.loaded
        pad = lm.tokenizer.pad_token_id or 0
        hidden = None
        if self.static_runner is not None:
            hidden = self.static_runner.hidden(tails, shared, prefix_kv, loaded_prefix, pad)
        if hidden is None:
            packed = pack_tails(tails, shared)
            out = packed_forward(lm.model, packed, shared, shared, prefix_kv, lm.device)
            hidden = out[0, torch.tensor(packed.last, device=lm.device)]
        return self._probabilities(hidden)

    def _probabilities(self, hidden: torch.Tensor) -> list[float]:
        """P(yes) from final hidden states: sigmoid of the float32 (w_yes − w_no) projection."""
        lm = self.loaded
        return torch.sigmoid(hidden.float() @ lm.w_diff + lm.b_diff).tolist()
