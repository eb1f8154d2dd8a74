"""What one request costs a real server process (gunicorn master + workers): CPU seconds and
memory of a process tree from /proc (Linux); and the rerank-API amplification request of
issue 16 (a 2,000-word query, a 40,000-word instruction, 1,000 documents: 251 KB), shared by
tests/test_fuzz_rerank_api.py and bench/rerank_api_limits.py."""
from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

WORDS = ("pain", "chest", "asthma", "wheeze", "cough", "fever", "night", "knee", "renal",
         "acute", "chronic", "dose", "daily", "left", "right", "history", "denies", "mild")


def words(count: int, seed: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(count))


def amplification_body(query_words: int = 2000, instruction_words: int = 40000,
                       documents: int = 1000, doc_words: int = 2) -> dict[str, Any]:
    """The probe's request: a long query and instruction in front of many small documents."""
    return {"query": words(query_words, 1), "instruction": words(instruction_words, 2),
            "documents": [words(doc_words, 10 + i) for i in range(documents)]}


def body_bytes(body: dict[str, Any]) -> bytes:
    return json.dumps(body).encode()

_TICK = os.sysconf("SC_CLK_TCK")


def tree(root: int) -> list[int]:
    """`root` and every process below it."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        parents.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += parents.get(pid, [])
    return out


def cpu_seconds(root: int) -> float:
    """User + system CPU seconds used so far by the live processes of the tree."""
    total = 0
    for pid in tree(root):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
    return total / _TICK


def _status_kb(pid: int, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def rss_mb(root: int) -> float:
    """Resident memory of the tree now (MB)."""
    return sum(_status_kb(pid, "VmRSS") for pid in tree(root)) / 1024


def reset_peaks(root: int) -> bool:
    """Reset each process's peak RSS (VmHWM) to its current RSS; False where not allowed."""
    ok = True
    for pid in tree(root):
        try:
            Path(f"/proc/{pid}/clear_refs").write_text("5")
        except OSError:
            ok = False
    return ok


def peak_rss_mb(root: int) -> float:
    """Sum of the tree's peak RSS (VmHWM) since the last `reset_peaks` (MB)."""
    return sum(_status_kb(pid, "VmHWM") for pid in tree(root)) / 1024
