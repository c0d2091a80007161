"""Where worked answers go wrong: the fact a tiny_qa_worked answer quotes, and whether its answer follows from it.

    python -m benchmarks.worked_steps RUN_DIR/validation-last [RUN_DIR2/validation ...]

A tiny_qa_worked answer (examples/tiny/worked.py) is three lines: the person, `The fact: <a sentence of the
context>`, `Answer: <span>`. For every folder of scored predictions (llm_distillation.benchmark's
predictions.jsonl) it prints the share of answers whose fact line is the gold one, whose answer is the gold
one, and whose answer ends their own fact line (the answer follows from the step the student wrote, right or
wrong), over the predictions that have both lines.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from examples.tiny.worked import FINAL
from llm_distillation.metrics import final_answer, worked_part

FACT = "The fact:"  # the step line of examples.tiny.worked.worked_answer


def worked_steps(text: str):
    """(fact, answer) of a worked answer (the answer read as the benchmark reads it), or None when it lacks either
    line."""
    steps = [line.strip() for line in worked_part(text, FINAL).splitlines()]
    fact = next((line[len(FACT):].strip() for line in steps if line.startswith(FACT)), None)
    if fact is None or not any(line.strip().startswith(FINAL) for line in text.splitlines()):
        return None
    return fact, final_answer(text, FINAL)


def shares(predictions: list[dict]) -> dict:
    parsed = right_fact = right_answer = follows = 0
    for row in predictions:
        steps, gold = worked_steps(row["prediction"]), worked_steps(row["references"][0])
        if steps is None or gold is None:
            continue
        parsed += 1
        right_fact += steps[0] == gold[0]
        right_answer += steps[1] == gold[1]
        follows += bool(steps[1]) and steps[0].rstrip(".").endswith(steps[1])
    n = max(len(predictions), 1)
    return {"answers": len(predictions), "both_lines": parsed / n, "fact_right": right_fact / n,
            "answer_right": right_answer / n, "answer_follows_fact": follows / max(parsed, 1)}


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("scored", nargs="+", help="folders holding predictions.jsonl")
    args = parser.parse_args(argv)
    lines = ["| predictions | answers | both lines | fact right | answer right | answer follows its own fact |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for folder in args.scored:
        rows = [json.loads(line) for line in (Path(folder) / "predictions.jsonl").read_text().splitlines()]
        s = shares(rows)
        lines.append(f"| {folder} | {s['answers']} | {s['both_lines']:.2f} | {s['fact_right']:.2f} | "
                     f"{s['answer_right']:.2f} | {s['answer_follows_fact']:.2f} |")
    text = "\n".join(lines)
    print(text)
    return text


if __name__ == "__main__":
    main()
