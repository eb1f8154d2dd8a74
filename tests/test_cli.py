"""The `fhir-rerank` console script as users run it: real processes, real HTTP."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

ROOT = Path(__file__).resolve().parent.parent
BIG = "79a66c97-6131-3213-f3c9-4606946ab056"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FHIR_RERANK_")}
    env.update(extra)
    return env


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "adapter.cli", *args]


@pytest.fixture()
def served(tmp_path):
    """Start `fhir-rerank serve` on a free port; yield (base URL, log path); stop it."""
    procs = []

    def start(*args: str, env: dict[str, str] | None = None) -> tuple[str, Path]:
        port = _free_port()
        log = tmp_path / f"serve-{port}.log"
        proc = subprocess.Popen(_cli("serve", "--port", str(port), *args), cwd=ROOT,
                                env=env or _env(), stdout=log.open("w"),
                                stderr=subprocess.STDOUT)
        procs.append(proc)
        base = f"http://127.0.0.1:{port}/fhir"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise AssertionError(f"serve exited {proc.returncode}: {log.read_text()}")
            try:
                requests.get(base + "/metadata", timeout=1)
                return base, log
            except (requests.ConnectionError, requests.Timeout):  # bound, app still loading
                time.sleep(0.2)
        raise AssertionError(f"serve did not come up: {log.read_text()}")

    yield start
    for proc in procs:
        proc.terminate()
        try:
            proc.wait(timeout=40)  # gunicorn's graceful stop, on a busy shared machine
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def test_serve_over_fixture_files_answers_fhir(served):
    base, log = served("--reranker", "none")
    resp = requests.get(f"{base}/Patient/{BIG}/$rerank",
                        params={"query": "kidney disease", "_count": 3}, timeout=30)
    assert resp.status_code == 200
    assert resp.headers["Content-Type"].startswith("application/fhir+json")
    bundle = resp.json()
    assert bundle["type"] == "searchset" and len([e for e in bundle["entry"]
                                                  if e["search"]["mode"] == "match"]) == 3
    text = log.read_text()
    assert "GET /fhir/Patient/*/$rerank 200" in text  # access log without patient id or query
    assert BIG not in text and "kidney" not in text


def test_serve_without_weights_says_so_and_serves_bm25_but_is_not_ready(served, tmp_path):
    empty = tmp_path / "no-weights"  # a directory that holds no checkpoint
    empty.mkdir()
    base, log = served(env=_env(FHIR_RERANK_MODEL=str(empty), HF_HUB_OFFLINE="1"))
    lines = [line for line in log.read_text().splitlines() if "BM25 order" in line]
    assert len(lines) == 1 and "BM25 order" in lines[0] and "--reranker none" in lines[0]
    assert "HF_HUB_OFFLINE" not in lines[0]  # a local directory: no talk of the model hub
    bundle = requests.get(f"{base}/Condition", params={"patient": BIG, "_content": "stress"},
                          timeout=30).json()
    warnings = [i["diagnostics"] for e in bundle["entry"] if e["search"]["mode"] == "outcome"
                for i in e["resource"]["issue"]]
    assert any("not reranked" in w for w in warnings)
    ready = requests.get(base.removesuffix("/fhir") + "/readyz", timeout=30)
    assert ready.status_code == 503 and ready.json()["status"] == "not ready"
    assert "keyword order" in ready.text and "allow_keyword_fallback" in ready.text


def test_serve_with_allow_keyword_fallback_is_degraded_not_ready(served, tmp_path):
    empty = tmp_path / "no-weights"
    empty.mkdir()
    base, _ = served("--model", str(empty), env=_env(FHIR_RERANK_ALLOW_KEYWORD_FALLBACK="true",
                                                     HF_HUB_OFFLINE="1"))
    ready = requests.get(base.removesuffix("/fhir") + "/readyz", timeout=30)
    assert ready.status_code == 200 and ready.json()["status"] == "degraded"


def test_serve_model_from_the_command_line_is_ready(served, tiny_model_dir):
    """`serve --model DIR` (the --help example) allows DIR alone, so it becomes ready: no
    unloaded 0.6B left in models_allowed."""
    base, _ = served("--model", str(tiny_model_dir), "--device", "cpu")
    ready = requests.get(base.removesuffix("/fhir") + "/readyz", timeout=30)
    assert ready.status_code == 200 and ready.json()["status"] == "ready", ready.text
    assert "0.6B" not in ready.text


@pytest.mark.parametrize("args, env, says", [
    (["rerank", "--query", "asthma", "--docs", "notes.jsonl", "--model", "./no-such-model"], {},
     "no-such-model does not exist"),
    (["serve", "--model", "./no-such-model"], {}, "no-such-model does not exist"),
    (["worker", "--model", "~/no-such-model", "--redis-url", "redis://127.0.0.1:1/0"], {},
     "no-such-model does not exist"),
    (["serve"], {"FHIR_RERANK_DEVICE": "gpu"}, "device: 'gpu' is not a device"),
    (["serve", "--port", "8081"], {"FHIR_RERANK_PORT": "eighty"},
     "FHIR_RERANK_PORT='eighty' (setting port): 'eighty' is not an integer"),
    (["serve"], {"FHIR_RERANK_MODLE": "4B"}, "did you mean FHIR_RERANK_MODEL?"),
    (["worker", "--tiers", "8B", "--redis-url", "redis://127.0.0.1:1/0"], {},
     "--tiers 8B: no allowed model is sent there"),
])
def test_bad_start_is_one_line_exit_2(args, env, says):
    proc = subprocess.run(_cli(*args), cwd=ROOT, env=_env(**env), capture_output=True,
                          text=True, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert says in lines[0] and "Traceback" not in proc.stderr


def test_rerank_with_an_unloadable_model_exits_2_unless_keyword_order_is_allowed(tmp_path):
    empty = tmp_path / "no-weights"
    empty.mkdir()
    docs = tmp_path / "notes.jsonl"
    docs.write_text('"asthma attack at night"\n"knee pain"\n')
    args = _cli("rerank", "--query", "asthma", "--docs", str(docs), "--model", str(empty))
    strict = subprocess.run(args, cwd=ROOT, env=_env(HF_HUB_OFFLINE="1"), capture_output=True,
                            text=True, timeout=120)
    assert strict.returncode == 2 and strict.stdout == ""
    assert "could not load" in strict.stderr and "make-tiny-model" in strict.stderr
    lenient = subprocess.run(args, cwd=ROOT, env=_env(HF_HUB_OFFLINE="1",
                             FHIR_RERANK_ALLOW_KEYWORD_FALLBACK="true"),
                             capture_output=True, text=True, timeout=120)
    assert lenient.returncode == 0 and "asthma attack" in lenient.stdout
    assert "BM25 keyword scores" in lenient.stderr


def test_port_in_use_is_one_line_naming_the_fix():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        for dev in ([], ["--dev"]):
            proc = subprocess.run(_cli("serve", "--port", str(port), "--reranker", "none", *dev),
                                  cwd=ROOT, env=_env(), capture_output=True, text=True,
                                  timeout=120)
            lines = proc.stderr.strip().splitlines()
            assert proc.returncode == 2 and len(lines) == 1, proc.stderr
            assert f"port {port}" in lines[0] and "--port" in lines[0] and "PORT=" in lines[0]


def test_log_flags_work_after_the_subcommand_too():
    for args in (["--log-format", "json", "search"], ["search", "--log-format", "json"]):
        proc = subprocess.run(_cli(*args, "x", "--reranker", "none"), cwd=ROOT, env=_env(),
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, proc.stderr  # no patient: one JSON error line
        assert json.loads(proc.stderr.strip().splitlines()[-1])["level"] == "ERROR"
    quiet = subprocess.run(_cli("search", "x", "--reranker", "none", "--log-level", "CRITICAL"),
                           cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    assert quiet.returncode == 2 and quiet.stderr == ""


def test_serve_refuses_to_start_when_reranker_required(tmp_path):
    missing = str(tmp_path / "no-weights")  # a directory without a checkpoint: the load fails
    (tmp_path / "no-weights").mkdir()
    proc = subprocess.run(_cli("serve", "--port", str(_free_port())), cwd=ROOT,
                          env=_env(FHIR_RERANK_MODEL=missing, HF_HUB_OFFLINE="1",
                                   FHIR_RERANK_RERANKER_REQUIRED="true"),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "refusing to start" in proc.stderr and missing in proc.stderr


def test_search_command_prints_a_bundle():
    proc = subprocess.run(_cli("search", "stress", "--patient", BIG, "--type", "Condition",
                               "--count", "2", "--reranker", "none", "--json"),
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    bundle = json.loads(proc.stdout)
    entries = [e for e in bundle["entry"] if e["search"]["mode"] == "match"]
    assert len(entries) == 2 and all(e["resource"]["resourceType"] == "Condition"
                                     for e in entries)


def test_bad_setting_is_one_clear_line():
    proc = subprocess.run(_cli("search", "x", "--reranker", "none"), cwd=ROOT,
                          env=_env(FHIR_RERANK_RECALL="lots"), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "recall" in proc.stderr and "Traceback" not in proc.stderr


def test_make_tiny_model_writes_a_loadable_checkpoint(tmp_path):
    from adapter.rerank.qwen3 import Qwen3Reranker

    out = tmp_path / "tiny"
    proc = subprocess.run(_cli("make-tiny-model", str(out), "--seed", "3", "--untied"),
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "qwen3" and config["tie_word_embeddings"] is False
    scores = Qwen3Reranker(str(out), device="cpu", dtype="float32").score("q", ["a", "b"]).scores
    assert len(scores) == 2 and all(0.0 < s < 1.0 for s in scores)


def test_make_tiny_model_draws_its_progress_on_a_terminal_only(tmp_path):
    import fcntl
    import os
    import struct
    import termios

    master, slave = os.openpty()  # a terminal 24 x 80 (a new pty is 0 x 0: tqdm draws nothing)
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    proc = subprocess.Popen(_cli("make-tiny-model", str(tmp_path / "tty")), cwd=ROOT, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=slave)
    os.close(slave)
    seen = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # EIO: the terminal's other end closed
            break
        if not chunk:
            break
        seen += chunk
    os.close(master)
    assert proc.wait(timeout=300) == 0
    terminal = seen.decode("utf-8", "replace")
    assert "make-tiny-model" in terminal and "3/3" in terminal, terminal[-500:]
    piped = subprocess.run(_cli("make-tiny-model", str(tmp_path / "pipe")), cwd=ROOT, env=_env(),
                           capture_output=True, text=True, timeout=300)
    assert piped.returncode == 0 and "3/3" not in piped.stderr and "\r" not in piped.stderr


def test_serve_without_embedding_weights_says_so_once_and_serves_keyword_recall(served, tmp_path):
    missing = str(tmp_path / "no-embedding")  # a directory without a checkpoint
    (tmp_path / "no-embedding").mkdir()
    base, log = served("--reranker", "none", env=_env(FHIR_RERANK_EMBEDDER=missing,
                                                      HF_HUB_OFFLINE="1"))
    for _ in range(2):
        bundle = requests.get(f"{base}/Condition", params={"patient": BIG, "_content": "stress"},
                              timeout=30).json()
    lines = [line for line in log.read_text().splitlines() if "dense recall off" in line]
    assert len(lines) == 1 and 'embedder = ""' in lines[0]
    warnings = [i["diagnostics"] for e in bundle["entry"] if e["search"]["mode"] == "outcome"
                for i in e["resource"]["issue"] if i["severity"] == "warning"]
    assert any("dense recall is off" in w for w in warnings)
    assert [e for e in bundle["entry"] if e["search"]["mode"] == "match"]


def test_search_prints_a_table_by_default_with_recall_and_type():
    proc = subprocess.run(_cli("search", "stress", "--patient", BIG, "--type", "Condition",
                               "--count", "3", "--recall", "7", "--reranker", "none"),
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split()[:4] == ["#", "score", "resource", "text"]
    assert [ln.split()[0] for ln in lines[1:4]] == ["1", "2", "3"]
    assert all(ln.split()[2].startswith("Condition/") for ln in lines[1:4])
    assert "7 ranked; 0 tokens, $0 (bm25, tier default)" in proc.stdout
    assert "raise `recall`" in proc.stdout  # more matched than the 7 reranked


def test_rerank_command_ranks_a_jsonl_file_like_the_engine(tmp_path, tiny_model_dir):
    from adapter.rerank.qwen3 import Qwen3Reranker

    docs = ["wheeze and inhaler use", "knee replacement", "asthma review, peak flow low"]
    path = tmp_path / "notes.jsonl"
    path.write_text("\n".join(json.dumps({"id": f"n{i}", "text": d}) for i, d in enumerate(docs))
                    + '\n"plain string line"\n')
    env = _env(FHIR_RERANK_DTYPE="float32", FHIR_RERANK_DEVICE="cpu")
    proc = subprocess.run(_cli("rerank", "--query", "asthma", "--docs", str(path), "--model",
                               str(tiny_model_dir), "--json"),
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    direct = Qwen3Reranker(str(tiny_model_dir), device="cpu", dtype="float32").score(
        "asthma", docs + ["plain string line"])
    order = sorted(range(4), key=lambda i: (-direct.scores[i], i))
    assert [r["index"] for r in got["results"]] == order
    assert [r["id"] for r in got["results"]] == [["n0", "n1", "n2", "4"][i] for i in order]
    assert got["usage"]["tokens"] == direct.total_tokens
    table = subprocess.run(_cli("rerank", "--query", "asthma", "--docs", str(path), "--model",
                                str(tiny_model_dir), "--top-n", "2"),
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert table.returncode == 0 and len(table.stdout.strip().splitlines()) == 5
    bad = subprocess.run(_cli("rerank", "--query", "q", "--docs", str(tmp_path / "none.jsonl"),
                              "--reranker", "none"),
                         cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--docs" in bad.stderr and "Traceback" not in bad.stderr


def test_version_and_help_with_examples():
    version = subprocess.run(_cli("--version"), cwd=ROOT, env=_env(), capture_output=True,
                             text=True, timeout=60)
    assert version.returncode == 0 and version.stdout.startswith("fhir-rerank 0.")
    for command in ("serve", "worker", "search", "rerank", "make-tiny-model"):
        proc = subprocess.run(_cli(command, "--help"), cwd=ROOT, env=_env(),
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0 and f"fhir-rerank {command}" in proc.stdout.split("example:")[1]
    from adapter.cli import build_parser

    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command").choices
    for name, sub in subparsers.items():
        missing = [a.dest for a in sub._actions if not a.help]
        assert missing == [], f"{name}: options without help text: {missing}"
