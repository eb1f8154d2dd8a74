"""Limits, trusted hosts, health and readiness, metrics, and strict configuration."""
from __future__ import annotations

import pytest

from adapter import create_app
from adapter.config import load_settings

SMALL = "f201"
BIG = "79a66c97-6131-3213-f3c9-4606946ab056"


def client(**overrides):
    return create_app(load_settings({"reranker": "none", **overrides}, env={})).test_client()


@pytest.fixture(scope="module")
def files():
    return client()


def issue(resp, status):
    assert resp.status_code == status, resp.get_data(as_text=True)[:300]
    body = resp.get_json()
    assert body["resourceType"] == "OperationOutcome"
    return body["issue"][0]


# --- limits ---------------------------------------------------------------------------------

def test_question_and_instruction_length_limits_name_their_setting():
    small = client(max_question_chars=20, max_instruction_chars=10)
    ok = small.get(f"/fhir/Condition?patient={SMALL}&_content={'a' * 20}")
    assert ok.status_code == 200
    too_long = issue(small.get(f"/fhir/Condition?patient={SMALL}&_content={'a' * 21}"), 400)
    assert "max_question_chars = 20" in too_long["diagnostics"]
    assert too_long["expression"] == ["_content"]
    instr = issue(small.get(f"/fhir/$rerank?patient={SMALL}&query=a&instruction={'b' * 11}"),
                  400)
    assert "max_instruction_chars = 10" in instr["diagnostics"]


def test_parameter_count_limit_in_query_and_body():
    small = client(max_parameters=5)
    query = "&".join(f"x{i}=1" for i in range(4))
    assert small.get(f"/fhir/Condition?patient={SMALL}&_content=a&{query}").status_code == 400
    assert small.get(f"/fhir/Condition?patient={SMALL}&_content=a&x=1").status_code == 200
    body = {"resourceType": "Parameters",
            "parameter": [{"name": "query", "valueString": "a"}] * 6}
    found = issue(small.post("/fhir/$rerank", json=body), 400)
    assert "max_parameters = 5" in found["diagnostics"]


def test_json_depth_and_body_size_limits():
    small = client(max_json_depth=4, max_body_bytes=2000)
    body = {"resourceType": "Parameters", "parameter": [
        {"name": "query", "valueString": "stress"}, {"name": "patient", "valueString": SMALL}]}
    assert small.post("/fhir/$rerank", json=body).status_code == 200  # depth 3
    deep = issue(small.post("/fhir/$rerank", data="[[[[[1]]]]]",
                            content_type="application/fhir+json"), 400)
    assert "max_json_depth = 4" in deep["diagnostics"]
    big = issue(small.post("/fhir/$rerank", data="x" * 2001,
                           content_type="application/fhir+json"), 413)
    assert "max_body_bytes = 2000" in big["diagnostics"]


def test_brackets_inside_strings_do_not_count_as_depth():
    small = client(max_json_depth=4)
    body = {"resourceType": "Parameters", "parameter": [
        {"name": "query", "valueString": "[[[[[[{{{{ \\\" ]]"},
        {"name": "patient", "valueString": SMALL}]}
    assert small.post("/fhir/$rerank", json=body).status_code == 200


# --- links come from configuration ------------------------------------------------------------

def test_untrusted_host_is_400_and_never_in_links(files):
    found = issue(files.get(f"/fhir/Condition?patient={SMALL}&_content=a",
                            headers={"Host": "evil.example"}), 400)
    assert "trusted_hosts" in found["diagnostics"] and found["expression"] == ["Host"]
    for host in ("localhost", "127.0.0.1:8080", "localhost:8080"):
        resp = files.get(f"/fhir/Condition?patient={SMALL}&_content=a", headers={"Host": host})
        assert resp.status_code == 200, host
        assert f"http://{host}/fhir/" in resp.get_data(as_text=True)
    assert files.get("/fhir/metadata", headers={"Host": "localhost:9"}).status_code == 400


