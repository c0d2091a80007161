"""The loss of a run, resolved and validated once: which loss, its constants, the vocabularies.

`LossSpec.from_config` is the only place that reads `distillation_config`'s loss fields and the
only place that rejects bad values (one-line `UserError`s naming the flag and the fix). Which
losses exist, their families and defaults: llm_recipes.losses.table.
"""
from dataclasses import dataclass
from typing import Optional, Union

from llm_recipes.errors import UserError
from llm_recipes.losses import table
from llm_recipes.losses.hybrid import HybridOptions
from llm_recipes.losses.multilevel_ot import LOGIT_NORMS, MODES, RANKINGS, SL_FORMS, MultiLevelOTOptions
from llm_recipes.losses.projection import Projection, ProjectionOptions
from llm_recipes.losses.selection import TOKEN_SELECTIONS
from llm_recipes.losses.table import SFT_ONLY


@dataclass(frozen=True)
class ULDOptions:
    student_temperature: float = 1.0
    teacher_temperature: float = 1.0
    top_k: int = 0  # 0 = exact (full sort)


@dataclass(frozen=True)
class KLOptions:
    kind: str = "forward"  # a divergence kind of the loss table (table.DIVERGENCE_KINDS)
    temperature: float = 1.0
    beta: float = 0.5  # jsd
    alpha: float = 0.1  # skew_forward / skew_reverse


Options = Union[ULDOptions, MultiLevelOTOptions, KLOptions, ProjectionOptions, HybridOptions, None]


