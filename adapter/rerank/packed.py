"""Padding-free batches for the Qwen3 engine (`attention = "packed"`) and their CUDA graphs.

A padded batch holds one row per document, each right-padded to the longest; a packed batch
is ONE sequence: the documents' tails (what follows the prompt prefix every pair shares) one
after the other, no padding. A flex-attention block mask lets each token see the shared
prefix (whose keys/values the engine computed once, `Qwen3Reranker._prefix_cache`) and the
tokens of its own document up to itself, nothing else; positions restart after the prefix in
every document. Each document's score is read at its own last token. The maths of every
document is the padded path's (and the model card's): the same keys, values and positions,
only laid out differently; `tests/test_qwen3_packed.py` holds it to the card's port at 1e-5.

The flex kernel skips the 128×128 blocks the mask rules out, so attention costs Σ (document
length × (prefix + document length)), not (batch length)². On CUDA, flex_attention is compiled
(Triton); on a CPU it runs eagerly (materialising the scores: for the oracle tests, not speed).

`StaticPackedRunner` runs packed batches at a few fixed shapes — the batch length padded up
to a power-of-two bucket, the prefix up to a multiple of 128 — out of static buffers, so that
on CUDA each shape is captured once as a CUDA graph and replayed (one launch instead of
hundreds per batch). Off CUDA it runs the very same static-shape code eagerly (tests).
"""
from __future__ import annotations

import logging
import math
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch

logger = logging.getLogger(__name__)

#: the name under which the packed attention function is registered with transformers
PACKED_ATTENTION = "fhir_rerank_packed"
ATTENTION_MODES = ("auto", "padded", "packed")
#: prefix buckets of the static path: the shared prefix is padded up to a multiple of this
PREFIX_STEP = 128
#: the smallest packed-length bucket of the static path
SMALLEST_BUCKET = 512

# The eager (CPU) flex path is used on purpose for the oracle tests; its one-time advice to
# compile is noise there. On CUDA the compiled kernel is used and the warning never fires.
warnings.filterwarnings("ignore", message="flex_attention called without torch.compile",
                        category=UserWarning)


