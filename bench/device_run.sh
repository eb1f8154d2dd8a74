#!/usr/bin/env bash
# Issue 7, the one prepared GPU run (≈ 9 minutes on an H100, each step time-boxed):
#   1. the `cuda` tests of the Qwen3 engine (padded, packed and CUDA-graph paths vs the card),
#   2. bench/rerank_throughput.py for 0.6B, 4B and 8B, 256 documents: card recipe, padded,
#      packed and graphs engines in one run each (tokens/s, ratio to the card, MFU).
# Results: $OUT/run.log (everything printed, step exit codes and times at the end) and
# $OUT/rerank_throughput_<config>.json, copied to bench/results/ too. JSON is written after
# every timed row, so a step stopped by its time box still keeps the rows it finished.
#
# Prepare once on the machine that has network. The GPU machine has none; its image (Python
# 3.12) has torch, pytest, numpy, safetensors, tokenizers, huggingface-hub, prometheus-client
# and an older transformers (5.17 when last listed), but not rank-bm25. The engine is written
# against transformers 5.24 (`cache=`), so carry that too (both are pure-Python wheels):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux2014_x86_64 -d .whl \
#       rank-bm25==0.2.2 transformers==5.24.0
# and make sure tests/.tiny-model/v2-tied-seed0 exists as a real folder (run the CPU tests
# once; in a worktree where it is a symlink, carry the checkout that holds it). Then, with the
# device tool, from the repository root:
#   run(command="bash bench/device_run.sh", timeout_s=600,
#       carry=[".whl", "tests/.tiny-model/v2-tied-seed0"])
# (tree ≈ 11 MB + checkpoint 23 MB + wheels; a call carries 64 MiB at most, so the 28 MB
# untied checkpoint fits only without the wheels; when it is there, test_qwen3_engine.py's
# cuda test runs too). No model hub is needed: the benchmark builds random-weight models and
# takes the tokenizer from the tiny checkpoint.
set -u -o pipefail
OUT=${OUT:-bench/results/device}
PY=${PYTHON:-python3}
mkdir -p "$OUT" bench/results
LOG="$OUT/run.log"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
SUMMARY=""

step() {  # step NAME SECONDS COMMAND...: run it under a time limit, log its exit code and time
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit} s): $*" | tee -a "$LOG"
    local t0=$SECONDS
    timeout --signal=TERM --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    SUMMARY+="$name: exit $rc$([ "$rc" = 124 ] && echo ' (time box hit)') after $((SECONDS - t0)) s"$'\n'
}

{
    date -u +"run at %Y-%m-%dT%H:%M:%SZ"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    $PY -c "import torch, transformers; print('python', __import__('sys').version.split()[0], \
'torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)"
} 2>&1 | tee -a "$LOG"

TESTS="tests/test_qwen3_packed.py"
[ -f tests/.tiny-model/v2-untied-seed0/model.safetensors ] && TESTS="$TESTS tests/test_qwen3_engine.py"
step pytest_cuda 140 $PY -m pytest -m cuda -q -p no:cacheprovider $TESTS

TOKENIZER=tests/.tiny-model/v2-tied-seed0
for pair in 0.6B:90 4B:120 8B:160; do
    config=${pair%%:*}
    limit=${pair##*:}
    json="$OUT/rerank_throughput_$config.json"
    step "bench_$config" "$limit" $PY bench/rerank_throughput.py --config "$config" --device cuda \
        --docs 256 --tokenizer "$TOKENIZER" --json "$json"
    [ -f "$json" ] && cp "$json" bench/results/
done

printf '=== summary\n%s' "$SUMMARY" | tee -a "$LOG"
