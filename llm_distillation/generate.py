"""Teacher answers for a task's split: the labels of "distillation on teacher text".

    python -m llm_distillation.generate --model_name meta-llama/Llama-2-7b-chat-hf --task squad \
        --split train --output_dir data/llama2-squad --bf16

The teacher answers every example few-shot (the task's default count for that teacher, or --few_shot),
greedily, at most --max_new_tokens tokens, and its first line, stripped, is the answer; empty answers
are dropped and counted. The output folder holds:

- `dataset_dict.json`, `train/`, `validation/`: a datasets folder (`load_from_disk`) with the example
  ids, the prompt fields, the gold `answers` and the generated column (`answers_generated`,
  `summary_generated` for dialogsum, or --answer_column); validation is a seeded --val_fraction of it.
  Train on it with `--dataset.source OUT --dataset.answer_column answers_generated`. When the task
  holds out more splits (e.g. `test` for dialogsum, pubmedqa), their gold examples are copied in too,
  so the task loader finds them instead of cutting them off the generated train split.
- `generated.jsonl`: the generated rows, one JSON object per line, with their `split`.
- `progress.jsonl`: every answered example (`id`, `answer`), appended and flushed after each batch.
  A run that stops (killed, out of time) is continued by running the same command again: finished
  ids are not generated again. `run.json` records the settings the answers depend on; a rerun with
  other settings is refused instead of mixing answers of two setups.
- `summary.json`: counts (examples, answered, dropped empty, dropped too long, train, validation).
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from llm_distillation import generation
from llm_distillation.datasets.catalog import task_names
from llm_recipes import flags
from llm_recipes.checkpoint import prepare_output_dir
from llm_recipes.errors import UserError
from llm_recipes.flags import Refused, option

PROGRESS_FILE = "progress.jsonl"
SETTINGS_FILE = "run.json"
SUMMARY_FILE = "summary.json"
JSONL_FILE = "generated.jsonl"


@dataclass(frozen=True)
class GenerateArgs:
    """Flags of `python -m llm_distillation.generate`."""

    model_name: str = option(help="the teacher: hub id or local folder")
    task: str = option(help=", ".join(task_names()))
    output_dir: str = option(help="datasets folder + generated.jsonl + progress.jsonl (resumable)")
    split: str = option("train", "split of the task to answer")
    source: Optional[str] = option(None, "hub id or local path of the task's data; None: the task's default")
    tokenizer_name: Optional[str] = option(None, "None: the model's own tokenizer")
    batch_size: int = option(8, "prompts per generate call")
    few_shot: Optional[int] = option(None, "shots per prompt; None: the task's default for this teacher")
    max_new_tokens: int = option(150, "generation budget per answer (only the first line is kept)")
    number_of_examples: Optional[int] = option(None, "only the first N examples of the split")
    val_fraction: float = option(0.1, "seeded fraction split off as validation (0: train only)")
    seed: int = option(42, "few-shot choice and the validation split")
    answer_column: Optional[str] = option(
        None, "name of the generated column; None: answers_generated/summary_generated")
    chat: Optional[bool] = option(None, "chat-template prompts; None: when the tokenizer has a template")
    bf16: bool = option(False, "load the teacher in bfloat16")
    trust_remote_code: bool = option(False, "run the model repository's own code (only for repositories you trust)")
    stop_at_newline: bool = option(True, "stop a row at its first newline (same first line, far fewer tokens)")
    skip_too_long: bool = option(False, "leave out prompts longer than the model accepts instead of failing")
    save_teacher_topk: int = option(
        0, "also cache the teacher's top-K distributions over these answers in OUTPUT_DIR/teacher_cache (train with "
           "--distillation_config.teacher_cache, sequence-level KD without the teacher); 0: no cache")
    progress: bool = option(True, "tqdm progress bars")


# Flag names of the published generator script (datasets/generator.py) that mean the same here.
ALIASES = {"model_id": "model_name", "model_tokenizer": "tokenizer_name", "dataset_id": "source",
           "split_name": "split", "number_few_shot": "few_shot", "bfloat": "bf16"}
REFUSED = {k: Refused(v) for k, v in {
    "from_disk": "is not needed: --source takes a hub id or a local folder",
    "mapping": "is not supported: the task's loader (llm_distillation/datasets/tasks.py) maps the columns",
    "mapping_dict": "is not supported: the task's loader (llm_distillation/datasets/tasks.py) maps the columns",
    "context": "is not supported: the prompt format is the task's (llm_distillation/prompts.py)",
    "title": "is not needed: the Title: line follows the published teacher setting (llm_distillation/prompts.py)",
    "num_workers": "is not needed: prompts are tokenized up front",
}.items()}


def generated_column(task: str, answer_column: Optional[str]) -> str:
    """--answer_column, else the task's published name (answers_generated; summary_generated for dialogsum)."""
    from llm_distillation.datasets.tasks import task_data

    return answer_column or task_data(task).generated_column


