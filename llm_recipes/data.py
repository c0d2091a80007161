"""Paired teacher/student data: the loader file, the pairing checks, the joint filter, the text
alignment, the batches.

A loader file is user code (it is imported and executed as is) that defines
`get_split(dataset_config, tokenizer, split) -> datasets.Dataset` with `input_ids`, `labels` (-100 on
the prompt) and `attention_mask`, and ideally an `id` column. For distillation it is called once per
tokenizer. The ULD fork kept the two sides in sync through a module-level global; here both sides are
checked to hold the same examples (count and ids), filtered jointly, and always indexed together:
one index list drives both, so a student row can only ever meet its own teacher row.

Text alignment (across tokenizers, `attach_alignment`) is computed here once per example, never in
the training step: every answer token gets the index of its text-aligned group (`alignment_group`,
-1 elsewhere, e.g. the student's EOS), and with a projection map every student answer token the trie
node its projected target comes from (`projection_node`, -1: not served). Both columns are aligned
with `labels`; the loss engine turns them into paired rows (llm_recipes.losses.pairing).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
import traceback
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch

from llm_recipes.errors import UserError
from llm_recipes.losses.label_alignment import align_example
from llm_recipes.losses.pairing import IGNORE_INDEX

REQUIRED_COLUMNS = ("input_ids", "labels", "attention_mask")
ALIGNMENT_COLUMNS = ("alignment_group", "projection_node", "continuation_node")  # per label position, -1: none
ID_COLUMN = "id"


# --------------------------------------------------------------------------------------- the loader
def import_loader(path: str):
    """Import a loader file (or a folder's load.py) and return its module."""
    if os.path.isdir(path):
        path = os.path.join(path, "load.py")
    if not os.path.isfile(path):
        raise UserError(f"dataset loader file {path} does not exist: pass --dataset.file path/to/loader.py "
                        "(or a folder with load.py)")
    name = "llm_recipes_loader_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except UserError:
        raise
    except Exception as error:  # the loader is user code: report where it broke, on one line
        raise UserError(f"dataset loader {path} failed to import: {_where(error, path)}") from None
    if not callable(getattr(module, "get_split", None)):
        raise UserError(f"dataset loader {path} defines no get_split(dataset_config, tokenizer, split) function")
    return module


def _where(error: BaseException, path: str) -> str:
    frames = [f for f in traceback.extract_tb(error.__traceback__)
              if os.path.abspath(f.filename) == os.path.abspath(path)]
    if isinstance(error, SyntaxError):
        return f"SyntaxError line {error.lineno}: {error.msg}"
    line = f" (line {frames[-1].lineno})" if frames else ""
    return f"{type(error).__name__}{line}: {' '.join(str(error).split())}"


def load_split(loader, dataset_config, tokenizer, split: str, *, role: str, model_name: str,
               encoder_decoder: bool):
    """Call the loader for one model and check what it returned."""
    import datasets

    config = dataclasses.replace(dataset_config, role=role, model_name=model_name, encoder_decoder=encoder_decoder)
    path = getattr(loader, "__file__", "loader")
    try:
        data = loader.get_split(config, tokenizer, split)
    except UserError:
        raise
    except Exception as error:
        raise UserError(f"dataset loader {path} failed in get_split(split={split!r}) for the {role}: "
                        f"{_where(error, path)}") from None
    if not isinstance(data, datasets.Dataset):
        raise UserError(f"dataset loader {path} returned {type(data).__name__} for split {split!r}: "
                        "get_split must return a datasets.Dataset")
    missing = [c for c in REQUIRED_COLUMNS if c not in data.column_names]
    if missing:
        raise UserError(f"the {role}'s {split} split from {path} has no {', '.join(missing)} column: "
                        f"get_split must return {', '.join(REQUIRED_COLUMNS)}")
    if len(data) == 0:
        raise UserError(f"the {role}'s {split} split from {path} is empty: check the data source and training_size")
    return data


def _lengths(data, column: str) -> list[int]:
    import pyarrow.compute as pc

    return pc.list_value_length(data.data.column(column)).to_pylist()


def summarize(data, role: str, split: str, encoder_decoder: bool) -> dict:
    """Per-example token counts, after checking that the columns line up."""
    n_input = _lengths(data, "input_ids")
    n_mask = _lengths(data, "attention_mask")
    n_labels = _lengths(data, "labels")
    for i, (a, m, l) in enumerate(zip(n_input, n_mask, n_labels)):
        if a != m or (not encoder_decoder and a != l):
            raise UserError(f"the {role}'s {split} example {i} has input_ids/attention_mask/labels of lengths "
                            f"{a}/{m}/{l}: a causal model needs them equal")
    answers = data.map(lambda b: {"n": [sum(t != IGNORE_INDEX for t in row) for row in b["labels"]]},
                       batched=True, remove_columns=data.column_names, load_from_cache_file=False,
                       keep_in_memory=True)["n"]
    length = [max(a, l) for a, l in zip(n_input, n_labels)] if encoder_decoder else n_input
    return {"length": length, "answer_tokens": answers}


# --------------------------------------------------------------------------------------- pairing
@dataclass
class PairedSplit:
    """The student's rows and (for distillation) the teacher's, index i on both sides the same example."""

    student: object
    teacher: Optional[object]
    dropped_too_long: int = 0
    without_answer: int = 0
    alignment: dict = field(default_factory=dict)  # text-alignment figures (attach_alignment), {} without it
    cache: Optional[object] = None  # teacher_cache.TeacherCache of this split (attach_teacher_cache)
    cache_rows: Optional[list] = None  # per example: where its rows are in the cache

    def __len__(self) -> int:
        return len(self.student)


def check_pairing(student, teacher, split: str) -> None:
    """Same number of examples, and the same ids in the same order where an id column exists."""
    if len(student) != len(teacher):
        raise UserError(f"teacher and student {split} sets do not pair up: {len(teacher)} teacher examples vs "
                        f"{len(student)} student examples; the loader must return the same examples, in the "
                        "same order, for both tokenizers")
    has_ids = (ID_COLUMN in student.column_names, ID_COLUMN in teacher.column_names)
    if has_ids == (True, True):
        for i, (s, t) in enumerate(zip(student[ID_COLUMN], teacher[ID_COLUMN])):
            if s != t:
                raise UserError(f"teacher and student {split} sets do not pair up: example {i} is id {s!r} for "
                                f"the student and id {t!r} for the teacher; the loader must keep the source order")
    elif any(has_ids):
        side = "student" if has_ids[0] else "teacher"
        raise UserError(f"only the {side}'s {split} set has an {ID_COLUMN!r} column: return it on both sides")
    else:
        print(f"note: the {split} sets have no {ID_COLUMN!r} column; teacher/student pairing is checked by count only")


def joint_filter(student, teacher, student_stats: dict, teacher_stats: Optional[dict],
                 student_max: Optional[int], teacher_max: Optional[int]) -> tuple[object, object, int]:
    """Drop, on both sides at once, every example too long for either model."""
    keep = []
    for i, length in enumerate(student_stats["length"]):
        too_long = student_max is not None and length > student_max
        if teacher_stats is not None and teacher_max is not None:
            too_long = too_long or teacher_stats["length"][i] > teacher_max
        if not too_long:
            keep.append(i)
    dropped = len(student) - len(keep)
    if dropped:
        student = student.select(keep)
        teacher = teacher.select(keep) if teacher is not None else None
    return student, teacher, dropped


def with_end_of_answer(teacher, eos_id: int):
    """Every teacher answer ending with the teacher's EOS (`--distillation_config.distill_eos`): a causal teacher's
    rows hold none (the ULD convention), so no row of it would predict the end of the answer."""
    def append(row):
        labels = row["labels"]
        if not any(label != IGNORE_INDEX for label in labels) or labels[-1] == eos_id:
            return row
        return {"input_ids": row["input_ids"] + [eos_id], "labels": labels + [eos_id],
                "attention_mask": row["attention_mask"] + [1]}
    return teacher.map(append, desc="teacher answers end with EOS")


def build_paired_split(loader, dataset_config, split: str, *, student_tokenizer, student_name: str,
                       student_encoder_decoder: bool, student_max: Optional[int], teacher_tokenizer=None,
                       teacher_name: Optional[str] = None, teacher_encoder_decoder: bool = False,
                       teacher_max: Optional[int] = None, teacher_eos: bool = False) -> PairedSplit:
    """The split of both sides, checked to pair up, filtered jointly; `teacher_eos`: the teacher's answers end with
    its EOS (with_end_of_answer)."""
    student = load_split(loader, dataset_config, student_tokenizer, split, role="student",
                         model_name=student_name, encoder_decoder=student_encoder_decoder)
    teacher = None
    if teacher_tokenizer is not None:
        teacher = load_split(loader, dataset_config, teacher_tokenizer, split, role="teacher",
                             model_name=teacher_name, encoder_decoder=teacher_encoder_decoder)
        check_pairing(student, teacher, split)
        if teacher_eos:
            teacher = with_end_of_answer(teacher, teacher_tokenizer.eos_token_id)
    student_stats = summarize(student, "student", split, student_encoder_decoder)
    teacher_stats = summarize(teacher, "teacher", split, teacher_encoder_decoder) if teacher is not None else None
    without_answer = sum(1 for n in student_stats["answer_tokens"] if n == 0)
    student, teacher, dropped = joint_filter(student, teacher, student_stats, teacher_stats, student_max, teacher_max)
    if len(student) == 0:
        raise UserError(f"every {split} example is longer than the models accept ({student_max} student / "
                        f"{teacher_max} teacher tokens): raise --context_length or shorten the prompts")
    keep_columns = lambda d: d.select_columns([c for c in REQUIRED_COLUMNS if c in d.column_names])  # noqa: E731
    student = keep_columns(student).with_format("python")
    teacher = keep_columns(teacher).with_format("python") if teacher is not None else None
    return PairedSplit(student, teacher, dropped_too_long=dropped, without_answer=without_answer)


# ------------------------------------------------------------------------------------ text alignment
def attach_alignment(split: PairedSplit, student_tokenizer, teacher_tokenizer, projection=None,
                     end: Optional[tuple] = None, continuation: bool = False) -> PairedSplit:
    """The split with the text-alignment columns added to both sides (see the module docstring), and its
    figures: unaligned examples, groups, the share of 1:1 groups, the largest group, the share of student
    answer tokens the projection serves (with `projection`, a ProjectionMap). `end`: (student EOS ids, teacher
    EOS ids): two answers that end with their EOS get one more group, the end of the answer. `continuation`: the
    continuation_node column too (--distillation_config.projected_continuation)."""
    from tqdm.auto import tqdm

    counts, shapes = Counter(), Counter()
    columns = ([], [], [], [])
    pairs = zip(split.student["labels"], split.teacher["labels"])
    for s_labels, t_labels in tqdm(pairs, total=len(split), desc="aligning answers", leave=False,
                                   disable=len(split) < 5000):
        for column, values in zip(columns, align_example(s_labels, t_labels, student_tokenizer, teacher_tokenizer,
                                                         projection, counts, shapes, end, continuation)):
            column.append(values)
    student = split.student.add_column("alignment_group", columns[0])
    teacher = split.teacher.add_column("alignment_group", columns[1])
    if projection is not None:
        student = student.add_column("projection_node", columns[2])
        if continuation:
            student = student.add_column("continuation_node", columns[3])
    groups = sum(shapes.values())
    largest = max(shapes, key=sum) if shapes else (0, 0)
    figures = {"unaligned_examples": counts["unaligned_examples"], "groups": groups,
               "one_to_one_share": shapes[(1, 1)] / groups if groups else 0.0,
               "largest_group": {"teacher_tokens": largest[0], "student_tokens": largest[1]}}
    if projection is not None:
        answer_tokens = sum(sum(1 for label in row if label != IGNORE_INDEX) for row in split.student["labels"])
        figures["projection_served_share"] = counts["served"] / answer_tokens if answer_tokens else 0.0
        figures["projection_skipped"] = {k: counts[k] for k in ("special", "beyond_first_teacher_token",
                                                                "prefix_not_in_trie") if counts[k]}
        if continuation:  # group starts whose target also holds the continuations of the group before
            figures["continued_share"] = counts["continued"] / groups if groups else 0.0
    return dataclasses.replace(split, student=student.with_format("python"), teacher=teacher.with_format("python"),
                               alignment=figures)


def attach_teacher_cache(split: PairedSplit, folder: str, name: str, teacher_tokenizer) -> PairedSplit:
    """Find every example of the split in the teacher cache (by its teacher tokens), or refuse in one line
    naming the first example that is not there."""
    from llm_recipes.teacher_cache import TeacherCache

    cache = TeacherCache(folder, name)
    found = []
    for i, (input_ids, labels) in enumerate(zip(split.teacher["input_ids"], split.teacher["labels"])):
        where = cache.locate(input_ids, labels)
        if where is None:
            answer = teacher_tokenizer.decode([t for t in labels if t != IGNORE_INDEX])
            raise UserError(f"the teacher cache {folder} has no rows for {name} example {i} (teacher answer "
                            f"{answer[:60]!r}): it was written for other data, prompts or teacher tokenizer; write it "
                            "again with the same --dataset.* flags (python -m llm_distillation.cache_teacher)")
        found.append(where)
    return dataclasses.replace(split, cache=cache, cache_rows=found)


def one_to_one_share(batch: dict) -> float:
    """Share of 1:1 text-aligned groups in a collated batch (the start-up report)."""
    one = total = 0
    for s_row, t_row in zip(batch["student"]["alignment_group"].tolist(), batch["teacher"]["alignment_group"].tolist()):
        s_sizes, t_sizes = Counter(g for g in s_row if g >= 0), Counter(g for g in t_row if g >= 0)
        total += len(s_sizes)
        one += sum(1 for g, n in s_sizes.items() if n == 1 and t_sizes.get(g) == 1)
    return one / total if total else 0.0


# -------------------------------------------------------------------------------------- batching
def epoch_order(num_examples: int, epoch: int, seed: int) -> list[int]:
    """The epoch's permutation: a function of (seed, epoch) only, so resume can recompute it."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_examples, generator=generator).tolist()


def steps_per_epoch(num_examples: int, micro_batch: int, accumulation: int, world_size: int) -> int:
    """Full optimizer steps in an epoch; the incomplete last global batch is left out (and counted)."""
    return num_examples // (micro_batch * accumulation * world_size)


def train_micro_batches(num_examples: int, epoch: int, seed: int, micro_batch: int, accumulation: int,
                        world_size: int, rank: int, start_step: int = 0) -> Iterator[list[int]]:
    """This rank's micro-batches, in order, from optimizer step `start_step` of the epoch.

    A global micro-batch (micro_batch x world_size consecutive examples of the permutation) is split
    into contiguous rank slices, so N processes with batch b see exactly the examples that one process
    with batch N*b sees, step for step.
    """
    order = epoch_order(num_examples, epoch, seed)
    global_micro = micro_batch * world_size
    per_step = global_micro * accumulation
    for step in range(start_step, steps_per_epoch(num_examples, micro_batch, accumulation, world_size)):
        for a in range(accumulation):
            begin = step * per_step + a * global_micro + rank * micro_batch
            yield order[begin:begin + micro_batch]


def eval_batches(num_examples: int, batch_size: int, world_size: int, rank: int) -> list[Optional[list[int]]]:
    """Every example once, in order; ranks get equally many batches (None = a placeholder that counts nothing)."""
    batches = [list(range(i, min(i + batch_size, num_examples))) for i in range(0, num_examples, batch_size)]
    while len(batches) % world_size:
        batches.append(None)
    return batches[rank::world_size]


def pad(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, :len(r)] = torch.tensor(r, dtype=torch.long)
    return out


def collate(rows: list[dict], pad_token_id: int) -> dict:
    """Right-pad one side's rows: pad id for inputs, 0 for the mask, -100 for the labels, -1 for the
    alignment columns."""
    batch = {
        "input_ids": pad([r["input_ids"] for r in rows], pad_token_id),
        "attention_mask": pad([r["attention_mask"] for r in rows], 0),
        "labels": pad([r["labels"] for r in rows], IGNORE_INDEX),
    }
    for column in ALIGNMENT_COLUMNS:
        if column in rows[0]:
            batch[column] = pad([r[column] for r in rows], -1)
    return batch


def batch_alignment(batch: dict) -> Optional[dict]:
    """The text-alignment ids of a collated paired batch, as the loss engine takes them (None without)."""
    student, teacher = batch["student"], batch.get("teacher")
    if teacher is None or "alignment_group" not in student:
        return None
    return {"student_groups": student["alignment_group"], "teacher_groups": teacher["alignment_group"],
            "student_nodes": student.get("projection_node"), "student_continuations": student.get("continuation_node")}


class PairedBatches(torch.utils.data.Dataset):
    """Maps a list of example indices to the collated student (and teacher) batch, for a DataLoader."""

    def __init__(self, split: PairedSplit, student_pad_id: int, teacher_pad_id: Optional[int]):
        self.split, self.student_pad_id, self.teacher_pad_id = split, student_pad_id, teacher_pad_id

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, indices) -> dict:
        placeholder = indices is None
        indices = [0] if placeholder else indices
        batch = {"student": collate(_rows(self.split.student, indices), self.student_pad_id)}
        if self.split.teacher is not None:
            batch["teacher"] = collate(_rows(self.split.teacher, indices), self.teacher_pad_id)
        if self.split.cache is not None:  # the teacher's cached rows where its hidden states would be
            from llm_recipes.teacher_cache import scatter_rows

            cache = self.split.cache
            rows = [cache.packed(self.split.cache_rows[i]) for i in indices]
            batch["teacher"]["cache"] = scatter_rows(rows, batch["teacher"]["labels"], cache.meta.encoder_decoder,
                                                     2 * cache.k + 1)
        if placeholder:
            for side in batch.values():
                side["labels"].fill_(IGNORE_INDEX)
                for column in ALIGNMENT_COLUMNS:
                    if column in side:
                        side[column].fill_(-1)
        return batch


def _rows(data, indices: list[int]) -> list[dict]:
    columns = data[indices]
    return [dict(zip(columns, values)) for values in zip(*columns.values())]


def loader_over(batches: list, split: PairedSplit, student_pad_id: int, teacher_pad_id: Optional[int],
                num_workers: int, device: Optional[torch.device] = None) -> torch.utils.data.DataLoader:
    """A DataLoader whose every item is one already-chosen batch of indices (collated in workers). For a CUDA
    `device` the batches (the teacher cache's rows included) come in pinned memory, so that `move` copies them
    to the GPU without blocking."""
    # Its own generator: creating a DataLoader iterator draws a seed, which must not come from the global
    # RNG (dropout's), or resuming would shift the random stream.
    return torch.utils.data.DataLoader(
        PairedBatches(split, student_pad_id, teacher_pad_id), sampler=batches, batch_size=None,
        num_workers=num_workers, generator=torch.Generator().manual_seed(0),
        pin_memory=device is not None and device.type == "cuda")


def move(batch: dict, device) -> dict:
    return {side: {k: v.to(device, non_blocking=True) for k, v in t.items()} for side, t in batch.items()}
