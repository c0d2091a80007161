#!/usr/bin/env bash
# The paired benchmark on a real pair, offline, on a CPU: Gemma 3 270M (fine-tuned on people_qa's gold
# answers, cached beside the converted models) answers 480 of people_qa's training questions;
# SmolLM2-135M-Instruct learns from those answers with SFT, ULD by index at the seeds' factor 1.5 and the
# projected teacher (text alignment; both from a top-32 teacher cache); each row's rate picked on
# validation, then 3 seeds paired by seed, test F1 on 1,000 questions.
#   bash scripts/real_pair_demo.sh                 # the table (~55 min on 2 cores; ~75 while the teacher is fine-tuned)
#   bash scripts/real_pair_demo.sh --quick         # the mechanics on a few examples (~5 minutes)
#   bash scripts/real_pair_demo.sh --seeds 5
# By running it you accept the models' licences: Gemma Terms of Use (https://ai.google.dev/gemma/terms),
# Apache-2.0 for SmolLM2. Details: examples/real_pair/demo.py; the latest results: docs/real_pair/
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# the converted models, unless scripts/real_pair.sh made them already (in whichever --dtype)
[ -f "${LLM_DISTILL_CACHE:-$HOME/.cache/llm-distill}/real_pair/COMPLETE.json" ] || \
  "${PYTHON:-python}" examples/real_pair/fetch_models.py
exec "${PYTHON:-python}" -m examples.real_pair.demo "$@"  # --output_dir DIR (default output/real_pair_demo)
