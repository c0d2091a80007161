#!/usr/bin/env bash
# The published pipeline at toy scale, offline, on a CPU (about 11 minutes on 2 cores, one seed):
# a tiny teacher trained on a synthetic QA task, its answers, students trained by SFT, ULD,
# MultiLevelOT (fast, greedy) and KL, every model benchmarked; a table and a plot in OUTPUT.
#   bash scripts/demo.sh                      # one seed
#   bash scripts/demo.sh --seeds 3            # each student 3 times: mean and spread (about 25 minutes)
#   bash scripts/demo.sh --teacher assets/tiny/teacher   # skip the teacher's training (same weights)
#   bash scripts/demo.sh --quick              # a smoke run of the mechanics (about 3 minutes)
# Details: examples/tiny/demo.py; the latest results: docs/demo/
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python -m examples.tiny.demo --output_dir "${OUTPUT:-output/demo}" "$@"
