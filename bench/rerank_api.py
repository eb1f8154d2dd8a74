"""Overhead of the rerank API's HTTP + job path over a direct engine call, in one run.

The same documents go (a) straight to the engine (`Qwen3Reranker.score`) and (b) through
`POST /v1/rerank` of the real Flask app served on a loopback port (werkzeug, threaded), which
parses the body, submits the in-process job, waits for it and formats the answer. Two models
on CPU: the tiny checkpoint (where overhead shows most) and random weights with the 0.6B
architecture (built as in bench/rerank_throughput.py; nothing downloaded). The two ways run
interleaved, `--repeats` times each; medians and their ratio are reported (target ≤ 1.10 for
0.6B). Scores of both ways are checked equal.

    python bench/rerank_api.py --docs 200 --json bench/results/rerank_api.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import logging
import platform
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench"), str(ROOT / "tests")]

from adapter import create_app  # noqa: E402
from adapter.config import load_settings  # noqa: E402
from adapter.api.state import state_of  # noqa: E402
from adapter.rerank.qwen3 import Qwen3Reranker  # noqa: E402
from adapter.rerank.tiny import build_qwen_tokenizer, make_tiny_model  # noqa: E402
from rerank_throughput import QUERY, WORDS, random_model  # noqa: E402

log = logging.getLogger("bench")


def documents(count: int, seed: int, min_words: int, max_words: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words)))
            for _ in range(count)]


def build_engine(name: str, dtype: str, max_length: int) -> Qwen3Reranker:
    if name == "tiny":
        path = Path(tempfile.mkdtemp(prefix="tiny-")) / "tiny"
        make_tiny_model(path)
        return Qwen3Reranker(str(path), device="cpu", dtype="float32", max_length=max_length)
    model, _ = random_model(name, "cpu", getattr(torch, dtype))
    return Qwen3Reranker.from_model(model, build_qwen_tokenizer(), model_name=name,
                                    max_length=max_length)


def serve(engine: Qwen3Reranker, model: str, max_length: int) -> tuple[str, object]:
    """The app on a loopback port, its job runner scoring with `engine`."""
    import socket

    from werkzeug.serving import make_server

    with socket.socket() as sock:  # the port first: the app answers only Hosts on its port
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    settings = load_settings({"reranker": "qwen3", "model": model, "models_allowed": [model],
                              "device": "cpu", "max_length": max_length, "port": port,
                              "instruction": engine.instruction}, env={})
    app = create_app(settings)
    state_of(app).runtime.register_reranker(engine, model)
    server = make_server("127.0.0.1", port, app, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.port}", server


def run(name: str, args: argparse.Namespace) -> dict:
    engine = build_engine(name, args.dtype, args.max_length)
    words = (args.min_words, args.max_words) if name == "tiny" else \
        (args.min_words_06b, args.max_words_06b)
    docs = documents(args.docs, args.seed, *words)
    model = "bench-" + name
    url, server = serve(engine, model, args.max_length)
    session = requests.Session()
    body = {"model": model, "query": QUERY, "documents": docs}
    session.post(f"{url}/v1/rerank", json={**body, "documents": docs[:4]}).raise_for_status()
    engine.score(QUERY, docs[:4])  # warm-up both ways
    direct_s, api_s, tokens = [], [], 0
    for _ in range(args.repeats):
        start = time.perf_counter()
        direct = engine.score(QUERY, docs)
        direct_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        resp = session.post(f"{url}/v1/rerank", json=body, timeout=3600)
        api_s.append(time.perf_counter() - start)
        resp.raise_for_status()
        answer = resp.json()
        got = {r["index"]: r["relevance_score"] for r in answer["results"]}
        diff = max(abs(got[i] - s) for i, s in enumerate(direct.scores))
        if diff > 1e-6:
            raise SystemExit(f"{name}: API scores differ from the engine's by {diff:.2e}")
        tokens = answer["usage"]["total_tokens"]
        log.info("%s: direct %.3f s, /v1/rerank %.3f s", name, direct_s[-1], api_s[-1])
    server.shutdown()
    row = {"model": name, "docs": len(docs), "tokens": tokens,
           "words_per_doc": list(words), "repeats": args.repeats,
           "direct_s": statistics.median(direct_s), "api_s": statistics.median(api_s),
           "direct_all_s": direct_s, "api_all_s": api_s}
    row["ratio"] = row["api_s"] / row["direct_s"]
    log.info("%s: direct %.3f s, /v1/rerank %.3f s, ratio %.3f", name, row["direct_s"],
             row["api_s"], row["ratio"])
    return row


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=200)
    parser.add_argument("--models", default="tiny,0.6B", help="comma-separated: tiny, 0.6B")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--min-words", type=int, default=20)
    parser.add_argument("--max-words", type=int, default=200, help="tiny model documents")
    parser.add_argument("--min-words-06b", type=int, default=5)
    parser.add_argument("--max-words-06b", type=int, default=15,
                        help="0.6B documents (shorter: CPU time on a shared machine)")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--max-length", type=int, default=8192)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    rows = [run(name.strip(), args) for name in args.models.split(",") if name.strip()]
    print(f"\n| model | docs | tokens | direct s | /v1/rerank s | ratio |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['docs']} | {r['tokens']} | {r['direct_s']:.3f} | "
              f"{r['api_s']:.3f} | **{r['ratio']:.3f}** |")
    result = {"when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": platform.platform(), "cpu_threads": torch.get_num_threads(),
              "dtype_0.6B": args.dtype, "rows": rows}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
