"""Task examples: each source's real schema mapped to one normalized row, the splits, and `get_split`.

A normalized example (what prompts.build_prompt and the benchmark read)::

    {"id": "5733be28...", "title": "...", "context": "...", "question": "...", "answers": ["gold", ...]}

with the task's prompt fields (`TaskData.fields`: title/context/question; dialogue; instruction/input)
and `answers`, the references (gold, or the teacher's generated answer when `answer_column` names it).
The first answer is the training label; all of them are references for the metrics.

Splits. A task asks its source for `train`, `validation` and its evaluation split. When the source
lacks `validation` (or the evaluation split), it is cut off `train` (`TaskData.carve`: seeded with
CARVE_SEED, never with the run's seed, so every run sees the same held-out examples), and `train` is
what remains. Source splits named `valid`/`dev` serve as `validation`; Dolly's MiniLLM copy
(`raw.jsonl`, `valid.jsonl`) is mapped as MiniLLM does (see TASK_DATA["dolly"]).

`make_get_split(task)` implements the loader contract of llm_recipes/data.py: the teacher gets the
few-shot (chat) prompt of its family, the student the plain 0-shot prompt, both the same examples in
the same order with the same `id`s.
"""
from __future__ import annotations

import itertools
import os
import random
from typing import Iterator, Optional, Sequence

import numpy as np

from llm_distillation.datasets.catalog import TASK_DATA, TaskData, default_eval_split, task_data  # noqa: F401
from llm_distillation.datasets.sources import load_splits
from llm_distillation.prompts import (answer_separator, build_prompt, few_shot_count, has_chat_template,
                                      prompt_uses_title)
from llm_recipes.errors import UserError
from llm_recipes.losses.pairing import IGNORE_INDEX

CARVE_SEED = 42  # the held-out splits cut off `train` must not move with --dataset.seed
VALIDATION_NAMES = ("valid", "dev")  # source split names that serve as `validation`


# The generic task: a user's own data in one of these schemas (checked in this order).
GENERIC_SCHEMAS: dict[str, dict] = {
    "messages": {"needs": ("messages",), "fields": {"messages": "messages"}},
    "alpaca": {"needs": ("instruction", "output"), "fields": {"instruction": "instruction", "input": "input"},
               "answer": "output"},
    "dolly": {"needs": ("instruction", "response"), "fields": {"instruction": "instruction", "input": "context"},
              "answer": "response"},
    "prompt": {"needs": ("prompt", "response"), "fields": {"prompt": "prompt"}, "answer": "response"},
    "completion": {"needs": ("prompt", "completion"), "fields": {"prompt": "prompt"}, "answer": "completion"},
    "text": {"needs": ("text",), "fields": {"text": "text"}, "answer": "text"},
}


# ------------------------------------------------------------------------------------------- splits
def _source_splits(task: str, data: TaskData, source: str) -> dict:
    """The source's splits under the names the task uses (aliases applied)."""
    hub_config = data.hub_config if source == data.source else None
    _check_built(task, data, source)
    splits = load_splits(source, hub_config=hub_config)
    named = {}
    for name, dataset in splits.items():
        target = data.split_aliases.get(name) or ("validation" if name in VALIDATION_NAMES else name)
        named[target if target not in splits else name] = dataset
    return named


def _check_built(task: str, data: TaskData, source: str) -> None:
    """A task whose default data is generated, not downloaded, says how to make it when it is missing."""
    if source == data.source and data.build_hint and not os.path.exists(os.path.expanduser(source)):
        raise UserError(f"the {task} data is not at {source}: {data.build_hint}, or pass --dataset.source")


def _carve_size(size, pool: int, name: str, source: str) -> int:
    count = int(size) if size >= 1 else max(1, int(round(pool * size)))
    if not 0 < count < pool:
        raise UserError(f"{source} has no {name!r} split and its train split ({pool} examples) is too small to cut "
                        f"{count} off: give the source a {name} split")
    return count


