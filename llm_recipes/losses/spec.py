"""The loss of a run, resolved and validated once: which loss, its constants, the vocabularies.

`LossSpec.from_config` is the only place that reads `distillation_config`'s loss fields: it resolves
`auto` and the alignment (llm_recipes.losses.table) and asks the loss's family for its validated
constants (one-line `UserError`s naming the flag and the fix). The run plan holds the result
(llm_recipes.config.resolve_plan); `with_artifacts` adds what the family builds of the tokenizer pair.
"""
from dataclasses import dataclass, replace
from typing import Any, Optional

from llm_recipes.errors import UserError
from llm_recipes.losses import table
from llm_recipes.losses.family import Family, PairArtifacts, choice, positive_int
from llm_recipes.losses.hybrid import HybridOptions  # noqa: F401 (the families' options, re-exported)
from llm_recipes.losses.kl import KLOptions, validate_kl  # noqa: F401
from llm_recipes.losses.multilevel_ot import MultiLevelOTOptions, validate_multilevel_ot  # noqa: F401
from llm_recipes.losses.projection import ProjectionOptions  # noqa: F401
from llm_recipes.losses.selection import TOKEN_SELECTIONS
from llm_recipes.losses.table import SFT_ONLY
from llm_recipes.losses.uld import ULDOptions  # noqa: F401


@dataclass(frozen=True)
class LossSpec:
    name: str  # a loss of the table (llm_recipes.losses.table), or "none" (SFT_ONLY)
    student_vocab_size: Optional[int] = None  # real (tokenizer) sizes; None: the logits' full width
    teacher_vocab_size: Optional[int] = None
    same_tokenizer: bool = False
    student_encoder_decoder: bool = False
    teacher_encoder_decoder: bool = False
    chunk_size: int = 1024  # answer rows per chunk (MultiLevelOT: whole sequences, up to this many rows)
    skip_student_eos: bool = True  # per-sequence losses (ULD, MultiLevelOT) only
    options: Any = None  # the family's constants (its options(): ULDOptions, KLOptions, ...)
    token_selection: str = "none"  # a TOKEN_SELECTIONS entry (llm_recipes.losses.selection)
    token_selection_ratio: float = 1.0  # fraction of each answer's paired positions kept
    alignment: str = "index"  # how answer rows pair: "index" (pair_answers) or "text" (pair_by_groups)

    @property
    def loss(self) -> Optional[table.Loss]:
        return table.LOSSES.get(self.name)

    @property
    def family(self) -> Optional[Family]:
        """What computes the term (llm_recipes.losses.family); None for SFT."""
        return self.loss.family if self.loss is not None else None

    @property
    def distills(self) -> bool:
        return self.name != SFT_ONLY

    @property
    def is_same_tokenizer_loss(self) -> bool:
        return self.loss is not None and self.loss.same_tokenizer

    @property
    def selects_tokens(self) -> bool:
        return self.token_selection != "none" and self.distills

    @property
    def per_sequence(self) -> bool:
        """A unit is a sequence (mean over its positions: ULD, MultiLevelOT); else a token."""
        return self.loss is not None and self.loss.per_sequence

    def with_artifacts(self, artifacts: PairArtifacts) -> "LossSpec":
        """This spec with what its family built of the tokenizer pair (the projection map, the shared tokens)."""
        if self.family is None:
            return self
        return replace(self, options=self.family.with_artifacts(self.options, artifacts))

    @classmethod
    def from_config(
        cls,
        distillation_config,
        *,
        name: Optional[str] = None,
        student_vocab_size: int,
        teacher_vocab_size: int,
        same_tokenizer: bool,
        student_encoder_decoder: bool = False,
        teacher_encoder_decoder: bool = False,
        chunk_size: int = 1024,
        cache=None,
        artifacts: Optional[PairArtifacts] = None,
    ) -> "LossSpec":
        """The spec of the run: `name` (default: the config's loss) resolved for the tokenizer pair and validated.
        `cache`: the teacher cache's metadata (a cached teacher fixes what ULD can compute); `artifacts`: what
        the family builds of the tokenizer pair, when already built (else `with_artifacts` later)."""
        cfg = distillation_config
        name = name if name is not None else cfg.loss
        alignment = "index"
        loss = None
        if name != SFT_ONLY:
            loss = table.resolve(name, same_tokenizer, getattr(cfg, "alignment", "auto"))
            name, alignment = loss.name, table.resolve_alignment(loss, getattr(cfg, "alignment", "auto"),
                                                                 same_tokenizer)
            if loss.same_tokenizer and student_vocab_size != teacher_vocab_size:
                raise UserError(
                    f"same_tokenizer is set but the tokenizers have {student_vocab_size} and "
                    f"{teacher_vocab_size} tokens; use --distillation_config.loss "
                    f"{' or '.join(table.cross_tokenizer_losses())}")
        positive_int("--logits_chunk_size", chunk_size)
        options = loss.family.options(loss, cfg, cache) if loss is not None else None
        selection = getattr(cfg, "token_selection", "none") if loss is not None else "none"
        ratio = getattr(cfg, "token_selection_ratio", 1.0)
        validate_token_selection(loss, selection, ratio)
        spec = cls(
            name=name,
            student_vocab_size=int(student_vocab_size),
            teacher_vocab_size=int(teacher_vocab_size),
            same_tokenizer=bool(same_tokenizer),
            student_encoder_decoder=bool(student_encoder_decoder),
            teacher_encoder_decoder=bool(teacher_encoder_decoder),
            chunk_size=int(chunk_size),
            skip_student_eos=bool(cfg.skip_student_eos),
            options=options,
            token_selection=selection,
            token_selection_ratio=float(ratio),
            alignment=alignment,
        )
        return spec.with_artifacts(artifacts) if artifacts is not None else spec


def validate_token_selection(loss: Optional[table.Loss], selection: str, ratio) -> None:
    choice("token_selection", selection, TOKEN_SELECTIONS)
    if selection == "none":
        return
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
        raise UserError(f"--distillation_config.token_selection_ratio must be in (0, 1], got {ratio!r}")
    if selection == "divergence" and loss is not None and not loss.family.scores_positions:
        what = (loss.family.no_position_scores
                or f"the {loss.name} loss's per-position value is not implemented as a score")
        raise UserError(f"--distillation_config.token_selection divergence scores positions by the loss's own value; "
                        f"{what}: use teacher_entropy, student_entropy or student_ce")
