"""The real Qwen3 tokenizer built offline, and tiny random-weight Qwen3 reranker checkpoints.

Why: the tests and `fhir-rerank make-tiny-model` need a checkpoint that loads exactly like a
`Qwen/Qwen3-Reranker-*` directory (same tokenizer, same architecture, same file layout) without
reaching the Hugging Face hub. The tokenizer comes from Qwen's `qwen.tiktoken` BPE ranks, shipped
with this package (`adapter/rerank/data/qwen.tiktoken.gz`, copied from the `dashscope` wheel:
provenance and licence in `adapter/rerank/data/README.md`), converted the way transformers'
tiktoken converter does.
"""
from __future__ import annotations

import base64
import gzip
import json
import logging
import threading
from pathlib import Path
from typing import Callable

import torch
from tokenizers import AddedToken
from transformers import PreTrainedTokenizerFast, Qwen3Config
from transformers.convert_slow_tokenizer import bytes_to_unicode

logger = logging.getLogger(__name__)

#: Qwen3's added tokens in id order, from 151643; the first 14 are "special" in the official files.
QWEN3_ADDED_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>",
    "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>", "<think>", "</think>",
]
FIRST_ADDED_ID = 151643
QWEN3_VOCAB_SIZE = FIRST_ADDED_ID + len(QWEN3_ADDED_TOKENS)  # 151669
_SPECIAL_COUNT = 14
_YES_ID, _NO_ID = 9693, 2152
_SUFFIX_IDS = [151645, 198, 151644, 77091, 198, 151667, 271, 151668, 271]

#: The tiny architecture: real Qwen3 layout (GQA, q/k norms, head_dim, rope), toy widths.
TINY_ARCH = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                 num_attention_heads=2, num_key_value_heads=1, head_dim=8)

_tokenizer_lock = threading.Lock()
_tokenizer_cache: PreTrainedTokenizerFast | None = None


#: Qwen's BPE ranks (gzip of dashscope 2.0.2's resources/qwen.tiktoken, byte for byte)
QWEN_TIKTOKEN = Path(__file__).resolve().parent / "data" / "qwen.tiktoken.gz"


def qwen_tiktoken_path() -> Path:
    """Where the Qwen BPE ranks lie: package data, so `pip install .` alone is enough."""
    if not QWEN_TIKTOKEN.is_file():
        raise FileNotFoundError(f"{QWEN_TIKTOKEN} is missing: the package was installed without "
                                "its data files; reinstall it (pip install .)")
    return QWEN_TIKTOKEN


