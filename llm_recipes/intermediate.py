"""Distillation from intermediate hidden states, trainer side: layer maps, the learned projections,
and the teacher's forward with unit attribution. The loss math is in llm_recipes.losses.hidden
(hidden-state term) and llm_recipes.losses.selection (feature term); docs/methods.md defines both.

Layer indices are those of Hugging Face's `hidden_states` (`decoder_hidden_states` for an
encoder-decoder): 0 = the embedding output, i = the output of block i, L = the model's last hidden
state (for most models after the final norm). Negative indices count from the end (-1 = L). A layer
map "s:t,s:t" pairs student index s with teacher index t.
- Hidden-state default (DistillKit's proportional map on these indices): every student block
  i = 1..L_s with teacher floor(i * L_t / L_s + 1/2), so L_s -> L_t; the embeddings only on request ("0:0").
- Feature-selection default: the last layers, L_s:L_t.

Projections: one Linear(d_s -> d_t) per hidden pair whose widths differ, keyed "s{s}_t{t}", in the
student's dtype. They are trained by the same optimizer as the student (an extra parameter group),
replicated on every process (never sharded: d_s x d_t each), broadcast from rank 0 at start and
their gradients all-reduced once per optimizer step (`distributed.all_reduce_gradients`), and saved
as `hidden_projections.safetensors` in every checkpoint (reloaded by --resume_from).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from llm_recipes import models
from llm_recipes.errors import UserError
from llm_recipes.losses.pairing import predicting_rows
from llm_recipes.losses.selection import unit_scores

PROJECTIONS_FILE = "hidden_projections.safetensors"


# ----------------------------------------------------------------------------------------- layer maps
def parse_layer_map(text, flag: str) -> list[tuple[int, int]]:
    """ "1:2,2:4" (or a list of "s:t" strings) -> [(1, 2), (2, 4)]."""
    items = text if isinstance(text, (list, tuple)) else str(text).split(",")
    pairs = []
    for item in items:
        item = str(item).strip()
        if not item:
            continue
        student, sep, teacher = item.partition(":")
        try:
            if not sep:
                raise ValueError
            pairs.append((int(student), int(teacher)))
        except ValueError:
            raise UserError(f"{flag} expects student:teacher layer pairs such as 1:2,2:4, got {item!r}") from None
    if not pairs:
        raise UserError(f"{flag} is empty: give student:teacher pairs such as 1:2,2:4, or leave it unset")
    return pairs


def proportional_map(student_layers: int, teacher_layers: int) -> list[tuple[int, int]]:
    """Student block i = 1..L_s -> teacher floor(i * L_t / L_s + 1/2) (round half up, integer-exact)."""
    return [(i, (2 * i * teacher_layers + student_layers) // (2 * student_layers))
            for i in range(1, student_layers + 1)]


def resolve_layer_map(text, student_layers: int, teacher_layers: int, flag: str,
                      default: list[tuple[int, int]]) -> list[tuple[int, int]]:
    if text is None:
        return default
    resolved = []
    for s, t in parse_layer_map(text, flag):
        pair = []
        for index, layers, side in ((s, student_layers, "student"), (t, teacher_layers, "teacher")):
            if not -(layers + 1) <= index <= layers:
                raise UserError(f"{flag}: {side} layer {index} does not exist; the {side} has hidden states 0 "
                                f"(embeddings) to {layers} (last), or -1 to -{layers + 1} from the end")
            pair.append(index % (layers + 1))
        resolved.append(tuple(pair))
    if len(set(resolved)) != len(resolved):
        raise UserError(f"{flag} lists a layer pair twice: {text}")
    return resolved


# ------------------------------------------------------------------------------------------- the plan
@dataclass
class LayerPlan:
    """Which hidden states take part, resolved once at set-up from a probe forward of both models."""

    student_sizes: list[int]  # width of hidden_states[i], i = 0..L_s
    teacher_sizes: list[int]
    hidden_pairs: list[tuple[int, int]] = field(default_factory=list)
    feature_pairs: list[tuple[int, int]] = field(default_factory=list)

    @property
    def teacher_feature_layers(self) -> list[int]:
        return sorted({t for _, t in self.feature_pairs})

    @property
    def feature_kept_fraction(self) -> float:
        pairs = self.feature_pairs
        return sum(self.student_sizes[s] / self.teacher_sizes[t] for s, t in pairs) / len(pairs) if pairs else 0.0

    def describe(self) -> str:
        parts = []
        if self.hidden_pairs:
            parts.append("hidden-state layers (student:teacher) " + ",".join(f"{s}:{t}" for s, t in self.hidden_pairs))
        if self.feature_pairs:
            parts.append("feature-selection layers " + ",".join(
                f"{s}:{t} (keeps {self.student_sizes[s]} of {self.teacher_sizes[t]} units)"
                for s, t in self.feature_pairs))
        return "; ".join(parts)


def plan_layers(cfg, student: nn.Module, teacher: nn.Module, probe: dict, teacher_sharded: bool) -> Optional[LayerPlan]:
    """Resolve the layer maps against the two models (None when neither intermediate term is on)."""
    t, d = cfg.train, cfg.distillation
    if not (d.hidden_weight > 0 or d.feature_weight > 0):
        return None
    with torch.no_grad():
        _, s_states = forward_hidden_states(student, probe["student"], t.encoder_decoder, what="student")
        t_head, t_states = forward_hidden_states(teacher, probe["teacher"], d.encoder_decoder, what="teacher")
    plan = LayerPlan([h.shape[-1] for h in s_states], [h.shape[-1] for h in t_states])
    student_layers, teacher_layers = len(s_states) - 1, len(t_states) - 1
    if d.hidden_weight > 0:
        plan.hidden_pairs = resolve_layer_map(d.hidden_layer_map, student_layers, teacher_layers,
                                              "--distillation_config.hidden_layer_map",
                                              proportional_map(student_layers, teacher_layers))
    if d.feature_weight > 0:
        if d.encoder_decoder:
            raise UserError("feature selection attributes a causal teacher's hidden units; the teacher is "
                            "encoder-decoder: use the hidden-state term (--distillation_config.hidden_weight) instead")
        plan.feature_pairs = resolve_layer_map(d.feature_layer_map, student_layers, teacher_layers,
                                               "--distillation_config.feature_layer_map",
                                               [(student_layers, teacher_layers)])
        for s, layer in plan.feature_pairs:
            if plan.student_sizes[s] > plan.teacher_sizes[layer]:
                raise UserError(f"feature selection keeps d_s = {plan.student_sizes[s]} of the teacher's "
                                f"{plan.teacher_sizes[layer]} units at layer {layer}, but the student is wider: use "
                                "the hidden-state term (learned projection) instead")
            if layer == 0:
                raise UserError("--distillation_config.feature_layer_map: teacher layer 0 (embeddings) cannot be "
                                "attributed; choose a layer from 1")
        inner = [layer for layer in plan.teacher_feature_layers if layer < teacher_layers]
        if inner and teacher_sharded:
            raise UserError("feature selection at an inner teacher layer backpropagates through the teacher, which "
                            "is not supported with a sharded teacher (--distillation_config.enable_fsdp): use the "
                            "last layer (the default) or an unsharded teacher")
        check_attribution_points(teacher, probe["teacher"], t_head, t_states, plan.teacher_feature_layers)
    return plan


def check_attribution_points(teacher: nn.Module, batch: dict, head_input: torch.Tensor, states, layers) -> None:
    """The tensors the attribution differentiates must be the hidden states the feature term matches."""
    last = len(states) - 1
    recorded: dict = {}
    with torch.no_grad(), _record_blocks(teacher, [layer for layer in layers if layer < last], recorded, leaf=None):
        forward_hidden_states(teacher, batch, False, what="teacher")
    for layer in layers:
        found = head_input if layer == last else recorded.get(layer)
        if found is None or found.shape != states[layer].shape or not torch.equal(found, states[layer]):
            raise UserError(f"the teacher ({type(teacher).__name__}) does not expose layer {layer}'s hidden state as "
                            "the output of a block (or, for the last, as its output layer's input), so feature "
                            "selection cannot attribute it: choose another --distillation_config.feature_layer_map")


# ----------------------------------------------------------------------------------------- forwards
def forward_hidden_states(model: nn.Module, batch: dict, encoder_decoder: bool, inner: Optional[nn.Module] = None,
                          what: str = "model"):
    """(what the output layer sees [B, S, H], the HF hidden_states tuple [0] embeddings .. [L] last)."""
    head_input, outputs = models.forward_outputs(model, batch, encoder_decoder, inner, output_hidden_states=True)
    states = getattr(outputs, "decoder_hidden_states" if encoder_decoder else "hidden_states", None)
    if not states:
        raise UserError(f"the {what} ({type(inner or model).__name__}) returns no hidden states "
                        "(output_hidden_states): it cannot take part in hidden-state or feature distillation")
    return head_input, states


@contextlib.contextmanager
def _record_blocks(model: nn.Module, layers: list[int], recorded: dict, leaf: Optional[int]):
    """Record block outputs hidden_states[l] (1 <= l < L); block `leaf`'s output becomes a gradient leaf,
    so that a backward stops there (the teacher's weights and lower blocks never enter a graph)."""
    blocks = models.decoder_layers(model)

    def hook_for(layer):
        def hook(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            if layer == leaf:
                hidden = hidden.detach().requires_grad_()
            recorded[layer] = hidden
            if layer == leaf:
                return (hidden,) + tuple(output[1:]) if isinstance(output, tuple) else hidden
            return None
        return hook

    handles = [blocks[layer - 1].register_forward_hook(hook_for(layer)) for layer in layers]
    try:
        yield recorded
    finally:
        for handle in handles:
            handle.remove()


@dataclass
class TeacherPass:
    head_input: torch.Tensor  # [B, S, H_t], no grad
    states: Optional[tuple]  # hidden_states, no grad (None when no intermediate term is on)
    scores: dict  # teacher layer -> [d_t] unit attribution scores (feature selection)


def teacher_pass(teacher: nn.Module, batch: dict, encoder_decoder: bool, *, states: bool, attribute: list[int] = (),
                 last_layer: int = 0, attribution: str = "abs", vocab_size: Optional[int] = None,
                 chunk_size: int = 1024) -> TeacherPass:
    """The teacher's forward: last hidden state, optionally all hidden states and unit attributions.

    Attribution of layer l: the gradient of sum over answer rows of log p_t(target) w.r.t. hidden_states[l],
    reduced over batch and positions by `unit_scores`. The log-probabilities are taken a chunk of rows
    at a time from detached head inputs (no [B, S, V] graph); for an inner layer the gradient is then
    carried back through the blocks above it only. No teacher parameter requires or receives a gradient.
    `last_layer` is the teacher's L (layers below it are attributed through their block outputs).
    """
    if not (states or attribute):
        with torch.no_grad():
            return TeacherPass(models.forward_hidden(teacher, batch, encoder_decoder), None, {})
    recorded: dict = {}
    with contextlib.ExitStack() as stack:
        inner = [layer for layer in attribute if layer < last_layer]
        if inner:
            stack.enter_context(_record_blocks(teacher, inner, recorded, leaf=min(inner)))
        stack.enter_context(torch.enable_grad() if inner else torch.no_grad())
        head_input, hidden_states = forward_hidden_states(teacher, batch, encoder_decoder, what="teacher")
    last = len(hidden_states) - 1
    scores = {}
    if attribute:
        gradient = _head_input_gradient(teacher, batch, head_input, vocab_size, chunk_size)
        if last in attribute:
            scores[last] = unit_scores(gradient, attribution)
        below = [layer for layer in attribute if layer < last]
        if below:
            grads = torch.autograd.grad(head_input, [recorded[layer] for layer in below], grad_outputs=gradient)
            scores.update({layer: unit_scores(g, attribution) for layer, g in zip(below, grads)})
    return TeacherPass(head_input.detach(), tuple(h.detach() for h in hidden_states), scores)


def _head_input_gradient(teacher: nn.Module, batch: dict, head_input: torch.Tensor, vocab_size, chunk_size: int):
    """d (sum over answer rows of log p(target)) / d head_input, [B, S, H], chunk by chunk over rows."""
    mask, targets = predicting_rows(batch["labels"], False)
    rows = mask.reshape(-1).nonzero().squeeze(1).to(head_input.device)
    targets = targets.reshape(-1).to(head_input.device)[rows]
    flat = head_input.detach().reshape(-1, head_input.shape[-1])
    gradient = torch.zeros_like(flat)
    head = models.output_head(teacher)
    for start in range(0, rows.numel(), chunk_size):
        chunk = rows[start:start + chunk_size]
        with torch.enable_grad():
            x = flat.index_select(0, chunk).requires_grad_()
            logits = head(x)
            logits = logits[:, : vocab_size or logits.shape[-1]].float()
            log_prob = torch.log_softmax(logits, dim=-1).gather(1, targets[start:start + chunk_size, None]).sum()
            (g,) = torch.autograd.grad(log_prob, x)
        gradient.index_copy_(0, chunk, g)
    return gradient.reshape(head_input.shape)


# ---------------------------------------------------------------------------------------- projections
def projection_key(student_layer: int, teacher_layer: int) -> str:
    return f"s{student_layer}_t{teacher_layer}"


def build_projections(plan: LayerPlan, dtype: torch.dtype, device: torch.device) -> Optional[nn.ModuleDict]:
    """Linear(d_s -> d_t) for each hidden pair whose widths differ (None when none does)."""
    layers = {projection_key(s, t): nn.Linear(plan.student_sizes[s], plan.teacher_sizes[t])
              for s, t in plan.hidden_pairs if plan.student_sizes[s] != plan.teacher_sizes[t]}
    return nn.ModuleDict(layers).to(device=device, dtype=dtype) if layers else None


def projector(projections: Optional[nn.ModuleDict]):
    """project(s, t, rows): the learned projection of that pair, or the rows themselves."""
    def project(student_layer: int, teacher_layer: int, rows: torch.Tensor) -> torch.Tensor:
        key = projection_key(student_layer, teacher_layer)
        if projections is None or key not in projections:
            return rows
        return projections[key](rows)
    return project


def save_projections(projections: nn.ModuleDict, folder: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in projections.state_dict().items()},
              str(Path(folder) / PROJECTIONS_FILE))


def load_projections(projections: nn.ModuleDict, folder: str) -> None:
    """Load a checkpoint's projections into `projections` (same layer pairs and widths required)."""
    from safetensors.torch import load_file

    path = Path(folder) / PROJECTIONS_FILE
    if not path.is_file():
        raise UserError(f"--resume_from {folder} has no {PROJECTIONS_FILE}, but this run trains hidden-state "
                        "projections: resume with the hidden-state flags of that run")
    saved = load_file(str(path))
    expected = projections.state_dict()
    if saved.keys() != expected.keys() or any(saved[k].shape != expected[k].shape for k in saved):
        raise UserError(f"{path} holds projections {sorted(saved)} of other shapes than this run's {sorted(expected)}: "
                        "resume with the same --distillation_config.hidden_layer_map and models")
    with torch.no_grad():
        for key, value in expected.items():
            value.copy_(saved[key])
