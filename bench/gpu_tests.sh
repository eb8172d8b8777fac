#!/usr/bin/env bash
# The default test suite on a lent GPU machine (CUDA visible, so every run in it takes the CUDA path),
# one pytest process per test file, several at once, each under its own time limit, so that a file that
# hangs is named instead of taking the whole budget. One log comes back: $OUT/tests.log.
#   bash bench/gpu_tests.sh [seconds per file, default 240] [files at once, default 6]
#   FILES='tests/test_hub.py tests/test_layout.py' bash bench/gpu_tests.sh 60 2   # a check on a CPU
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/vitfood-gpu}
LIMIT=${1:-240} JOBS=${2:-6}
mkdir -p "$OUT/tests"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ! python3 -c "import datasets, pytest" 2>/dev/null && ls .gpu/whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu/whl/*.whl && export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
export LIMIT OUT
ls ${FILES:-tests/test_*.py} | xargs -P "$JOBS" -I{} bash -c \
  'f={}; n=$(basename $f .py); s=$(date +%s); timeout -k 10 $LIMIT python3 -m pytest -q -rfE -p no:cacheprovider --durations=3 $f > $OUT/tests/$n.log 2>&1; echo "rc=$? wall=$(( $(date +%s) - s ))s" >> $OUT/tests/$n.log'
for f in "$OUT"/tests/*.log; do echo "=== $(basename "$f" .log): $(tail -1 "$f") | $(grep -E '(passed|failed|error|skipped|deselected)' "$f" | tail -1)"; done > "$OUT/tests.log"
for f in "$OUT"/tests/*.log; do grep -q '^rc=0 ' "$f" || { echo; echo "##### $(basename "$f")"; tail -60 "$f"; }; done >> "$OUT/tests.log"
rm -rf "$OUT/tests"
cat "$OUT/tests.log" | head -150
