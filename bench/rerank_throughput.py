"""Throughput of the Qwen3-Reranker engine against the model card's recipe, in one run.

Random weights with the real 0.6B / 4B / 8B architectures (speed does not depend on weight
values), built directly in the target dtype on the target device: nothing is downloaded.
One shared document set with a realistic length spread: most documents 100–600 tokens, ~4 %
notes of several thousand. Prints tokens/s, engine/card ratio, MFU and peak memory; writes JSON.

    python bench/rerank_throughput.py --config 0.6B --device cpu --docs 48
    python bench/rerank_throughput.py --config 8B --device cuda --docs 256 --json bench/results/8b.json

Tokens are counted per (instruction, query, document) pair as the card feeds them (prefix and
suffix included), so the engine's shared-prefix reuse shows up as higher tokens/s and MFU.
MFU = tokens/s × 2 × non-embedding parameters / measured dense bf16 matmul peak.
"""
from __future__ import annotations

import argparse
import datetime
import json
import logging
import math
import platform
import random
import resource
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from adapter.rerank.base import ScoreOptions  # noqa: E402
from adapter.rerank.qwen3 import Qwen3Reranker  # noqa: E402
from adapter.rerank.tiny import QWEN3_VOCAB_SIZE, build_qwen_tokenizer  # noqa: E402
from oracle_recipe import CardRecipe  # noqa: E402  (the card's recipe, line for line)

log = logging.getLogger("bench")
ARCHS = {  # hidden, layers, heads, kv heads, intermediate, tied head
    "0.6B": (1024, 28, 16, 8, 3072, True),
    "4B": (2560, 36, 32, 8, 9728, True),
    "8B": (4096, 36, 32, 8, 12288, False),
}
QUERY = "Has the patient's diabetes been well controlled over the last year?"
WORDS = ("patient reports denies history of type 2 diabetes mellitus hypertension metformin "
         "500 mg twice daily HbA1c 7.4 % glucose fasting mg/dL blood pressure 138/86 mmHg "
         "follow-up in three months chest pain shortness of breath no acute distress exam "
         "normal labs reviewed plan continue current medications counselled on diet and "
         "exercise retinopathy screening ordered creatinine eGFR lipid panel LDL statin").split()


def random_model(config_name: str, device: str, dtype: torch.dtype):
    """A random-weight Qwen3ForCausalLM with the named reranker's architecture."""
    from transformers import AutoModelForCausalLM, Qwen3Config
    from transformers.utils import is_flash_attn_2_available

    hidden, layers, heads, kv, inter, tied = ARCHS[config_name]
    config = Qwen3Config(vocab_size=QWEN3_VOCAB_SIZE, hidden_size=hidden, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv, intermediate_size=inter,
                         head_dim=128, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
                         max_position_embeddings=40960, tie_word_embeddings=tied)
    attn = "flash_attention_2" if device == "cuda" and is_flash_attn_2_available() else "sdpa"
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn)
    non_embedding = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n)
    if not tied:
        non_embedding -= model.lm_head.weight.numel()
    return model.eval(), non_embedding


def document_set(tokenizer, count: int, seed: int, max_tokens: int) -> list[str]:
    """Lognormal lengths (median ~250 tokens), clipped to 100–600, plus ~4 % long notes."""
    rng = random.Random(seed)
    lengths = [min(600, max(100, int(rng.lognormvariate(math.log(250), 0.5)))) for _ in range(count)]
    for i in rng.sample(range(count), max(1, round(0.04 * count))):
        lengths[i] = rng.randint(min(2000, max_tokens), max_tokens)
    docs = []
    for n in lengths:
        words = [rng.choice(WORDS) for _ in range(n)]
        ids = tokenizer(" ".join(words), add_special_tokens=False)["input_ids"][:n]
        docs.append(tokenizer.decode(ids))
    return docs


