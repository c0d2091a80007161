"""The alignment inspector: `python -m llm_recipes.alignment --teacher_tokenizer T --student_tokenizer S
--text "..."` shows the groups of a text; `--file data.jsonl --column answers.text` gives figures over a
data set."""
from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from llm_recipes.alignment.groups import UnalignedAnswer, align_answer, group_by_ends
from llm_recipes.alignment.projection_map import ProjectionMap, projection_positions
from llm_recipes.alignment.tokens import WHITESPACE, TokenizerInfo, char_to_byte_offsets, tokenizer_info
from llm_recipes.errors import UserError
from llm_recipes.flags import Command, entry_points, option


# ------------------------------------------------------------------------------------ inspector
def _text_spans(info: TokenizerInfo, text: str, data: bytes) -> tuple[list[int], list[int]]:
    """(ids, end offset of every token in `data` = text.encode()), the tokenizer's own tokenization."""
    encoding = info.backend.encode(text, add_special_tokens=False)
    ids = list(encoding.ids)
    offsets = char_to_byte_offsets(text)
    if info.exact:
        # token bytes, and for tokens without bytes (unk, an added special token typed in the text) the
        # input bytes of their offsets; the tokens' own prefix space (if any) is then a leading extra
        n = len(text)
        pieces = [info.token_bytes[i] if info.text_id(i) else data[offsets[min(a, n)]:offsets[min(b, n)]]
                  for i, (a, b) in zip(ids, encoding.offsets)]
        own = b"".join(pieces)
        extra = len(own) - len(data)
        if own == data or (extra > 0 and own.endswith(data) and not own[:extra].strip(WHITESPACE)):
            ends, pos = [], -max(extra, 0)
            for piece in pieces:
                pos += len(piece)
                ends.append(max(pos, 0))
            return ids, ends
    ends, previous = [], 0
    for _, end in encoding.offsets:
        previous = max(previous, offsets[min(end, len(text))])
        ends.append(previous)
    return ids, ends


def text_groups(teacher_tokenizer, student_tokenizer, text: str) -> list[dict]:
    """The inspector's groups of one text: [{"text", "teacher_ids", "student_ids"}], where the texts
    concatenate to `text`, the ids to each tokenizer's tokenization of `text` without special tokens,
    each group's tokens cover exactly its text and no group splits into two that do. Boundaries fall
    on character boundaries (two byte-level tokenizers that both split a character stay in one group)."""
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise UserError(f"the text is not valid Unicode ({error})") from error
    teacher, student = tokenizer_info(teacher_tokenizer), tokenizer_info(student_tokenizer)
    t_ids, t_ends = _text_spans(teacher, text, data)
    s_ids, s_ends = _text_spans(student, text, data)
    length = len(data)
    groups, _, _ = group_by_ends([min(e, length) for e in t_ends], [min(e, length) for e in s_ends], length,
                                  cut_ok=lambda b: (data[b] & 0xC0) != 0x80)
    return [{"text": data[g.start:g.end].decode("utf-8"), "teacher_ids": [t_ids[i] for i in g.teacher],
             "student_ids": [s_ids[i] for i in g.student]} for g in groups]


def _dotted(row: dict, column: str):
    value = row
    for key in column.split("."):
        if isinstance(value, list):
            value = value[0] if value else None
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    if isinstance(value, list):
        value = value[0] if value else None
    return value