def held_out_splits(task: str, split: str, source: Optional[str], seed: int) -> dict:
    """The task's other held-out splits (gold), which its loader would otherwise cut off the output's train."""
    from llm_distillation.datasets.tasks import load_examples, task_data

    if split != "train":
        return {}
    data = task_data(task)
    names = [name for name in (*data.carve, data.eval_split) if name not in ("train", "validation")]
    return {name: load_examples(task, name, source=source, seed=seed) for name in dict.fromkeys(names)}


# -------------------------------------------------------------------------------- progress on disk
def read_progress(path: Path) -> dict[str, str]:
    """id -> answer of the finished examples. A line cut off by a kill is dropped from the file."""
    finished: dict[str, str] = {}
    if not path.exists():
        return finished
    good_bytes = 0
    with open(path, "rb") as handle:
        for raw in handle:
            if not raw.endswith(b"\n"):  # the write of this line never finished
                break
            try:
                record = json.loads(raw)
                finished[str(record["id"])] = record["answer"]
            except (ValueError, KeyError, TypeError):
                break
            good_bytes += len(raw)
    if good_bytes < path.stat().st_size:
        with open(path, "r+b") as handle:
            handle.truncate(good_bytes)
    return finished


def check_settings(output: Path, settings: dict, *, resuming: bool) -> None:
    """Record the settings the answers depend on, or refuse to continue a run made with others."""
    path = output / SETTINGS_FILE
    if resuming and path.exists():
        previous = json.loads(path.read_text())
        changed = [key for key in settings if previous.get(key) != settings[key]]
        if changed:
            key = changed[0]
            raise UserError(f"--output_dir {output} holds answers generated with {key}={previous.get(key)!r}, "
                            f"this run asks for {settings[key]!r}: use the same settings to continue it, "
                            "or a new --output_dir")
        return
    path.write_text(json.dumps(settings, indent=2) + "\n")


# ------------------------------------------------------------------------------------------ output
def write_outputs(output: Path, examples, finished: dict[str, str], column: str, *, val_fraction: float,
                  seed: int, held_out: Optional[dict] = None) -> dict:
    """The datasets folder (train/validation from the kept answers, in example order, plus the gold
    `held_out` splits) and generated.jsonl."""
    import datasets

    kept_rows = []
    dropped_empty = 0
    for example in examples:
        answer = finished.get(example["id"])
        if answer is None:
            continue
        if not answer:
            dropped_empty += 1
            continue
        kept_rows.append({**example, column: answer})
    if not kept_rows:
        raise UserError(f"every answer of the teacher was empty ({dropped_empty}): check the prompts with "
                        "--number_of_examples 8 and the model's chat template")
    kept = datasets.Dataset.from_list(kept_rows)
    if val_fraction > 0:
        parts = kept.train_test_split(test_size=val_fraction, seed=seed, shuffle=True)
        splits = datasets.DatasetDict({"train": parts["train"], "validation": parts["test"]})
    else:
        splits = datasets.DatasetDict({"train": kept})
    with open(output / JSONL_FILE, "w") as handle:
        for name, split in splits.items():
            for row in split:
                handle.write(json.dumps({**row, "split": name}, ensure_ascii=False) + "\n")
    counts = {"kept": len(kept), "dropped_empty": dropped_empty, **{name: len(s) for name, s in splits.items()}}
    for name, split in (held_out or {}).items():
        splits[name] = split
    for stale in ("train", "validation", *splits):  # a rerun rewrites the folder (e.g. another --val_fraction)
        if (output / stale).is_dir():
            shutil.rmtree(output / stale)
    splits.save_to_disk(str(output))
    return counts


