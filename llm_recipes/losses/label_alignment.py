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
                  counts: Optional[Counter] = None, shapes: Optional[Counter] = None):
    """(alignment_group per student label, per teacher label, projection_node per student label) of one example's
    label rows (lists); `counts` / `shapes` collect the figures (unaligned examples, served tokens, group shapes)."""
    from llm_recipes import alignment

    counts = Counter() if counts is None else counts
    shapes = Counter() if shapes is None else shapes
    s_pos, s_ids = _answer(student_labels)
    t_pos, t_ids = _answer(teacher_labels)
    s_groups, t_groups, nodes = [-1] * len(student_labels), [-1] * len(teacher_labels), [-1] * len(student_labels)
    try:
        found = alignment.align_answer(teacher_tokenizer, t_ids, student_tokenizer, s_ids)
    except alignment.UnalignedAnswer:
        counts["unaligned_examples"] += 1
        return s_groups, t_groups, nodes
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
    return s_groups, t_groups, nodes


def text_alignment(student_labels: torch.Tensor, teacher_labels: torch.Tensor, student_tokenizer, teacher_tokenizer,
                   projection=None, counts: Optional[Counter] = None) -> dict:
    """The text-alignment ids of a batch of label rows [B, S] / [B, S'] as the loss engine takes them (see
    llm_recipes.data.batch_alignment), computed now: for answers that were not in the data set (the public loss
    functions, answers sampled during training)."""
    rows = [align_example(s, t, student_tokenizer, teacher_tokenizer, projection, counts)
            for s, t in zip(student_labels.tolist(), teacher_labels.tolist())]
    columns = [torch.tensor([row[i] for row in rows], dtype=torch.long, device=student_labels.device)
               for i in range(3)]
    return {"student_groups": columns[0], "teacher_groups": columns[1].to(teacher_labels.device),
            "student_nodes": columns[2] if projection is not None else None}


