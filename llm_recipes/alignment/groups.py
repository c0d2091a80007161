"""Minimal groups of consecutive teacher and student answer tokens that cover the same bytes."""
from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Optional, Sequence

from llm_recipes.alignment.tokens import WHITESPACE, answer_byte_spans, tokenizer_info


class UnalignedAnswer(ValueError):
    """The teacher's and the student's answers do not cover the same text (after whitespace at either end)."""



# ------------------------------------------------------------------------------------ grouping
@dataclass(frozen=True)
class Group:
    """Consecutive tokens of both sides that cover the same bytes [start, end) (common coordinates).

    `teacher` / `student`: indices of the tokens (into the answer's ids) in the group.
    """

    teacher: tuple[int, ...]
    student: tuple[int, ...]
    start: int
    end: int


def group_by_ends(teacher_ends: list[Optional[int]], student_ends: list[Optional[int]], length: int,
                   cut_ok=None, leading_group: bool = False) -> tuple[list[Group], list[int], list[int]]:
    """Groups from token end offsets in one coordinate system, all within [0, length].

    `leading_group`: ends <= 0 (whitespace-only tokens before the text, in common coordinates) are
    boundaries too where both sides have one; otherwise tokens ending at or before 0 join group 0."""
    t_group = [-1] * len(teacher_ends)
    s_group = [-1] * len(student_ends)
    if length <= 0:
        return [], t_group, s_group
    common = {e for e in teacher_ends if e is not None and (leading_group or e > 0) and e < length}
    common &= {e for e in student_ends if e is not None and (leading_group or e > 0) and e < length}
    if cut_ok is not None:
        common = {e for e in common if e <= 0 or cut_ok(e)}
    bounds = sorted(common) + [length]
    members: list[tuple[list[int], list[int]]] = [([], []) for _ in bounds]
    for side, (ends, out) in enumerate(((teacher_ends, t_group), (student_ends, s_group))):
        for k, e in enumerate(ends):
            if e is None:
                continue
            g = bisect.bisect_left(bounds, e)
            out[k] = g
            members[g][side].append(k)
    groups, start = [], min(0, bounds[0])
    for g, end in enumerate(bounds):
        groups.append(Group(tuple(members[g][0]), tuple(members[g][1]), start, end))
        start = end
    return groups, t_group, s_group


def _common_ends(spans: Sequence[Optional[tuple[int, int]]], lead: int):
    return [None if span is None else span[1] - lead for span in spans]


def align_spans(teacher_spans: Sequence[Optional[tuple[int, int]]], student_spans: Sequence[Optional[tuple[int, int]]],
                *, teacher_lead: int = 0, student_lead: int = 0, length: Optional[int] = None) -> list[Group]:
    """The minimal groups of consecutive tokens covering the same bytes.

    Offsets are compared in common coordinates: `span - lead` of each side (lead = that side's leading
    whitespace, in bytes; offsets <= 0 lie in the leading whitespace), capped at `length`. A group ends
    exactly where both sides have a token ending at the same offset, so no group can be split further;
    whitespace-only leading tokens thus form groups of their own where both sides have one ending at
    the same distance from the text, and otherwise join the first group; tokens ending at `length` or beyond (trailing
    whitespace) the last; None spans (special tokens) join no group. Without `length` both sides must
    end at the same offset, else `UnalignedAnswer`.
    """
    t_ends = _common_ends(teacher_spans, teacher_lead)
    s_ends = _common_ends(student_spans, student_lead)
    if length is None:
        t_len = max((e for e in t_ends if e is not None), default=0)
        s_len = max((e for e in s_ends if e is not None), default=0)
        if t_len != s_len:
            raise UnalignedAnswer(f"the teacher's tokens cover {t_len} bytes, the student's {s_len}")
        length = t_len
    t_ends = [None if e is None else min(e, length) for e in t_ends]
    s_ends = [None if e is None else min(e, length) for e in s_ends]
    return group_by_ends(t_ends, s_ends, length, leading_group=True)[0]


