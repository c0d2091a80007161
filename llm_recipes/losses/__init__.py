"""Distillation losses: ULD, MultiLevelOT (fast and greedy) and the same-tokenizer KL family.

Public functions on full logits (stable API): `uld_loss`, `multilevel_ot_loss`, `kl_loss`.
Trainer interface (chunked, from hidden states): `LossSpec`, `count_units`, `distillation_terms`.
Definitions, constants and normalisation: docs/losses.md.
"""
from llm_recipes.losses.api import kl_loss, multilevel_ot_loss, uld_loss
from llm_recipes.losses.engine import DistillationTerms, count_units, distillation_terms
from llm_recipes.losses.multilevel_ot import MultiLevelOTOptions
from llm_recipes.losses.spec import (
    CROSS_TOKENIZER_LOSSES,
    LOSS_NAMES,
    SAME_TOKENIZER_LOSSES,
    SFT_ONLY,
    KLOptions,
    LossSpec,
    ULDOptions,
    resolve_loss_name,
)

# the MultiLevelOT seed's `--f 1|2`
MULTILEVEL_OT_F_MODES = {1: "fast", 2: "greedy"}

__all__ = [
    "CROSS_TOKENIZER_LOSSES",
    "DistillationTerms",
    "KLOptions",
    "LOSS_NAMES",
    "LossSpec",
    "MULTILEVEL_OT_F_MODES",
    "MultiLevelOTOptions",
    "SAME_TOKENIZER_LOSSES",
    "SFT_ONLY",
    "ULDOptions",
    "count_units",
    "distillation_terms",
    "kl_loss",
    "multilevel_ot_loss",
    "resolve_loss_name",
    "uld_loss",
]
