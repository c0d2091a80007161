"""The loss table: every distillation term of `--distillation_config.loss`, defined once.

A row names a loss, its family (the module holding its arithmetic and everything the trainer needs to know
about it: llm_recipes.losses.family), whether it compares the two models token id by token id (then they
must share one tokenizer), its default `distil_factor`, for the KL family which divergence, and a
one-line summary for `--help` and the docs. The `auto` rule is `auto_loss` below. Adding a loss is one
row here (and, for a new family, its module, its reference in `reference.py` and its test).
"""
from dataclasses import dataclass
from typing import Optional

from llm_recipes.errors import UserError
from llm_recipes.losses.divergences import DIVERGENCE_KINDS  # noqa: F401 (re-exported: the KL family's kinds)
from llm_recipes.losses.family import Family
from llm_recipes.losses.hybrid import HYBRID
from llm_recipes.losses.kl import KL
from llm_recipes.losses.multilevel_ot import MULTILEVEL_OT
from llm_recipes.losses.projection import PROJECTED, PROJECTED_DIVERGENCES  # noqa: F401 (re-exported)
from llm_recipes.losses.uld import ULD

AUTO = "auto"  # --distillation_config.loss default: see auto_loss
SFT_ONLY = "none"  # no teacher term: the student's cross-entropy alone


@dataclass(frozen=True)
class Loss:
    name: str  # the --distillation_config.loss value
    family: Family  # what computes it (its module: llm_recipes.losses.<family>)
    same_tokenizer: bool  # compares token ids directly: refused when the tokenizers differ
    distil_factor: float  # default --distillation_config.distil_factor
    summary: str = ""  # one line for --help and the docs
    divergence: Optional[str] = None  # the KL family's kind (llm_recipes.losses.divergences)

    @property
    def per_sequence(self) -> bool:
        """Its unit: a sequence (the mean over its paired positions), else an answer token."""
        return self.family.per_sequence


# How answer tokens pair across tokenizers: "index" pairs the i-th answer tokens (the seeds' ULD and
# MultiLevelOT); "text" pairs tokens that start the same text (llm_recipes.alignment). With one
# tokenizer both are the same pairing.
ALIGNMENTS = ("index", "text")

LOSSES = {loss.name: loss for loss in (
    Loss("uld", ULD, False, 1.5,
         "L1 distance between the sorted teacher and student probabilities (Boizard et al.)"),
    Loss("multilevel_ot", MULTILEVEL_OT, False, 0.15,
         "token- and sequence-level optimal transport on ranked top-k columns (Cui et al.)"),
    Loss("projected", PROJECTED, False, 1.5,
         "the teacher's distribution projected onto the student's vocabulary through the student's tokenization "
         "of every teacher token, compared by --distillation_config.projected_divergence"),
    Loss("hybrid", HYBRID, False, 1.5,
         "JSD on the tokens both vocabularies share, ULD on the rest (TRL GOLD's hybrid)"),
    Loss("kl", KL, True, 1.5, "forward KL(p || q) x T^2", "forward"),
    Loss("reverse_kl", KL, True, 1.5, "reverse KL(q || p) x T^2", "reverse"),
    Loss("jsd", KL, True, 1.5, "generalised Jensen-Shannon divergence (jsd_beta) x T^2", "jsd"),
    Loss("skew_kl", KL, True, 1.5, "KL(p || a p + (1-a) q) (skew_alpha) x T^2", "skew_forward"),
    Loss("skew_reverse_kl", KL, True, 1.5, "KL(q || a q + (1-a) p) (skew_alpha) x T^2", "skew_reverse"),
    Loss("tvd", KL, True, 1.5, "total variation 0.5 sum |p - q| x T^2", "tvd"),
)}


def loss_choices() -> tuple:
    """What --distillation_config.loss accepts (read at call time: a row added at run time counts)."""
    return (AUTO,) + tuple(LOSSES)


def cross_tokenizer_losses() -> tuple:
    return tuple(name for name, loss in LOSSES.items() if not loss.same_tokenizer)


LOSS_NAMES = tuple(LOSSES)
LOSS_CHOICES = loss_choices()
CROSS_TOKENIZER_LOSSES = cross_tokenizer_losses()
SAME_TOKENIZER_LOSSES = tuple(name for name, loss in LOSSES.items() if loss.same_tokenizer)


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
        raise UserError(f"unknown loss {name!r}: --distillation_config.loss must be one of "
                        f"{', '.join(loss_choices())}")
    return LOSSES[name]


def resolve(name: str, same_tokenizer: bool, alignment: str = AUTO) -> Loss:
    """The loss a run computes: `auto` resolved (`alignment`: --distillation_config.alignment), and a
    same-tokenizer loss refused across tokenizers."""
    loss = lookup(auto_loss(same_tokenizer, alignment) if name == AUTO else name)
    if loss.same_tokenizer and not same_tokenizer:
        raise UserError(f"--distillation_config.loss {loss.name} compares the two models token by token and needs "
                        "the same tokenizer for teacher and student, but their vocabularies differ: use "
                        f"{' or '.join(cross_tokenizer_losses())}")
    return loss


def resolve_alignment(loss: Loss, alignment: str, same_tokenizer: bool) -> str:
    """`--distillation_config.alignment` for this loss: auto is text across tokenizers, index with one (where
    the two pairings are the same); a loss that needs text alignment refuses index."""
    if alignment not in (AUTO,) + ALIGNMENTS:
        raise UserError(f"--distillation_config.alignment must be one of auto, {', '.join(ALIGNMENTS)}, "
                        f"got {alignment!r}")
    if same_tokenizer:
        return "index"
    resolved = "text" if alignment == AUTO else alignment
    if resolved not in loss.family.alignments:
        raise UserError(f"--distillation_config.loss {loss.name} needs --distillation_config.alignment "
                        f"{' or '.join(loss.family.alignments)}, got {resolved}")
    return resolved


def by_divergence(kind: str) -> Loss:
    """The KL-family row of a divergence kind ("forward" -> kl, ...)."""
    return next(loss for loss in LOSSES.values() if loss.divergence == kind)
