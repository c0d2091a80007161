"""The loss-family protocol: everything the trainer needs to know about a family of logit losses.

A family (ULD, MultiLevelOT, the KL family, the projected teacher, the hybrid) is one module holding its
arithmetic and one `Family` object; the loss table (llm_recipes.losses.table) maps every
`--distillation_config.loss` name to a family. The engine, the objective, the trainer, the pre-flight
checks and the benchmarks only call the methods below: none of them asks which family it holds.

What a family says:
- its constants, read from distillation_config and validated once (`options`, one-line UserErrors);
- how it pairs answer tokens: which alignments it accepts (`alignments`), whether every served student
  row is paired through the projection map (`uses_nodes`);
- what it builds once per tokenizer pair (`artifacts`, then `with_artifacts`: the projection map, the
  shared tokens), cached on disk by the tokenizers' content;
- its unit (`per_sequence`: the mean over a sequence's paired positions, else one answer token) and
  how the engine cuts its rows into chunks (`chunks`: MultiLevelOT needs whole sequences);
- its term for one chunk of rows (`terms`), from live teacher logits or a teacher cache's rows (the
  teacher head decides which: `ChunkBatch.teacher_logits`);
- its per-position value for token selection (`position_scores`), or why it has none;
- which temperature the teacher's distribution is taken at (`teacher_temperature_field`: a teacher cache
  must hold log-probabilities at that one), and how the run's first lines describe it (`describe`).

A new family subclasses `Family`. The simplest one overrides `row_values` only: a differentiable
per-row value of fp32 student and teacher logits, which the default `terms` adds to the CE.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional, Tuple

import torch

from llm_recipes.errors import UserError
from llm_recipes.losses.cross_entropy import cross_entropy_sum
from llm_recipes.losses.pairing import Pairing, check_head_width

Head = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class PairArtifacts:
    """What a family builds once per tokenizer pair (llm_recipes.alignment)."""

    projection_map: object = None  # alignment.ProjectionMap: the projected teacher (and the data's trie nodes)
    shared_tokens: Optional[tuple] = None  # (teacher ids, student ids) with the same text: the hybrid
    end_tokens: Optional[tuple] = None  # (teacher EOS ids, student EOS id): the end of an answer on both sides
    summary: str = ""  # one line for the run's start-up report


class Chunk(NamedTuple):
    start: int  # rows [start, end) of the gathered student rows
    end: int
    paired: int  # the first `paired` rows of the chunk have a teacher partner (same offsets)
    lengths: Tuple[int, ...] = ()  # whole-sequence chunks: paired rows per sequence in the chunk


def own(x: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """x, or a copy when it shares memory with `source` (an identity head returns its input rows), for a
    computation that overwrites the buffers it is given."""
    return x.clone() if x.untyped_storage().data_ptr() == source.untyped_storage().data_ptr() else x


def row_chunks(first: int, rows: int, paired: int, size: int) -> list[Chunk]:
    """Rows [first, rows) in chunks of `size`; the rows below `paired` have a teacher partner."""
    return [Chunk(start, min(start + size, rows), max(0, min(start + size, rows, paired) - start))
            for start in range(first, rows, size)]


class Continuation(NamedTuple):
    """projected_continuation's inputs of a micro-batch, per paired row [P] (-1: none), from the Pairing: the trie
    node continuing the previous group, that group's first teacher token and the flat teacher row predicting it;
    the paired rows' own flat teacher rows (sorted); the previous rows' teacher hidden states [M, H_t] and each
    paired row's index into them; the previous group's other teacher tokens [K] (their rows' hidden states
    [K, H_t], the tokens, the paired row each belongs to)."""

    nodes: torch.Tensor
    previous_ids: torch.Tensor
    previous_rows: torch.Tensor
    teacher_row_ids: torch.Tensor
    hidden: torch.Tensor
    index: torch.Tensor
    inner_hidden: torch.Tensor
    inner_ids: torch.Tensor
    inner_units: torch.Tensor


@dataclass
class ChunkBatch:
    """Everything a chunk's term needs besides its student logits (built by the engine per micro-batch)."""

    spec: object  # the LossSpec
    student_head: Head
    targets: torch.Tensor  # [N] the token each student row predicts
    max_target: int
    teacher_rows: Optional[torch.Tensor]  # [P, H_t] hidden rows of the teacher (or a cache's packed rows), no grad
    teacher_head: Optional[Head]
    row_weights: Optional[torch.Tensor]  # [P] fp32: 1/m_b (per-sequence unit), 1 (per token)
    nodes: Optional[torch.Tensor]  # [P] long: projection-map node of each paired row (uses_nodes)
    with_ce: bool
    plans: dict  # chunk start -> plan, from a checkpointed chunk's first pass to its recompute
    continuation: Optional[Continuation] = None  # projected_continuation (the engine fills it when the pairing has it)

    @property
    def options(self):
        return self.spec.options

    def weights(self, chunk: Chunk) -> torch.Tensor:
        return self.row_weights[chunk.start:chunk.start + chunk.paired]

    def student_vocab(self, z: torch.Tensor) -> int:
        """The student's real vocabulary (checked against the logits' width: padding rows are allowed)."""
        vocab = self.spec.student_vocab_size or z.shape[-1]
        check_head_width(z.shape[-1], vocab, "student")
        return vocab

    def teacher_logits(self, chunk: Chunk, student: Optional[torch.Tensor] = None) -> torch.Tensor:
        """fp32 teacher logits [paired, V_t] of the chunk's paired rows, without gradient. `student`: the paired
        student logits over the same vocabulary, for a cached teacher's tail (llm_recipes.teacher_cache)."""
        return self.teacher_logits_of(self.teacher_rows[chunk.start:chunk.start + chunk.paired], student)

    def teacher_logits_of(self, rows: torch.Tensor, student: Optional[torch.Tensor] = None) -> torch.Tensor:
        """fp32 teacher logits [n, V_t] of teacher hidden rows [n, H_t] (see `teacher_logits`)."""
        with torch.no_grad():
            takes_student = student is not None and getattr(self.teacher_head, "takes_student", False)
            t_logits = self.teacher_head(rows, student) if takes_student else self.teacher_head(rows)
            vocab_t = self.spec.teacher_vocab_size or t_logits.shape[-1]
            check_head_width(t_logits.shape[-1], vocab_t, "teacher")
            return t_logits[:, :vocab_t].float()

    def plan(self, chunk: Chunk, keep: bool, make: Callable):
        """The chunk's plan (sorts, rankings, the teacher's side). `keep` (a checkpointed chunk): kept by its
        first pass and taken back by backward's recompute of the chunk, so it is computed once."""
        plan = self.plans.pop(chunk.start, None)
        if plan is None:
            plan = make()
            if keep:
                self.plans[chunk.start] = plan
        return plan


