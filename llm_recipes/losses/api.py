"""Public loss functions on full logits (stable API, documented in docs/losses.md and the README): one per family.

Each returns the distillation term as a 0-d fp32 tensor: distill_sum / distill_count of the
trainer's engine (per-sequence mean then batch mean for ULD / MultiLevelOT, mean over answer tokens
for the KL family, the projected teacher and the hybrid), 0 when nothing is paired. They run the same
chunked code as the trainer, with the logits as "hidden states" and the identity as output layer, so
both always agree. `projected_loss` and `hybrid_loss` pair the answers by text: they take the two
tokenizers and align the answers the label ids spell (llm_recipes.alignment), as the data pipeline does.
"""
from typing import Optional

import torch

from llm_recipes.errors import UserError
from llm_recipes.losses.engine import DistillationTerms, distillation_terms
from llm_recipes.losses.multilevel_ot import MultiLevelOTOptions
from llm_recipes.losses import table
from llm_recipes.losses.spec import KLOptions, LossSpec, ULDOptions, validate_kl, validate_multilevel_ot

DEFAULT_CHUNK_SIZE = 1024


def _identity(rows: torch.Tensor) -> torch.Tensor:
    return rows


def _mean(terms: DistillationTerms) -> torch.Tensor:
    if terms.distill_count == 0:
        return terms.distill_sum * 0.0
    return terms.distill_sum / terms.distill_count


def _shared_vocabulary(tokenizers: tuple, vocab_size: Optional[int]) -> int:
    """The number of ids both tokenizers map to the same tokens (checked), or a UserError naming the first
    id that differs."""
    student, teacher = tokenizers
    s_vocab, t_vocab = student.get_vocab(), teacher.get_vocab()
    if s_vocab != t_vocab:
        s_of, t_of = {i: tok for tok, i in s_vocab.items()}, {i: tok for tok, i in t_vocab.items()}
        first = min(i for i in set(s_of) | set(t_of) if s_of.get(i) != t_of.get(i))
        raise UserError(f"the student and teacher tokenizers differ (id {first} is {s_of.get(first)!r} for the student "
                        f"and {t_of.get(first)!r} for the teacher): a same-tokenizer divergence would compare "
                        "unrelated tokens; use a cross-tokenizer loss (uld_loss, multilevel_ot_loss)")
    size = len(student)
    if vocab_size is not None and vocab_size != size:
        raise UserError(f"vocab_size={vocab_size} is not the tokenizers' length {size}: leave vocab_size out")
    return size


def _check_chunk_size(chunk_size) -> None:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise UserError(f"chunk_size must be a positive integer (rows per chunk), got {chunk_size!r}")


def _check_logits(name, logits, labels):
    if logits.dim() != 3 or not logits.is_floating_point():
        raise UserError(f"{name} must be a float tensor [batch, seq, vocab], got {tuple(logits.shape)} {logits.dtype}")
    if labels.shape != logits.shape[:2]:
        raise UserError(f"{name} {tuple(logits.shape)} and its labels {tuple(labels.shape)} differ in [batch, seq]")


