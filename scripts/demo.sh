#!/usr/bin/env bash
# The paired tiny benchmark, offline, on a CPU: the shipped tiny teacher answers a synthetic QA task;
# students with another tokenizer (SFT, ULD by index and by text, the projected teacher live and from a
# teacher cache, the hybrid, MultiLevelOT) and with the teacher's (SFT, KL) learn from its answers; each
# row's learning rate picked on validation, then N seeds paired by seed, test F1 on 1,000 questions.
#   bash scripts/demo.sh                      # 5 seeds, random-init and pretrained students (~2 hours, 2 cores)
#   bash scripts/demo.sh --seeds 3 --regimes pretrained
#   bash scripts/demo.sh --quick              # the mechanics on a few examples (~9 minutes)
# Details: examples/tiny/demo.py; the latest results: docs/demo/
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python -m examples.tiny.demo "$@"  # --output_dir DIR (default output/demo)
