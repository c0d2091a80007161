"""tiny_qa_worked: the tiny task's questions answered with their worked step, then the answer on a line of its own.

    python -m examples.tiny.worked --output_dir ~/.cache/llm-distill/tiny_qa_worked

The on-policy benchmark's long-answer task at toy scale (people_qa_worked is the real pair's). A worked answer
names the person asked about, quotes the fact that answers the question (a sentence of the context), then gives
the answer:

    The question is about Bram.
    The fact: Bram owns a grey lizard.
    Answer: grey lizard

Written from the shipped splits (assets/tiny/data: train, validation, test, test_large) and the teacher's own
training split (examples/tiny/assets.py: 24,000 fresh examples), each row with a `worked` column beside its
SQuAD fields, so that the tiny_qa_worked loader reads them.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from examples.tiny import assets, synthetic_qa
from llm_recipes import flags
from llm_recipes.flags import option

DEFAULT_FOLDER = "~/.cache/llm-distill/tiny_qa_worked"
FINAL = "Answer:"


def worked_answer(row: dict) -> str:
    """The worked answer of a tiny_qa row: the person, the fact the answer comes from (the context's sentence
    holding the answer's span), the answer."""
    (answer,), (start,) = row["answers"]["text"], row["answers"]["answer_start"]
    offset = 0
    for sentence in row["context"].split(". "):
        sentence = sentence if sentence.endswith(".") else sentence + "."
        if offset <= start < offset + len(sentence):
            person = sentence.split(" ", 1)[0]
            return f"The question is about {person}.\nThe fact: {sentence}\n{FINAL} {answer}"
        offset += len(sentence) + 1
    raise ValueError(f"row {row['id']}: no sentence of its context holds the answer's span")


def write(folder) -> Path:
    """train, validation, test, test_large and the teacher's split, with their worked answers."""
    from configs.paths import TINY_QA_DATA

    folder = Path(folder).expanduser()
    splits = {split: assets.read_split(TINY_QA_DATA, split) for split in ("train", "validation", "test", "test_large")}
    generated = synthetic_qa.generate_splits({**synthetic_qa.SPLIT_SIZES, "teacher": assets.TEACHER_DATA_SIZE},
                                             assets.SEED)
    splits["teacher"] = generated["teacher"]
    folder.mkdir(parents=True, exist_ok=True)
    for split, rows in splits.items():
        (folder / f"{split}.jsonl").write_text("".join(json.dumps({**row, "worked": worked_answer(row)}) + "\n"
                                                       for row in rows))
    teacher = folder / "teacher"  # the teacher's training set as its loader reads it (train = the 24,000)
    teacher.mkdir(exist_ok=True)
    (teacher / "train.jsonl").write_text((folder / "teacher.jsonl").read_text())
    for split in ("validation", "test"):
        (teacher / f"{split}.jsonl").write_text((folder / f"{split}.jsonl").read_text())
    return folder


@dataclass(frozen=True)
class WorkedArgs:
    """Flags of `python -m examples.tiny.worked`."""

    output_dir: str = option(DEFAULT_FOLDER, "where the worked splits go")


COMMAND = flags.Command(program="python -m examples.tiny.worked", summary=__doc__.strip().splitlines()[0],
                        sections={"args": WorkedArgs})
main, cli = flags.entry_points(COMMAND, lambda parsed: print(f"tiny_qa_worked: {write(parsed['args'].output_dir)}"))

if __name__ == "__main__":
    cli()
