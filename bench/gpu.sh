#!/usr/bin/env bash
# Issue #13's GPU measurements in one command, for a lent GPU machine (../shared/gpu/NOTES.md):
#   bash bench/gpu.sh          # about 7 minutes on one H100 (figures of 2026-11-27 in bench/README.md); results in $OUT (or /tmp/vitfood-gpu)
#   bash bench/gpu.sh --tiny   # toy sizes: check the script on a CPU first
# datasets is not installed on that machine: wheels carried in .gpu/whl are installed into /tmp/site.
# Fetch them where pip can reach an index (.gpu/ is not committed):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .gpu/whl \
#     datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 fsspec==2026.9.0 pytest pluggy iniconfig pygments
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/vitfood-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ! python3 -c "import datasets, pytest" 2>/dev/null && ls .gpu/whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu/whl/*.whl && export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/gpu.txt" 2>&1
timeout -k 10 490 python3 bench/gpu.py "$@" --out "$OUT/gpu.json" 2>&1 | tee "$OUT/gpu.log" | tail -40
# what time is left: the tests that need CUDA, then the rest, bounded
# (to a file, not through a pipe: test subprocesses killed by timeout would hold a pipe open)
timeout -k 10 95 python3 -m pytest -x -q -p no:cacheprovider tests/test_steps.py > "$OUT/pytest.log" 2>&1
tail -15 "$OUT/pytest.log"
