"""Where a student's answers go wrong: its first answer token, or the rest given a right start.

    python -m benchmarks.answer_pieces --model DIR [--model DIR2 ...] [--task tiny_qa] \
        [--source assets/tiny/data] [--split validation] [--examples 300]

For each model, on the split's gold answers (the first reference, with the leading space the answers have in
training, and the EOS), one teacher-forced forward per example with the task's 0-shot prompt:
- first token: the share of examples whose most likely first answer token is the gold answer's first token (on
  tiny_qa, retrieving the right entity from the context: what F1 mostly counts);
- later tokens: the share of the gold answer's other tokens (EOS included) that are the most likely token given
  the gold tokens before them (completing a right start).

Used to find out why on-policy rows of the tiny pair trail their off-policy rows (docs/on_policy.md).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def pieces(model_dir: str, task: str, source: Path, split: str, examples: int) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llm_distillation.generation import build_prompts

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = [json.loads(line) for line in (source / f"{split}.jsonl").read_text().splitlines()][:examples]
    _, prompts = build_prompts(task, rows, tokenizer, k=0, pool=None, seed=0, chat=False, encoder_decoder=False,
                               progress=False)
    first = later = later_total = 0
    for prompt, row in zip(prompts, rows):
        gold = tokenizer(" " + row["answers"]["text"][0], add_special_tokens=False)["input_ids"] + \
            [tokenizer.eos_token_id]
        with torch.no_grad():
            logits = model(torch.tensor([list(prompt) + gold])).logits[0]
        guess = logits[len(prompt) - 1:len(prompt) - 1 + len(gold)].argmax(-1).tolist()
        first += guess[0] == gold[0]
        later += sum(g == t for g, t in zip(guess[1:], gold[1:]))
        later_total += len(gold) - 1
    return {"model": model_dir, "examples": len(rows), "first_token": first / len(rows),
            "later_tokens": later / max(later_total, 1)}


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", required=True, help="a model folder (repeat for several)")
    parser.add_argument("--task", default="tiny_qa")
    parser.add_argument("--source", default="assets/tiny/data", help="the folder of the task's split files")
    parser.add_argument("--split", default="validation")
    parser.add_argument("--examples", type=int, default=300)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    results = [pieces(m, args.task, Path(args.source), args.split, args.examples) for m in args.model]
    print("| model | first answer token right | later tokens right, given the gold start |")
    print("| --- | ---: | ---: |")
    for r in results:
        print(f"| {r['model']} | {r['first_token']:.3f} | {r['later_tokens']:.3f} |")
    return results


if __name__ == "__main__":
    main()
