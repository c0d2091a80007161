#!/usr/bin/env bash
# Benchmark a checkpoint (full model folder, hub id or LoRA adapter folder) on a task's evaluation split:
# 0-shot greedy answers, first line, SQuAD F1 / EM / ROUGE-1/2/L/Lsum (x100).
# Edit the variables, then run: bash scripts/benchmark.sh
# Every flag: python -m llm_distillation.benchmark --help ; details: docs/generation_and_benchmark.md
set -euo pipefail
cd "$(dirname "$0")/.."

RUN=output/pythia-410m-squad
MODEL=$RUN/last                         # checkpoint folder (a --use_peft checkpoint loads base + adapter)
TASK=squad                              # squad qed fairytaleqa pubmedqa dialogsum dolly generic tiny_qa
SPLIT=validation                        # published: squad/qed validation, fairytaleqa/dialogsum test
OUTPUT=results/$(basename "$RUN")-$TASK-$SPLIT

# --bertscore adds BERTScore F1 (pip install bert-score; downloads roberta-large on first use)
# --few_shot N --chat benchmarks a chat teacher the way it generated its answers
# --number_of_examples 100 for a quick estimate
python -m llm_distillation.benchmark \
  --model_name "$MODEL" \
  --task "$TASK" \
  --split "$SPLIT" \
  --output_dir "$OUTPUT" \
  --batch_size 32 \
  --max_new_tokens 150

# Every checkpoint of a run trained with --save_all (the published runs chose the checkpoint by benchmark):
#   for ckpt in "$RUN"/checkpoints/step-*; do
#     python -m llm_distillation.benchmark --model_name "$ckpt" --task "$TASK" --split "$SPLIT" \
#       --output_dir "$OUTPUT/$(basename "$ckpt")"
#   done
