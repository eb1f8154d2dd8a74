"""Throughput of the Qwen3-Reranker engines against the model card's recipe, in one run.

Random weights with the real 0.6B / 4B / 8B architectures (speed does not depend on weight
values), built directly in the target dtype on the target device: nothing is downloaded.
One shared document set with a realistic length spread: most documents 100–600 tokens, ~4 %
notes of several thousand. Engines: `padded` (length-sorted right-padded batches), `packed`
(padding-free batches under a flex-attention mask) and, on CUDA, `graphs` (packed batches
replayed as CUDA graphs). Prints tokens/s, ratio to the card, MFU, peak memory and the largest
score difference to the card per engine; writes JSON.

    python bench/rerank_throughput.py --config 0.6B --device cpu --docs 8 --max-doc-tokens 600 --batch-tokens 4096
    python bench/rerank_throughput.py --config 8B --device cuda --docs 256 --json bench/results/8b.json

On a CPU the packed engine runs flex attention eagerly, which materialises each batch's
(heads × length × keys) scores: keep --batch-tokens small there (it is for checking, not speed).

tokens/s counts tokens per (instruction, query, document) pair as the card feeds them (prefix
and suffix included): the work done for the caller, so the engine's shared-prefix reuse shows up
as higher tokens/s. MFU counts the FLOPs actually executed: the card runs every token of every
pair; an engine runs the shared prefix (system prompt, instruction, query) once per call and
each pair's tail, so its MFU = (prefix once + tails) / seconds × 2 × non-embedding parameters /
measured dense bf16 matmul peak (padding and attention FLOPs not counted). The prefix saving is
its own line (`prefix_saving` in the JSON): tokens the engine did not run.
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
from adapter.rerank.qwen3 import DEFAULT_INSTRUCTION, Qwen3Reranker  # noqa: E402
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


ENGINES = {  # name → Qwen3Reranker options
    "padded": {"attention": "padded"},
    "packed": {"attention": "packed"},
    "graphs": {"attention": "packed", "cuda_graphs": True},
}


def engine_names(requested: str, device: str) -> list[str]:
    """The engines to time: `graphs` only on CUDA (off CUDA it would be `packed` again)."""
    names = [n.strip() for n in requested.split(",") if n.strip()]
    unknown = [n for n in names if n not in ENGINES]
    if unknown:
        raise SystemExit(f"unknown engine(s) {', '.join(unknown)}; pick from {', '.join(ENGINES)}")
    return [n for n in names if n != "graphs" or device == "cuda"]


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
    parser.add_argument("--engines", default="padded,packed,graphs",
                        help="comma-separated: padded, packed, graphs (graphs: CUDA only)")
    parser.add_argument("--skip-card", action="store_true", help="time the engines only")
    parser.add_argument("--tokens-only", action="store_true",
                        help="count the document set's tokens and the engine's prefix saving "
                             "(no model, no timing: seconds on any machine)")
    parser.add_argument("--tokenizer", type=Path, default=None,
                        help="a checkpoint directory whose Qwen tokenizer to use (e.g. "
                             "tests/.tiny-model/v2-tied-seed0) instead of building it from "
                             "the packaged qwen.tiktoken ranks")
    parser.add_argument("--json", type=Path, default=None,
                        help="written after every timed row, so a run cut short keeps its rows")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    docs_count = args.docs or (256 if args.device == "cuda" else 48)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(args.seed)

    if args.tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    else:
        tokenizer = build_qwen_tokenizer()
    docs = document_set(tokenizer, docs_count, args.seed, args.max_doc_tokens)
    if args.tokens_only:
        _, saving = executed_tokens(tokenizer, docs, args.max_length)
        counted = {"command": "python bench/rerank_throughput.py " + " ".join(argv or sys.argv[1:]),
                   "date": datetime.date.today().isoformat(), "docs": len(docs),
                   "seed": args.seed, "max_doc_tokens": args.max_doc_tokens,
                   "prefix_saving": saving}
        print(json.dumps(counted, indent=2))
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(counted, indent=2) + "\n")
        return counted
    peak = bf16_peak_tflops(args.device)
    started = time.perf_counter()
    model, non_embedding = random_model(args.config, args.device, dtype)
    log.info("built %s (%.2fB non-embedding params) on %s in %.1f s; bf16 peak %.1f TFLOP/s",
             args.config, non_embedding / 1e9, args.device, time.perf_counter() - started, peak)
    card = CardRecipe(model, tokenizer, max_length=args.max_length)
    tokens = _card_tokens(card, docs)
    log.info("%d documents, %d tokens", len(docs), tokens)
    result = {"config": args.config, "device": args.device, "dtype": args.dtype,
              "device_name": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or platform.machine(),
              "threads": torch.get_num_threads(), "docs": len(docs), "tokens": tokens,
              "date": datetime.date.today().isoformat(), "torch": torch.__version__,
              "bf16_peak_tflops": round(peak, 2), "non_embedding_params": non_embedding,
              "card_batch_size": args.card_batch_size, "batch_tokens": args.batch_tokens}
    scores: dict[str, list[float]] = {}

    def record(name: str, seconds: float, memory: float, executed: int | None = None) -> None:
        tok_s = tokens / seconds
        run = tokens if executed is None else executed  # the card runs every token it is fed
        row = {"seconds": round(seconds, 2), "tokens_per_s": round(tok_s, 1),
               "tokens_executed": run,
               "mfu": round(run / seconds * 2 * non_embedding / (peak * 1e12), 4),
               "peak_memory_gb": round(memory, 2)}
        result[name] = row
        for other in scores.keys() & ENGINES.keys() if "card" in result else ():
            result[other]["ratio_over_card"] = round(result["card"]["seconds"] /
                                                     result[other]["seconds"], 2)
            result[other]["max_abs_score_diff"] = max(
                abs(a - b) for a, b in zip(scores[other], scores["card"]))
        log.info("%s: %.2f s, %.1f tok/s", name, seconds, tok_s)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(result, indent=2))

    def run_card() -> None:
        card.score(QUERY, docs[:2], DEFAULT_INSTRUCTION)  # warm-up
        scores["card"], seconds, memory = timed(args.device, lambda: card.score(
            QUERY, docs, DEFAULT_INSTRUCTION, batch_size=args.card_batch_size))
        record("card", seconds, memory)

    # On CUDA the card runs first (a run cut short still has the baseline; peak memory is
    # reset per row). On a CPU peak memory is the process high-water mark, so it runs last.
    card_first = args.device == "cuda" and not args.skip_card
    if card_first:
        run_card()
    for name in engine_names(args.engines, args.device):
        started = time.perf_counter()
        engine = Qwen3Reranker.from_model(model, tokenizer, model_name=args.config,
                                          max_length=args.max_length, batch_tokens=args.batch_tokens,
                                          options=ScoreOptions(long_documents="truncate"),
                                          **ENGINES[name])
        engine.score(QUERY, docs[:16])  # warm-up: compiles flex / captures graphs it still needs
        log.info("%s engine ready in %.1f s", name, time.perf_counter() - started)
        executed, saving = executed_tokens(tokenizer, docs, args.max_length)
        result["prefix_saving"] = saving
        scores[name], seconds, memory = timed(args.device, lambda: engine.score(QUERY, docs).scores)
        record(name, seconds, memory, executed)
        del engine
        if args.device == "cuda":
            torch.cuda.empty_cache()  # the next engine starts from the same free memory
    if not card_first and not args.skip_card:
        run_card()
    print(format_table(result))
    return result


def executed_tokens(tokenizer, docs: list[str], max_length: int) -> tuple[int, dict]:
    """(tokens the engine runs through the model for one call over `docs`, the prefix saving):
    its rows (as `Qwen3Reranker.encode_pairs` builds them, long documents truncated) share a
    prefix it computes once (`Qwen3Reranker._score_sequences`)."""
    from adapter.rerank.chunking import build_rows
    from adapter.rerank.qwen3 import DOC_HEAD, PREFIX, SHARED, SUFFIX, _longest_common_prefix

    shared = SHARED.format(instruction=DEFAULT_INSTRUCTION, query=QUERY)
    rows = build_rows(tokenizer, tokenizer.encode(PREFIX, add_special_tokens=False),
                      tokenizer.encode(SUFFIX, add_special_tokens=False), max_length,
                      shared, DOC_HEAD, docs, ScoreOptions(long_documents="truncate")).rows
    shared = min(_longest_common_prefix(rows), min(len(r) for r in rows) - 1)
    fed = sum(len(r) for r in rows)
    executed = fed - shared * (len(rows) - 1)
    return executed, {"shared_prefix_tokens": shared, "rows": len(rows), "tokens_fed": fed,
                      "tokens_executed": executed, "tokens_not_run": fed - executed,
                      "fraction_not_run": round((fed - executed) / fed, 4)}


def _card_tokens(card: CardRecipe, docs: list[str]) -> int:
    """Tokens of the card's prompts (prefix, body cut as the card cuts it, suffix)."""
    pairs = [f"<Instruct>: {DEFAULT_INSTRUCTION}\n<Query>: {QUERY}\n<Document>: {d}" for d in docs]
    return int(card.process_inputs(pairs)["attention_mask"].sum())


