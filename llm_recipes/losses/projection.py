"""The projected teacher: the teacher's next-token distribution carried onto the student's vocabulary.

For every teacher token v, sigma(v) is the student's tokenization of v's text (llm_recipes.alignment
builds it once per tokenizer pair, as a trie over student-token prefixes: `ProjectionMap`). At the
k-th student token of a text-aligned group, with P the group's student tokens before it, the target
over the student vocabulary is

    q*(u) = sum of p(v) over teacher tokens v whose sigma starts with P + [u],  normalised,

where p = softmax(z_t / T) is the teacher's distribution at the row that predicts the group's first
teacher token. The data pipeline gives every served student answer token its trie node (the node of
P); the loss compares q* with q = softmax(z_s / T) by a KL-family divergence (forward KL by default),
x T^2, one unit per served token. Where this is not exact, and what is skipped: docs/losses.md.

Computing q*: at a group's first student token the node is a root, whose pairs are (v, sigma(v)[0])
for every teacher token, so the target is one `index_add_` of p's columns into the student's columns
(`Projection.root_columns`: teacher id -> first student token, or a spare column for tokens without
a sigma); deeper nodes have few pairs, gathered and scattered for those rows only.
"""
from dataclasses import dataclass, field, replace
from typing import Optional

import torch

from llm_recipes.losses.divergences import scaled
from llm_recipes.errors import UserError
from llm_recipes.losses.family import Continuation, Family, PairArtifacts, distills_eos, on_when_on_policy
from llm_recipes.losses.kl import kl_options
from llm_recipes.losses.token_terms import token_terms_sum

# The divergences a projected target can be compared by (loss name -> kind): a projected target is sparse (zero
# on the student tokens no teacher token starts with), so reverse KL, infinite where the target is zero and the
# student is not, is left out.
PROJECTED_DIVERGENCES = {"kl": "forward", "jsd": "jsd", "skew_kl": "skew_forward", "skew_reverse_kl": "skew_reverse",
                         "tvd": "tvd"}


class Projection:
    """A ProjectionMap ready for the loss: per-view root columns, kept per device. `end` = (teacher EOS ids, student
    EOS id), --distillation_config.distill_eos: at a group's first student token the teacher's probability of
    ending the answer goes to the student's EOS (without it, tokens without text collect in the spare column,
    which the target leaves out)."""

    def __init__(self, pmap, end: Optional[tuple] = None):
        self.map = pmap
        self.teacher_vocab_size = pmap.teacher_vocab_size
        self.student_vocab_size = pmap.student_vocab_size
        roots = pmap.roots.tolist()
        columns = torch.full((len(roots), pmap.teacher_vocab_size), -1, dtype=torch.long)
        for view, node in enumerate(roots):
            a, b = int(pmap.node_offsets[node]), int(pmap.node_offsets[node + 1])
            columns[view, pmap.teacher_ids[a:b]] = pmap.next_student_ids[a:b]
        if end is not None:
            teacher_eos, student_eos = end
            columns[:, [i for i in teacher_eos if 0 <= i < pmap.teacher_vocab_size]] = student_eos
        self.roots = pmap.roots.clone()
        self.root_columns = columns  # [views, V_t]: sigma(v)[0], or -1 without a sigma
        self._on: dict = {}

    def on(self, device: torch.device) -> "Projection":
        """This projection with its tensors on `device` (copied once)."""
        if device.type == "cpu":
            return self
        if device not in self._on:
            moved = object.__new__(Projection)
            moved.map = self.map.to(device)
            moved.teacher_vocab_size, moved.student_vocab_size = self.teacher_vocab_size, self.student_vocab_size
            moved.roots, moved.root_columns, moved._on = self.roots.to(device), self.root_columns.to(device), {}
            self._on[device] = moved
        return self._on[device]


@dataclass(frozen=True)
class ProjectionOptions:
    kind: str = "forward"  # the divergence (a kind of PROJECTED_DIVERGENCES)
    temperature: float = 1.0
    beta: float = 0.5  # jsd
    alpha: float = 0.1  # skew kinds
    eos: bool = False  # --distillation_config.distill_eos: the teacher's EOS projects onto the student's
    continuation: bool = False  # --distillation_config.projected_continuation (`continue_targets`)
    projection: Optional[Projection] = field(default=None, compare=False, repr=False)


