"""The loss of a run, resolved and validated once: which loss, its constants, the vocabularies.

`LossSpec.from_config` is the only place that reads `distillation_config`'s loss fields and the
only place that rejects bad values (one-line `UserError`s naming the flag and the fix).
"""
from dataclasses import dataclass
from typing import Optional, Union

from llm_recipes.errors import UserError
from llm_recipes.losses.multilevel_ot import LOGIT_NORMS, MODES, RANKINGS, SL_FORMS, MultiLevelOTOptions
from llm_recipes.losses.selection import TOKEN_SELECTIONS

# names accepted by --distillation_config.loss ("auto" is resolved by `resolve_loss_name`)
SAME_TOKENIZER_LOSSES = {
    "kl": "forward",
    "reverse_kl": "reverse",
    "jsd": "jsd",
    "skew_kl": "skew_forward",
    "skew_reverse_kl": "skew_reverse",
    "tvd": "tvd",
}
CROSS_TOKENIZER_LOSSES = ("uld", "multilevel_ot")
LOSS_NAMES = ("auto",) + CROSS_TOKENIZER_LOSSES + tuple(SAME_TOKENIZER_LOSSES)
SFT_ONLY = "none"  # no teacher term: cross-entropy only


@dataclass(frozen=True)
class ULDOptions:
    student_temperature: float = 1.0
    teacher_temperature: float = 1.0
    top_k: int = 0  # 0 = exact (full sort)


@dataclass(frozen=True)
class KLOptions:
    kind: str = "forward"  # a value of SAME_TOKENIZER_LOSSES
    temperature: float = 1.0
    beta: float = 0.5  # jsd
    alpha: float = 0.1  # skew_forward / skew_reverse


Options = Union[ULDOptions, MultiLevelOTOptions, KLOptions, None]


def resolve_loss_name(name: str, same_tokenizer: bool) -> str:
    """'auto' -> 'kl' when the two models share a tokenizer, else 'uld'."""
    if name == "auto":
        return "kl" if same_tokenizer else "uld"
    return name


@dataclass(frozen=True)
class LossSpec:
    name: str  # a LOSS_NAMES entry other than "auto", or "none"
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

    @property
    def is_same_tokenizer_loss(self) -> bool:
        return self.name in SAME_TOKENIZER_LOSSES

    @property
    def selects_tokens(self) -> bool:
        return self.token_selection != "none" and self.name != SFT_ONLY

    @property
    def per_sequence(self) -> bool:
        """ULD / MultiLevelOT: a unit is a sequence (mean over its positions); else a token."""
        return self.name in CROSS_TOKENIZER_LOSSES

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
    ) -> "LossSpec":
        cfg = distillation_config
        name = resolve_loss_name(name if name is not None else cfg.loss, same_tokenizer)
        valid = LOSS_NAMES + (SFT_ONLY,)
        if name not in valid:
            raise UserError(f"unknown loss {name!r}: --distillation_config.loss must be one of {', '.join(LOSS_NAMES)}")
        _positive_int("--logits_chunk_size", chunk_size)
        if name in SAME_TOKENIZER_LOSSES:
            if not same_tokenizer:
                raise UserError(
                    f"loss {name!r} compares the two models token by token and needs one tokenizer, but "
                    f"student and teacher tokenizers differ; use --distillation_config.loss uld or multilevel_ot"
                )
            if student_vocab_size != teacher_vocab_size:
                raise UserError(
                    f"same_tokenizer is set but the tokenizers have {student_vocab_size} and "
                    f"{teacher_vocab_size} tokens; use --distillation_config.loss uld or multilevel_ot"
                )
        options = _options(name, cfg)
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
        )


def _options(name: str, cfg) -> Options:
    if name == "uld":
        _positive("student_temperature", cfg.student_temperature)
        _positive("teacher_temperature", cfg.teacher_temperature)
        _non_negative_int("uld_top_k", cfg.uld_top_k)
        return ULDOptions(float(cfg.student_temperature), float(cfg.teacher_temperature), int(cfg.uld_top_k))
    if name == "multilevel_ot":
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
    if name in SAME_TOKENIZER_LOSSES:
        opts = KLOptions(SAME_TOKENIZER_LOSSES[name], float(cfg.temperature), float(cfg.jsd_beta), float(cfg.skew_alpha))
        validate_kl(opts)
        return opts
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
    if selection == "divergence" and name == "multilevel_ot":
        raise UserError("--distillation_config.token_selection divergence needs a per-position loss value, which "
                        "MultiLevelOT (per-sequence ranking and transport) does not have: use teacher_entropy, "
                        "student_entropy or student_ce")


def validate_kl(opts: KLOptions) -> None:
    _positive("temperature", opts.temperature)
    if not 0 < opts.beta < 1:
        raise UserError(
            f"--distillation_config.jsd_beta must be strictly between 0 and 1, got {opts.beta} "
            f"(beta -> 0 and 1 are the plain divergences: use loss kl or reverse_kl)"
        )
    if not 0 <= opts.alpha < 1:
        raise UserError(f"--distillation_config.skew_alpha must be in [0, 1), got {opts.alpha}")


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