def format_table(result: dict) -> str:
    lines = [f"{result['config']} on {result['device']} ({result['device_name']}, {result['dtype']}, "
             f"{result['threads']} threads), {result['docs']} docs, {result['tokens']} tokens, "
             f"{result['date']}",
             f"{'':8}{'seconds':>10}{'tok/s':>10}{'× card':>8}{'MFU':>8}{'peak GB':>9}{'max |Δ|':>10}"]
    for name in ("card", *ENGINES):
        if name in result:
            row = result[name]
            ratio = f"{row['ratio_over_card']:.2f}" if "ratio_over_card" in row else "1.00" if name == "card" else "-"
            diff = f"{row['max_abs_score_diff']:.1e}" if "max_abs_score_diff" in row else "-"
            lines.append(f"{name:8}{row['seconds']:>10.2f}{row['tokens_per_s']:>10.1f}{ratio:>8}"
                         f"{row['mfu']:>8.1%}{row['peak_memory_gb']:>9.2f}{diff:>10}")
    saving = result.get("prefix_saving")
    if saving:
        lines.append(f"shared prefix: {saving['shared_prefix_tokens']} tokens run once instead of "
                     f"{saving['rows']} times: {saving['tokens_not_run']} of {saving['tokens_fed']} "
                     f"tokens not run ({saving['fraction_not_run']:.1%}); MFU counts the tokens run")
    lines.append(f"(max |Δ| against the card: {result['dtype']} noise; float32 runs agree within 1e-5)")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