def flex_attention_available() -> bool:
    """True when this torch has `torch.nn.attention.flex_attention` (torch ≥ 2.5)."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_attention(mode: str, device: str, config: Any = None) -> str:
    """`auto` | `padded` | `packed` → `padded` or `packed`.

    auto = padded, for now: packed batches match the card within 1e-5 on this CPU (the oracle
    tests) but have never run on a GPU, where they are meant to pay off; a device run of
    bench/device_run.sh (issue 7) decides whether auto becomes packed on CUDA. On a CPU the
    eager flex kernel materialises its scores and is slower than padded sdpa batches.
    `packed` opts in on any device (it is what the oracle tests run). A model with sliding-window layers
    stays padded (the packed mask is the full-attention one), and so does, on CUDA, a head
    dimension under 16 (the Triton flex kernel's minimum; real Qwen3 checkpoints have 128).
    """
    if mode not in ATTENTION_MODES:
        raise ValueError(f"attention {mode!r} is not one of {', '.join(ATTENTION_MODES)}")
    if mode == "padded":
        return "padded"
    why_not = _packed_unsupported(device, config)
    if why_not is None:
        return "packed" if mode == "packed" else "padded"
    if mode == "packed":
        raise ValueError(f"attention = packed: {why_not}; use attention = padded")
    return "padded"


def _packed_unsupported(device: str, config: Any) -> str | None:
    """Why packed batches cannot run for this model on this device (None: they can)."""
    if not flex_attention_available():
        return "needs torch.nn.attention.flex_attention (torch ≥ 2.5)"
    if config is None:
        return None
    if any(t != "full_attention" for t in getattr(config, "layer_types", None) or []):
        return "supports full-attention models only (this one has sliding-window layers)"
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if device.startswith("cuda") and head_dim < 16:
        return f"the CUDA flex kernel needs a head dimension of at least 16 (this model: {head_dim})"
    return None


def pack_in_order(lengths: list[int], budget: int) -> list[list[int]]:
    """Indices sorted longest first, cut into consecutive batches of at most `budget` real
    tokens (a document longer than the budget is a batch of its own). Packed batches carry no
    padding, so any lengths may share one; longest first keeps the peak memory in the first."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    total = 0
    for i in order:
        if batches and total + lengths[i] <= budget:
            batches[-1].append(i)
            total += lengths[i]
        else:
            batches.append([i])
            total = lengths[i]
    return batches


@dataclass
class Packed:
    """One packed batch as flat lists: token ids, positions, document index per token (the
    bucket padding after the last document is one more document of its own) and the index
    of each document's last token."""

    ids: list[int]
    positions: list[int]
    doc: list[int]
    last: list[int]


def pack_tails(tails: list[list[int]], shared: int, length: int | None = None,
               pad_id: int = 0) -> Packed:
    """Lay `tails` end to end; positions continue the shared prefix (`shared` tokens) anew
    in every document. With `length`, pad up to it (a shape bucket) with `pad_id` tokens."""
    ids: list[int] = []
    positions: list[int] = []
    doc: list[int] = []
    last: list[int] = []
    for d, tail in enumerate(tails):
        ids.extend(tail)
        positions.extend(range(shared, shared + len(tail)))
        doc.extend([d] * len(tail))
        last.append(len(ids) - 1)
    if length is not None:
        if length < len(ids):
            raise ValueError(f"{len(ids)} packed tokens do not fit a bucket of {length}")
        extra = length - len(ids)
        ids.extend([pad_id] * extra)
        positions.extend(range(shared, shared + extra))
        doc.extend([len(tails)] * extra)
    return Packed(ids, positions, doc, last)


def packed_mask_mod(doc: torch.Tensor, shared: torch.Tensor, prefix_len: torch.Tensor):
    """The mask as a flex `mask_mod`: key `kv` is visible to query `q` when it is one of the
    `shared` real prefix keys, or a packed key (index ≥ `prefix_len`, the prefix keys held,
    padded or not) of q's own document at or before q. Tensors only, so that a compiled kernel
    does not specialise on their values."""

    def mask_mod(b, h, q_idx, kv_idx):
        tail = (kv_idx - prefix_len).clamp(min=0)
        own = (kv_idx >= prefix_len) & (doc[q_idx] == doc[tail]) & (tail <= q_idx)
        return (kv_idx < shared) | own

    return mask_mod


def packed_block_mask(doc: torch.Tensor, shared: torch.Tensor, prefix_len: torch.Tensor,
                      prefix_keys: int):
    """The flex BlockMask of a packed batch: `doc` (packed length,) on the model's device;
    keys = `prefix_keys` (= the value of `prefix_len`) prefix keys + the packed tokens."""
    from torch.nn.attention.flex_attention import create_block_mask

    length = doc.shape[0]
    return create_block_mask(packed_mask_mod(doc, shared, prefix_len), B=None, H=None,
                             Q_LEN=length, KV_LEN=prefix_keys + length, device=doc.device)


_compiled_flex: dict[str, Any] = {}


def _flex(device_type: str):
    """flex_attention compiled once per process on CUDA (Triton), eager elsewhere."""
    from torch.nn.attention.flex_attention import flex_attention

    if device_type != "cuda":
        return flex_attention
    if "cuda" not in _compiled_flex:
        _compiled_flex["cuda"] = torch.compile(flex_attention)
    return _compiled_flex["cuda"]


def packed_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                     value: torch.Tensor, attention_mask: Any, scaling: float | None = None,
                     **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers attention function (AttentionInterface) for packed batches: flex attention
    under the batch's BlockMask, grouped-query heads shared by flex itself."""
    from torch.nn.attention.flex_attention import BlockMask

    if not isinstance(attention_mask, BlockMask):
        raise TypeError("packed attention needs the batch's flex BlockMask as attention_mask")
    out = _flex(query.device.type)(query, key, value, block_mask=attention_mask, scale=scaling,
                                   enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2).contiguous(), None


_registered = False


def register_packed_attention() -> None:
    """Register `packed_attention` with transformers' AttentionInterface (once per process)."""
    global _registered
    if not _registered:
        from transformers import AttentionInterface

        AttentionInterface.register(PACKED_ATTENTION, packed_attention)
        _registered = True


@contextmanager
def packed_attention_on(model: Any) -> Iterator[None]:
    """Run `model`'s attention layers through `packed_attention` for the duration (the caller
    holds the model's lock, so no other forward sees the switch); restored afterwards."""
    register_packed_attention()
    config = model.config
    before = config._attn_implementation
    config._attn_implementation = PACKED_ATTENTION
    try:
        yield
    finally:
        config._attn_implementation = before


def _prefix_cache(prefix_kv: list[tuple[torch.Tensor, torch.Tensor]] | None, config: Any):
    from transformers import DynamicCache

    if prefix_kv is None:
        return None
    return DynamicCache(ddp_cache_data=list(prefix_kv), config=config)


def packed_forward(model: Any, packed: Packed, shared: int, prefix_len: int,
                   prefix_kv: list[tuple[torch.Tensor, torch.Tensor]] | None,
                   device: torch.device) -> torch.Tensor:
    """Hidden states (1, packed length, hidden) of one packed batch through `model.model`
    (a Qwen3ForCausalLM) with its attention switched to the packed flex path. `prefix_kv`
    holds `prefix_len` ≥ `shared` keys per layer (batch 1), the real ones first."""
    doc = torch.tensor(packed.doc, device=device)
    mask = packed_block_mask(doc, torch.tensor(shared, device=device),
                             torch.tensor(prefix_len, device=device), prefix_len)
    with packed_attention_on(model):
        out = model.model(input_ids=torch.tensor([packed.ids], device=device),
                          attention_mask={"full_attention": mask},
                          position_ids=torch.tensor([packed.positions], device=device),
                          cache=_prefix_cache(prefix_kv, model.config),
                          use_cache=prefix_kv is not None)
    return out.last_hidden_state


def length_buckets(largest: int, smallest: int = SMALLEST_BUCKET) -> list[int]:
    """Powers of two from `smallest` up to the first ≥ `largest` (the static path's shapes)."""
    buckets = [smallest]
    while buckets[-1] < largest:
        buckets.append(buckets[-1] * 2)
    return buckets


def bucket_for(n: int, buckets: list[int]) -> int | None:
    """The smallest bucket holding `n`, None when `n` exceeds them all."""
    return next((b for b in buckets if b >= n), None)


def prefix_bucket(shared: int, step: int = PREFIX_STEP) -> int:
    """The shared prefix's length padded up to a multiple of `step` (at least one step)."""
    return max(step, math.ceil(shared / step) * step)


class _Shape:
    """Static buffers (and, on CUDA, a captured graph) of one (prefix bucket, length bucket)."""

    def __init__(self, model: Any, device: torch.device, prefix_len: int, length: int,
                 dtype: torch.dtype) -> None:
        cfg = model.config
        kv_heads = cfg.num_key_value_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.prefix_len, self.length = prefix_len, length
        self.ids = torch.zeros((1, length), dtype=torch.long, device=device)
        self.positions = torch.zeros((1, length), dtype=torch.long, device=device)
        self.doc = torch.zeros((length,), dtype=torch.long, device=device)
        self.shared = torch.zeros((), dtype=torch.long, device=device)
        self.prefix_len_t = torch.tensor(prefix_len, device=device)
        self.prefix = [(torch.zeros((1, kv_heads, prefix_len, head_dim), dtype=dtype, device=device),
                        torch.zeros((1, kv_heads, prefix_len, head_dim), dtype=dtype, device=device))
                       for _ in range(cfg.num_hidden_layers)]
        self.mask = packed_block_mask(self.doc, self.shared, self.prefix_len_t, prefix_len)
        self.graph: Any = None
        self.output: torch.Tensor | None = None

    def fill(self, packed: Packed, shared: int) -> None:
        """Copy one batch into the static inputs and rebuild the mask's block tables in place
        (the mask_mod reads the static `doc`/`shared`, so only the tables change)."""
        dev = self.ids.device
        self.ids.copy_(torch.tensor([packed.ids]).to(dev, non_blocking=True))
        self.positions.copy_(torch.tensor([packed.positions]).to(dev, non_blocking=True))
        self.doc.copy_(torch.tensor(packed.doc).to(dev, non_blocking=True))
        self.shared.fill_(shared)
        fresh = packed_block_mask(self.doc, self.shared, self.prefix_len_t, self.prefix_len)
        for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices",
                     "q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices"):
            target, source = getattr(self.mask, name, None), getattr(fresh, name, None)
            if target is not None and source is not None:
                target.copy_(source)

    def load_prefix(self, prefix_kv: list[tuple[torch.Tensor, torch.Tensor]] | None,
                    shared: int) -> None:
        """The call's prefix keys/values into the static buffers; the padding stays zero."""
        for (k_buf, v_buf), kv in zip(self.prefix, prefix_kv or [None] * len(self.prefix)):
            k_buf.zero_()
            v_buf.zero_()
            if kv is not None:
                k_buf[:, :, :shared].copy_(kv[0])
                v_buf[:, :, :shared].copy_(kv[1])

    def forward(self, model: Any) -> torch.Tensor:
        """The packed forward over the static buffers (what a CUDA graph captures)."""
        with packed_attention_on(model):
            out = model.model(input_ids=self.ids, attention_mask={"full_attention": self.mask},
                              position_ids=self.positions,
                              cache=_prefix_cache(self.prefix, model.config), use_cache=True)
        return out.last_hidden_state


