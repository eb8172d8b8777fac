#!/usr/bin/env bash
# The GPU measurements in one command (about 7 minutes on one H200; figures in bench/README.md):
#   bash bench/gpu.sh          # results in $OUT (or /tmp/vitfood-gpu): gpu.json, gpu.log, gpu.txt, pytest.log
#   bash bench/gpu.sh --tiny   # toy sizes: check the script on a CPU first
#   PHASES=generate,vitfood,trainer bash bench/gpu.sh   # some of bench/gpu.py's phases only
# 1. the tests that need CUDA (the whole step as a CUDA graph, the step's syncs);
# 2. bench/gpu.py: the disk, the data set, vitfood's recipe, the Trainer's, vitfood.bench, vitfood's recipe with
#    an eager step (--no-cuda-graph), each phase's figures written to gpu.json as it ends.
# A machine without `datasets` gets it from wheels in .gpu/whl (ignored by git), installed into /tmp/site:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .gpu/whl \
#     datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 fsspec==2026.9.0
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/vitfood-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ! python3 -c "import datasets, pytest" 2>/dev/null && ls .gpu/whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu/whl/*.whl && export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, transformers, datasets; print(torch.__version__, transformers.__version__, datasets.__version__)"
  nproc; git log -1 --format=%h 2>/dev/null; } > "$OUT/gpu.txt" 2>&1
# to a file, not through a pipe: test subprocesses killed by timeout would hold a pipe open
timeout -k 10 90 python3 -m pytest -q -rfEs -p no:cacheprovider tests/test_graph.py tests/test_steps.py > "$OUT/pytest.log" 2>&1
tail -8 "$OUT/pytest.log"
timeout -k 10 480 python3 bench/gpu.py "$@" ${PHASES:+--phases "$PHASES"} --out "$OUT/gpu.json" > "$OUT/gpu.log" 2>&1
tail -40 "$OUT/gpu.log"
