"""The loss of one micro-batch, term by term, from hidden states (no [batch, seq, vocab] logits):

    loss = cross_entropy_factor * CE + distil_factor * logit term + hidden_weight * hidden-state term
           + feature_weight * feature term,   each term divided by the optimizer step's units of it.

`Objective` is the resolved plan of these terms (built once at set-up); `count_units` reads a batch's
labels only (so the step's totals are known before any forward), `compute_terms` runs the teacher and
the student and returns each term summed over its units, `combine` divides by the step's totals.
The logit term comes from llm_recipes.losses, the hidden-state and feature terms from
llm_recipes.losses.hidden / .selection with the layer plan of llm_recipes.intermediate.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from enum import Enum
from typing import Callable, NamedTuple, Optional

import torch
from torch import nn

from llm_recipes import intermediate, models, teacher_cache
from llm_recipes.data import batch_alignment
from llm_recipes.losses import LossSpec, count_units as count_logit_units, distillation_terms
from llm_recipes.losses.hidden import RowPairs, hidden_row_pairs, hidden_states_sum
from llm_recipes.losses.selection import feature_selection_sum, top_units


class Answers(Enum):
    """Whose answers a micro-batch holds, which decides the terms it trains."""

    DATA = "data"  # the data set's answers: every active term
    SAMPLED = "sampled"  # the student's own answers (on-policy, llm_recipes.on_policy): no CE, they are not labels
    CE_ONLY = "ce_only"  # the data set's answers of an on-policy step (--on_policy_ce): the CE alone, no teacher


class Counts(NamedTuple):
    """Units of each term in a micro-batch (summed over an optimizer step's micro-batches and processes,
    the divisors of the step's terms): CE tokens, logit-term units (tokens or sequences), hidden-state
    rows, feature-term rows."""

    ce: float = 0
    distill: float = 0
    hidden: float = 0
    feature: float = 0


@dataclass
class Terms:
    sums: dict  # term name -> 0-d fp32 tensor, the term summed over its units in this micro-batch
    counts: Counts
    candidate_positions: int = 0  # paired answer positions before token selection
    kept_positions: int = 0  # ... and after


@dataclass(frozen=True)
class Models:
    """The models one micro-batch runs through."""

    student: nn.Module  # what is called: the student, or its DDP wrapper
    student_inner: nn.Module  # the Hugging Face model inside (its output layer, its config)
    teacher: Optional[nn.Module] = None  # frozen; None when no term needs it
    projections: Optional[nn.ModuleDict] = None  # learned hidden-state projections (student width -> teacher's)


@dataclass(frozen=True)
class Objective:
    """Which terms a run computes, with which weights, settings and layers."""

    spec: LossSpec  # the logit term (spec.name "none": CE only)
    weights: dict  # term name -> weight
    active: tuple  # the terms computed: "ce" and every term with a weight > 0
    train: object  # train_config (student precision, encoder-decoder, chunk size)
    distillation: object  # distillation_config (teacher precision, hidden-state and feature settings)
    layers: Optional[intermediate.LayerPlan] = None  # hidden-state / feature layers, None when both are off
    uses_teacher: bool = False  # run the teacher's forward (a logit, hidden-state or feature term needs it)
    cached_teacher_head: Optional[Callable] = None  # with a teacher cache: its packed rows -> teacher logits


def build_objective(run, distil_factor: float, spec: LossSpec, layers: Optional[intermediate.LayerPlan],
                    cache=None) -> Objective:
    """The run's terms and weights; `cache` (teacher_cache.CacheMeta): the teacher's logits come from it."""
    t, d = run.train, run.distillation
    head = teacher_cache.CachedHead(cache.vocab_size, cache.topk, cache.temperature) if cache is not None else None
    weights = {"ce": d.cross_entropy_factor if t.distillation else 1.0,
               "distill": distil_factor if spec.distills else 0.0,
               "hidden": d.hidden_weight if layers is not None and layers.hidden_pairs else 0.0,
               "feature": d.feature_weight if layers is not None and layers.feature_pairs else 0.0}
    active = tuple(name for name in Counts._fields if name == "ce" or weights[name] > 0)
    return Objective(spec, weights, active, t, d, layers, uses_teacher=spec.distills or layers is not None,
                     cached_teacher_head=head)


def autocast(device: torch.device, mixed_precision: bool, use_fp16: bool):
    if use_fp16:
        return torch.autocast(device.type, dtype=torch.float16)
    if mixed_precision:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def row_pairs(objective: Objective, batch: dict) -> RowPairs:
    """Rows where the hidden-state and feature terms compare the two models."""
    d = objective.distillation
    return hidden_row_pairs(batch["student"], batch["teacher"], positions=d.hidden_positions,
                            alignment=d.hidden_alignment, student_encoder_decoder=objective.train.encoder_decoder,
                            teacher_encoder_decoder=d.encoder_decoder, skip_student_eos=d.skip_student_eos)


def _row_counts(objective: Objective, rows: int) -> tuple[int, int]:
    return (rows if "hidden" in objective.active else 0,
            rows if "feature" in objective.active and rows >= 2 else 0)  # correlations need 2 rows


def count_units(objective: Objective, batch: dict, answers: Answers = Answers.DATA) -> Counts:
    """Units of every term, from labels and masks only (before any forward); sampled answers have no CE
    units, a CE_ONLY batch only those."""
    if answers is Answers.CE_ONLY:
        return Counts(int(count_logit_units(objective.spec, batch["student"]["labels"])[0]))
    teacher_labels = batch["teacher"]["labels"] if objective.uses_teacher else None
    ce, units = count_logit_units(objective.spec, batch["student"]["labels"], teacher_labels, batch_alignment(batch))
    rows = row_pairs(objective, batch).count if objective.layers is not None else 0
    return Counts(int(ce) if answers is Answers.DATA else 0, int(units), *_row_counts(objective, rows))


def teacher_forward(objective: Objective, teacher: nn.Module, batch: dict, device: torch.device):
    """The teacher's last hidden states (and, with a layer plan, its hidden states and unit attributions)."""
    t, d, layers = objective.train, objective.distillation, objective.layers
    with autocast(device, d.mixed_precision, d.use_fp16):
        return intermediate.teacher_pass(
            teacher, batch["teacher"], d.encoder_decoder, states=layers is not None,
            attribute=layers.teacher_feature_layers if "feature" in objective.active else [],
            last_layer=len(layers.teacher_sizes) - 1 if layers is not None else 0,
            attribution=d.feature_attribution, vocab_size=objective.spec.teacher_vocab_size,
            chunk_size=t.logits_chunk_size)


class CachedPass(NamedTuple):
    """What the loss engine reads of a teacher pass, from the cache: packed rows where hidden states would be."""

    head_input: torch.Tensor


def compute_terms(objective: Objective, models_: Models, batch: dict, device: torch.device,
                  answers: Answers = Answers.DATA) -> Terms:
    """Every active term of one micro-batch (on `device`), each summed over its units. SAMPLED answers: the CE
    is not computed (a zero that still reaches the student) and has no units; CE_ONLY: the CE alone, no
    teacher forward (every other term a zero without units)."""
    if answers is Answers.CE_ONLY:
        return _ce_terms(objective, models_, batch, device)
    with_ce = answers is Answers.DATA
    t, layers = objective.train, objective.layers
    teacher, teacher_head = None, None
    if objective.cached_teacher_head is not None and objective.uses_teacher:  # rows of the cache, no forward
        teacher, teacher_head = CachedPass(batch["teacher"]["cache"]), objective.cached_teacher_head
    elif objective.uses_teacher:
        teacher = teacher_forward(objective, models_.teacher, batch, device)
        teacher_head = models.output_head(models_.teacher)
    with autocast(device, t.mixed_precision, t.use_fp16):
        states = None
        if layers is None:
            student_hidden = models.forward_hidden(models_.student, batch["student"], t.encoder_decoder,
                                                   inner=models_.student_inner)
        else:
            student_hidden, states = intermediate.forward_hidden_states(
                models_.student, batch["student"], t.encoder_decoder, inner=models_.student_inner, what="student")
        logit = distillation_terms(
            objective.spec, student_hidden, batch["student"]["labels"], models.output_head(models_.student_inner),
            teacher.head_input if teacher is not None else None,
            batch["teacher"]["labels"] if teacher is not None else None,
            teacher_head, with_ce=with_ce, alignment=batch_alignment(batch))
        sums = {"ce": logit.ce_sum, "distill": logit.distill_sum}
        rows = 0
        if layers is not None:
            pairs = row_pairs(objective, batch)
            rows = pairs.count
            sums.update(_intermediate_sums(objective, models_, states, teacher, pairs))
    counts = Counts(logit.ce_count if with_ce else 0, logit.distill_count, *_row_counts(objective, rows))
    return Terms(sums, counts, logit.candidate_positions, logit.kept_positions)


def _ce_terms(objective: Objective, models_: Models, batch: dict, device: torch.device) -> Terms:
    """The student's CE on the batch's labels alone (the logit engine without teacher rows)."""
    t = objective.train
    with autocast(device, t.mixed_precision, t.use_fp16):
        student_hidden = models.forward_hidden(models_.student, batch["student"], t.encoder_decoder,
                                               inner=models_.student_inner)
        logit = distillation_terms(objective.spec, student_hidden, batch["student"]["labels"],
                                   models.output_head(models_.student_inner))
    zero = logit.ce_sum.new_zeros(())
    sums = {name: logit.ce_sum if name == "ce" else zero for name in objective.active}
    return Terms(sums, Counts(logit.ce_count))  # no paired positions: the logit term's selection is not here


def _intermediate_sums(objective: Objective, models_: Models, states, teacher, pairs: RowPairs) -> dict:
    d, layers, sums = objective.distillation, objective.layers, {}
    if "hidden" in objective.active:
        sums["hidden"] = hidden_states_sum(states, teacher.states, pairs, layers.hidden_pairs, d.hidden_distance,
                                           intermediate.projector(models_.projections))
    if "feature" in objective.active:
        units = {(s, layer): top_units(teacher.scores[layer], layers.student_sizes[s])
                 for s, layer in layers.feature_pairs}
        sums["feature"] = feature_selection_sum(states, teacher.states, pairs.student_rows, pairs.teacher_rows,
                                                layers.feature_pairs, units, d.feature_offdiag_weight)
    return sums


def combine(objective: Objective, terms: Terms, totals: Counts) -> torch.Tensor:
    """The micro-batch's share of the step's loss: each term's sum over the step's units of that term."""
    loss = None
    for name in objective.active:
        value = objective.weights[name] * terms.sums[name] / max(getattr(totals, name), 1.0)
        loss = value if loss is None else loss + value
    return loss


def describe(objective: Objective, distillation: bool) -> str:
    """The total loss in words, for the run's start-up line."""
    spec, d, layers = objective.spec, objective.distillation, objective.layers
    if not distillation:
        return "CE"
    text = f"{d.cross_entropy_factor} x CE"
    if spec.distills:
        text += f" + {objective.weights['distill']} x {spec.name}" + spec.family.describe(spec)
        if spec.selects_tokens:
            text += f" (on the top {spec.token_selection_ratio:g} of answer positions by {spec.token_selection})"
    if layers is not None and layers.hidden_pairs:
        text += f" + {d.hidden_weight} x hidden-state {d.hidden_distance}"
    if layers is not None and layers.feature_pairs:
        text += f" + {d.feature_weight} x feature correlation"
    return text