def test_public_base_url_writes_every_link_and_async_location():
    app = client(public_base_url="https://rerank.example.org/fhir",
                 trusted_hosts=["internal:8000"])
    assert app.get("/fhir/metadata", headers={"Host": "localhost"}).status_code == 400
    for host in ("rerank.example.org", "internal:8000"):
        resp = app.get(f"/fhir/Condition?patient={SMALL}&_content=a", headers={"Host": host})
        text = resp.get_data(as_text=True)
        assert resp.status_code == 200 and "internal:8000" not in text
        links = [link["url"] for link in resp.get_json()["link"]]
        urls = [e["fullUrl"] for e in resp.get_json()["entry"]
                if not e.get("fullUrl", "urn:").startswith("urn:")]  # urn: = the outcome
        assert all(u.startswith("https://rerank.example.org/fhir/") for u in links + urls)
    queued = app.get(f"/fhir/Condition?patient={SMALL}&_content=a",
                     headers={"Host": "internal:8000", "Prefer": "respond-async"})
    assert queued.status_code == 202
    assert queued.headers["Content-Location"].startswith("https://rerank.example.org/fhir/_async/")


def test_no_redirect_carries_the_host(files):
    resp = files.get("//fhir//metadata", headers={"Host": "localhost"})
    assert resp.status_code == 404 and "Location" not in resp.headers


# --- health, readiness, metrics -----------------------------------------------------------------

def test_healthz_and_readyz_in_process(files):
    assert files.get("/healthz").get_json() == {"status": "alive"}
    ready = files.get("/readyz", headers={"Host": "pod-10-0-0-7:8080"})  # probes: any Host
    assert ready.status_code == 200, ready.get_json()
    checks = {c["name"]: c for c in ready.get_json()["checks"]}
    assert set(checks) == {"fhir", "models"} and all(c["ok"] for c in checks.values())
    assert "file source with" in checks["fhir"]["detail"]


def test_readyz_not_ready_until_the_model_is_loaded(tiny_model_dir):
    app = client(reranker="qwen3", model=str(tiny_model_dir),
                 models_allowed=[str(tiny_model_dir)], device="cpu")
    before = app.get("/readyz")
    assert before.status_code == 503
    models = [c for c in before.get_json()["checks"] if c["name"] == "models"][0]
    assert not models["ok"] and "not loaded" in models["detail"]
    from adapter.api.state import state_of

    # Another app's model is not this app's: still not ready.
    create_app(load_settings({"reranker": "qwen3", "model": str(tiny_model_dir),
                              "models_allowed": [str(tiny_model_dir)], "device": "cpu"},
                             env={})).extensions["fhir_rerank"].runtime.reranker()
    assert app.get("/readyz").status_code == 503
    state_of(app.application).runtime.reranker()  # what `serve` does before it answers
    assert app.get("/readyz").status_code == 200


def test_readyz_keyword_fallback_is_not_ready_unless_allowed(tmp_path):
    """A model that cannot load serves keyword order: 503 naming why, unless
    allow_keyword_fallback accepts it (200 "degraded", what `make demo` turns on)."""
    from adapter.api.state import state_of

    empty = tmp_path / "not-a-checkpoint"
    empty.mkdir()
    for allowed, status, word in ((False, 503, "not ready"), (True, 200, "degraded")):
        app = client(reranker="qwen3", model=str(empty), device="cpu",
                     allow_keyword_fallback=allowed)
        state_of(app.application).runtime.reranker()  # what `serve` does before it answers
        resp = app.get("/readyz")
        assert resp.status_code == status and resp.get_json()["status"] == word
        models = [c for c in resp.get_json()["checks"] if c["name"] == "models"][0]
        assert "serving BM25 keyword order" in models["detail"]
        assert str(empty) in models["detail"] and models["degraded"] is allowed
        assert ("set allow_keyword_fallback = true" in models["detail"]) is not allowed


def test_readyz_names_an_unreachable_fhir_server():
    app = client(fhir_base_url="http://127.0.0.1:9/fhir", readyz_timeout=0.5)
    resp = app.get("/readyz")
    assert resp.status_code == 503
    fhir = [c for c in resp.get_json()["checks"] if c["name"] == "fhir"][0]
    assert not fhir["ok"] and "unreachable" in fhir["detail"]