# --------------------------------------------------------------------------------------------- run
def validate(args: GenerateArgs) -> None:
    if args.batch_size < 1:
        raise UserError(f"--batch_size must be at least 1, got {args.batch_size}")
    if args.max_new_tokens < 1:
        raise UserError(f"--max_new_tokens must be at least 1, got {args.max_new_tokens}")
    if args.few_shot is not None and args.few_shot < 0:
        raise UserError(f"--few_shot must be 0 or more, got {args.few_shot}")
    if args.number_of_examples is not None and args.number_of_examples < 1:
        raise UserError(f"--number_of_examples must be at least 1, got {args.number_of_examples}")
    if not 0 <= args.val_fraction < 1:
        raise UserError(f"--val_fraction must be in [0, 1), got {args.val_fraction}")
    if args.save_teacher_topk < 0:
        raise UserError(f"--save_teacher_topk must be 0 (no cache) or a positive K, got {args.save_teacher_topk}")


def generate(args: GenerateArgs) -> dict:
    """Answer the split (continuing a previous run in the same folder) and write the outputs; returns the summary."""
    from tqdm.auto import tqdm

    from llm_distillation.datasets.tasks import load_examples, task_data
    from llm_distillation.prompts import few_shot_count, prompt_uses_title

    validate(args)
    output = prepare_output_dir(args.output_dir)
    column = generated_column(args.task, args.answer_column)
    all_examples = load_examples(args.task, args.split, source=args.source, seed=args.seed)
    if column in all_examples.column_names:
        raise UserError(f"the {args.task} {args.split} split already has a {column} column: name the generated "
                        "column with --answer_column")
    examples = all_examples
    if args.number_of_examples is not None:
        examples = all_examples.select(range(min(args.number_of_examples, len(all_examples))))
    ids = [str(i) for i in examples["id"]]
    if len(set(ids)) != len(ids):
        raise UserError(f"the {args.task} {args.split} split has duplicate ids: resuming and pairing need unique ids")

    k = few_shot_count(args.task, args.model_name, override=args.few_shot)
    model, tokenizer = generation.load_for_generation(args.model_name, tokenizer_name=args.tokenizer_name,
                                                     bf16=args.bf16, trust_remote_code=args.trust_remote_code)
    chat = generation.uses_chat_template(tokenizer, args.chat)
    title = prompt_uses_title(args.task, args.model_name)
    progress_path = output / PROGRESS_FILE
    finished = read_progress(progress_path)
    check_settings(output, {"model_name": args.model_name, "tokenizer_name": args.tokenizer_name,
                            "task": args.task, "split": args.split, "source": args.source, "few_shot": k,
                            "chat": chat, "title": title, "max_new_tokens": args.max_new_tokens, "seed": args.seed,
                            "bf16": args.bf16}, resuming=bool(finished))
    pending = [i for i, example_id in enumerate(ids) if example_id not in finished]
    dropped_too_long = 0
    if pending:
        pool = generation.shot_pool(args.task, args.split, all_examples, k=k, source=args.source, seed=args.seed)
        is_encoder_decoder = generation.is_encoder_decoder(model)
        _, prompts = generation.build_prompts(args.task, examples.select(pending), tokenizer, k=k, pool=pool,
                                             seed=args.seed, chat=chat, encoder_decoder=is_encoder_decoder,
                                             title=title, progress=args.progress)
        fits = generation.fitting_prompts(prompts, generation.max_prompt_positions(model), args.max_new_tokens,
                                         skip=args.skip_too_long)
        dropped_too_long = len(prompts) - len(fits)
        final = task_data(args.task).final_answer  # worked answers: every line up to "Answer: ..."
        stop = ["\n"] if args.stop_at_newline and not final else None
        with open(progress_path, "a") as handle, tqdm(total=len(ids), initial=len(ids) - len(pending),
                                                       desc="teacher answers", unit="example",
                                                       disable=not args.progress) as bar:
            for indices, answers in generation.generate_batches(model, tokenizer, [prompts[i] for i in fits],
                                                     max_new_tokens=args.max_new_tokens,
                                                     batch_size=args.batch_size, stop_strings=stop,
                                                     final_line=final):
                for index, answer in zip(indices, answers):
                    example_id = ids[pending[fits[index]]]
                    finished[example_id] = generation.kept_answer(answer, final)
                    handle.write(json.dumps({"id": example_id, "answer": finished[example_id]},
                                            ensure_ascii=False) + "\n")
                handle.flush()
                os.fsync(handle.fileno())
                bar.update(len(indices))

    counts = write_outputs(output, examples, finished, column, val_fraction=args.val_fraction, seed=args.seed,
                           held_out=held_out_splits(args.task, args.split, args.source, args.seed))
    summary = {"examples": len(ids), "answered": sum(1 for i in ids if i in finished),
               "dropped_too_long": dropped_too_long, **counts, "column": column,
               "settings": asdict(args)}
    (output / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    print(f"{summary['kept']} answers kept ({summary['dropped_empty']} empty dropped, {dropped_too_long} too long "
          f"left out): {summary['train']} train, {summary.get('validation', 0)} validation in {output}")
    if args.save_teacher_topk:
        summary["teacher_cache"] = cache_answers(args, output, column, model)
    return summary


def cache_answers(args: GenerateArgs, output: Path, column: str, model) -> dict:
    """The teacher cache of the generated answers, with the model already in memory: the examples a run with
    `--dataset.file <the task's loader> --dataset.source OUTPUT_DIR --dataset.answer_column COLUMN` builds."""
    from configs.datasets import dataset
    from configs.paths import LOADERS_DIR
    from llm_distillation import cache_teacher
    from llm_recipes import models

    loader = Path(LOADERS_DIR) / f"{args.task}.py"
    splits = "train,validation" if args.val_fraction > 0 else "train"
    cache_args = cache_teacher.CacheArgs(
        model_name=args.model_name, output_dir=str(output / "teacher_cache"), topk=args.save_teacher_topk,
        tokenizer_name=args.tokenizer_name, trust_remote_code=args.trust_remote_code, bf16=args.bf16,
        batch_size=args.batch_size, splits=splits, progress=args.progress)
    tokenizer = models.load_tokenizer(args.tokenizer_name or args.model_name, trust_remote_code=args.trust_remote_code,
                                      what="teacher tokenizer")
    result = cache_teacher.write_cache(
        cache_args, dataset(file=str(loader), source=str(output), answer_column=column, few_shot=args.few_shot,
                            seed=args.seed), model=model, tokenizer=tokenizer)
    extra = (f" --dataset.few_shot {args.few_shot}" if args.few_shot is not None else "") + \
        (f" --dataset.seed {args.seed}" if args.seed != 42 else "")
    print(f"train from it with: --dataset.file {loader} --dataset.source {output} --dataset.answer_column {column}"
          f"{extra} --distillation_config.teacher_cache {output / 'teacher_cache'}")
    return result


COMMAND = flags.Command(program="python -m llm_distillation.generate", summary=__doc__.strip().splitlines()[0],
                        sections={"args": GenerateArgs}, aliases=ALIASES, refused=REFUSED)


main, cli = flags.entry_points(COMMAND, lambda parsed: generate(parsed["args"]))

if __name__ == "__main__":
    cli()