def _lead(data: bytes) -> int:
    return len(data) - len(data.lstrip(WHITESPACE))


@dataclass
class AnswerAlignment:
    """One aligned answer pair. Spans are in common coordinates (see `align_answer`); `text` is the
    shared answer bytes in those coordinates (no leading or trailing whitespace; no whitespace at all
    when `whitespace_free`)."""

    groups: list[Group]
    teacher_group_of_token: list[int]
    student_group_of_token: list[int]
    teacher_spans: list[Optional[tuple[int, int]]]
    student_spans: list[Optional[tuple[int, int]]]
    text: bytes
    whitespace_free: bool = False


def _non_whitespace_counts(data: bytes) -> list[int]:
    counts = [0]
    for b in data:
        counts.append(counts[-1] + (b not in WHITESPACE))
    return counts


def align_answer(teacher_tokenizer, teacher_answer_ids: Sequence[int], student_tokenizer,
                 student_answer_ids: Sequence[int]) -> AnswerAlignment:
    """Align one answer pair; raises `UnalignedAnswer` when the two do not cover the same text.

    Both sides byte-level/Metaspace: common coordinates are byte offsets after each side's leading
    whitespace, and the texts must agree byte for byte apart from whitespace at either end. If a side
    is WordPiece (or another tokenizer whose tokens do not carry their whitespace, so its decoded text
    need not reproduce the original spacing: "a,b" decodes as "a, b"), coordinates count non-whitespace
    bytes only (`whitespace_free`) and the texts must agree once all whitespace is removed.
    """
    t_spans, t_data = answer_byte_spans(teacher_tokenizer, teacher_answer_ids)
    s_spans, s_data = answer_byte_spans(student_tokenizer, student_answer_ids)
    whitespace_free = not (tokenizer_info(teacher_tokenizer).exact and tokenizer_info(student_tokenizer).exact)
    if whitespace_free:
        t_map, s_map = _non_whitespace_counts(t_data), _non_whitespace_counts(s_data)
        core = bytes(b for b in t_data if b not in WHITESPACE)
        other = bytes(b for b in s_data if b not in WHITESPACE)
    else:
        t_lead, s_lead = _lead(t_data), _lead(s_data)
        core, other = t_data[t_lead:].rstrip(WHITESPACE), s_data[s_lead:].rstrip(WHITESPACE)
        t_map = [min(i - t_lead, len(core)) for i in range(len(t_data) + 1)]
        s_map = [min(i - s_lead, len(core)) for i in range(len(s_data) + 1)]
    if core != other:
        raise UnalignedAnswer(f"teacher answer {t_data!r} and student answer {s_data!r} differ")
    t_common = [None if sp is None else (t_map[sp[0]], t_map[sp[1]]) for sp in t_spans]
    s_common = [None if sp is None else (s_map[sp[0]], s_map[sp[1]]) for sp in s_spans]
    groups, t_group, s_group = group_by_ends([None if sp is None else sp[1] for sp in t_common],
                                              [None if sp is None else sp[1] for sp in s_common], len(core),
                                              leading_group=True)
    return AnswerAlignment(groups, t_group, s_group, t_common, s_common, core, whitespace_free)


def answer_groups(teacher_tokenizer, teacher_answer_ids: Sequence[int], student_tokenizer,
                  student_answer_ids: Sequence[int]) -> tuple[list[int], list[int]]:
    """(group of every teacher answer token, group of every student answer token); -1 = no group
    (EOS and other special tokens). Both sides have the same groups 0..G-1, in text order.

    Raises `UnalignedAnswer` (a ValueError) when the answers' texts differ after whitespace at either
    end (for example an `<unk>` on one side, or a lowercasing normalizer): catch it and count it.
    """
    alignment = align_answer(teacher_tokenizer, teacher_answer_ids, student_tokenizer, student_answer_ids)
    return alignment.teacher_group_of_token, alignment.student_group_of_token