def _pick_split(task: str, data: TaskData, splits: dict, split: str, source: str):
    """(rows of `split`, their row numbers in the source split they come from, that split's name)."""
    missing = [name for name in data.carve if name not in splits]
    if split in splits and not (split == "train" and missing):
        return splits[split], list(range(len(splits[split]))), split
    if "train" not in splits or (split != "train" and split not in missing):
        carvable = f" (and {', '.join(missing)}, cut off train)" if missing and "train" in splits else ""
        raise UserError(f"{source} has no {split!r} split for the {task} task; its splits are "
                        f"{', '.join(sorted(splits))}{carvable}: point --dataset.source at data with a {split} split")
    pool = list(range(len(splits["train"])))
    order = pool if data.carve_head else [int(i) for i in np.random.default_rng(CARVE_SEED).permutation(len(pool))]
    cut: dict[str, list[int]] = {}
    for name in missing:
        count = _carve_size(data.carve[name], len(order), name, source)
        cut[name], order = sorted(order[:count]), order[count:]
    rows = cut.get(split, sorted(order))
    return splits["train"].select(rows), rows, "train"


# ------------------------------------------------------------------------------------- normalization
def _text(value) -> str:
    if value is None:
        return ""
    if isinstance(value, dict) and "contexts" in value:  # PubMedQA: the abstract's sections
        return " ".join(str(v) for v in value["contexts"])
    if isinstance(value, (list, tuple)):
        return " ".join(_text(v) for v in value)
    return str(value)