def _read_bpe_ranks(path: Path) -> dict[bytes, int]:
    ranks: dict[bytes, int] = {}
    data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    for line in data.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def _vocab_and_merges(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte-level vocab and merges from tiktoken ranks (as transformers' TikTokenConverter)."""
    byte_encoder = bytes_to_unicode()

    def to_str(b: bytes) -> str:
        return "".join(byte_encoder[c] for c in b)

    vocab = {to_str(tok): rank for tok, rank in ranks.items()}
    merges: list[tuple[bytes, bytes, int]] = []
    for token, rank in ranks.items():
        local = []
        for i in range(1, len(token)):
            left, right = token[:i], token[i:]
            if left in ranks and right in ranks:
                local.append((left, right, rank))
        local.sort(key=lambda m: (ranks[m[0]], ranks[m[1]]))
        merges.extend(local)
    merges.sort(key=lambda m: m[2])
    return vocab, [(to_str(a), to_str(b)) for a, b, _ in merges]


def _build_qwen_tokenizer() -> PreTrainedTokenizerFast:
    from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer

    vocab, merges = _vocab_and_merges(_read_bpe_ranks(qwen_tiktoken_path()))
    if len(vocab) != FIRST_ADDED_ID:
        raise ValueError(f"qwen.tiktoken holds {len(vocab)} ranks, expected {FIRST_ADDED_ID}")
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, errors="replace", padding_side="left",
                         model_max_length=131072, clean_up_tokenization_spaces=False)
    tok.add_tokens([AddedToken(t, special=i < _SPECIAL_COUNT, normalized=False)
                    for i, t in enumerate(QWEN3_ADDED_TOKENS)])
    # Only after the added tokens exist, so <|im_end|> keeps its official id 151645.
    tok.eos_token = "<|im_end|>"
    tok.pad_token = "<|endoftext|>"
    ids = tok.convert_tokens_to_ids(QWEN3_ADDED_TOKENS)
    if ids != list(range(FIRST_ADDED_ID, QWEN3_VOCAB_SIZE)) or len(tok) != QWEN3_VOCAB_SIZE:
        raise ValueError(f"Qwen3 added tokens landed on the wrong ids: {ids[:3]}..., len {len(tok)}")
    return tok


def build_qwen_tokenizer() -> PreTrainedTokenizerFast:
    """The real Qwen3 tokenizer (151,669 tokens), built offline once per process (~3 s)."""
    global _tokenizer_cache
    with _tokenizer_lock:
        if _tokenizer_cache is None:
            _tokenizer_cache = _build_qwen_tokenizer()
            logger.debug("built the Qwen3 tokenizer from %s", qwen_tiktoken_path())
        return _tokenizer_cache


def tiny_qwen3_config(tie_word_embeddings: bool = True) -> Qwen3Config:
    """A Qwen3 config with the reranker's vocab, ids and rope, and toy widths."""
    return Qwen3Config(
        vocab_size=QWEN3_VOCAB_SIZE, max_position_embeddings=40960, rope_theta=1_000_000.0,
        rms_norm_eps=1e-6, tie_word_embeddings=tie_word_embeddings, bos_token_id=151643,
        eos_token_id=151645, hidden_act="silu", attention_bias=False, use_cache=True,
        architectures=["Qwen3ForCausalLM"], **TINY_ARCH)


def _random_state(config: Qwen3Config, seed: int) -> dict[str, torch.Tensor]:
    """Weights of O(1) scale so that P(yes) spreads over (0, 1) and depends on every token."""
    from transformers import Qwen3ForCausalLM

    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Qwen3ForCausalLM(config).state_dict().items()}
    gen = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for name in sorted(shapes):
        shape = shapes[name]
        if name.endswith("norm.weight"):
            tensor = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        elif name.endswith("embed_tokens.weight") or name == "lm_head.weight":
            tensor = torch.randn(shape, generator=gen)
        else:  # linear layers: unit-variance outputs for unit-variance inputs
            tensor = torch.randn(shape, generator=gen) * (1.5 / shape[-1] ** 0.5)
        state[name] = tensor
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    _centre_yes_no(config, state, gen)
    return {name: tensor.to(torch.bfloat16) for name, tensor in state.items()}


def _centre_yes_no(config: Qwen3Config, state: dict[str, torch.Tensor],
                   gen: torch.Generator) -> None:
    """Make P(yes) spread around 0.5 with the document instead of sitting near 0 or 1.

    Random probes (random tokens + the reranker suffix) give last hidden states H; w_yes − w_no
    loses its component along mean(H) and is scaled so H·(w_yes − w_no) has std 2.
    """
    from transformers import Qwen3ForCausalLM

    model = Qwen3ForCausalLM(config).eval()
    model.load_state_dict(state, strict=False)
    model.tie_weights()
    probes = torch.randint(0, FIRST_ADDED_ID, (32, 40), generator=gen)
    probes = torch.cat([probes, torch.tensor(_SUFFIX_IDS).expand(32, -1)], dim=1)
    with torch.no_grad():
        hidden = model.model(input_ids=probes).last_hidden_state[:, -1]
    head = "model.embed_tokens.weight" if config.tie_word_embeddings else "lm_head.weight"
    diff = state[head][_YES_ID] - state[head][_NO_ID]
    mean = hidden.mean(0)
    diff = diff - (diff @ mean) / (mean @ mean) * mean
    diff = diff * (2.0 / (hidden @ diff).std())
    state[head][_NO_ID] = state[head][_YES_ID] - diff


