"""Benchmark: the development server vs the production server (gunicorn) under load.

    .venv/bin/python bench/load.py [--clients 16] [--seconds 60] [--json PATH]

Starts `fhir-rerank serve --dev` (Werkzeug) and `fhir-rerank serve` (gunicorn) in turn, each
over fhir_fixtures/ with `reranker = "none"`, and drives each with the same load: `--clients`
threads, each on its own keep-alive connection, cycling through type searches and `$rerank`
calls for the fixture patients (the largest has 927 resources). Per server: requests/s,
p50 and p99 latency, errors (anything but 200, or no answer), and the RSS of the server's
whole process tree before the load (after one warm-up pass) and after it. The production
server runs `--workers` processes (default: twice the CPU count, like `server_workers = 0` with Redis); the load is synchronous searches,
which any process answers without Redis. Prints a table and
writes JSON under bench/results/. Target: production ≥ 2x the development server's
requests/s, 0 errors, RSS growth ≤ 20 %.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import quote

ROOT = Path(__file__).resolve().parent.parent
PATIENTS = ["79a66c97-6131-3213-f3c9-4606946ab056", "ec6a274e-5090-45c9-b153-e40418f6fa3d",
            "720b9118-3153-40c8-b162-cd963506be0e", "f201"]
QUESTIONS = ["kidney disease", "chest pain", "emergency visit for breathing", "stress at work",
             "blood pressure", "diabetes medication", "anemia", "urinary tract infection"]


def targets() -> list[str]:
    paths = []
    for i, patient in enumerate(PATIENTS):
        for j, question in enumerate(QUESTIONS):
            q = quote(question)
            if (i + j) % 2:
                paths.append(f"/fhir/Condition?patient={patient}&_content={q}&_count=10")
            else:
                paths.append(f"/fhir/Patient/{patient}/$rerank?query={q}&_count=10")
    return paths


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tree_rss_mb(pid: int) -> float:
    """RSS of a process and all its descendants (gunicorn master + workers), in MB."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    total, stack = 0, [pid]
    while stack:
        current = stack.pop()
        stack += children.get(current, [])
        try:
            for line in Path(f"/proc/{current}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


def start_server(dev: bool, port: int, log_path: Path, workers: int) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FHIR_RERANK_")}
    env["PYTHONPATH"] = str(ROOT)
    # every client is the same anonymous caller: the per-caller caps would throttle the load
    env["FHIR_RERANK_MAX_SYNC_PER_CALLER"] = env["FHIR_RERANK_MAX_JOBS_PER_CALLER"] = "0"
    if not dev:
        env["FHIR_RERANK_SERVER_WORKERS"] = str(workers)
    argv = [sys.executable, "-m", "adapter.cli", "--log-level", "WARNING", "serve",
            "--reranker", "none", "--port", str(port)] + (["--dev"] if dev else [])
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log_path.open("w"),
                            stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {log_path.read_text()[-2000:]}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/readyz")
            if conn.getresponse().status == 200:
                return proc
        except OSError:
            pass
        time.sleep(0.3)
    raise RuntimeError("server did not become ready")


def drive(port: int, clients: int, seconds: float) -> dict:
    paths = targets()
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors = [0] * clients
    stop_at = time.monotonic() + seconds

    def client(index: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        i = index
        while time.monotonic() < stop_at:
            path = paths[i % len(paths)]
            i += 1
            start = time.perf_counter()
            try:
                conn.request("GET", path, headers={"Accept": "application/fhir+json"})
                resp = conn.getresponse()
                resp.read()
                ok = resp.status == 200
            except (OSError, http.client.HTTPException):
                ok = False
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            latencies[index].append(time.perf_counter() - start)
            if not ok:
                errors[index] += 1
        conn.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    began = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - began
    every = sorted(x for per in latencies for x in per)
    return {"requests": len(every), "seconds": round(elapsed, 2),
            "requests_per_s": round(len(every) / elapsed, 1),
            "p50_ms": round(statistics.median(every) * 1000, 1),
            "p99_ms": round(every[min(len(every) - 1, int(len(every) * 0.99))] * 1000, 1),
            "errors": sum(errors)}


def measure(dev: bool, clients: int, seconds: float, log_dir: Path, workers: int) -> dict:
    port = free_port()
    name = ("development (Werkzeug, --dev)" if dev
            else f"production (gunicorn, {workers} processes x 8 threads)")
    proc = start_server(dev, port, log_dir / f"load-{'dev' if dev else 'prod'}.log", workers)
    try:
        drive(port, clients, max(5.0, seconds / 10))  # warm-up: caches filled, threads up
        rss_before = tree_rss_mb(proc.pid)
        result = drive(port, clients, seconds)
        result.update(server=name, rss_before_mb=round(rss_before, 1),
                      rss_after_mb=round(tree_rss_mb(proc.pid), 1))
        result["rss_growth_pct"] = round(100 * (result["rss_after_mb"] / rss_before - 1), 1)
        return result
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--workers", type=int, default=2 * (os.cpu_count() or 1),
                        help="gunicorn processes (server_workers); synchronous searches only")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results_dir = ROOT / "bench" / "results"
    results_dir.mkdir(parents=True, exist_ok=True)
    log_dir = Path(tempfile.mkdtemp(prefix="fhir-rerank-load-"))
    rows = [measure(dev, args.clients, args.seconds, log_dir, args.workers)
            for dev in (True, False)]
    dev, prod = rows
    ratio = prod["requests_per_s"] / dev["requests_per_s"] if dev["requests_per_s"] else 0.0
    print(f"\n{args.clients} clients x {args.seconds:.0f} s, fixtures, reranker none, "
          f"{os.cpu_count()} CPUs\n")
    print("| server | req/s | p50 ms | p99 ms | errors | RSS before MB | RSS after MB | growth |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['server']} | {r['requests_per_s']} | {r['p50_ms']} | {r['p99_ms']} | "
              f"{r['errors']} | {r['rss_before_mb']} | {r['rss_after_mb']} | "
              f"{r['rss_growth_pct']} % |")
    print(f"\nproduction / development requests/s: {ratio:.2f}x (target >= 2x)")
    out = args.json or results_dir / "load.json"
    out.write_text(json.dumps({
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "clients": args.clients, "seconds": args.seconds, "results": rows,
        "ratio_requests_per_s": round(ratio, 2)}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