def test_readyz_with_redis_down_is_not_ready(redis_server):
    app = client(redis_url="redis://127.0.0.1:9/0", readyz_timeout=0.5)
    resp = app.get("/readyz")
    assert resp.status_code == 503
    checks = {c["name"]: c for c in resp.get_json()["checks"]}
    assert not checks["redis"]["ok"] and "unreachable" in checks["redis"]["detail"]
    assert not checks["workers"]["ok"]


def test_readyz_with_no_worker_on_a_tier_names_the_command(redis_server):
    # queues of their own: other tests' workers on the session's Redis must not count
    app = client(redis_url=redis_server.url, readyz_timeout=0.5, model="m1",
                 models_allowed=["m1", "m2"], model_queues=["m1=ops-a", "m2=ops-b"])
    resp = app.get("/readyz")
    assert resp.status_code == 503
    checks = {c["name"]: c for c in resp.get_json()["checks"]}
    assert checks["redis"]["ok"]
    detail = checks["workers"]["detail"]
    assert "rerank.ops-a" in detail and "rerank.ops-b" in detail
    # the same command as a job's 503 (adapter.jobs.routing.worker_command): the queue's name,
    # which `--tiers` reads as that queue (a bare "ops-b" would be read as a model)
    assert "`fhir-rerank worker --tiers rerank.ops-b`" in detail
    from adapter.jobs.routing import queue_for_tier

    settings = load_settings({"model_queues": ["m2=ops-b"]}, env={})
    assert queue_for_tier(settings, "rerank.ops-b") == "rerank.ops-b"


def test_metrics_count_routes_by_template_not_by_id(files):
    files.get(f"/fhir/Patient/{SMALL}/$rerank?query=fever")
    files.get(f"/fhir/Condition?patient={SMALL}&_content=fever")
    files.get(f"/fhir/Condition?patient={SMALL}&_content=fever")
    files.get("/fhir/nothing/here/at/all")
    text = files.get("/metrics").get_data(as_text=True)
    assert 'fhir_rerank_requests_total{method="GET",route="/fhir/Patient/<patient_id>/$rerank",' \
           'status="200"}' in text
    assert 'route="/fhir/<resource_type>",status="200"}' in text
    assert 'route="unmatched",status="404"}' in text
    assert 'fhir_rerank_request_duration_seconds_bucket{le="0.005",method="GET",' in text
    for stage in ("fetch", "flatten", "recall", "rerank"):
        assert f'fhir_rerank_stage_duration_seconds_count{{stage="{stage}"}}' in text
    assert 'fhir_rerank_jobs_total{state="submitted"}' in text
    assert 'fhir_rerank_cache_lookups_total{cache="bm25_index",result="hit"}' in text
    assert "fhir_rerank_model_loads_total" in text
    assert SMALL not in text and "fever" not in text


# --- strict configuration ------------------------------------------------------------------------

def test_unknown_environment_variable_stops_start_up():
    with pytest.raises(ValueError, match="FHIR_RERANK_RERANKR"):
        load_settings(env={"FHIR_RERANK_RERANKR": "none"})
    assert load_settings(env={"FHIR_RERANK_RERANKER": "none"}).reranker == "none"


def test_missing_config_file_stops_start_up(tmp_path):
    with pytest.raises(ValueError, match="not a file"):
        load_settings(env={"FHIR_RERANK_CONFIG": str(tmp_path / "nope.toml")})
    bad = tmp_path / "bad.toml"
    bad.write_text("recall = = 3")
    with pytest.raises(ValueError, match="not valid TOML"):
        load_settings(env={"FHIR_RERANK_CONFIG": str(bad)})


