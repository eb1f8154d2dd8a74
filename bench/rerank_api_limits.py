"""What one rerank-API request costs a real `fhir-rerank serve` process: server CPU seconds,
wall time, peak RSS during the request and RSS after it (issue 16, item 1).

Requests: a small one (2 documents) and the probe's amplification request (a 2,000-word
query, a 40,000-word instruction, 1,000 two-word documents; tests/request_costs.py). Servers
(tiny Qwen3 checkpoint, CPU, in-process jobs): `defaults`, and `chars-raised`
(max_question_chars / max_instruction_chars at 1,000,000, so the request reaches the token
limit, counted by the engine). CPU seconds are the server process tree's user + system time
from /proc; peak RSS is VmHWM after resetting it (/proc/PID/clear_refs) just before the
request, RSS after one second past the answer; the amplification request is sent
`--repeat` times in a row. `--server-root` runs the server from another checkout (e.g. `git worktree add
/tmp/old 1717c6b`) to measure the code before a change; one run measures one code version.

    python bench/rerank_api_limits.py --json bench/results/rerank_api_limits.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from adapter.config import settings_env  # noqa: E402
from fixtures_jobs import free_port  # noqa: E402
from fixtures_model import tiny_checkpoint  # noqa: E402
from request_costs import (amplification_body, body_bytes, cpu_seconds, peak_rss_mb,  # noqa: E402
                           reset_peaks, rss_mb, tree)

SERVERS = {"defaults": {},
           "chars-raised": {"max_question_chars": 1_000_000,
                            "max_instruction_chars": 1_000_000}}


def start(server_root: Path, settings: dict, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, **settings_env(settings), "PYTHONPATH": str(server_root),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "adapter.cli", "serve", "--port", str(port)],
                            cwd=server_root, env=env, stdout=log.open("w"),
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(log.read_text()[-2000:])
        try:
            if requests.get(f"{url}/v1/models", timeout=2).ok:
                return proc, url
        except requests.RequestException:
            pass
        time.sleep(0.3)
    proc.kill()
    raise RuntimeError(f"serve did not start: {log.read_text()[-2000:]}")


def stop(proc: subprocess.Popen) -> None:
    """Stop the server; its worker too, even when it is still busy with a request."""
    pids = tree(proc.pid)
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        pass
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(10)


def measure(proc: subprocess.Popen, url: str, name: str, raw: bytes, timeout: float) -> dict:
    reset_peaks(proc.pid)
    rss_before, cpu_before = rss_mb(proc.pid), cpu_seconds(proc.pid)
    started = time.perf_counter()
    try:
        resp = requests.post(f"{url}/v1/rerank", data=raw, timeout=timeout,
                             headers={"Content-Type": "application/json"})
        status, answer = resp.status_code, resp.text[:160]
    except requests.RequestException as exc:
        status, answer = None, f"no answer: {type(exc).__name__}"
    wall = time.perf_counter() - started
    cpu = cpu_seconds(proc.pid) - cpu_before
    peak = peak_rss_mb(proc.pid)
    time.sleep(1.0)
    return {"request": name, "body_bytes": len(raw), "status": status, "answer": answer,
            "wall_s": round(wall, 3), "server_cpu_s": round(cpu, 3),
            "rss_before_mb": round(rss_before, 1), "peak_rss_mb": round(peak, 1),
            "rss_after_mb": round(rss_mb(proc.pid), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--server-root", type=Path, default=ROOT,
                        help="checkout whose adapter package the server runs")
    parser.add_argument("--servers", default=",".join(SERVERS))
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--repeat", type=int, default=3,
                        help="amplification requests in a row (does RSS keep growing?)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    model = str(tiny_checkpoint())
    base = {"reranker": "qwen3", "model": model, "models_allowed": [model], "device": "cpu",
            "dtype": "float32"}
    requests_ = {"small (2 docs)": body_bytes({"query": "asthma at night",
                                               "documents": ["wheeze", "knee pain"]}),
                 "amplification": body_bytes(amplification_body())}
    rows = []
    for server in args.servers.split(","):
        log = Path(tempfile.mkdtemp(prefix="limits-")) / "serve.log"
        proc, url = start(args.server_root, {**base, **SERVERS[server]}, log)
        try:
            measure(proc, url, "warm-up", requests_["small (2 docs)"], args.timeout)
            for name, raw in requests_.items():
                for attempt in range(1, (args.repeat if name == "amplification" else 1) + 1):
                    row = {"server": server, "attempt": attempt,
                           **measure(proc, url, name, raw, args.timeout)}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
        finally:
            stop(proc)
    head = ("server", "request", "attempt", "body_bytes", "status", "wall_s", "server_cpu_s",
            "rss_before_mb", "peak_rss_mb", "rss_after_mb")
    print("\n" + " | ".join(head))
    for row in rows:
        print(" | ".join(str(row[k]) for k in head))
    if args.json:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=args.server_root,
                                capture_output=True, text=True).stdout.strip()
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "server_commit": commit, "machine": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
