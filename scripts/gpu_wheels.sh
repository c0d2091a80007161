#!/usr/bin/env bash
# Wheels for a GPU node that cannot reach the package index but has Python 3.12 with CUDA torch, numpy, pandas,
# pyarrow, accelerate, safetensors (a typical CUDA image): the packages of requirements.txt it lacks, and the
# peers the GPU check compares with. Then: bash scripts/gpu_check.sh --wheels DIR
#
#   bash scripts/gpu_wheels.sh .whl      # ~25 MB
set -euo pipefail
dir="${1:?usage: bash scripts/gpu_wheels.sh DIR}"
mkdir -p "$dir"
pins=$(grep -E '^(transformers|tokenizers|datasets|peft|fire|tqdm)==' "$(dirname "$0")/../requirements.txt")
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$dir" \
    $pins termcolor dill multiprocess liger-kernel trl
ls -la "$dir"