class StaticPackedRunner:
    """Packed batches at bucketed static shapes; CUDA graphs of them when `capture` is true.

    One `_Shape` per (prefix bucket, length bucket) in use, created (and, on CUDA, captured
    after two warm-up runs on a side stream) on first use or by `warm`; all graphs share one
    memory pool, which is safe because they replay one at a time under the model's lock and
    each output is read before the next replay. A batch longer than the largest bucket, or
    a capture that fails, runs the eager packed path instead (logged once).
    """

    def __init__(self, model: Any, device: torch.device, largest: int, capture: bool) -> None:
        self.model, self.device, self.capture = model, device, capture
        self.buckets = length_buckets(largest)
        self.dtype = next(model.parameters()).dtype
        self.shapes: dict[tuple[int, int], _Shape] = {}
        self.pool: Any = torch.cuda.graph_pool_handle() if capture else None
        self.failed: set[tuple[int, int]] = set()

    def shape(self, prefix_len: int, length: int) -> _Shape | None:
        """The static shape for this (prefix bucket, length bucket), made and captured once."""
        key = (prefix_len, length)
        if key in self.failed:
            return None
        if key not in self.shapes:
            shape = _Shape(self.model, self.device, prefix_len, length, self.dtype)
            if self.capture:
                try:
                    self._capture(shape)
                except Exception as exc:  # a kernel that cannot be captured: stay eager
                    logger.warning("CUDA graph capture of packed shape %s failed (%s: %s); "
                                   "those batches run eagerly", key, type(exc).__name__, exc)
                    self.failed.add(key)
                    return None
            self.shapes[key] = shape
        return self.shapes[key]

    def _capture(self, shape: _Shape) -> None:
        # a valid batch in the buffers: one document filling the bucket
        shape.fill(pack_tails([[0] * shape.length], 0), 0)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # compiles flex for this shape, settles the allocator
                shape.forward(self.model)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            shape.output = shape.forward(self.model)
        shape.graph = graph

    def warm(self, prefix_lens: list[int]) -> None:
        """Make (and capture) every length bucket for these prefix buckets ahead of traffic."""
        for prefix_len in prefix_lens:
            for length in self.buckets:
                self.shape(prefix_len, length)

    def hidden(self, tails: list[list[int]], shared: int,
               prefix_kv: list[tuple[torch.Tensor, torch.Tensor]] | None,
               loaded_prefix: dict[int, bool], pad_id: int = 0) -> torch.Tensor | None:
        """Hidden states at each tail's last token, (len(tails), hidden); None when no static
        shape holds this batch (the caller runs it eagerly). `loaded_prefix` remembers, per
        call, which shapes already hold this call's prefix keys."""
        total = sum(len(t) for t in tails)
        length = bucket_for(total, self.buckets)
        if length is None:
            return None
        shape = self.shape(prefix_bucket(shared), length)
        if shape is None:
            return None
        if id(shape) not in loaded_prefix:
            shape.load_prefix(prefix_kv, shared)
            loaded_prefix[id(shape)] = True
        packed = pack_tails(tails, shared, length, pad_id)
        shape.fill(packed, shared)
        if shape.graph is not None:
            shape.graph.replay()
            hidden = shape.output
        else:
            hidden = shape.forward(self.model)
        return hidden[0, torch.tensor(packed.last, device=self.device)]
