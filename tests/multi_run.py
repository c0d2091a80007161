"""Run several trainings in one launch (tests/test_distributed.py), sharing one process group.

    python -m torch.distributed.run --nproc_per_node 2 tests/multi_run.py RUNS.json
    python tests/multi_run.py RUNS.json          (one process: the references)

RUNS.json is a list of {"name", "flags", "dump": bool, "unsynchronized": bool} (or {"sample": {...}}: the
on-policy sampler under FSDP2 against the unsharded model, see `sample_sharded`). "dump" writes each
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


def sample_sharded(spec: dict) -> None:
    """The student's sampled answers to this rank's prompts (ragged, and up to another length on each rank: the
    ranks decode for different numbers of steps) from the unsharded model and from the same model sharded with
    FSDP2, with the same seed; both written to <out>/sampled_rank<R>.json."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llm_recipes import on_policy
    from llm_recipes.config import parse_flags as parse

    settings = spec["sample"]
    info = distributed.setup(fsdp=True)
    tokenizer = AutoTokenizer.from_pretrained(settings["model"])
    model = AutoModelForCausalLM.from_pretrained(settings["model"])
    eos = on_policy.eos_ids(model, tokenizer)
    words = "context: ada lives in oslo. bo lives in rome. question: where does ada live? answer:".split()
    prompts = [tokenizer(" ".join(words[: 6 + 4 * row + 3 * info.rank]))["input_ids"] for row in range(3)]
    sampling = on_policy.Sampling(1.0, settings["max_new_tokens"] + 4 * info.rank, 1.0, 1.0)
    torch.manual_seed(settings["seed"])
    plain = on_policy.sample_answers(model, prompts, sampling, eos, tokenizer.pad_token_id, info.device)
    run = parse({"model_name": settings["model"], "enable_fsdp": True, "output_dir": settings["out"]})
    sharded_model = distributed.wrap_student(model, run, info)
    torch.manual_seed(settings["seed"])
    sharded = on_policy.sample_answers(sharded_model, prompts, sampling, eos, tokenizer.pad_token_id, info.device,
                                       synced=True)
    Path(settings["out"]).mkdir(parents=True, exist_ok=True)
    (Path(settings["out"]) / f"sampled_rank{info.rank}.json").write_text(json.dumps({"plain": plain,
                                                                                     "sharded": sharded}))


def run_one(spec: dict) -> None:
    if "sample" in spec:
        return sample_sharded(spec)
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
