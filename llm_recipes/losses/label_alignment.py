"""Text alignment of label rows: which answer tokens of a student row and a teacher row cover the same text.

The data pipeline computes it once per example (llm_recipes.data.attach_alignment); the public loss functions and
the on-policy step compute it for answers that were not in a data set (`text_alignment`). The ids it gives (a
group per answer token, a projection-map node per student answer token) are what `pairing.pair_by_groups`
pairs rows by.
"""
from __future__ import annotations

from collections import Counter
from typing import Optional

import torch

from llm_recipes.losses.pairing import IGNORE_INDEX


def _answer(labels: list[int]) -> tuple[list[int], list[int]]:
    """(positions, ids) of the answer tokens of one label row."""
    positions = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
    return positions, [labels[i] for i in positions]


def align_example(student_labels, teacher_labels, student_tokenizer, teacher_tokenizer, projection=None,
                  counts: Optional[Counter] = None, shapes: Optional[Counter] = None, end: Optional[tuple] = None,
                  continuation: bool = False):
    """(alignment_group per student label, per teacher label, projection_node per student label, continuation_node
    per student label) of one example's label rows (lists); `counts` / `shapes` collect the figures (unaligned
    examples, served tokens, group shapes). `end` = (student EOS ids, teacher EOS ids): when both answers end with
    one, the two EOS tokens are one more group, the end of the answer (its student row served at a root of the
    projection: the teacher's EOS probability goes to the student's EOS). `continuation` (with `projection`): see
    `continuation_nodes`; otherwise the fourth list is all -1."""
    from llm_recipes import alignment

    counts = Counter() if counts is None else counts
    shapes = Counter() if shapes is None else shapes
    s_pos, s_ids = _answer(student_labels)
    t_pos, t_ids = _answer(teacher_labels)
    s_groups, t_groups, nodes = [-1] * len(student_labels), [-1] * len(teacher_labels), [-1] * len(student_labels)
    following = [-1] * len(student_labels)
    ends = end is not None and s_ids and t_ids and s_ids[-1] in end[0] and t_ids[-1] in end[1]
    if ends and len(s_ids) == len(t_ids) == 1:  # both answers are their EOS alone: the end group only
        return (*_with_end(s_groups, t_groups, nodes, s_pos, t_pos, 0, projection, s_ids, shapes), following)
    try:
        found = alignment.align_answer(teacher_tokenizer, t_ids, student_tokenizer, s_ids)
    except alignment.UnalignedAnswer:
        counts["unaligned_examples"] += 1
        return s_groups, t_groups, nodes, following
    for i, g in zip(s_pos, found.student_group_of_token):
        s_groups[i] = g
    for i, g in zip(t_pos, found.teacher_group_of_token):
        t_groups[i] = g
    shapes.update((len(g.teacher), len(g.student)) for g in found.groups)
    if projection is not None:
        _, served = alignment.projection_positions(found.teacher_group_of_token, found.student_group_of_token,
                                                   found.teacher_spans, found.student_spans, s_ids, projection,
                                                   counts=counts)
        for i, node in zip(s_pos, served):
            nodes[i] = node
    if ends:
        _with_end(s_groups, t_groups, nodes, s_pos, t_pos, len(found.groups), projection, s_ids, shapes)
    if projection is not None and continuation:
        for k, node in continuation_nodes(found.groups, s_ids, projection, len(s_ids) - 1 if ends else None):
            if nodes[s_pos[k]] >= 0:
                following[s_pos[k]] = node
                counts["continued"] += 1
    return s_groups, t_groups, nodes, following


def continuation_nodes(groups, s_ids: list[int], projection, end_at: Optional[int] = None):
    """(student answer index, trie node) for every student token that starts a group g + 1 after a group g whose
    student tokens some teacher token's sigma extends: the node of g's student tokens (`end_at`: the student index
    of the end-of-answer group, which follows the last group). The projected target there also holds what the
    teacher could have written instead of g's teacher tokens: one longer token (`--distillation_config.
    projected_continuation`, llm_recipes.losses.projection)."""
    from llm_recipes.alignment import VIEW_INNER

    starts = [group.student[0] if group.student else None for group in groups[1:]] + [end_at]
    first = next((s_ids[group.student[0]] for group in groups if group.student), -1)
    for g, group in enumerate(groups):
        if starts[g] is None or not group.teacher or not group.student:
            continue
        node = projection.node_of([s_ids[i] for i in group.student], VIEW_INNER if g else projection.start_view(first))
        if node >= 0:
            yield starts[g], node


def _with_end(s_groups, t_groups, nodes, s_pos, t_pos, group: int, projection, s_ids, shapes):
    """The two answers' EOS tokens as one more group, `group` (the student's last token, the teacher's last)."""
    from llm_recipes.alignment import VIEW_INNER

    s_groups[s_pos[-1]], t_groups[t_pos[-1]] = group, group
    shapes[(1, 1)] += 1
    if projection is not None:
        nodes[s_pos[-1]] = projection.root(VIEW_INNER if group else projection.start_view(s_ids[0]))
    return s_groups, t_groups, nodes


def text_alignment(student_labels: torch.Tensor, teacher_labels: torch.Tensor, student_tokenizer, teacher_tokenizer,
                   projection=None, counts: Optional[Counter] = None, continuation: bool = False) -> dict:
    """The text-alignment ids of a batch of label rows [B, S] / [B, S'] as the loss engine takes them (see
    llm_recipes.data.batch_alignment), computed now: for answers that were not in the data set (the public loss
    functions, answers sampled during training)."""
    rows = [align_example(s, t, student_tokenizer, teacher_tokenizer, projection, counts, continuation=continuation)
            for s, t in zip(student_labels.tolist(), teacher_labels.tolist())]
    columns = [torch.tensor([row[i] for row in rows], dtype=torch.long, device=student_labels.device)
               for i in range(4)]
    return {"student_groups": columns[0], "teacher_groups": columns[1].to(teacher_labels.device),
            "student_nodes": columns[2] if projection is not None else None,
            "student_continuations": columns[3] if projection is not None and continuation else None}