@dataclass(frozen=True)
class LossSpec:
    name: str  # a loss of the table (llm_recipes.losses.table), or "none" (SFT_ONLY)
    student_vocab_size: Optional[int] = None  # real (tokenizer) sizes; None: the logits' full width
    teacher_vocab_size: Optional[int] = None
    same_tokenizer: bool = False
    student_encoder_decoder: bool = False
    teacher_encoder_decoder: bool = False
    chunk_size: int = 1024  # answer rows per chunk (MultiLevelOT: whole sequences, up to this many rows)
    skip_student_eos: bool = True  # ULD / MultiLevelOT only
    options: Options = None
    token_selection: str = "none"  # a TOKEN_SELECTIONS entry (llm_recipes.losses.selection)
    token_selection_ratio: float = 1.0  # fraction of each answer's paired positions kept
    alignment: str = "index"  # how answer rows pair: "index" (pair_answers) or "text" (pair_by_groups)

    @property
    def loss(self) -> Optional[table.Loss]:
        return table.LOSSES.get(self.name)

    @property
    def family(self) -> str:
        """The table's family of the loss ("uld", "multilevel_ot", "divergence", "projection", "hybrid"), "none"
        for SFT."""
        return self.loss.family if self.loss is not None else SFT_ONLY

    @property
    def is_same_tokenizer_loss(self) -> bool:
        return self.loss is not None and self.loss.same_tokenizer

    @property
    def selects_tokens(self) -> bool:
        return self.token_selection != "none" and self.name != SFT_ONLY

    @property
    def per_sequence(self) -> bool:
        """A unit is a sequence (mean over its positions: ULD, MultiLevelOT); else a token."""
        return self.loss is not None and self.loss.per_sequence

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
        projection: Optional[Projection] = None,
        shared_tokens: Optional[tuple] = None,
    ) -> "LossSpec":
        """The spec of the run. `projection` (the projected loss) and `shared_tokens` ((teacher ids, student ids),
        the hybrid loss) are built once per tokenizer pair (llm_recipes.alignment)."""
        cfg = distillation_config
        name = name if name is not None else cfg.loss
        alignment = "index"
        if name != SFT_ONLY:
            loss = table.resolve(name, same_tokenizer, getattr(cfg, "alignment", "auto"))
            name, alignment = loss.name, table.resolve_alignment(loss, getattr(cfg, "alignment", "auto"),
                                                                 same_tokenizer)
            if loss.same_tokenizer and student_vocab_size != teacher_vocab_size:
                raise UserError(
                    f"same_tokenizer is set but the tokenizers have {student_vocab_size} and "
                    f"{teacher_vocab_size} tokens; use --distillation_config.loss "
                    f"{' or '.join(table.CROSS_TOKENIZER_LOSSES)}")
        _positive_int("--logits_chunk_size", chunk_size)
        options = _options(name, cfg, projection, shared_tokens)
        selection = getattr(cfg, "token_selection", "none") if name != SFT_ONLY else "none"
        ratio = getattr(cfg, "token_selection_ratio", 1.0)
        validate_token_selection(name, selection, ratio)
        return cls(
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


def _options(name: str, cfg, projection: Optional[Projection] = None, shared_tokens: Optional[tuple] = None) -> Options:
    family = table.LOSSES[name].family if name in table.LOSSES else SFT_ONLY
    if family == "uld":
        _positive("student_temperature", cfg.student_temperature)
        _positive("teacher_temperature", cfg.teacher_temperature)
        _non_negative_int("uld_top_k", cfg.uld_top_k)
        return ULDOptions(float(cfg.student_temperature), float(cfg.teacher_temperature), int(cfg.uld_top_k))
    if family == "multilevel_ot":
        opts = MultiLevelOTOptions(
            mode=cfg.multilevel_ot_mode,
            top_k=cfg.top_k,
            sl_weight=float(cfg.sl_weight),
            sd_weight=float(cfg.sd_weight),
            sl_temperature=float(cfg.sl_temperature),
            sd_temperature=float(cfg.sd_temperature),
            sinkhorn_reg=float(cfg.sinkhorn_reg),
            sinkhorn_iters=cfg.sinkhorn_iters,
            student_temperature=float(cfg.student_temperature),
            teacher_temperature=float(cfg.teacher_temperature),
            ranking=cfg.multilevel_ot_ranking,
            logit_norm=cfg.multilevel_ot_logit_norm,
            sl_form=cfg.multilevel_ot_sl_form,
            sd_scale=float(cfg.sd_scale),
        )
        validate_multilevel_ot(opts)
        return opts
    if family == "divergence":
        opts = KLOptions(table.LOSSES[name].divergence, float(cfg.temperature), float(cfg.jsd_beta),
                         float(cfg.skew_alpha))
        validate_kl(opts)
        return opts
    if family == "projection":
        _choice("projected_divergence", cfg.projected_divergence, table.PROJECTED_DIVERGENCES)
        opts = ProjectionOptions(table.LOSSES[cfg.projected_divergence].divergence, float(cfg.temperature),
                                 float(cfg.jsd_beta), float(cfg.skew_alpha), projection)
        validate_kl(KLOptions(opts.kind, opts.temperature, opts.beta, opts.alpha))
        if projection is None:
            raise ValueError("the projected loss needs the tokenizer pair's projection map (llm_recipes.alignment)")
        return opts
    if family == "hybrid":
        validate_kl(KLOptions("jsd", float(cfg.temperature), float(cfg.jsd_beta)))
        for field in ("hybrid_matched_weight", "hybrid_unmatched_weight"):
            if getattr(cfg, field) is not None and not getattr(cfg, field) >= 0:
                raise UserError(f"--distillation_config.{field} must be >= 0, got {getattr(cfg, field)}")
        if shared_tokens is None:
            raise ValueError("the hybrid loss needs the tokens the two vocabularies share (llm_recipes.alignment)")
        return HybridOptions(float(cfg.temperature), float(cfg.jsd_beta), cfg.hybrid_matched_weight,
                             cfg.hybrid_unmatched_weight, shared_tokens[0], shared_tokens[1])
    return None


def validate_multilevel_ot(opts: MultiLevelOTOptions) -> None:
    _choice("multilevel_ot_mode", opts.mode, MODES)
    _choice("multilevel_ot_ranking", opts.ranking, RANKINGS)
    _choice("multilevel_ot_logit_norm", opts.logit_norm, LOGIT_NORMS)
    _choice("multilevel_ot_sl_form", opts.sl_form, SL_FORMS)
    if opts.ranking == "token" and opts.mode == "greedy":
        raise UserError(
            "multilevel_ot_mode greedy (--f 2) matches columns over a sequence and needs "
            "--distillation_config.multilevel_ot_ranking sequence"
        )
    _positive_int("--distillation_config.top_k", opts.top_k)
    _positive_int("--distillation_config.sinkhorn_iters", opts.sinkhorn_iters)
    for field in ("sl_temperature", "sd_temperature", "sinkhorn_reg", "student_temperature", "teacher_temperature"):
        _positive(field, getattr(opts, field))
    for field in ("sl_weight", "sd_weight", "sd_scale"):
        if not getattr(opts, field) >= 0:
            raise UserError(f"--distillation_config.{field} must be >= 0, got {getattr(opts, field)}")


def validate_token_selection(name: str, selection: str, ratio) -> None:
    _choice("token_selection", selection, TOKEN_SELECTIONS)
    if selection == "none":
        return
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
        raise UserError(f"--distillation_config.token_selection_ratio must be in (0, 1], got {ratio!r}")
    if selection == "divergence" and name in table.LOSSES and table.LOSSES[name].family not in ("uld", "divergence"):
        what = {"multilevel_ot": "MultiLevelOT (per-sequence ranking and transport) has no per-position value"}.get(
            name, f"the {name} loss's per-position value is not implemented as a score")
        raise UserError(f"--distillation_config.token_selection divergence scores positions by the loss's own value; "
                        f"{what}: use teacher_entropy, student_entropy or student_ce")


def validate_kl(opts: KLOptions) -> None:
    """The KL family's constants; each is checked only for the kinds that read it."""
    _positive("temperature", opts.temperature)
    if opts.kind == "jsd" and not 0 < opts.beta < 1:
        raise UserError(
            f"--distillation_config.jsd_beta (loss jsd) must be strictly between 0 and 1, got {opts.beta} "
            f"(beta -> 0 and 1 are the plain divergences: use loss kl or reverse_kl)"
        )
    if opts.kind in ("skew_forward", "skew_reverse") and not 0 <= opts.alpha < 1:
        raise UserError(f"--distillation_config.skew_alpha (losses skew_kl, skew_reverse_kl) must be in [0, 1), "
                        f"got {opts.alpha}")


def _positive(field, value):
    if not (isinstance(value, (int, float)) and value > 0):
        raise UserError(f"--distillation_config.{field} must be > 0, got {value!r}")


def _positive_int(flag, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{flag} must be a positive integer, got {value!r}")


def _non_negative_int(field, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise UserError(f"--distillation_config.{field} must be an integer >= 0, got {value!r}")


def _choice(field, value, choices):
    if value not in choices:
        raise UserError(f"--distillation_config.{field} must be one of {', '.join(choices)}, got {value!r}")