def as_answer_list(value) -> list[str]:
    """References from any answer shape: "a", ["a", "b"], {"text": [...]}, [{"string": "a"}], None."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value] if value.strip() else []
    if isinstance(value, dict):
        for key in ("text", "string", "answer"):
            if key in value:
                return as_answer_list(value[key])
        return []
    out: list[str] = []
    for item in value:
        for answer in as_answer_list(item):
            if answer not in out:
                out.append(answer)
    return out


def _missing_column(task: str, source: str, what: str, wanted: Sequence[str], found: Sequence[str], fix: str):
    return UserError(f"the {task} data in {source} has no {what} column (looked for {', '.join(wanted)}); columns "
                     f"found: {', '.join(found)}; {fix}")


def _column_plan(task: str, data: TaskData, columns: list[str], source: str, answer_column: Optional[str]):
    """For each normalized field, the source column it comes from (None: optional and absent)."""
    plan = {}
    fix_source = "point --dataset.source at data in the task's schema (docs/tasks.md) or write a loader file"
    for name, candidates in data.fields.items():
        present = next((c for c in candidates if c in columns), None)
        if present is None and name not in data.optional:
            raise _missing_column(task, source, repr(name), candidates, columns, fix_source)
        plan[name] = present
    if answer_column:
        if answer_column not in columns:
            raise _missing_column(task, source, f"answer column {answer_column!r}", [answer_column], columns,
                                  "pass --dataset.answer_column one of these (or leave it and "
                                  "--dataset.generated_by unset for the gold answers)")
        answers = (answer_column,)
    else:
        answers = next((tuple(c for c in group if c in columns) for group in data.answers if group[0] in columns), None)
        if answers is None:
            raise _missing_column(task, source, "answer", [g[0] for g in data.answers], columns,
                                  "pass --dataset.answer_column the column holding the answers")
    ids = next((c for c in data.id if c in columns), None)
    return plan, answers, ids


def _generic_plan(columns: list[str], source: str, answer_column: Optional[str]):
    for schema, spec in GENERIC_SCHEMAS.items():
        if all(c in columns for c in spec["needs"]):
            fields = {k: (v if v in columns else None) for k, v in spec["fields"].items()}
            answer = answer_column or spec.get("answer")
            if answer_column and answer_column not in columns:
                raise _missing_column("generic", source, f"answer column {answer_column!r}", [answer_column], columns,
                                      "pass --dataset.answer_column one of these")
            return schema, fields, ((answer,) if answer else ()), ("id" if "id" in columns else None)
    schemas = "; ".join(f"{name}: {'+'.join(spec['needs'])}" for name, spec in GENERIC_SCHEMAS.items())
    raise UserError(f"the data in {source} matches none of the generic loader's schemas ({schemas}); columns found: "
                    f"{', '.join(columns)}: rename the columns, or write your own loader file (docs/tasks.md)")


def _normalize_row(row: dict, fields: dict, answers: tuple, id_column: Optional[str], fallback_id: str,
                   schema: Optional[str] = None) -> dict:
    out = {"id": str(row[id_column]) if id_column and row[id_column] is not None else fallback_id}
    references = as_answer_list([row[column] for column in answers])
    if schema == "messages":
        return _split_messages(row["messages"], out["id"], bool(answers), references)
    for name, column in fields.items():
        out[name] = _text(row[column]) if column else ""
    out["answers"] = references
    return out


def _split_messages(messages, row_id: str, answer_from_column: bool, references: list[str]) -> dict:
    """A chat: the last assistant turn is the answer, the turns before it the prompt."""
    turns = [{"role": str(m["role"]), "content": _text(m["content"])} for m in messages or []]
    if answer_from_column:
        return {"id": row_id, "messages": turns, "answers": references}
    if not turns or turns[-1]["role"] != "assistant":
        raise UserError(f"chat example {row_id} does not end with an assistant turn: the generic loader trains on "
                        "the last assistant turn of each `messages` list")
    if len(turns) < 2:
        raise UserError(f"chat example {row_id} has only an assistant turn: it needs a user turn before it")
    return {"id": row_id, "messages": turns[:-1], "answers": as_answer_list(turns[-1]["content"])}


def _merge(examples: list[dict], key: str) -> list[dict]:
    """One example per distinct `key` value (first row's id and position), the answers of all its rows."""
    merged: dict = {}
    for example in examples:
        first = merged.setdefault(example[key], example)
        if first is not example:
            first["answers"] = first["answers"] + [a for a in example["answers"] if a not in first["answers"]]
    return list(merged.values())


def _features(fields: Sequence[str], messages: bool):
    import datasets

    features = {"id": datasets.Value("string")}
    for name in fields:
        features[name] = datasets.Value("string")
    if messages:
        features["messages"] = [{"role": datasets.Value("string"), "content": datasets.Value("string")}]
    features["answers"] = datasets.Sequence(datasets.Value("string"))
    return datasets.Features(features)


def _check_fraction(training_size) -> float:
    if isinstance(training_size, bool) or not isinstance(training_size, (int, float)) or not 0 < training_size <= 1:
        raise UserError(f"--dataset.training_size must be a fraction in (0, 1], got {training_size!r}")
    return float(training_size)


def check_source(task: str, source: Optional[str], answer_column: Optional[str] = None) -> None:
    """Before anything is loaded: a local source's first example parses and has the task's columns (the
    answer column included), or a one-line UserError (Hub ids and saved datasets are checked when loaded)."""
    from llm_distillation.datasets.sources import first_row

    data = task_data(task)
    source = source or data.source
    if not source:
        raise UserError(f"the {task} task has no default data: pass --dataset.source (a file, a folder, or a Hub id)")
    _check_built(task, data, source)
    row = first_row(source)
    if row is None:
        return
    if task == "generic":
        _generic_plan(list(row), source, answer_column)
    else:
        _column_plan(task, data, list(row), source, answer_column)


def load_examples(task: str, split: str, *, source: Optional[str] = None, answer_column: Optional[str] = None,
                  training_size: float = 1.0, seed: int = 42):
    """The normalized examples of one split, in source order (a datasets.Dataset).

    training_size < 1 keeps a seeded random fraction (same seed, same examples), still in source order.
    answer_column names the column whose text becomes `answers` (e.g. the teacher's `answers_generated`).
    """
    from tqdm.auto import tqdm

    data = task_data(task)
    fraction = _check_fraction(training_size)
    source = source or data.source
    if not source:
        raise UserError(f"the {task} task has no default data: pass --dataset.source (a file, a folder, or a Hub id)")
    splits = _source_splits(task, data, source)

    def plan(columns: list[str]):
        if task == "generic":
            return _generic_plan(columns, source, answer_column)
        return (None,) + _column_plan(task, data, columns, source, answer_column)

    plan(list(next(iter(splits.values())).column_names))  # a wrong schema is the more useful error: check it first
    raw, rows, origin = _pick_split(task, data, splits, split, source)
    schema, fields, answers, id_column = plan(list(raw.column_names))
    normalized = [
        _normalize_row(row, fields, answers, id_column, f"{origin}-{rows[i]}", schema)
        for i, row in enumerate(tqdm(raw.to_list(), desc=f"{task} {split} examples", disable=len(raw) < 20000,
                                     leave=False))]
    if data.merge_on:
        normalized = _merge(normalized, data.merge_on)
    if fraction < 1:
        count = max(1, int(len(normalized) * fraction))
        keep = sorted(int(i) for i in np.random.default_rng(seed).permutation(len(normalized))[:count])
        normalized = [normalized[i] for i in keep]
    names = [n for n in fields if n != "messages"]
    return _in_memory(normalized, _features(names, schema == "messages"))


def _in_memory(rows: list[dict], features):
    """A Dataset from python rows, built by arrow in one go (from_list encodes row by row: 10x slower)."""
    import datasets
    import pyarrow as pa

    table = pa.Table.from_pylist(rows, schema=features.arrow_schema)
    return datasets.Dataset(datasets.table.InMemoryTable(table))


def _draw_order(size: int, seed: int) -> Iterator[int]:
    """Row numbers 0..size-1 in a seeded random order, drawn lazily (the first few cost O(1), not O(size))."""
    rng, seen = random.Random(seed), set()
    while len(seen) < size // 2:
        index = rng.randrange(size)
        if index not in seen:
            seen.add(index)
            yield index
    rest = [i for i in range(size) if i not in seen]
    rng.shuffle(rest)
    yield from rest


def _shot_candidates(pool, seed: int) -> Iterator[dict]:
    """The pool's rows that can be shots (they have an answer), in the seeded draw order."""
    for index in _draw_order(len(pool), seed):
        row = pool[index]
        if row["answers"]:
            yield row


def select_shots(pool, k: int, *, seed: int, exclude_id: Optional[str]) -> list[dict]:
    """k few-shot examples from `pool` (the task's train split): a seeded draw, never `exclude_id`.

    The draw depends on (seed, len(pool)) only, so every evaluated example gets the same shots, except
    that an example drawn as a shot of itself is replaced by the next one. Rows without an answer are skipped.
    """
    if k <= 0:
        return []
    shots = list(itertools.islice((row for row in _shot_candidates(pool, seed) if row["id"] != exclude_id), k))
    if len(shots) < k:
        raise UserError(f"only {len(shots)} few-shot examples with an answer are available, {k} asked: lower "
                        "--dataset.few_shot")
    return shots


# -------------------------------------------------------------------------------------- tokenization
def _special(tokenizer, name: str) -> Optional[int]:
    return getattr(tokenizer, f"{name}_token_id", None)


def encode_prompt(prompt: str, tokenizer, *, encoder_decoder: bool = False) -> list[int]:
    """Prompt token ids as the model sees them at training and generation time.

    Causal: the BOS token once (prepended unless the text, e.g. a chat template, already starts with it),
    then the prompt. Encoder-decoder: the tokenizer's own special tokens, ending with EOS.
    """
    return _encode_prompts([prompt], tokenizer, encoder_decoder)[0]


def _encode_prompts(prompts: list[str], tokenizer, encoder_decoder: bool) -> list[list[int]]:
    if encoder_decoder:
        eos = _special(tokenizer, "eos")
        encoded = tokenizer(prompts, add_special_tokens=True)["input_ids"]
        return [ids + [eos] if eos is not None and (not ids or ids[-1] != eos) else ids for ids in encoded]
    bos = _special(tokenizer, "bos")
    encoded = tokenizer(prompts, add_special_tokens=False)["input_ids"] if prompts else []
    return [[bos] + ids if bos is not None and (not ids or ids[0] != bos) else ids for ids in encoded]


def _join(separator: str, answer: str) -> str:
    """separator + answer, without doubling the space when the answer already starts with whitespace."""
    if answer[:1].isspace() and separator[-1:].isspace():
        separator = separator.rstrip()
    return separator + answer


def tokenize_examples(prompts: list[str], answers: list[Optional[str]], tokenizer, *, role: str,
                      encoder_decoder: bool, separators: Optional[list[str]] = None) -> list[dict]:
    """tokenize_example for many examples at once (batched tokenizer calls)."""
    if role not in ("student", "teacher"):
        raise UserError(f"role must be 'student' or 'teacher', got {role!r}")
    eos = _special(tokenizer, "eos")
    if eos is None and (role == "student" or encoder_decoder):
        raise UserError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no EOS token: the answer labels "
                        "end with one; give the tokenizer an eos_token")
    prompt_ids = _encode_prompts(list(prompts), tokenizer, encoder_decoder)
    default = "" if role == "teacher" else " "
    separators = separators if separators is not None else [default] * len(prompts)
    texts = [_join(separators[i] if not encoder_decoder else "", a) if a else "" for i, a in enumerate(answers)]
    answer_ids = tokenizer(texts, add_special_tokens=encoder_decoder)["input_ids"] if texts else []
    out = []
    for p, a, answer in zip(prompt_ids, answer_ids, answers):
        if not answer:
            a = []
        elif (encoder_decoder or role == "student") and (not a or a[-1] != eos):
            a = a + [eos]
        if encoder_decoder:
            out.append({"input_ids": p, "labels": a, "attention_mask": [1] * len(p)})
        else:
            out.append({"input_ids": p + a, "labels": [IGNORE_INDEX] * len(p) + a,
                        "attention_mask": [1] * (len(p) + len(a))})
    return out


