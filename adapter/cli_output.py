"""The people-facing side of `fhir-rerank`: one-off `rerank` of a JSONL file, readable tables,
and progress bars (tqdm, only when stderr is a terminal)."""
from __future__ import annotations

import contextlib
import json
import logging
import shutil
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

from adapter.errors import BadRequest
from adapter.fhir.flatten import flatten_resource
from adapter.pipeline import scoring_model
from adapter.rerank.usage import format_usd, usage_from_bundle, usage_of
from adapter.runtime import Runtime

log = logging.getLogger("adapter")


@contextlib.contextmanager
def progress(label: str, unit: str = "doc") -> Iterator[Callable[[int, int], None] | None]:
    """An `on_progress(done, total)` drawing a tqdm bar on a terminal; None elsewhere."""
    if not sys.stderr.isatty():
        yield None
        return
    from tqdm import tqdm

    bar = tqdm(desc=label, unit=unit, file=sys.stderr, leave=False)
    try:
        def update(done: int, total: int) -> None:
            bar.total = total
            bar.n = done
            bar.refresh()
        yield update
    finally:
        bar.close()


def read_documents(path: str) -> tuple[list[str], list[str]]:
    """(ids, texts) from a JSONL file: each line a string or an object with `text` (and an
    optional `id`); the id defaults to the line number."""
    ids, texts = [], []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise BadRequest(f"cannot read --docs {path}: {exc.strerror}; give a JSONL file") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError:
            raise BadRequest(f"--docs line {number} is not JSON; each line must be a string or "
                             'an object like {"id": "n1", "text": "..."}') from None
        if isinstance(item, dict) and isinstance(item.get("text"), str):
            ids.append(str(item.get("id", number)))
            texts.append(item["text"])
        elif isinstance(item, str):
            ids.append(str(number))
            texts.append(item)
        else:
            raise BadRequest(f"--docs line {number} has no string `text`")
    if not texts:
        raise BadRequest(f"--docs {path} holds no documents")
    return ids, texts


def table(rows: list[list[str]], header: list[str]) -> str:
    """A plain aligned text table, the last column cut to the terminal width."""
    width = shutil.get_terminal_size((120, 20)).columns
    cols = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header) - 1)]
    room = max(20, width - sum(cols) - 2 * len(cols))
    out = []
    for row in [header, *rows]:
        last = row[-1].replace("\n", " ")
        last = last if len(last) <= room else last[:room - 1] + "…"
        out.append("  ".join([c.ljust(w) for c, w in zip(row, cols)] + [last]))
    return "\n".join(out)


def cmd_rerank(args: Any, settings: Any) -> int:
    """Rank the documents of a JSONL file by a query with the configured reranker."""
    ids, texts = read_documents(args.docs)
    reranker = Runtime(settings).reranker(args.model)
    with progress("reranking") as bar:
        result = reranker.score(args.query, texts, args.instruction, on_progress=bar)
    usage = usage_of(result, settings, scoring_model(result, args.model or settings.model))
    order = sorted(range(len(texts)), key=lambda i: (-result.scores[i], i))[:args.top_n]
    if args.json:
        json.dump({"model": usage.model, "tier": usage.tier,
                   "results": [{"index": i, "id": ids[i], "relevance_score": result.scores[i]}
                               for i in order],
                   "usage": {"tokens": usage.tokens, "cost_usd": usage.cost_usd}}, sys.stdout)
        sys.stdout.write("\n")
    else:
        print(table([[str(r + 1), f"{result.scores[i]:.4f}", ids[i], texts[i]]
                     for r, i in enumerate(order)], ["#", "score", "id", "text"]))
        print(f"\n{usage.tokens} tokens, ${format_usd(usage.cost_usd)} at list price "
              f"({usage.model}, tier {usage.tier})")
    if result.keyword_reason:
        log.warning("scores are BM25 keyword scores: %s", result.keyword_reason)
    return 0


def print_bundle_table(bundle: dict[str, Any]) -> None:
    """A searchset Bundle as a table (rank, score, resource, text) plus its notes."""
    rows, notes = [], []
    for entry in bundle.get("entry", []):
        if entry["search"]["mode"] == "match":
            res = entry["resource"]
            rows.append([str(len(rows) + 1), f"{entry['search']['score']:.4f}",
                         f"{res['resourceType']}/{res.get('id', '?')}", flatten_resource(res)])
        else:
            notes += [f"{i['severity']}: {i['diagnostics']}" for i in entry["resource"]["issue"]]
    print(table(rows, ["#", "score", "resource", "text"]) if rows else "no matches")
    usage = usage_from_bundle(bundle)
    if usage:
        print(f"\n{bundle.get('total', len(rows))} ranked; {usage.tokens} tokens, "
              f"${format_usd(usage.cost_usd)} ({usage.model}, tier {usage.tier})")
    for note in notes:
        print(note)