def uld_loss(
    student_logits: torch.Tensor,
    student_labels: torch.Tensor,
    teacher_logits: torch.Tensor,
    teacher_labels: torch.Tensor,
    *,
    student_temperature: float = 1.0,
    teacher_temperature: float = 1.0,
    skip_student_eos: bool = True,
    encoder_decoder: bool = False,
    top_k: int = 0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """Universal Logit Distillation: mean over sequences of the mean over paired answer positions of
    sum_i |sort(q)_i - sort(p)_i|. `top_k > 0`: the faster top-k approximation (a lower bound)."""
    _check_logits("student_logits", student_logits, student_labels)
    _check_logits("teacher_logits", teacher_logits, teacher_labels)
    for field, value in (("student_temperature", student_temperature), ("teacher_temperature", teacher_temperature)):
        if not value > 0:
            raise UserError(f"{field} must be > 0, got {value}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise UserError(f"top_k must be an integer >= 0, got {top_k!r}")
    _check_chunk_size(chunk_size)
    spec = LossSpec(
        "uld",
        student_encoder_decoder=encoder_decoder,
        teacher_encoder_decoder=encoder_decoder,
        chunk_size=chunk_size,
        skip_student_eos=skip_student_eos,
        options=ULDOptions(float(student_temperature), float(teacher_temperature), top_k),
    )
    return _mean(distillation_terms(spec, student_logits, student_labels, _identity,
                                    teacher_logits, teacher_labels, _identity, with_ce=False))


def multilevel_ot_loss(
    student_logits: torch.Tensor,
    student_labels: torch.Tensor,
    teacher_logits: torch.Tensor,
    teacher_labels: torch.Tensor,
    *,
    mode: str = "fast",
    top_k: int = 50,
    sl_weight: float = 0.1,
    sd_weight: float = 0.1,
    sl_temperature: float = 1.0,
    sd_temperature: float = 2.0,
    sinkhorn_reg: float = 0.1,
    sinkhorn_iters: int = 20,
    skip_student_eos: bool = True,
    encoder_decoder: bool = False,
    student_temperature: float = 1.0,
    teacher_temperature: float = 1.0,
    ranking: str = "sequence",
    logit_norm: str = "none",
    sl_form: str = "paper",
    sd_scale: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """MultiLevelOT: mean over sequences of mean_l(HAD_l + sl_weight SL_l) + sd_weight sd_scale SD.
    Defaults are the paper's; `logit_norm="std"`, `sl_form="public"`, `sd_scale=0.001`,
    `sinkhorn_iters=10`, `ranking="token"` reproduce the public code's variants (docs/losses.md)."""
    _check_logits("student_logits", student_logits, student_labels)
    _check_logits("teacher_logits", teacher_logits, teacher_labels)
    opts = MultiLevelOTOptions(mode, top_k, sl_weight, sd_weight, sl_temperature, sd_temperature, sinkhorn_reg,
                               sinkhorn_iters, student_temperature, teacher_temperature, ranking, logit_norm,
                               sl_form, sd_scale)
    validate_multilevel_ot(opts)
    _check_chunk_size(chunk_size)
    spec = LossSpec(
        "multilevel_ot",
        student_encoder_decoder=encoder_decoder,
        teacher_encoder_decoder=encoder_decoder,
        chunk_size=chunk_size,
        skip_student_eos=skip_student_eos,
        options=opts,
    )
    return _mean(distillation_terms(spec, student_logits, student_labels, _identity,
                                    teacher_logits, teacher_labels, _identity, with_ce=False))


def kl_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    kind: str = "forward",
    temperature: float = 1.0,
    beta: float = 0.5,
    skew: float = 0.1,
    encoder_decoder: bool = False,
    vocab_size: Optional[int] = None,
    tokenizers: Optional[tuple] = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """Same-tokenizer divergence (kind: forward | reverse | jsd | skew_forward | skew_reverse | tvd)
    times T^2, mean over the answer tokens of the batch. Both logits share `labels`.

    Logits whose widths differ (padding rows of one tokenizer: 151,936 vs 152,064) are compared on their
    first `vocab_size` columns, which is only meaningful when both tokenizers give those ids the same
    tokens: pass `tokenizers=(student_tokenizer, teacher_tokenizer)` and it is checked (`vocab_size`
    defaults to their length). Different tokenizers are refused: use a cross-tokenizer loss."""
    _check_logits("student_logits", student_logits, labels)
    _check_logits("teacher_logits", teacher_logits, labels)
    if kind not in table.DIVERGENCE_KINDS:
        raise UserError(f"unknown kind {kind!r}; expected one of {', '.join(table.DIVERGENCE_KINDS)}")
    _check_chunk_size(chunk_size)
    widths = (student_logits.shape[-1], teacher_logits.shape[-1])
    if tokenizers is not None:
        vocab_size = _shared_vocabulary(tokenizers, vocab_size)
    elif vocab_size is not None and widths[0] != widths[1]:
        raise UserError(
            f"vocab_size={vocab_size} compares the first {vocab_size} ids of logits of widths {widths}, which is only "
            "right when both tokenizers give those ids the same tokens: pass tokenizers=(student_tokenizer, "
            "teacher_tokenizer) to check it, or use a cross-tokenizer loss (uld_loss, multilevel_ot_loss)")
    if vocab_size is None and widths[0] != widths[1]:
        raise UserError(
            f"student and teacher logits have different widths {widths}: if they share a tokenizer and differ "
            f"only by padding rows pass tokenizers=(student_tokenizer, teacher_tokenizer); for different "
            f"tokenizers use uld_loss or multilevel_ot_loss"
        )
    if vocab_size is not None and not 0 < vocab_size <= min(widths):
        raise UserError(f"vocab_size={vocab_size} must be in [1, {min(widths)}] (the narrower logits' width)")
    opts = KLOptions(kind, float(temperature), float(beta), float(skew))
    validate_kl(opts)
    spec = LossSpec(
        table.by_divergence(kind).name,
        student_vocab_size=vocab_size,
        teacher_vocab_size=vocab_size,
        same_tokenizer=True,
        student_encoder_decoder=encoder_decoder,
        teacher_encoder_decoder=encoder_decoder,
        chunk_size=chunk_size,
        skip_student_eos=False,
        options=opts,
    )
    return _mean(distillation_terms(spec, student_logits, labels, _identity, teacher_logits, labels, _identity,
                                    with_ce=False))


def _text_spec(name: str, tokenizers: tuple, config: dict, encoder_decoder: bool, chunk_size: int, artifacts):
    from configs.distillation import distillation_config

    _check_chunk_size(chunk_size)
    student, teacher = tokenizers
    return LossSpec.from_config(distillation_config(loss=name, **config), name=name, student_vocab_size=len(student),
                                teacher_vocab_size=len(teacher), same_tokenizer=False,
                                student_encoder_decoder=encoder_decoder, teacher_encoder_decoder=encoder_decoder,
                                chunk_size=chunk_size, artifacts=artifacts)


def _by_text(spec, student_logits, student_labels, teacher_logits, teacher_labels, tokenizers, projection_map=None):
    from llm_recipes.losses.label_alignment import text_alignment

    _check_logits("student_logits", student_logits, student_labels)
    _check_logits("teacher_logits", teacher_logits, teacher_labels)
    if student_labels.shape[0] != teacher_labels.shape[0]:
        raise UserError(f"student and teacher batches differ in size ({student_labels.shape[0]} vs "
                        f"{teacher_labels.shape[0]})")
    continuation = spec.family.continues_groups(spec.options)
    alignment = text_alignment(student_labels, teacher_labels, *tokenizers, projection_map, continuation=continuation)
    return _mean(distillation_terms(spec, student_logits, student_labels, _identity, teacher_logits, teacher_labels,
                                    _identity, with_ce=False, alignment=alignment))


def projected_loss(
    student_logits: torch.Tensor,
    student_labels: torch.Tensor,
    teacher_logits: torch.Tensor,
    teacher_labels: torch.Tensor,
    *,
    tokenizers: tuple,
    divergence: str = "kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    skew: float = 0.1,
    encoder_decoder: bool = False,
    projection_map=None,
    continuation: bool = False,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """The projected teacher: at every student answer token the projection serves, T^2 x `divergence` (kl, jsd,
    skew_kl, skew_reverse_kl, tvd) between the teacher's distribution carried onto the student's vocabulary and
    the student's, mean over those tokens. `tokenizers=(student_tokenizer, teacher_tokenizer)`; answers are the
    label ids (-100 elsewhere) and are paired by the text they spell. `projection_map`: the pair's map (default:
    built once and cached on disk per tokenizer pair, llm_recipes.alignment.load_or_build_map). `continuation`:
    --distillation_config.projected_continuation (group starts also hold the longer teacher tokens' mass)."""
    from llm_recipes import alignment
    from llm_recipes.losses.family import PairArtifacts

    student, teacher = tokenizers
    pmap = projection_map if projection_map is not None else alignment.load_or_build_map(teacher, student)[0]
    spec = _text_spec("projected", tokenizers, {"projected_divergence": divergence, "temperature": temperature,
                                                "jsd_beta": beta, "skew_alpha": skew,
                                                "projected_continuation": continuation},
                      encoder_decoder, chunk_size, PairArtifacts(projection_map=pmap))
    return _by_text(spec, student_logits, student_labels, teacher_logits, teacher_labels, tokenizers, pmap)


def hybrid_loss(
    student_logits: torch.Tensor,
    student_labels: torch.Tensor,
    teacher_logits: torch.Tensor,
    teacher_labels: torch.Tensor,
    *,
    tokenizers: tuple,
    temperature: float = 1.0,
    beta: float = 0.5,
    matched_weight: Optional[float] = None,
    unmatched_weight: Optional[float] = None,
    encoder_decoder: bool = False,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """TRL GOLD's hybrid: JSD_beta on the tokens both vocabularies share plus ULD on the others, at every pair of
    text-aligned rows, mean over those pairs (weights: GOLD's default when None; docs/losses.md).
    `tokenizers=(student_tokenizer, teacher_tokenizer)`; answers are paired by the text their label ids spell."""
    from llm_recipes import alignment
    from llm_recipes.losses.family import PairArtifacts

    student, teacher = tokenizers
    spec = _text_spec("hybrid", tokenizers, {"temperature": temperature, "jsd_beta": beta,
                                             "hybrid_matched_weight": matched_weight,
                                             "hybrid_unmatched_weight": unmatched_weight},
                      encoder_decoder, chunk_size, PairArtifacts(shared_tokens=alignment.shared_token_pairs(teacher,
                                                                                                            student)))
    return _by_text(spec, student_logits, student_labels, teacher_logits, teacher_labels, tokenizers)