def read_column(path, column: str, limit: int = 0) -> list[str]:
    """The `column` (dotted path; the first item of a list) of every row of a .jsonl file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--file {path} does not exist")
    out = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise UserError(f"{path}:{n} is not JSON ({error.msg})") from error
            value = _dotted(row, column)
            if value is None:
                raise UserError(f"{path}:{n} has no column {column!r}")
            out.append(str(value))
            if limit and len(out) >= limit:
                break
    return out


def dataset_figures(teacher_tokenizer, student_tokenizer, answers: Sequence[str], *, teacher_separator: str = " ",
                    student_separator: str = " ", pmap: Optional[ProjectionMap] = None) -> dict:
    """Alignment and projection figures over answers tokenized as the trainer does (causal models):
    teacher `separator + answer` without EOS, student `separator + answer` + EOS."""
    teacher, student = tokenizer_info(teacher_tokenizer), tokenizer_info(student_tokenizer)
    eos = getattr(student_tokenizer, "eos_token_id", None)
    build_seconds = 0.0
    if pmap is None:
        started = time.perf_counter()
        pmap = ProjectionMap.build(teacher_tokenizer, student_tokenizer)
        build_seconds = time.perf_counter() - started
    t_all = [list(e.ids) for e in teacher.backend.encode_batch([teacher_separator + a for a in answers],
                                                               add_special_tokens=False)]
    s_all = [list(e.ids) + ([eos] if eos is not None else [])
             for e in student.backend.encode_batch([student_separator + a for a in answers], add_special_tokens=False)]
    counts: Counter = Counter()
    sizes: Counter = Counter()
    unaligned, largest, groups = 0, (0, 0), 0
    positions = text_positions = 0
    started = time.perf_counter()
    for t_ids, s_ids in zip(t_all, s_all):
        positions += len(s_ids)
        try:
            a = align_answer(teacher, t_ids, student, s_ids)
        except UnalignedAnswer:
            unaligned += 1
            counts["unaligned"] += len(s_ids)
            continue
        text_positions += sum(1 for g in a.student_group_of_token if g >= 0)
        for g in a.groups:
            shape = (len(g.teacher), len(g.student))
            sizes[shape] += 1
            groups += 1
            if sum(shape) > sum(largest):
                largest = shape
        projection_positions(a.teacher_group_of_token, a.student_group_of_token, a.teacher_spans, a.student_spans,
                             s_ids, pmap, teacher_ids=t_ids, counts=counts)
    align_seconds = time.perf_counter() - started
    served = counts["served"]
    return {
        "examples": len(answers), "unaligned_examples": unaligned, "groups": groups,
        "one_to_one_group_share": round(sizes[(1, 1)] / groups, 4) if groups else None,
        "largest_group": {"teacher_tokens": largest[0], "student_tokens": largest[1]},
        "most_common_group_shapes": {f"{t}:{s}": n for (t, s), n in sizes.most_common(6)},
        "student_positions": positions, "student_text_positions": text_positions,
        "served_share": round(served / positions, 4) if positions else None,
        "served_share_of_text_positions": round(served / text_positions, 4) if text_positions else None,
        "sigma_consistent_share_of_served": round(counts["consistent"] / served, 4) if served else None,
        "skipped": {k: counts[k] for k in ("special", "beyond_first_teacher_token", "prefix_not_in_trie", "unaligned")
                    if counts[k]},
        "map": {"nodes": pmap.num_nodes, "pairs": pmap.num_pairs, "build_seconds": round(build_seconds, 3)},
        "align_and_position_seconds_per_1000": round(align_seconds / max(len(answers), 1) * 1000, 3),
    }


def _token_label(info: TokenizerInfo, i: int) -> str:
    return info.strings[i] if 0 <= i < info.vocab_size and info.strings[i] is not None else f"<{i}>"


def format_groups(teacher_tokenizer, student_tokenizer, groups: list[dict]) -> str:
    """The inspector's side-by-side table."""
    teacher, student = tokenizer_info(teacher_tokenizer), tokenizer_info(student_tokenizer)
    def labels(info, ids):
        return " ".join(json.dumps(_token_label(info, i), ensure_ascii=False)[1:-1] for i in ids)

    rows = [("text", "teacher", "student")]
    for g in groups:
        rows.append((json.dumps(g["text"], ensure_ascii=False), labels(teacher, g["teacher_ids"]),
                     labels(student, g["student_ids"])))
    widths = [max(len(r[c]) for r in rows) for c in range(3)]
    lines = [" | ".join(r[c].ljust(widths[c]) for c in range(3)).rstrip() for r in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    one = sum(1 for g in groups if len(g["teacher_ids"]) == 1 and len(g["student_ids"]) == 1)
    n_teacher = sum(len(g["teacher_ids"]) for g in groups)
    n_student = sum(len(g["student_ids"]) for g in groups)
    lines.append(f"{len(groups)} groups, {one} one-to-one; teacher {n_teacher} tokens ({teacher.kind}), "
                 f"student {n_student} tokens ({student.kind})")
    return "\n".join(lines)


@dataclass(frozen=True)
class InspectFlags:
    """Flags of `python -m llm_recipes.alignment`."""

    teacher_tokenizer: str = option("", "a tokenizer folder (or tokenizer.json)")
    student_tokenizer: str = option("", "a tokenizer folder (or tokenizer.json)")
    text: Optional[str] = option(None, "show the groups of this text (--json: one JSON list of {text, teacher_ids, "
                                       "student_ids})")
    file: Optional[str] = option(None, "or: figures over the answers of a .jsonl file (1:1 groups, largest group, "
                                       "positions the projection serves)")
    column: str = option("answers.text", "--file: dotted path of the answer in each row (a list gives its first item)")
    json: bool = option(False, "machine-readable output")
    teacher_separator: str = option(" ", "--file: what precedes the answer on the teacher's side (plain prompt: \" \", "
                                         "chat prompt: \"\")")
    student_separator: str = option(" ", "--file: what precedes the answer on the student's side")
    limit: int = option(0, "--file: the first N rows only (0: all)")
    map: Optional[str] = option(None, "--file: a saved projection map (built and saved there if missing)")


COMMAND = Command(program="python -m llm_recipes.alignment", sections={"flags": InspectFlags},
                  summary="Shows how two tokenizers' tokens group by the text they cover (minimal groups of "
                          "consecutive tokens), or figures over a data set.")


def _load_tokenizer(path: str):
    if not path:
        raise UserError("--teacher_tokenizer and --student_tokenizer are required (tokenizer folders)")
    p = Path(path)
    try:
        if p.is_file() and p.suffix == ".json":
            from tokenizers import Tokenizer

            return Tokenizer.from_file(str(p))
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path)
    except Exception as error:  # noqa: BLE001 - shown to the user as one line
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UserError(f"cannot load tokenizer {path!r}: {first_line}") from error


