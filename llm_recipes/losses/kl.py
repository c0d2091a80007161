"""The KL family (kl, reverse_kl, jsd, skew_kl, skew_reverse_kl, tvd): one tokenizer, token by token.

With p = softmax(z_t / T) and q = softmax(z_s / T) over the shared vocabulary, each paired answer token
adds T^2 D_kind(p, q) (the divergences: llm_recipes.losses.divergences), one unit per token. The CE and
the divergence of a chunk run in one fused pass over its two logits buffers (token_terms); from a top-K
teacher cache the forward KL at temperature 1 reads the K cached entries directly (cached_terms).
"""
from dataclasses import dataclass

import torch

from llm_recipes.errors import UserError
from llm_recipes.losses.cached_terms import cached_forward_kl_sum
from llm_recipes.losses.divergences import divergence_rows
from llm_recipes.losses.family import Family, own, positive
from llm_recipes.losses.token_terms import token_terms_sum


@dataclass(frozen=True)
class KLOptions:
    kind: str = "forward"  # a divergence kind (llm_recipes.losses.divergences.DIVERGENCE_KINDS)
    temperature: float = 1.0
    beta: float = 0.5  # jsd
    alpha: float = 0.1  # skew_forward / skew_reverse


def validate_kl(opts: KLOptions) -> None:
    """The KL family's constants; each is checked only for the kinds that read it."""
    positive("temperature", opts.temperature)
    if opts.kind == "jsd" and not 0 < opts.beta < 1:
        raise UserError(
            f"--distillation_config.jsd_beta (loss jsd) must be strictly between 0 and 1, got {opts.beta} "
            f"(beta -> 0 and 1 are the plain divergences: use loss kl or reverse_kl)"
        )
    if opts.kind in ("skew_forward", "skew_reverse") and not 0 <= opts.alpha < 1:
        raise UserError(f"--distillation_config.skew_alpha (losses skew_kl, skew_reverse_kl) must be in [0, 1), "
                        f"got {opts.alpha}")


def kl_options(kind: str, cfg) -> KLOptions:
    opts = KLOptions(kind, float(cfg.temperature), float(cfg.jsd_beta), float(cfg.skew_alpha))
    validate_kl(opts)
    return opts


class KLFamily(Family):
    name = "KL"
    alignments = ("index",)  # one tokenizer: by index and by text are the same pairing
    consumes_logits = True
    scores_positions = True
    reads = ("temperature", "jsd_beta", "skew_alpha")

    def options(self, loss, cfg, cache=None) -> KLOptions:
        return kl_options(loss.divergence, cfg)

    def terms(self, batch, chunk, checkpointed, z, targets):
        """CE, and the divergence of the paired rows, in one pass over z (consumed)."""
        opts = batch.options
        vocab_s = batch.student_vocab(z)
        weights = batch.weights(chunk)
        head = batch.teacher_head
        if (getattr(head, "sparse_forward_kl", False) and opts.kind == "forward" and opts.temperature == 1
                and head.temperature == 1 and batch.with_ce and vocab_s == z.shape[-1] == head.vocab_size):
            packed = batch.teacher_rows[chunk.start:chunk.start + chunk.paired]  # a cache's rows: no dense row
            return cached_forward_kl_sum(z, targets, packed, head.k, weights)
        zt = own(batch.teacher_logits(chunk, z[: chunk.paired, :vocab_s]), batch.teacher_rows)
        if vocab_s != zt.shape[1]:
            raise UserError(f"student and teacher vocabularies differ ({vocab_s} vs {zt.shape[1]}); a same-tokenizer "
                            "loss needs one vocabulary: use a cross-tokenizer --distillation_config.loss (projected, "
                            "hybrid, uld, multilevel_ot)")
        return token_terms_sum(z, targets, zt, weights, opts.kind, opts.temperature, opts.beta, opts.alpha,
                               with_ce=batch.with_ce)

    def position_scores(self, options, student_logits, teacher_logits):
        t = options.temperature
        return divergence_rows(options.kind, torch.log_softmax(student_logits / t, dim=-1),
                               torch.log_softmax(teacher_logits / t, dim=-1), options.beta, options.alpha)[0]


KL = KLFamily()
