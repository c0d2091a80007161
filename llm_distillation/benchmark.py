"""Benchmark a model on a task's evaluation split: greedy answers, scored against every reference.

    python -m llm_distillation.benchmark --model_name OUT/last --task squad --split validation \
        --output_dir results/pythia-squad

The model (a checkpoint folder, a hub id, or a LoRA adapter folder, whose base model is loaded from
its adapter_config.json) answers every example 0-shot by default (--few_shot N for k shots from the
train split), greedily, at most --max_new_tokens tokens; the first line, stripped, is its prediction (a task with
worked answers: every line up to its "Answer: ..." line, whose answer F1 and EM score; `worked_rougeL` compares
the steps before it).
Causal and encoder-decoder models (T5, BART: the prompt is the encoder input) both work. Predictions
are scored with SQuAD F1 and exact match, ROUGE-1/2/L/Lsum and, with --bertscore, BERTScore, all x100
(llm_distillation/metrics.py). Written to --output_dir:

- `scores.json`: model, task, split, n, the corpus scores and the settings of the run;
- `predictions.jsonl`: per example its id, prompt, prediction, references and scores.

The prompt is the student's plain prompt, as in training; --chat uses the tokenizer's chat template
(to benchmark a chat teacher, with --few_shot).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass
from typing import Optional

from llm_distillation import generation, metrics
from llm_distillation.datasets.catalog import task_names
from llm_recipes import flags
from llm_recipes.checkpoint import prepare_output_dir
from llm_recipes.errors import UserError
from llm_recipes.flags import Refused, option

SCORES_FILE = "scores.json"
PREDICTIONS_FILE = "predictions.jsonl"


@dataclass(frozen=True)
class BenchmarkArgs:
    """Flags of `python -m llm_distillation.benchmark`."""

    model_name: str = option(help="checkpoint folder, hub id, or LoRA adapter folder (adapter_config.json)")
    task: str = option(help=", ".join(task_names()))
    output_dir: str = option(help="where scores.json and predictions.jsonl go")
    split: Optional[str] = option(None, "None: the task's evaluation split (squad/qed validation, the others test)")
    source: Optional[str] = option(None, "hub id or local path of the task's data; None: the task's default")
    answer_column: Optional[str] = option(None, "column of the references; None: the task's gold answers")
    tokenizer_name: Optional[str] = option(None, "None: the model's own (or the adapter's, else its base model's)")
    base_model: Optional[str] = option(None, "LoRA adapter only: base model instead of the one in adapter_config.json")
    batch_size: int = option(8, "prompts per generate call")
    number_of_examples: Optional[int] = option(None, "only the first N examples of the split")
    max_new_tokens: int = option(150, "generation budget per answer (only the first line is kept)")
    few_shot: int = option(0, "shots per prompt, from the task's train split")
    seed: int = option(42, "choice of the few-shot examples")
    chat: bool = option(False, "prompt with the tokenizer's chat template (a chat teacher) instead of the plain prompt")
    bertscore: bool = option(False, "also BERTScore F1 (needs the bert_score package)")
    bf16: bool = option(False, "load the model in bfloat16")
    trust_remote_code: bool = option(False, "run the model repository's own code (only for repositories you trust)")
    stop_at_newline: bool = option(True, "stop a row at its first newline (same first line, far fewer tokens)")
    skip_too_long: bool = option(False, "leave out prompts longer than the model accepts instead of failing")
    progress: bool = option(True, "tqdm progress bars")


# Flag names of the published benchmark scripts that mean the same here.
ALIASES = {"model_id": "model_name", "model_tokenizer": "tokenizer_name", "dataset_id": "source",
           "split_name": "split", "number_few_shot": "few_shot", "output_path": "output_dir", "bfloat": "bf16"}
REFUSED = {k: Refused(v) for k, v in {
    "from_disk": "is not needed: --source takes a hub id or a local folder",
    "save_predictions": "is not needed: predictions.jsonl is always written",
    "context": "is not supported: the prompt format is the task's (llm_distillation/prompts.py)",
    "title": "is not needed: the Title: line follows the published teacher setting (llm_distillation/prompts.py)",
    "context_length": "is not needed: prompts longer than the model accepts are refused (or --skip_too_long)",
    "num_workers": "is not needed: prompts are tokenized up front",
    "mapping": "is not supported: the task's loader (llm_distillation/datasets/tasks.py) maps the columns",
    "mapping_dict": "is not supported: the task's loader (llm_distillation/datasets/tasks.py) maps the columns",
    "f": "selects a training method; the benchmark scores any checkpoint: remove it",
}.items()}


def validate(args: BenchmarkArgs) -> None:
    if args.batch_size < 1:
        raise UserError(f"--batch_size must be at least 1, got {args.batch_size}")
    if args.max_new_tokens < 1:
        raise UserError(f"--max_new_tokens must be at least 1, got {args.max_new_tokens}")
    if args.few_shot < 0:
        raise UserError(f"--few_shot must be 0 or more, got {args.few_shot}")
    if args.number_of_examples is not None and args.number_of_examples < 1:
        raise UserError(f"--number_of_examples must be at least 1, got {args.number_of_examples}")


def format_table(header: dict, scores: dict) -> str:
    """A two-line plain-text table: the run, then one column per metric."""
    names = list(scores)
    width = max(9, *(len(n) for n in names))
    run = "  ".join(f"{k}={v}" for k, v in header.items())
    return "\n".join([run, "  ".join(f"{n:>{width}}" for n in names),
                      "  ".join(f"{scores[n]:>{width}.2f}" for n in names)])


def benchmark(args: BenchmarkArgs) -> dict:
    """Answer, score, write scores.json and predictions.jsonl; returns the scores.json content."""
    from tqdm.auto import tqdm

    from llm_distillation.datasets.tasks import default_eval_split, load_examples, task_data
    from llm_distillation.prompts import prompt_uses_title

    validate(args)
    output = prepare_output_dir(args.output_dir)
    args = dataclasses.replace(args, split=args.split or default_eval_split(args.task))
    examples = load_examples(args.task, args.split, source=args.source, answer_column=args.answer_column,
                             seed=args.seed)
    all_examples = examples
    if args.number_of_examples is not None:
        examples = examples.select(range(min(args.number_of_examples, len(examples))))
    model, tokenizer = generation.load_for_generation(args.model_name, tokenizer_name=args.tokenizer_name,
                                                     base_model=args.base_model, bf16=args.bf16,
                                                     trust_remote_code=args.trust_remote_code)
    chat = generation.uses_chat_template(tokenizer, args.chat)
    title = chat and prompt_uses_title(args.task, args.model_name)  # a student's plain prompt never has it
    pool = generation.shot_pool(args.task, args.split, all_examples, k=args.few_shot, source=args.source,
                               seed=args.seed)
    is_encoder_decoder = generation.is_encoder_decoder(model)
    texts, prompts = generation.build_prompts(args.task, examples, tokenizer, k=args.few_shot, pool=pool,
                                             seed=args.seed, chat=chat, encoder_decoder=is_encoder_decoder,
                                             title=title, progress=args.progress)
    fits = generation.fitting_prompts(prompts, generation.max_prompt_positions(model), args.max_new_tokens,
                                     skip=args.skip_too_long)

    predictions: dict[int, str] = {}
    final = task_data(args.task).final_answer  # worked answers: every line up to "Answer: ..."
    stop = ["\n"] if args.stop_at_newline and not final else None
    with tqdm(total=len(fits), desc="answering", unit="example", disable=not args.progress) as bar:
        for indices, answers in generation.generate_batches(model, tokenizer, [prompts[i] for i in fits],
                                                 max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                                                 stop_strings=stop, final_line=final):
            for index, answer in zip(indices, answers):
                predictions[fits[index]] = generation.kept_answer(answer, final)
            bar.update(len(indices))

    rows = [examples[i] for i in fits]
    references = [list(row["answers"]) for row in rows]
    score = (lambda p, r, **kw: metrics.score_worked(p, r, final, **kw)) if final else metrics.score_predictions
    scores, per_sample = score([predictions[i] for i in fits], references, bertscore=args.bertscore,
                               progress=args.progress)
    with open(output / PREDICTIONS_FILE, "w") as handle:
        for i, row, refs, sample in zip(fits, rows, references, per_sample):
            record = {"id": row["id"], "prompt": texts[i], "prediction": predictions[i], "references": refs,
                      **sample}
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    result = {"model": args.model_name, "task": args.task, "split": args.split, "source": args.source,
              "n": len(fits), "dropped_too_long": len(prompts) - len(fits), "scores": scores,
              "settings": {**asdict(args), "chat": chat}}
    (output / SCORES_FILE).write_text(json.dumps(result, indent=2) + "\n")
    print(format_table({"model": args.model_name, "task": args.task, "split": args.split, "n": len(fits)}, scores))
    return result


COMMAND = flags.Command(program="python -m llm_distillation.benchmark", summary=__doc__.strip().splitlines()[0],
                        sections={"args": BenchmarkArgs}, aliases=ALIASES, refused=REFUSED)


main, cli = flags.entry_points(COMMAND, lambda parsed: benchmark(parsed["args"]))

if __name__ == "__main__":
    cli()