def tokenize_example(prompt: str, answer: Optional[str], tokenizer, *, role: str, encoder_decoder: bool,
                     separator: Optional[str] = None) -> dict:
    """input_ids, labels (-100 on the prompt) and attention_mask of one example (the ULD convention).

    Causal student: prompt, then `" {answer}<eos>"`; causal teacher: prompt, then `"{answer}"`, no EOS
    (`separator` replaces the leading " " / ""; a plain-prompted teacher takes the task's separator).
    Encoder-decoder: input = prompt + EOS, labels = answer + EOS. A missing answer gives prompt-only rows.
    """
    return tokenize_examples([prompt], [answer], tokenizer, role=role, encoder_decoder=encoder_decoder,
                             separators=None if separator is None else [separator])[0]


# ------------------------------------------------------------------------------------ loader contract
def _tokenized_features():
    import datasets

    ids = datasets.Sequence(datasets.Value("int64"))
    return datasets.Features({"id": datasets.Value("string"), "input_ids": ids, "labels": ids, "attention_mask": ids})


def make_get_split(task: str):
    """A `get_split(dataset_config, tokenizer, split)` for the task (llm_recipes/data.py's loader contract)."""
    data = task_data(task)

    def get_split(dataset_config, tokenizer, split):
        from tqdm.auto import tqdm

        role = getattr(dataset_config, "role", "student")
        model_name = getattr(dataset_config, "model_name", None) or getattr(tokenizer, "name_or_path", None)
        encoder_decoder = bool(getattr(dataset_config, "encoder_decoder", False))
        source = getattr(dataset_config, "source", None)
        seed = getattr(dataset_config, "seed", 42)
        answer_column = getattr(dataset_config, "answer_column", None)
        if answer_column is None and getattr(dataset_config, "generated_by", None):
            answer_column = data.generated_column
        fraction = getattr(dataset_config, "training_size", 1.0) if split == "train" else 1.0
        examples = load_examples(task, split, source=source, answer_column=answer_column, seed=seed,
                                 training_size=fraction)
        teacher = role == "teacher"
        shots = few_shot_count(task, model_name, getattr(dataset_config, "few_shot", None)) if teacher else 0
        if "text" in examples.column_names:
            shots = 0  # plain text: nothing to demonstrate, the model continues the text itself
        title = teacher and prompt_uses_title(task, model_name)
        if encoder_decoder and "text" in examples.column_names:
            raise UserError("plain `text` data trains a causal language model; an encoder-decoder model needs "
                            "prompt/response pairs")
        # select_shots(pool, shots, exclude_id=id) for every row, from one draw of shots + 1 candidates
        pool = load_examples(task, "train", source=source, seed=seed) if shots else None
        candidates = list(itertools.islice(_shot_candidates(pool, seed), shots + 1)) if shots else []
        prompts, answers, separators = [], [], []
        for row in tqdm(examples.to_list(), desc=f"{role} {split} prompts", disable=len(examples) < 5000, leave=False):
            chosen = [c for c in candidates if c["id"] != row["id"]][:shots]
            if len(chosen) < shots:
                chosen = select_shots(pool, shots, seed=seed, exclude_id=row["id"])  # raises: too few
            chat = teacher and has_chat_template(tokenizer) and "text" not in row
            prompts.append(build_prompt(task, row, tokenizer, chosen, chat=chat, title=title))
            answers.append(row["answers"][0] if row["answers"] else None)
            separators.append("" if chat else answer_separator(task, row))
        encoded = tokenize_examples(prompts, answers, tokenizer, role=role, encoder_decoder=encoder_decoder,
                                    separators=separators)
        if split == "train" and os.environ.get("RANK", "0") == "0":
            style = "chat template" if teacher and has_chat_template(tokenizer) else "plain"
            print(f"{role} prompts ({model_name}): {style}, {shots} shot(s)")
        return _in_memory([{"id": i, **e} for i, e in zip(examples["id"], encoded)], _tokenized_features())

    get_split.task = task
    return get_split