class Family:
    """A loss family: the defaults below suit a per-token family compared on paired rows by text or index."""

    name = ""  # for messages
    per_sequence = False  # unit: a sequence (the mean over its paired positions), else one answer token
    alignments = ("index", "text")  # how it can pair answer tokens across tokenizers (table.ALIGNMENTS)
    uses_nodes = False  # text pairing pairs every served student row through the projection map's nodes
    consumes_logits = False  # `terms` overwrites its logits buffer (the engine then never passes its input)
    teacher_temperature_field = "temperature"  # the distillation_config field the teacher's distribution uses
    scores_positions = False  # `position_scores` gives token selection's "divergence" score
    no_position_scores = ""  # why not, when it does not ("" : a generic reason)
    reads: tuple = ()  # the distillation_config fields `options` reads (a given one no active family reads is refused)

    def options(self, loss, cfg, cache=None):
        """The family's constants for the table row `loss` from distillation_config `cfg`, validated
        (one-line UserErrors). `cache`: teacher_cache.CacheMeta when the teacher comes from a cache."""
        return None

    def artifacts(self, student_tokenizer, teacher_tokenizer) -> PairArtifacts:
        """What the family needs of the tokenizer pair, built (or read from its on-disk cache) once per run."""
        return PairArtifacts()

    def with_artifacts(self, options, artifacts: PairArtifacts):
        """`options` completed with the pair's artifacts."""
        return options

    def chunks(self, pairing: Pairing, size: int) -> list[Chunk]:
        """The micro-batch's gathered rows in chunks of at most `size` rows (paired rows first)."""
        return row_chunks(0, pairing.ce_count, pairing.num_paired, size)

    def terms(self, batch: ChunkBatch, chunk: Chunk, checkpointed: bool, z: torch.Tensor, targets: torch.Tensor):
        """(CE summed over the chunk's rows, the term summed over its paired rows' units) from the chunk's fp32
        student logits `z` [rows, W] (chunk.paired > 0). `checkpointed`: backward will run this again (keep
        non-differentiable work in `batch.plan`)."""
        ce = cross_entropy_sum(z, targets) if batch.with_ce else z[:0].sum()
        zs = z[: chunk.paired, : batch.student_vocab(z)]
        values = self.row_values(zs, batch.teacher_logits(chunk), batch.options)
        return ce, (batch.weights(chunk) * values).sum()

    def row_values(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, options) -> torch.Tensor:
        """[n] differentiable value of each paired row, from fp32 logits [n, V_s] and [n, V_t] (no grad)."""
        raise NotImplementedError(f"the {self.name} family defines neither terms nor row_values")

    def position_scores(self, options, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        """Token selection's "divergence" score of each paired row (no gradient), when `scores_positions`."""
        raise NotImplementedError(f"the {self.name} family has no per-position value")

    def continues_groups(self, options) -> bool:
        """Whether the data gives every student token that starts a text group the trie node continuing the
        previous group (`continuation_node`: the projected teacher's --distillation_config.projected_continuation)."""
        return False

    def describe(self, spec) -> str:
        """Words after the loss's name in the run's start-up line ("" for none)."""
        return ""


def distills_eos(cfg) -> bool:
    """--distillation_config.distill_eos as resolved: None means on exactly when steps can be on-policy (lmbda > 0),
    since a sampled answer then learns when to stop from the teacher alone."""
    return on_when_on_policy(cfg, "distill_eos")


def on_when_on_policy(cfg, field: str) -> bool:
    """A distillation_config switch whose None means: on exactly when steps can be on-policy (lmbda > 0)."""
    chosen = getattr(cfg, field, None)
    return bool(chosen) if chosen is not None else getattr(cfg, "lmbda", 0.0) > 0


# --------------------------------------------------------------------------- option checks (one-line errors)
def positive(field: str, value) -> None:
    if not (isinstance(value, (int, float)) and value > 0):
        raise UserError(f"--distillation_config.{field} must be > 0, got {value!r}")


def non_negative(field: str, value) -> None:
    if not value >= 0:
        raise UserError(f"--distillation_config.{field} must be >= 0, got {value}")


def positive_int(flag: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{flag} must be a positive integer, got {value!r}")


def non_negative_int(field: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise UserError(f"--distillation_config.{field} must be an integer >= 0, got {value!r}")


def choice(field: str, value, choices) -> None:
    if value not in choices:
        raise UserError(f"--distillation_config.{field} must be one of {', '.join(choices)}, got {value!r}")
