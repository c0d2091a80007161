#!/usr/bin/env bash
# Teacher answers for a task's training split: the labels of "distillation on teacher text".
# Edit the variables, then run: bash scripts/generate.sh
# Interrupted? Run the same command again: finished examples (OUTPUT/progress.jsonl) are not redone.
# Every flag: python -m llm_distillation.generate --help ; details: docs/generation_and_benchmark.md
set -euo pipefail
cd "$(dirname "$0")/.."

TEACHER=meta-llama/Llama-2-7b-chat-hf   # hub id or local folder
TASK=squad                              # squad qed fairytaleqa pubmedqa dialogsum dolly generic tiny_qa
SPLIT=train
OUTPUT=data/generated/$(basename "$TEACHER")-$TASK

# --few_shot N overrides the task's published count for this teacher family (SQuAD: Llama-2 1, Mistral 3)
# --source PATH reads the task's data from a local copy (save_to_disk folder or split files)
# --number_of_examples 64 for a quick look at the answers before the full run
python -m llm_distillation.generate \
  --model_name "$TEACHER" \
  --task "$TASK" \
  --split "$SPLIT" \
  --output_dir "$OUTPUT" \
  --batch_size 16 \
  --max_new_tokens 150 \
  --val_fraction 0.1 \
  --seed 42 \
  --bf16

# Then train a student on the answers:
#   python finetuning.py --dataset.file llm_distillation/datasets/loader/$TASK.py \
#     --dataset.source "$OUTPUT" --dataset.answer_column answers_generated ...
# (DialogSum: --dataset.answer_column summary_generated)
