#!/usr/bin/env bash
# The checks that need a CUDA device, in one run (CI has none): the CUDA tests, then the step
# benchmarks on the GPU. Each stage has its own time limit, so a slow one (torch.compile of a
# large optimizer step) cannot take the others' time; each log is also written to $LOGS.
#   LOGS=/tmp/cuda-logs bash benchmarks/on_cuda.sh
# WORKLOADS (default both) and COMPILED (the models whose compiled path is timed, default ResNet-50
# and ViT-B/16) narrow it. The 400-layer MLP is left out of COMPILED: on an H200 machine (16 cores,
# torch 2.11) compiling its 800-tensor SGD step did not finish in 200 s.
set -o pipefail
cd "$(dirname "$0")/.."
LOGS=${LOGS:-/tmp/regdsl-cuda}
WORKLOADS=${WORKLOADS:-elastic net,group_lasso}
COMPILED=${COMPILED:-resnet50,vit_b16}
mkdir -p "$LOGS"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
stage() {  # stage NAME SECONDS COMMAND...: run it under a time limit, keep its log
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit} s)"
    local began=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee "$LOGS/$name.log"
    echo "=== $name: rc ${PIPESTATUS[0]} after $((SECONDS - began)) s"
}
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,memory.used --format=csv 2>&1 | tee "$LOGS/gpu.txt"
"$PY" -c "import torch, regdsl; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'regdsl', regdsl.__version__)"
stage cuda_tests 90 "$PY" -m pytest -q -p no:cacheprovider -m cuda -rs \
    tests/test_cuda.py tests/test_fold_edges.py tests/test_penalties.py tests/test_training.py tests/test_values.py
cd benchmarks
stage term_eager 70 "$PY" term_work.py --device cuda --no-compile --workloads "$WORKLOADS"
stage step_eager 100 "$PY" step_overhead.py --device cuda --no-compile --workloads "$WORKLOADS"
stage step_compiled 140 "$PY" step_overhead.py --device cuda --models "$COMPILED" --workloads "$WORKLOADS"