def inspect(flags: InspectFlags) -> None:
    if flags.limit < 0:
        raise UserError(f"--limit must be a whole number >= 0, got {flags.limit}")
    if (flags.text is None) == (flags.file is None):
        raise UserError("give exactly one of --text or --file")
    teacher = _load_tokenizer(flags.teacher_tokenizer)
    student = _load_tokenizer(flags.student_tokenizer)
    if flags.text is not None:
        groups = text_groups(teacher, student, flags.text)
        print(json.dumps(groups, ensure_ascii=False) if flags.json else format_groups(teacher, student, groups))
        return
    answers = read_column(flags.file, flags.column, flags.limit)
    pmap = None
    if flags.map:
        if Path(flags.map).exists():
            pmap = ProjectionMap.load(flags.map, teacher, student)
        else:
            pmap = ProjectionMap.build(teacher, student)
            pmap.save(flags.map)
    figures = dataset_figures(teacher, student, answers, teacher_separator=flags.teacher_separator,
                              student_separator=flags.student_separator, pmap=pmap)
    figures = {"file": str(flags.file), "column": flags.column, **figures}
    if flags.json:
        print(json.dumps(figures))
        return
    for key, value in figures.items():
        print(f"{key}: {json.dumps(value, ensure_ascii=False) if isinstance(value, dict) else value}")


main, cli = entry_points(COMMAND, lambda parsed: inspect(parsed["flags"]))
