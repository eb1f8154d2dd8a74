"""Honest numbers: every benchmark JSON the README cites is committed (with its command,
machine and time), and the engine's MFU counts the tokens it runs, not the ones it is fed."""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# the README and docs/BENCHMARKS.md (where the README's benchmark section moved)
README = "\n".join(p.read_text(encoding="utf-8") for p in
                   (ROOT / "README.md", ROOT / "docs" / "BENCHMARKS.md"))


def test_every_published_json_the_readme_cites_exists_with_command_machine_and_time():
    cited = set(re.findall(r"bench/published/([\w.-]+\.json)", README))
    assert cited, "the README cites no published benchmark JSON"
    for name in cited - {"eval.json"}:  # eval.json: named as what to write, not yet quoted
        data = json.loads((ROOT / "bench" / "published" / name).read_text())
        meta = data["published"]
        assert meta["command"].split()[-2:] == ["--json", f"bench/published/{name}"] or \
            f"bench/published/{name}" in meta["command"]
        assert meta["machine"] and re.match(r"\d{4}-\d\d-\d\dT", meta["when"])


def test_the_readme_quotes_the_published_numbers():
    e2e = json.loads((ROOT / "bench/published/e2e.json").read_text())
    assert f"| (a) bare fetch | {e2e['bare_fetch_s']:.3f} |" in README
    assert f"**{e2e['ratio_full_over_fetch']:.2f}**" in README
    api = json.loads((ROOT / "bench/published/rerank_api_tiny.json").read_text())
    row = next(r for r in api["rows"] if r["model"] == "tiny") if "rows" in api else api["tiny"]
    assert f"ratio {row['ratio']:.2f}" in README
    tokens = json.loads((ROOT / "bench/published/rerank_throughput_tokens_48docs.json")
                        .read_text())["prefix_saving"]
    assert f"{tokens['tokens_fed']:,} tokens" in README
    assert f"runs {tokens['tokens_executed']:,} tokens" in README
    assert "MFU 50.5" not in README.replace('"MFU 50.5 %") is withdrawn', "")


def test_mfu_counts_the_shared_prefix_once(tiny_model_dir):
    """The bench's token count is the engine's: its prompt rows, the shared prefix run once."""
    sys.path.insert(0, str(ROOT / "bench"))
    from rerank_throughput import QUERY, executed_tokens

    from adapter.rerank.base import ScoreOptions
    from adapter.rerank.qwen3 import Qwen3Reranker, _longest_common_prefix

    engine = Qwen3Reranker(str(tiny_model_dir), device="cpu", dtype="float32", max_length=512,
                           options=ScoreOptions(long_documents="truncate"))
    docs = ["asthma at night", "knee pain after a fall " * 3, "HbA1c 7.9 %" * 200]
    executed, saving = executed_tokens(engine.loaded.tokenizer, docs, 512)
    rows = engine.encode_pairs(QUERY, docs).rows
    shared = _longest_common_prefix(rows)
    assert saving["tokens_fed"] == sum(map(len, rows)) and saving["rows"] == 3
    assert saving["shared_prefix_tokens"] == shared > 20
    assert executed == sum(map(len, rows)) - 2 * shared == saving["tokens_executed"]