@torch.no_grad()
def projected_target(teacher_logits: torch.Tensor, nodes: torch.Tensor, projection: Projection, temperature: float,
                     student_vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(q* [n, student_vocab] fp32, served [n] bool) from fp32 teacher logits [n, V_t] at the rows' trie nodes.

    A row whose node collects no teacher mass (its teacher tokens all underflowed) is not served: its
    target is left uniform and the caller gives it no weight. A row whose mass is NaN (NaN teacher logits)
    is served, so that the term turns NaN and the trainer stops naming it, never skipped in silence."""
    projection = projection.on(teacher_logits.device)
    spare = max(projection.student_vocab_size, student_vocab)  # collects the mass of tokens without a sigma
    p = torch.softmax(scaled(teacher_logits[:, :projection.teacher_vocab_size], temperature), dim=-1)
    target = p.new_zeros(p.shape[0], spare + 1)
    nodes = nodes.to(p.device)
    at_root = (nodes[:, None] == projection.roots[None, :])
    for view in range(at_root.shape[1]):
        rows = at_root[:, view].nonzero().squeeze(1)
        if rows.numel():
            columns = projection.root_columns[view][:p.shape[1]]
            columns = torch.where(columns < 0, spare, columns)
            target[rows] = target[rows].index_add_(1, columns, p[rows])
    deeper = ~at_root.any(dim=1)
    if deeper.any():
        rows = deeper.nonzero().squeeze(1)
        pair_rows, teacher_ids, student_ids = projection.map.pairs(nodes[rows])
        inside = teacher_ids < p.shape[1]
        pair_rows, teacher_ids, student_ids = pair_rows[inside], teacher_ids[inside], student_ids[inside]
        target.index_put_((rows[pair_rows], student_ids), p[rows[pair_rows], teacher_ids], accumulate=True)
    target = target[:, :student_vocab]
    mass = target.sum(dim=1, keepdim=True)
    served = ~(mass.squeeze(1) <= 0)  # NaN mass (a broken teacher) stays served: the loss then says it is NaN
    target = torch.where(served[:, None], target / mass.clamp_min(torch.finfo(target.dtype).tiny),
                         1.0 / student_vocab)
    return target, served


@torch.no_grad()
def previous_rows(teacher_logits: torch.Tensor, served: torch.Tensor, batch, rows: slice, temperature: float):
    """(the paired rows of a chunk that continue a group [m], where their previous row's logits are: the chunk's
    own teacher logits or a new [k, V_t] block, and each row's index into them, and the log-normaliser at the
    temperature of each row they index), or None: see `continue_targets`. The previous group's first student
    token is usually a paired row of the same chunk, whose teacher logits are reused (nothing is copied); the
    teacher head runs on the rest."""
    c: Continuation = batch.continuation
    nodes = c.nodes[rows].to(served.device)
    mix = ((nodes >= 0) & served).nonzero().squeeze(1)
    if not mix.numel():
        return None
    own_rows = c.teacher_row_ids[rows].to(served.device)  # sorted: flat rows in sequence order
    wanted = c.previous_rows[rows].to(served.device)[mix]
    at = torch.searchsorted(own_rows, wanted).clamp(max=own_rows.numel() - 1)
    found = own_rows[at] == wanted
    where = torch.where(found, at, -1)
    normalisers = torch.empty(mix.numel(), dtype=torch.float32, device=served.device)
    if bool(found.any()):
        normalisers[found] = _log_normaliser(teacher_logits, at[found], temperature)
    blocks = [teacher_logits]
    if not bool(found.all()):
        index = c.index[rows].to(served.device)[mix][~found]
        block = batch.teacher_logits_of(c.hidden[index.to(c.hidden.device)]).to(teacher_logits.device)
        normalisers[~found] = _log_normaliser(block, torch.arange(block.shape[0], device=block.device), temperature)
        where[~found] = teacher_logits.shape[0] + torch.arange(block.shape[0], device=where.device)
        blocks.append(block)
    return mix, blocks, where, normalisers


def _log_normaliser(logits: torch.Tensor, index: torch.Tensor, temperature: float) -> torch.Tensor:
    """logsumexp of logits[index] / T, 256 rows at a time (no copy of more rows than that)."""
    return torch.cat([torch.logsumexp(scaled(logits[part], temperature), dim=-1) for part in index.split(256)])


def _probabilities(blocks: list, where: torch.Tensor, normalisers: torch.Tensor, rows: torch.Tensor,
                   columns: torch.Tensor, temperature: float) -> torch.Tensor:
    """p'(columns) [len(rows)] at the continued rows `rows` (indices into `where` and `normalisers`): each row's
    logits are row where[r] of the chunk's own block followed by the new one."""
    at = where[rows]
    out = torch.empty(rows.shape, dtype=torch.float32, device=where.device)
    start = 0
    for block in blocks:
        part = (at >= start) & (at < start + block.shape[0])
        if bool(part.any()):
            z = block[at[part] - start, columns[part]]
            out[part] = torch.exp(scaled(z, temperature) - normalisers[rows[part]])
        start += block.shape[0]
    return out


@torch.no_grad()
def continue_targets(target: torch.Tensor, previous, batch, rows: slice, projection: Projection,
                     temperature: float) -> None:
    """--distillation_config.projected_continuation, in place on the targets [n, V_s] of a chunk's paired `rows`
    (`previous`: from `previous_rows`).

    At a student token that starts group g + 1, the plain target is the teacher's row after g's teacher tokens
    t_1..t_k, projected: it takes for granted that the teacher wrote them, and that its text ends where g ends.
    From the row that predicted t_1 (probabilities p'), the teacher could as well have written one longer token v
    whose sigma continues g's student tokens (trie node n_g). The target becomes

        (sum over the pairs (v, u) of n_g of p'(v) into u  +  w * plain target) / (that mass + w),
        w = p'(t_1) p(t_2 | t_1) ... p(t_k | t_1..t_k-1), the teacher's probability of writing g as it did,

    so a student that stops (EOS) or breaks off inside a word the teacher would have continued ("b" of "brown":
    the teacher's "Ġb", or "bl" as "Ġb" "l") is told so, as the teacher's own rows before say. Only the pairs'
    probabilities are gathered: no [m, V] copy of the previous rows."""
    c: Continuation = batch.continuation
    mix, blocks, where, normalisers = previous
    device = target.device
    pair_rows, teacher_ids, student_ids = projection.on(device).map.pairs(c.nodes[rows].to(device)[mix])
    inside = (teacher_ids < projection.teacher_vocab_size) & (student_ids < target.shape[1])
    pair_rows, teacher_ids, student_ids = pair_rows[inside], teacher_ids[inside], student_ids[inside]
    longer = _probabilities(blocks, where, normalisers, pair_rows, teacher_ids, temperature)
    local = torch.arange(mix.numel(), device=device)
    wrote = _probabilities(blocks, where, normalisers, local, c.previous_ids[rows].to(device)[mix], temperature)
    wrote = wrote * _later_tokens_probability(batch, rows, mix, temperature).to(device)
    total = torch.zeros(mix.numel(), device=device).index_add_(0, pair_rows, longer) + wrote
    keep = ~(total <= 0)  # NaN stays NaN: a broken teacher row must show in the loss, never be skipped
    scale = torch.where(keep, wrote / total.clamp_min(torch.finfo(total.dtype).tiny), 1.0)
    target[mix] = target[mix].mul_(scale[:, None])
    add = keep[pair_rows]
    target.index_put_((mix[pair_rows[add]], student_ids[add]),
                      longer[add] / total[pair_rows[add]].clamp_min(torch.finfo(total.dtype).tiny), accumulate=True)


def _later_tokens_probability(batch, rows: slice, mix: torch.Tensor, temperature: float) -> torch.Tensor:
    """[m] fp32: for each continued row of the chunk, the teacher's probability of the previous group's tokens
    after its first, each given those before (1 for a group of one teacher token)."""
    c: Continuation = batch.continuation
    local = torch.full((rows.stop - rows.start,), -1, dtype=torch.long, device=mix.device)
    local[mix] = torch.arange(mix.numel(), device=mix.device)
    units = c.inner_units.to(mix.device)
    inside = (units >= rows.start) & (units < rows.stop)
    owner = local[(units - rows.start).clamp(0, local.numel() - 1)]
    take = (inside & (owner >= 0)).nonzero().squeeze(1)
    log_sum = torch.zeros(mix.numel(), device=mix.device)
    for part in take.split(256):  # the head's [rows, V_t] block at a time
        logits = batch.teacher_logits_of(c.inner_hidden[part.to(c.inner_hidden.device)]).to(mix.device)
        picked = scaled(logits.gather(1, c.inner_ids.to(mix.device)[part][:, None]).squeeze(1), temperature)
        lse = _log_normaliser(logits, torch.arange(logits.shape[0], device=logits.device), temperature)
        log_sum.index_add_(0, owner[part], picked - lse)
    return log_sum.exp()


# ------------------------------------------------------------------------------------------- the family
class ProjectedFamily(Family):
    """Every served student answer token is one unit, paired through the projection map's trie nodes."""

    name = "projected"
    alignments = ("text",)
    uses_nodes = True
    consumes_logits = True
    reads = ("projected_divergence", "temperature", "jsd_beta", "skew_alpha", "projected_continuation")

    def options(self, loss, cfg, cache=None) -> ProjectionOptions:
        if cfg.projected_divergence not in PROJECTED_DIVERGENCES:
            raise UserError(f"--distillation_config.projected_divergence must be one of "
                            f"{', '.join(PROJECTED_DIVERGENCES)} (a projected target is zero on many tokens, where "
                            f"reverse_kl is infinite), got {cfg.projected_divergence!r}")
        opts = kl_options(PROJECTED_DIVERGENCES[cfg.projected_divergence], cfg)
        return ProjectionOptions(opts.kind, opts.temperature, opts.beta, opts.alpha, distills_eos(cfg),
                                 on_when_on_policy(cfg, "projected_continuation"))

    def continues_groups(self, options) -> bool:
        return options.continuation

    def artifacts(self, student_tokenizer, teacher_tokenizer) -> PairArtifacts:
        from llm_recipes import alignment

        pmap, how = alignment.load_or_build_map(teacher_tokenizer, student_tokenizer)
        return PairArtifacts(projection_map=pmap, end_tokens=((teacher_tokenizer.eos_token_id,),
                                                               student_tokenizer.eos_token_id),
                             summary=f"projection map: {pmap.num_nodes:,} nodes, {pmap.num_pairs:,} pairs ({how})")

    def with_artifacts(self, options, artifacts):
        end = artifacts.end_tokens if options.eos and artifacts.end_tokens is not None else None
        return replace(options, projection=Projection(artifacts.projection_map, end))

    def terms(self, batch, chunk, checkpointed, z, targets):
        """CE and the divergence between the student and the projected teacher, in the fused pass of the KL
        family: the projected target enters as teacher logits T * log q*, whose log-softmax at temperature T
        is log q* itself."""
        opts = batch.options
        if opts.projection is None:
            raise ValueError("the projected loss needs the tokenizer pair's projection map (LossSpec.with_artifacts)")
        vocab_s = batch.student_vocab(z)

        def make():
            rows = slice(chunk.start, chunk.start + chunk.paired)
            t_logits = batch.teacher_logits(chunk)
            target, served = projected_target(t_logits, batch.nodes[rows], opts.projection, opts.temperature, vocab_s)
            previous = previous_rows(t_logits, served, batch, rows, opts.temperature) \
                if batch.continuation is not None else None
            del t_logits  # kept by `previous` only where continued rows read it
            if previous is not None:
                continue_targets(target, previous, batch, rows, opts.projection, opts.temperature)
            return target.log_().mul_(opts.temperature), served

        plan = batch.plans.pop(chunk.start, None)  # (log target, served), from a checkpointed chunk's first pass
        if plan is None:
            plan = make()
            if checkpointed:  # the fused pass overwrites its teacher buffer: the recompute gets the kept original
                batch.plans[chunk.start] = plan
                plan = (plan[0].clone(), plan[1])
        log_target, served = plan
        weights = batch.weights(chunk) * served
        return token_terms_sum(z, targets, log_target, weights, opts.kind, opts.temperature, opts.beta, opts.alpha,
                               with_ce=batch.with_ce)

    def describe(self, spec) -> str:
        name = next(n for n, kind in PROJECTED_DIVERGENCES.items() if kind == spec.options.kind)
        return f" ({name} to the projected teacher)"


PROJECTED = ProjectedFamily()
