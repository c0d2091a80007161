"""Run several trainings in one launch (tests/test_distributed.py), sharing one process group.

    python -m torch.distributed.run --nproc_per_node 2 tests/multi_run.py RUNS.json
    python tests/multi_run.py RUNS.json          (one process: the references)

RUNS.json is a list of {"name", "flags", "dump": bool, "unsynchronized": bool}. "dump" writes each
rank's copy of the student (DDP or no wrapper) to <output_dir>/rank<R>.pt after training;
"unsynchronized" replaces the DDP wrapper by nothing, reproducing the published ULD code's defect
(the negative control of the synchronization test). Paying the interpreter and import start-up once
for all runs keeps the multi-process tests fast.
"""
import json
import os
import sys
from pathlib import Path

import torch

from llm_recipes import distributed
from llm_recipes.config import parse_flags
from llm_recipes.finetuning import train


def run_one(spec: dict) -> None:
    captured = {}
    original = distributed.wrap_student

    def wrap(model, cfg, info):
        captured["model"] = model
        return model if spec.get("unsynchronized") else original(model, cfg, info)

    distributed.wrap_student = wrap
    try:
        train(parse_flags(spec["flags"]))
    finally:
        distributed.wrap_student = original
    if spec.get("dump"):
        state = {k: v.detach().clone() for k, v in captured["model"].state_dict().items()}
        torch.save(state, Path(spec["flags"]["output_dir"]) / f"rank{os.environ.get('RANK', '0')}.pt")


def main(path: str) -> None:
    for spec in json.loads(Path(path).read_text()):
        run_one(spec)
    distributed.teardown()


if __name__ == "__main__":
    main(sys.argv[1])
