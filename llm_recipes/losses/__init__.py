"""Distillation losses: ULD, MultiLevelOT (fast and greedy), the projected teacher, the hybrid, and the
same-tokenizer KL family; each family is one module behind one protocol (llm_recipes.losses.family).

Which losses exist, their defaults and the `auto` rule: `table` (llm_recipes.losses.table).
Public functions on full logits (stable API): `uld_loss`, `multilevel_ot_loss`, `projected_loss`, `hybrid_loss`,
`kl_loss`.
Trainer interface (chunked, from hidden states): `LossSpec`, `count_units`, `distillation_terms`.
Plain float64-ready references of every loss (for tests and benchmarks): `reference`.
Definitions, constants and normalisation: docs/losses.md.
"""
from llm_recipes.losses import table
from llm_recipes.losses.api import hybrid_loss, kl_loss, multilevel_ot_loss, projected_loss, uld_loss
from llm_recipes.losses.engine import DistillationTerms, count_units, distillation_terms
from llm_recipes.losses.multilevel_ot import MultiLevelOTOptions
from llm_recipes.losses.pairing import IGNORE_INDEX
from llm_recipes.losses.spec import KLOptions, LossSpec, ULDOptions
from llm_recipes.losses.table import SFT_ONLY

__all__ = [
    "DistillationTerms",
    "IGNORE_INDEX",
    "KLOptions",
    "LossSpec",
    "MultiLevelOTOptions",
    "SFT_ONLY",
    "ULDOptions",
    "count_units",
    "distillation_terms",
    "hybrid_loss",
    "kl_loss",
    "multilevel_ot_loss",
    "projected_loss",
    "table",
    "uld_loss",
]