def bf16_peak_tflops(device: str) -> float:
    """Measured dense bf16 matmul throughput (the MFU denominator)."""
    size, reps = (8192, 20) if device == "cuda" else (2048, 4)
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    best = math.inf
    for _ in range(3):
        _sync(device)
        start = time.perf_counter()
        for _ in range(reps):
            a @ b
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size ** 3 * reps / best / 1e12


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _peak_memory_gb(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # process high-water mark


def timed(device: str, fn) -> tuple[list[float], float, float]:
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    _sync(device)
    start = time.perf_counter()
    scores = fn()
    _sync(device)
    return scores, time.perf_counter() - start, _peak_memory_gb(device)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=sorted(ARCHS), default="0.6B")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--docs", type=int, default=None, help="default 256 on cuda, 48 on cpu")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--card-batch-size", type=int, default=16)
    parser.add_argument("--batch-tokens", type=int, default=16384)
    parser.add_argument("--max-length", type=int, default=8192)
    parser.add_argument("--max-doc-tokens", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-card", action="store_true", help="time the engine only")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    docs_count = args.docs or (256 if args.device == "cuda" else 48)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(args.seed)

    tokenizer = build_qwen_tokenizer()
    docs = document_set(tokenizer, docs_count, args.seed, args.max_doc_tokens)
    peak = bf16_peak_tflops(args.device)
    started = time.perf_counter()
    model, non_embedding = random_model(args.config, args.device, dtype)
    log.info("built %s (%.2fB non-embedding params) on %s in %.1f s; bf16 peak %.1f TFLOP/s",
             args.config, non_embedding / 1e9, args.device, time.perf_counter() - started, peak)

    engine = Qwen3Reranker.from_model(model, tokenizer, model_name=args.config,
                                      max_length=args.max_length, batch_tokens=args.batch_tokens,
                                      options=ScoreOptions(long_documents="truncate"))
    seqs = engine.encode_pairs(QUERY, docs, engine.instruction).rows
    tokens = sum(len(s) for s in seqs)
    log.info("%d documents, %d tokens (longest pair %d)", len(docs), tokens, max(map(len, seqs)))
    rows = {}
    engine_scores, seconds, memory = timed(args.device, lambda: engine.score(QUERY, docs).scores)
    rows["engine"] = (seconds, memory)
    card_scores = None
    if not args.skip_card:
        card = CardRecipe(model, tokenizer, max_length=args.max_length)
        card.score(QUERY, docs[:2], engine.instruction)  # warm-up
        card_scores, seconds, memory = timed(args.device, lambda: card.score(
            QUERY, docs, engine.instruction, batch_size=args.card_batch_size))
        rows["card"] = (seconds, memory)

    result = {"config": args.config, "device": args.device, "dtype": args.dtype,
              "device_name": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or platform.machine(),
              "threads": torch.get_num_threads(), "docs": len(docs), "tokens": tokens,
              "date": datetime.date.today().isoformat(), "torch": torch.__version__,
              "bf16_peak_tflops": round(peak, 2), "non_embedding_params": non_embedding,
              "card_batch_size": args.card_batch_size, "batch_tokens": args.batch_tokens}
    for name, (seconds, memory) in rows.items():
        tok_s = tokens / seconds
        result[name] = {"seconds": round(seconds, 2), "tokens_per_s": round(tok_s, 1),
                        "mfu": round(tok_s * 2 * non_embedding / (peak * 1e12), 4),
                        "peak_memory_gb": round(memory, 2)}
    if card_scores is not None:
        result["ratio_engine_over_card"] = round(result["card"]["seconds"] / result["engine"]["seconds"], 2)
        result["max_abs_score_diff"] = max(abs(a - b) for a, b in zip(engine_scores, card_scores))
    print(format_table(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return result


def format_table(result: dict) -> str:
    lines = [f"{result['config']} on {result['device']} ({result['device_name']}, {result['dtype']}, "
             f"{result['threads']} threads), {result['docs']} docs, {result['tokens']} tokens, "
             f"{result['date']}",
             f"{'':8}{'seconds':>10}{'tok/s':>10}{'MFU':>8}{'peak GB':>9}"]
    for name in ("card", "engine"):
        if name in result:
            row = result[name]
            lines.append(f"{name:8}{row['seconds']:>10.2f}{row['tokens_per_s']:>10.1f}"
                         f"{row['mfu']:>8.1%}{row['peak_memory_gb']:>9.2f}")
    if "ratio_engine_over_card" in result:
        lines.append(f"engine/card = {result['ratio_engine_over_card']}×; "
                     f"max |Δscore| = {result['max_abs_score_diff']:.2e} ({result['dtype']} noise)")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