def make_tiny_model(out_dir: str | Path, seed: int = 0, tie_word_embeddings: bool = True,
                    kind: str = "reranker",
                    on_progress: Callable[[int, int], None] | None = None) -> Path:
    """Write a tiny random Qwen3 reranker checkpoint (config, safetensors, tokenizer) to `out_dir`.

    Loads with `AutoModelForCausalLM.from_pretrained` / `AutoTokenizer.from_pretrained` exactly
    like a `Qwen/Qwen3-Reranker-*` directory. Deterministic for a seed; ~5 MB (tied) of bf16.
    `kind="embedding"` writes a Qwen3-Embedding-like checkpoint instead (`make_tiny_embedding`).
    `on_progress(done, 3)` follows its steps: weights, tokenizer (the slow one), written.
    """
    step = on_progress or (lambda done, total: None)
    if kind == "embedding":
        return make_tiny_embedding(out_dir, seed=seed, on_progress=on_progress)
    if kind != "reranker":
        raise ValueError(f"kind {kind!r} is not one of reranker, embedding")
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = tiny_qwen3_config(tie_word_embeddings)
    config.dtype = "bfloat16"
    config.save_pretrained(out)
    state = _random_state(config, seed)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    step(1, 3)
    build_qwen_tokenizer().save_pretrained(out)
    step(2, 3)
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 151643, "eos_token_id": [151645, 151643], "pad_token_id": 151643}))
    logger.info("wrote a tiny Qwen3 reranker (seed %d, %s head) to %s", seed,
                "tied" if tie_word_embeddings else "untied", out)
    step(3, 3)
    return out


def _embedding_tokenizer() -> PreTrainedTokenizerFast:
    """The Qwen3 tokenizer as the Qwen3-Embedding checkpoints ship it: every encoded text ends
    with `<|endoftext|>` (a TemplateProcessing post-processor, kept within max_length)."""
    import copy

    from tokenizers import processors

    tok = copy.deepcopy(build_qwen_tokenizer())
    eos = [("<|endoftext|>", FIRST_ADDED_ID)]
    template = processors.TemplateProcessing(
        single="$A <|endoftext|>", pair="$A <|endoftext|> $B:1 <|endoftext|>:1",
        special_tokens=eos)
    current = tok.backend_tokenizer.post_processor
    tok.backend_tokenizer.post_processor = (processors.Sequence([current, template])
                                            if current is not None else template)
    return tok


def make_tiny_embedding(out_dir: str | Path, seed: int = 0,
                        on_progress: Callable[[int, int], None] | None = None) -> Path:
    """Write a tiny random Qwen3-Embedding checkpoint to `out_dir`: a `Qwen3Model` (no head;
    weights named like the released ones, without a `model.` prefix) in float32, and the
    real tokenizer with the embedding models' end-of-text post-processor. Loads with
    `AutoModel.from_pretrained` / `AutoTokenizer.from_pretrained` like `Qwen/Qwen3-Embedding-*`.
    """
    from safetensors.torch import save_file
    from transformers import Qwen3Model

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = tiny_qwen3_config(tie_word_embeddings=True)
    config.dtype = "float32"
    config.save_pretrained(out)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Qwen3Model(config).state_dict().items()}
    gen = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for name in sorted(shapes):
        shape = shapes[name]
        if name.endswith("norm.weight"):
            state[name] = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        elif name.endswith("embed_tokens.weight"):
            state[name] = torch.randn(shape, generator=gen)
        else:
            state[name] = torch.randn(shape, generator=gen) * (1.5 / shape[-1] ** 0.5)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    step = on_progress or (lambda done, total: None)
    step(1, 3)
    _embedding_tokenizer().save_pretrained(out)
    step(2, 3)
    logger.info("wrote a tiny Qwen3 embedding model (seed %d) to %s", seed, out)
    step(3, 3)
    return out