def test_serve_refuses_a_misspelt_variable_with_the_reason(tmp_path):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("FHIR_RERANK_")}
    env["FHIR_RERANK_REDIS_ULR"] = "redis://x"
    proc = subprocess.run([sys.executable, "-m", "adapter.cli", "serve", "--reranker", "none"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "FHIR_RERANK_REDIS_ULR" in proc.stderr and "Traceback" not in proc.stderr


def test_a_misspelt_variable_names_its_nearest_setting():
    with pytest.raises(ValueError, match=r"FHIR_RERANK_MODLE \(did you mean FHIR_RERANK_MODEL\?\)"):
        load_settings(env={"FHIR_RERANK_MODLE": "4B"})
    with pytest.raises(ValueError, match=r"reranker_requird \(did you mean reranker_required\?\)"):
        load_settings({"reranker_requird": True}, env={})


def test_a_bad_variable_is_an_error_even_when_a_flag_overrides_it():
    with pytest.raises(ValueError, match=r"FHIR_RERANK_PORT='eighty' \(setting port\): 'eighty' is not"):
        load_settings({"port": 8081}, env={"FHIR_RERANK_PORT": "eighty"})
    with pytest.raises(ValueError, match="device: 'gpu' is not a device; use auto, cpu, cuda"):
        load_settings(env={"FHIR_RERANK_DEVICE": "gpu"})
    assert load_settings({"device": "cuda:1"}, env={}).device == "cuda:1"


def test_a_model_chosen_without_models_allowed_is_the_one_allowed():
    assert load_settings({"model": "./tiny"}, env={}).models_allowed == ["./tiny"]
    assert load_settings(env={"FHIR_RERANK_MODEL": "4B"}).models_allowed == ["4B"]
    assert load_settings(env={}).models_allowed == ["0.6B"]
    both = load_settings({"model": "./tiny"}, env={"FHIR_RERANK_MODELS_ALLOWED": "0.6B,4B"})
    assert both.models_allowed == ["0.6B", "4B"]


def test_upstream_meta_that_is_not_a_string_is_not_a_500():
    """Found by fuzzing an upstream: meta.versionId as a list made the cache key unhashable."""
    from adapter.fhir.flatten import flatten_documents

    resource = {"resourceType": "Condition", "id": "c1", "meta": {"versionId": ["1", "2"]},
                "code": {"text": "asthma"}, "subject": {"reference": "Patient/p"}}
    docs, _ = flatten_documents([resource], ["Condition/c1"], validate=False)
    assert len(docs) == 1 and "asthma" in docs[0].text


def test_readyz_counts_a_live_worker_per_queue(redis_server, celery_workers):
    settings = {"redis_url": redis_server.url, "reranker": "none", "model": "m3",
                "models_allowed": ["m3"], "model_queues": ["m3=ops-c"], "readyz_timeout": 1.0}
    worker = celery_workers.start("readyz-ops-c", ["rerank.ops-c"], settings)
    try:
        app = client(**settings)
        resp = app.get("/readyz")
        assert resp.status_code == 200, resp.get_json()
        workers = [c for c in resp.get_json()["checks"] if c["name"] == "workers"][0]
        assert workers["detail"] == "rerank.ops-c: 1 worker(s)"
    finally:
        worker.stop()
    resp = app.get("/readyz")
    assert resp.status_code == 503 and "no worker consumes rerank.ops-c" in resp.get_data(
        as_text=True)


def test_readyz_with_a_worker_serving_keyword_order(redis_server, celery_workers, tmp_path):
    """A worker whose model cannot load is live but serves keyword order: not ready (503 with
    the reason), or 200 "degraded" with allow_keyword_fallback."""
    import time

    empty = tmp_path / "not-a-checkpoint"
    empty.mkdir()
    settings = {"redis_url": redis_server.url, "reranker": "qwen3", "model": str(empty),
                "models_allowed": [str(empty)], "model_queues": [f"{empty}=ops-d"],
                "device": "cpu", "readyz_timeout": 1.0}
    worker = celery_workers.start("readyz-ops-d", ["rerank.ops-d"], settings)
    try:
        app = client(**settings)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            resp = app.get("/readyz")
            if "keyword order" in resp.get_data(as_text=True):
                break
            time.sleep(0.2)
        assert resp.status_code == 503, resp.get_json()
        workers = [c for c in resp.get_json()["checks"] if c["name"] == "workers"][0]
        assert "rerank.ops-d" in workers["detail"] and str(empty) in workers["detail"]
        lenient = client(**settings, allow_keyword_fallback=True).get("/readyz")
        assert lenient.status_code == 200 and lenient.get_json()["status"] == "degraded"
    finally:
        worker.stop()
    assert "keyword order" not in app.get("/readyz").get_data(as_text=True)  # it left
