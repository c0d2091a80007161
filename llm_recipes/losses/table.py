"""The loss table: every distillation term of `--distillation_config.loss`, defined once.

A row says what the name computes (its `family`: the module that does the arithmetic), whether it
compares the two models token id by token id (then they must share one tokenizer), its default
`distil_factor`, its unit (a sequence: the mean over its paired positions; or an answer token) and,
for the KL family, which divergence. The `auto` rule is `auto_loss` below. Config validation, the
engine, the public API, `--help`, the benchmarks and the tests all read this table: adding a loss is
one row here, its module, its reference in `reference.py` and its test.

This module imports nothing of the project but its error type, so anything can read it.
"""
from dataclasses import dataclass
from typing import Optional

from llm_recipes.errors import UserError

AUTO = "auto"  # --distillation_config.loss default: see auto_loss
SFT_ONLY = "none"  # no teacher term: the student's cross-entropy alone


@dataclass(frozen=True)
class Loss:
    name: str  # the --distillation_config.loss value
    family: str  # "uld" | "multilevel_ot" | "divergence" (llm_recipes.losses.kl / token_terms)
    same_tokenizer: bool  # compares token ids directly: refused when the tokenizers differ
    distil_factor: float  # default --distillation_config.distil_factor
    per_sequence: bool  # unit: a sequence (mean over its paired positions), else an answer token
    divergence: Optional[str] = None  # the "divergence" family's kind (kl.divergence_rows)
    summary: str = ""  # one line for --help and the docs
    alignments: tuple = ("index", "text")  # how it can pair answer tokens across tokenizers (see ALIGNMENTS)


# How answer tokens pair across tokenizers: "index" pairs the i-th answer tokens (the seeds' ULD and
# MultiLevelOT); "text" pairs tokens that start the same text (llm_recipes.alignment). With one
# tokenizer both are the same pairing.
ALIGNMENTS = ("index", "text")

LOSSES = {loss.name: loss for loss in (
    Loss("uld", "uld", False, 1.5, True,
         summary="L1 distance between the sorted teacher and student probabilities (Boizard et al.)"),
    Loss("multilevel_ot", "multilevel_ot", False, 0.15, True,
         summary="token- and sequence-level optimal transport on ranked top-k columns (Cui et al.)"),
    Loss("projected", "projection", False, 1.5, False, alignments=("text",),
         summary="the teacher's distribution projected onto the student's vocabulary through the student's "
                 "tokenization of every teacher token, compared by --distillation_config.projected_divergence"),
    Loss("hybrid", "hybrid", False, 1.5, False, alignments=("text",),
         summary="JSD on the tokens both vocabularies share, ULD on the rest (TRL GOLD's hybrid)"),
    Loss("kl", "divergence", True, 1.5, False, "forward", "forward KL(p || q) x T^2", ("index",)),
    Loss("reverse_kl", "divergence", True, 1.5, False, "reverse", "reverse KL(q || p) x T^2", ("index",)),
    Loss("jsd", "divergence", True, 1.5, False, "jsd", "generalised Jensen-Shannon divergence (jsd_beta) x T^2",
         ("index",)),
    Loss("skew_kl", "divergence", True, 1.5, False, "skew_forward", "KL(p || a p + (1-a) q) (skew_alpha) x T^2",
         ("index",)),
    Loss("skew_reverse_kl", "divergence", True, 1.5, False, "skew_reverse",
         "KL(q || a q + (1-a) p) (skew_alpha) x T^2", ("index",)),
    Loss("tvd", "divergence", True, 1.5, False, "tvd", "total variation 0.5 sum |p - q| x T^2", ("index",)),
)}

LOSS_NAMES = tuple(LOSSES)
LOSS_CHOICES = (AUTO,) + LOSS_NAMES  # what --distillation_config.loss accepts
DIVERGENCE_KINDS = tuple(loss.divergence for loss in LOSSES.values() if loss.divergence)
CROSS_TOKENIZER_LOSSES = tuple(name for name, loss in LOSSES.items() if not loss.same_tokenizer)
SAME_TOKENIZER_LOSSES = tuple(name for name, loss in LOSSES.items() if loss.same_tokenizer)


# The KL-family losses the projected target can be compared with: a projected target is sparse (zero on the
# student tokens no teacher token starts with), so a divergence that is infinite where the target is zero and
# the student is not (reverse KL) cannot be used.
PROJECTED_DIVERGENCES = ("kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd")


def auto_loss(same_tokenizer: bool, alignment: str = AUTO) -> str:
    """What `auto` becomes: forward KL when the two models share a tokenizer; across tokenizers the projected
    teacher, or ULD when answers pair by index (the seeds' recipe). Measured (docs/demo, 5 seeds paired): the
    projected teacher is the best cross-tokenizer row with random-init and pretrained students, while ULD at
    its factor 1.5 costs 18 and 40 F1 against SFT (it matches sorted probabilities: see docs/losses.md)."""
    if same_tokenizer:
        return "kl"
    return "uld" if alignment == "index" else "projected"


def lookup(name: str) -> Loss:
    """The row of a loss name, or a UserError listing the names."""
    if name not in LOSSES:
        raise UserError(f"unknown loss {name!r}: --distillation_config.loss must be one of {', '.join(LOSS_CHOICES)}")
    return LOSSES[name]


def resolve(name: str, same_tokenizer: bool, alignment: str = AUTO) -> Loss:
    """The loss a run computes: `auto` resolved (`alignment`: --distillation_config.alignment), and a
    same-tokenizer loss refused across tokenizers."""
    loss = lookup(auto_loss(same_tokenizer, alignment) if name == AUTO else name)
    if loss.same_tokenizer and not same_tokenizer:
        raise UserError(f"--distillation_config.loss {loss.name} compares the two models token by token and needs "
                        "the same tokenizer for teacher and student, but their vocabularies differ: use "
                        f"{' or '.join(CROSS_TOKENIZER_LOSSES)}")
    return loss


def resolve_alignment(loss: Loss, alignment: str, same_tokenizer: bool) -> str:
    """`--distillation_config.alignment` for this loss: auto is text across tokenizers, index with one (where
    the two pairings are the same); a loss that needs text alignment refuses index."""
    if same_tokenizer:
        return "index"
    resolved = "text" if alignment == AUTO else alignment
    if resolved not in loss.alignments:
        raise UserError(f"--distillation_config.loss {loss.name} needs --distillation_config.alignment "
                        f"{' or '.join(loss.alignments)}, got {resolved}")
    return resolved


def by_divergence(kind: str) -> Loss:
    """The KL-family row of a divergence kind ("forward" -> kl, ...)."""
    return next(loss for loss in LOSSES.values() if loss.divergence == kind)


def choices_text() -> str:
    return " | ".join(LOSS_CHOICES)
