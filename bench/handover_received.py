"""Time to 200 after a whole worker is SIGKILLed while a job it received waits for its pool
process, which is still loading a Qwen3-Reranker-0.6B-architecture model (issue 16, item 8).

Real parts, default job settings (job_stale_after 20 s, heartbeat 5 s, visibility timeout
3600 s): redis-server, the API (Flask app, Redis runner, fixtures as FHIR data), and
`celery -A celery_app worker -Q rerank.0.6B` processes on a random-weight checkpoint with the
0.6B architecture (built once under /tmp, ~1.2 GB of bf16; the real Qwen tokenizer of the
tiny test checkpoint). Worker A starts; once it consumes and has received the job but its pool
has not finished loading, it is SIGKILLed (main and pool); worker B is started right after, as
a supervisor or service manager would. Prints the seconds from the kill to the 200.

    .venv/bin/python bench/handover_received.py                  # B started after the kill
    .venv/bin/python bench/handover_received.py --warm-rescuer   # B already warm at the kill
    ... --json PATH        # also append this run (timeline, load average) to a JSON list

With `--warm-rescuer`, A's pool is kept warming on purpose (tests/slow_boot_app.py) while B
starts and warms up; then A is killed: the time is the hand-over plus B's scoring.
"""
from __future__ import annotations

import datetime
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

CHECKPOINT = Path(tempfile.gettempdir()) / "fhir-rerank-qwen3-0.6b-arch"
PATIENT = "f201"  # 10 resources


def build_checkpoint() -> Path:
    if (CHECKPOINT / "model.safetensors").exists():
        return CHECKPOINT
    import torch
    from transformers import AutoModelForCausalLM, Qwen3Config

    from adapter.rerank.tiny import QWEN3_VOCAB_SIZE
    from fixtures_model import tiny_checkpoint

    config = Qwen3Config(vocab_size=QWEN3_VOCAB_SIZE, hidden_size=1024, num_hidden_layers=28,
                         num_attention_heads=16, num_key_value_heads=8, intermediate_size=3072,
                         head_dim=128, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
                         max_position_embeddings=40960, tie_word_embeddings=True,
                         bos_token_id=151643, eos_token_id=151645,
                         architectures=["Qwen3ForCausalLM"])
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    staging = Path(tempfile.mkdtemp(prefix="writing-", dir=CHECKPOINT.parent))
    model.save_pretrained(staging)
    tiny = tiny_checkpoint()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny / name, staging / name)
    staging.rename(CHECKPOINT)
    return CHECKPOINT


def main() -> int:
    from adapter import create_app
    from adapter.config import load_settings, settings_env
    from adapter.jobs import job_ref
    from fixtures_jobs import CeleryWorker, RedisServer

    model = str(build_checkpoint())
    redis = RedisServer()
    redis.start()
    logs = Path(tempfile.mkdtemp(prefix="handover-"))
    settings = {"redis_url": redis.url, "model": model, "models_allowed": [model],
                "device": "cpu"}
    env = {**settings_env(settings), "OMP_NUM_THREADS": "2"}
    warm_rescuer = "--warm-rescuer" in sys.argv
    if warm_rescuer:  # A's pool stays warming (a deliberate delay, tests/slow_boot_app.py)
        from test_job_handover import SlowBootWorker

        a = SlowBootWorker("warming", ["rerank.0.6B"], env, logs, slow_s=900)
    else:
        a = CeleryWorker("warming", ["rerank.0.6B"], env, logs)
    b = CeleryWorker("rescuer", ["rerank.0.6B"], env, logs)
    try:
        a.start(wait=False)
        deadline = time.monotonic() + 180
        while "ready." not in a.log():
            assert time.monotonic() < deadline and a.proc.poll() is None, a.log()[-2000:]
            time.sleep(0.1)
        client = create_app(load_settings(settings, env={})).test_client()
        url = f"/fhir/Condition?patient={PATIENT}&_content=chest%20pain"
        resp = client.get(url, headers={"Prefer": "respond-async"})
        assert resp.status_code == 202, resp.get_data(as_text=True)[:300]
        path = "/fhir/_async/" + resp.headers["Content-Location"].rsplit("/", 1)[1]
        ref = job_ref(path.rsplit("/", 1)[1])
        while not re.search(rf"rerank\[{ref}\] received", a.log()):
            assert time.monotonic() < deadline, a.log()[-2000:]
            time.sleep(0.05)
        received = time.monotonic()
        if warm_rescuer:  # B starts now and gets warm while A holds the job, unstarted
            b.start(wait=False)
            b.wait_ready(timeout=900)
        else:
            time.sleep(2.0)
        warming = f"job {ref[:12]}: reranking" not in a.log()
        a.kill()
        killed = time.monotonic()
        print(f"job received; not started by A at the kill: {warming}; killed "
              f"{killed - received:.1f} s after the receipt")
        if not warm_rescuer:
            b.start(wait=False)
        while True:
            done = client.get(path)
            if done.status_code != 202 or time.monotonic() - killed > 300:
                break
            time.sleep(0.5)
        took = time.monotonic() - killed
        print(f"status {done.status_code} {took:.1f} s after the SIGKILL")
        run = {"when": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%MZ"),
               "rescuer": "warm at the kill" if warm_rescuer else "started after the kill",
               "killed_after_receipt_s": round(killed - received, 1),
               "unstarted_at_kill": warming, "status": done.status_code,
               "seconds_to_answer": round(took, 1), "load_average_1m": os.getloadavg()[0],
               "timeline_s": {}}
        stamp = time.time() - (time.monotonic() - killed)  # the kill, on the wall clock
        for what, pattern in (("worker B consuming", r"ready\."),
                              ("job handed over", r"handed to another worker"),
                              ("B's pool loaded the model", r"loaded Qwen3-Reranker"),
                              ("B's pool warm (speed probe done)", r"worker process \d+ ready"),
                              ("B starts the job", rf"job {ref[:12]}: reranking")):
            found = re.search(r"\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+):[^\]]*\] [^\n]*"
                              + pattern, b.log())
            if found:
                at = datetime.datetime.strptime(found.group(1), "%Y-%m-%d %H:%M:%S,%f")
                print(f"  {what}: +{at.timestamp() - stamp:.1f} s")
                run["timeline_s"][what] = round(at.timestamp() - stamp, 1)
            else:
                print(f"  {what}: not seen")
        if "--json" in sys.argv:
            out = Path(sys.argv[sys.argv.index("--json") + 1])
            runs = json.loads(out.read_text())["runs"] if out.exists() else []
            out.write_text(json.dumps({"what": "seconds from SIGKILL of a worker holding a "
                                               "received, unstarted job to the 200 (issue 16 item 8)",
                                       "model": "Qwen3-Reranker-0.6B architecture, random weights",
                                       "runs": runs + [run]}, indent=1) + "\n")
        return 0 if done.status_code == 200 and took < 90 else 1
    finally:
        a.kill()
        b.stop()
        redis.close()


if __name__ == "__main__":
    sys.exit(main())
