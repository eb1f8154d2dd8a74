# Two commands a newcomer needs: `make demo` and `make test`. Each sets itself up idempotently.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
NODE_STAMP := tests/fhir_server/node_modules/.installed
BROWSER_STAMP := tests/browser/node_modules/.installed
PORT ?= 8080
HAPI_PORT ?= 8090
HAPI_JAR := tests/hapi/target/hapi-test-server.jar
DEMO_PATIENT := 79a66c97-6131-3213-f3c9-4606946ab056
# two pytest-xdist workers on the 2-core machine: most tests wait on a server or a worker process
# much of the time. A module's tests stay on one worker; the HAPI tests share one (conftest).
PYTEST_WORKERS ?= 2
PYTEST_ARGS ?=
# The demo looks for Qwen3 weights in the local Hugging Face cache only (no hub retries when
# offline); `make demo HF_HUB_OFFLINE=0` lets transformers download them.
HF_HUB_OFFLINE ?= 1

.PHONY: demo test setup node redis browser chromium bench clean hapi hapi-jar

setup: $(STAMP)

# torch first and pinned: a bare `torch` would pull a multi-GB CUDA build (see README).
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

node: $(NODE_STAMP)

$(NODE_STAMP): tests/fhir_server/package-lock.json
	cd tests/fhir_server && npm ci --no-audit --no-fund --loglevel=error
	touch $(NODE_STAMP)

redis:
	@command -v redis-server >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq redis-server; \
	  else sudo apt-get update -qq && sudo apt-get install -y -qq redis-server; fi; }

# The browser tests (tests/test_smart_app.py): Debian's Chromium, driven by playwright-core
# from tests/browser/package-lock.json (never a browser download of its own).
browser: chromium $(BROWSER_STAMP)

$(BROWSER_STAMP): tests/browser/package-lock.json
	cd tests/browser && npm ci --no-audit --no-fund --loglevel=error
	touch $(BROWSER_STAMP)

chromium:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq chromium; \
	  else sudo apt-get update -qq && sudo apt-get install -y -qq chromium; fi; }

# The demo accepts BM25 keyword order when no weights are at hand (/readyz then answers 200
# "degraded", not "ready"); a deployment leaves allow_keyword_fallback off (503 until loaded).
demo: setup
	@echo "Chart search (SMART app) on the demo patient, through the local SMART stand-in — open:"
	@echo "  http://127.0.0.1:$(PORT)/smart/ehr-launch?patient=$(DEMO_PATIENT)"
	@echo "Serving the adapter over fhir_fixtures/ on http://127.0.0.1:$(PORT)/fhir — try:"
	@echo "  curl -s 'http://127.0.0.1:$(PORT)/fhir/Condition?patient=$(DEMO_PATIENT)&_content=heart%20problems&_count=3'"
	@echo "    # -> Condition 'Ischemic heart disease' among the first entries"
	@echo "  curl -s 'http://127.0.0.1:$(PORT)/fhir/Patient/$(DEMO_PATIENT)/\$$rerank?query=dialysis%20for%20kidney%20failure&_count=3'"
	@echo "    # -> kidney Conditions ('End-stage renal disease') and this patient's notes on dialysis"
	HF_HUB_OFFLINE=$(HF_HUB_OFFLINE) FHIR_RERANK_ALLOW_KEYWORD_FALLBACK=true FHIR_RERANK_SMART_STANDIN=true \
	  $(VENV)/bin/fhir-rerank serve --port $(PORT)

test: setup node redis browser hapi-jar
	SMART_APP_BROWSER=required $(PY) -m pytest -n $(PYTEST_WORKERS) $(PYTEST_ARGS)

bench: setup node
	$(PY) bench/e2e.py

# A real HAPI FHIR JPA server (R4, full text on, in-memory H2 + Lucene) built from tests/hapi/:
# `make hapi HAPI_PORT=8090` serves http://127.0.0.1:8090/fhir in the foreground (Ctrl-C stops
# it). Maven's downloads stay in ~/.m2; the jar is rebuilt only when tests/hapi/ changes.
hapi-jar: $(HAPI_JAR)

$(HAPI_JAR): tests/hapi/pom.xml $(shell find tests/hapi/src -type f 2>/dev/null)
	@command -v mvn >/dev/null 2>&1 || { echo "make hapi-jar needs Maven 3 and Java 17 (apt-get install maven openjdk-17-jdk-headless)"; exit 1; }
	cd tests/hapi && { mvn -B -q package || { echo "mvn package failed; retrying once"; mvn -B -q package; }; }
	touch $(HAPI_JAR)

hapi: hapi-jar
	java -Xmx1g -XX:TieredStopAtLevel=1 -XX:+UseSerialGC -jar $(HAPI_JAR) --server.port=$(HAPI_PORT)

clean:
	rm -rf $(VENV) tests/fhir_server/node_modules tests/browser/node_modules tests/.tiny-model tests/hapi/target
