#!/usr/bin/env bash
# The GPU path in one command (benchmarks/gpu_check.py): tests on CUDA, training in fp32 / mixed / pure bf16,
# FSDP2 on NCCL, resume after SIGTERM, loss and step timings beside Liger-Kernel and TRL; at most ~8 minutes.
#
#   bash scripts/gpu_check.sh                       # writes output/gpu_check/summary.{md,json} and prints it
#   bash scripts/gpu_check.sh --dry-run             # what it would run (exits 0 without a GPU too)
#   bash scripts/gpu_check.sh --wheels DIR [...]    # a node without the package index: install DIR's wheels
#                                                   # first (made by bash scripts/gpu_wheels.sh DIR)
set -euo pipefail
cd "$(dirname "$0")/.."
args=()
while [[ $# -gt 0 ]]; do
    if [[ "$1" == "--wheels" ]]; then
        [[ $# -ge 2 && -d "$2" ]] || { echo "error: --wheels needs a folder of .whl files (bash scripts/gpu_wheels.sh DIR)" >&2; exit 2; }
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gpu_check_site "$2"/*.whl
        export PYTHONPATH="/tmp/gpu_check_site${PYTHONPATH:+:$PYTHONPATH}"
        shift 2
    else
        args+=("$1")
        shift
    fi
done
exec python3 -m benchmarks.gpu_check "${args[@]}"
