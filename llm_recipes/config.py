"""The trainer's command line: its flags (`TRAINER`), the frozen run configuration, its checks, and
the plan it resolves to once the tokenizers are known.

The flags are the fields of the dataclasses in configs/ (parsed by llm_recipes.flags, the parser of
every command): undotted flags set train_config, `--<config>.<field>` (or `--<config>_<field>`) the
others, llama-recipes' undotted FSDP names (`--fsdp_cpu_offload`) set fsdp_config, and the
MultiLevelOT fork's `--f 1|2` selects MultiLevelOT fast / greedy. Flags of llama-recipes that this
trainer does not support are in `REFUSED`, each with its reason.

`parse_flags` gives a frozen `RunConfig`; `validate` refuses values that cannot work and flags that
would have no effect; `resolve_plan` says what the configuration means for the two tokenizers (which
loss `auto` became, its factor, whether the teacher is needed): the configuration itself is never
changed.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Optional

from configs import dataset, distillation_config, fsdp_config, lora_config, train_config, wandb_config
from llm_recipes import flags
from llm_recipes.errors import UserError
from llm_recipes.flags import Refused
from llm_recipes.losses import LossSpec
from llm_recipes.losses.family import distills_eos
from llm_recipes.losses.table import SFT_ONLY

MULTILEVEL_OT_F_MODES = {1: "fast", 2: "greedy"}  # the MultiLevelOT fork's --f
OPTIMIZERS = ("adamw", "sgd", "adafactor")
SCHEDULERS = ("onecycle", "cosine", "linear", "constant")

_NO_LOW_CPU = Refused("is not supported: every process loads the full weights, then shards them; remove the flag",
                      allowed=(False,))
_NO_QUANTIZATION = Refused("is not supported by this trainer: use --pure_bf16 (student) and "
                           "--distillation_config.pure_bf16 (teacher) to halve memory, or LoRA (--use_peft)",
                           allowed=(False,))
REFUSED = {
    "low_cpu_fsdp": _NO_LOW_CPU,
    "distillation_config.low_cpu_fsdp": _NO_LOW_CPU,
    "quantization": _NO_QUANTIZATION,
    "distillation_config.quantization": _NO_QUANTIZATION,
    "distillation_config.fsdp_activation_checkpointing": Refused(
        "has no effect: the frozen teacher runs no backward, so there is nothing to recompute; remove the flag",
        allowed=(False,)),
    "batching_strategy": Refused("is not supported: distillation pairs examples across two tokenizers, which "
                                 "packing would break; padding is the only strategy", allowed=("padding",)),
    "peft_method": Refused("is not supported: LoRA is the only method (--use_peft)", allowed=("lora",)),
}


def _f_flag(value) -> dict:
    mode = flags.coerce_value("f", value, int)
    if mode not in MULTILEVEL_OT_F_MODES:
        raise UserError(f"--f expects 1 (MultiLevelOT fast) or 2 (MultiLevelOT greedy), got {value!r}")
    return {"distillation_config.loss": "multilevel_ot",
            "distillation_config.multilevel_ot_mode": MULTILEVEL_OT_F_MODES[mode]}


TRAINER = flags.Command(
    program="python finetuning.py",
    summary="Distill a teacher LLM into a student (or fine-tune the student alone without --distillation).",
    sections={"train_config": train_config, "distillation_config": distillation_config, "fsdp_config": fsdp_config,
              "lora_config": lora_config, "dataset": dataset, "wandb_config": wandb_config},
    aliases={f"wandb_{name}": f"wandb_config.{name}" for name in ("project", "entity", "group", "tags", "notes",
                                                                 "mode")} | {"wandb_run_name": "wandb_config.name"},
    refused=REFUSED,
    expand={"f": _f_flag},
    expand_help={"f": "1|2: MultiLevelOT fast (1) or greedy (2); sets distillation_config.loss=multilevel_ot"},
    fallback=("fsdp_config",),
    groups={"training": "training", "distillation": "distillation", "data": "data", "distributed": "distributed",
            "output": "output", "logging": "logging"},
    set_by="the trainer for each model",
)


@dataclass(frozen=True)
class RunConfig:
    """All configs of one run, plus the flags the user actually gave (for provenance)."""

    train: train_config = field(default_factory=train_config)
    distillation: distillation_config = field(default_factory=distillation_config)
    fsdp: fsdp_config = field(default_factory=fsdp_config)
    lora: lora_config = field(default_factory=lora_config)
    dataset: dataset = field(default_factory=dataset)
    wandb: wandb_config = field(default_factory=wandb_config)
    given: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        out = {name: dataclasses.asdict(getattr(self, attr)) for name, attr in _SECTION_ATTRIBUTES.items()}
        out["flags_given"] = self.given
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str)


_SECTION_ATTRIBUTES = {"train_config": "train", "distillation_config": "distillation", "fsdp_config": "fsdp",
                       "lora_config": "lora", "dataset": "dataset", "wandb_config": "wandb"}


def run_config(parsed: flags.Parsed) -> RunConfig:
    """The run's frozen configs from the parsed flags, validated."""
    run = RunConfig(**{attr: parsed[name] for name, attr in _SECTION_ATTRIBUTES.items()}, given=parsed.given)
    validate(run, parsed.spelled)
    return run


def parse_flags(kwargs: dict, args: tuple = ()) -> RunConfig:
    """The run's frozen configs from fire's keyword (and positional) arguments, validated."""
    return run_config(flags.parse(TRAINER, dict(kwargs), tuple(args)))


def flag_reference(markdown: bool = False) -> str:
    """Every flag with its default and meaning (`--help`; the README's tables with markdown=True)."""
    return flags.markdown_reference(TRAINER) if markdown else flags.help_text(TRAINER)


# ------------------------------------------------------------------------------------------- checks
def validate(run: RunConfig, spelled: dict) -> None:
    """Cross-field checks: reject values that cannot work and flags that would have no effect.
    `spelled`: "field" / "section.field" -> the flag as the user wrote it."""
    _validate_ranges(run)
    _validate_dependent_flags(run, spelled)
    validate_sharding(run, spelled)
    validate_methods(run, spelled)


def _validate_ranges(run: RunConfig) -> None:
    t, d = run.train, run.distillation
    for name in ("batch_size_training", "val_batch_size", "gradient_accumulation_steps", "num_epochs",
                 "logits_chunk_size", "log_every"):
        if getattr(t, name) < 1:
            raise UserError(f"--{name} must be at least 1, got {getattr(t, name)}")
    for name in ("save_step", "max_train_step", "max_eval_step", "num_workers_dataloader", "warmup_steps"):
        if getattr(t, name) < 0:
            raise UserError(f"--{name} must be 0 or more, got {getattr(t, name)}")
    if t.lr <= 0:
        raise UserError(f"--lr must be positive, got {t.lr}")
    if not t.dist_timeout_minutes > 0:
        raise UserError(f"--dist_timeout_minutes must be positive, got {t.dist_timeout_minutes}")
    if not 0 <= t.warmup_ratio < 1:
        raise UserError(f"--warmup_ratio must be in [0, 1), got {t.warmup_ratio}")
    if t.context_length is not None and t.context_length < 2:
        raise UserError(f"--context_length must be at least 2, got {t.context_length}")
    if t.optimizer.lower() not in OPTIMIZERS:
        raise UserError(f"--optimizer {t.optimizer} is not supported: use AdamW, SGD or Adafactor")
    if t.scheduler.lower() not in SCHEDULERS:
        raise UserError(f"--scheduler {t.scheduler} is not supported: use one of {', '.join(SCHEDULERS)}")
    if sum([t.pure_bf16, t.mixed_precision, t.use_fp16]) > 1:
        raise UserError("--pure_bf16, --mixed_precision and --use_fp16 exclude each other: choose one")
    if sum([d.pure_bf16, d.mixed_precision, d.use_fp16]) > 1:
        raise UserError("--distillation_config.pure_bf16, .mixed_precision and .use_fp16 exclude each other: "
                        "choose one")
    if t.freeze_layers and t.num_freeze_layers < 1:
        raise UserError(f"--num_freeze_layers must be at least 1 with --freeze_layers, got {t.num_freeze_layers}")
    if not 0 < run.dataset.training_size <= 1:
        raise UserError(f"--dataset.training_size must be in (0, 1], got {run.dataset.training_size}")
    if d.distil_factor is not None and d.distil_factor < 0:
        raise UserError(f"--distillation_config.distil_factor must be 0 or more, got {d.distil_factor}")
    if d.cross_entropy_factor < 0:
        raise UserError(f"--distillation_config.cross_entropy_factor must be 0 or more, got {d.cross_entropy_factor}")
    if t.use_fast_kernels and t.attn_implementation not in (None, "sdpa"):
        raise UserError("--use_fast_kernels means attn_implementation=sdpa: drop one of the two flags")


def _first_given(spelled: dict, section: str) -> Optional[str]:
    given = sorted(flag for key, flag in spelled.items() if key.startswith(section + "."))
    return given[0] if given else None


def _validate_dependent_flags(run: RunConfig, spelled: dict) -> None:
    """A flag of a section that is switched off would have no effect: refuse it."""
    t = run.train
    for section, switched_on, switch in (("distillation_config", t.distillation, "--distillation"),
                                         ("lora_config", t.use_peft, "--use_peft"),
                                         ("fsdp_config", t.enable_fsdp, "--enable_fsdp"),
                                         ("wandb_config", t.use_wandb, "--use_wandb")):
        flag = _first_given(spelled, section)
        if flag and not switched_on:
            raise UserError(f"{flag} has no effect without {switch}: add {switch} or remove it")
    if "num_freeze_layers" in spelled and not t.freeze_layers:
        raise UserError("--num_freeze_layers has no effect without --freeze_layers: add --freeze_layers")


def validate_sharding(run: RunConfig, spelled: dict) -> None:
    """FSDP flags: supported strategies only, and no teacher sharding detail without the teacher's FSDP."""
    from llm_recipes.distributed import SHARDING_STRATEGIES

    t, d, f = run.train, run.distillation, run.fsdp
    for flag, value in (("--fsdp_config.sharding_strategy", f.sharding_strategy),
                        ("--distillation_config.sharding_strategy", d.sharding_strategy)):
        if value not in SHARDING_STRATEGIES:
            raise UserError(f"{flag} {value} is not supported with FSDP2: use one of {', '.join(SHARDING_STRATEGIES)}")
    if f.sharding_group_size < 0:
        raise UserError(f"--fsdp_config.sharding_group_size must be 0 or more, got {f.sharding_group_size}")
    if f.sharding_group_size and f.sharding_strategy != "HYBRID_SHARD":
        raise UserError("--fsdp_config.sharding_group_size only applies to HYBRID_SHARD: set "
                        "--fsdp_config.sharding_strategy HYBRID_SHARD or remove it")
    teacher_sharding = sorted(spelled[key] for key in ("distillation_config.sharding_strategy",
                                                       "distillation_config.fsdp_cpu_offload") if key in spelled)
    if teacher_sharding and not d.enable_fsdp:
        raise UserError(f"{teacher_sharding[0]} has no effect without --distillation_config.enable_fsdp: add it "
                        "or remove the flag")
    if t.enable_fsdp and t.use_fp16:
        raise UserError("--use_fp16 is not supported with --enable_fsdp (its loss scaler would see only this "
                        "process's shard): use --mixed_precision or --pure_bf16 (bf16 needs no scaler)")


# flag -> (what turns it on, whether it is on): a detail flag of a method that is off has no effect
METHOD_SWITCHES = {
    "token_selection_ratio": ("--distillation_config.token_selection", lambda d: d.token_selection != "none"),
    "hidden_layer_map": ("--distillation_config.hidden_weight > 0", lambda d: d.hidden_weight > 0),
    "hidden_distance": ("--distillation_config.hidden_weight > 0", lambda d: d.hidden_weight > 0),
    "hidden_positions": ("--distillation_config.hidden_weight > 0", lambda d: d.hidden_weight > 0),
    "hidden_alignment": ("--distillation_config.hidden_weight or feature_weight > 0",
                         lambda d: d.hidden_weight > 0 or d.feature_weight > 0),
    "feature_layer_map": ("--distillation_config.feature_weight > 0", lambda d: d.feature_weight > 0),
    "feature_attribution": ("--distillation_config.feature_weight > 0", lambda d: d.feature_weight > 0),
    "feature_offdiag_weight": ("--distillation_config.feature_weight > 0", lambda d: d.feature_weight > 0),
    "on_policy_max_new_tokens": ("--distillation_config.lmbda > 0", lambda d: d.lmbda > 0),
    "on_policy_temperature": ("--distillation_config.lmbda > 0", lambda d: d.lmbda > 0),
    "on_policy_top_p": ("--distillation_config.lmbda > 0", lambda d: d.lmbda > 0),
    "on_policy_start": ("--distillation_config.lmbda > 0", lambda d: d.lmbda > 0),
    "on_policy_ce": ("--distillation_config.lmbda > 0", lambda d: d.lmbda > 0),
}


def validate_methods(run: RunConfig, spelled: dict) -> None:
    """Hidden-state, selective and freezing flags: valid values, and no detail flag of a method that is off."""
    from llm_recipes.losses.hidden import HIDDEN_ALIGNMENTS, HIDDEN_DISTANCES, HIDDEN_POSITIONS
    from llm_recipes.losses.selection import FEATURE_ATTRIBUTIONS

    t, d = run.train, run.distillation
    choices_of = {"hidden_distance": HIDDEN_DISTANCES,
                  "hidden_positions": HIDDEN_POSITIONS, "hidden_alignment": HIDDEN_ALIGNMENTS,
                  "feature_attribution": FEATURE_ATTRIBUTIONS}
    for name, choices in choices_of.items():
        if getattr(d, name) not in choices:
            raise UserError(f"--distillation_config.{name} must be one of {', '.join(choices)}, "
                            f"got {getattr(d, name)!r}")
    for name in ("hidden_weight", "feature_weight", "feature_offdiag_weight"):
        if not getattr(d, name) >= 0:
            raise UserError(f"--distillation_config.{name} must be 0 or more, got {getattr(d, name)}")
    for name, (switch, is_on) in METHOD_SWITCHES.items():
        if f"distillation_config.{name}" in spelled and not is_on(d):
            raise UserError(f"--distillation_config.{name} has no effect without {switch}: set it or remove the flag")
    if d.token_selection != "none" and d.distil_factor == 0:
        raise UserError("--distillation_config.token_selection selects positions for the logit term, which "
                        "--distillation_config.distil_factor 0 turns off: raise distil_factor or remove the flag")
    if d.hidden_positions == "all":
        if d.hidden_alignment != "none":
            raise UserError("--distillation_config.hidden_positions all pairs identical inputs position by position; "
                            "hidden_alignment answer_index only pairs answers: use hidden_positions answer")
        if t.encoder_decoder or d.encoder_decoder:
            raise UserError("--distillation_config.hidden_positions all needs two causal models (an encoder-decoder "
                            "decoder does not see the prompt): use hidden_positions answer")
    validate_teacher_cache(run, spelled)
    validate_on_policy(run)
    freezing = [f"--{name}" for name in ("freeze_regex", "unfreeze_regex", "spectrum_yaml") if getattr(t, name)]
    if freezing and t.use_peft:
        raise UserError(f"{freezing[0]} chooses which student weights train, but --use_peft trains only a LoRA "
                        "adapter: drop one of the two")


def validate_on_policy(run: RunConfig) -> None:
    """--distillation_config.lmbda and the sampling of the student's answers (llm_recipes.on_policy)."""
    t, d = run.train, run.distillation
    if not 0 <= d.lmbda <= 1:
        raise UserError(f"--distillation_config.lmbda is a probability: it must be in [0, 1], got {d.lmbda}")
    if d.lmbda == 0:
        return
    if d.on_policy_max_new_tokens < 1:
        raise UserError(f"--distillation_config.on_policy_max_new_tokens must be at least 1, got "
                        f"{d.on_policy_max_new_tokens}")
    if not d.on_policy_temperature > 0:
        raise UserError(f"--distillation_config.on_policy_temperature must be > 0, got {d.on_policy_temperature}")
    if not 0 < d.on_policy_top_p <= 1:
        raise UserError(f"--distillation_config.on_policy_top_p must be in (0, 1], got {d.on_policy_top_p}")
    if not 0 <= d.on_policy_start < 1:
        raise UserError(f"--distillation_config.on_policy_start is a share of the run's steps: it must be in [0, 1), "
                        f"got {d.on_policy_start}")
    if d.on_policy_ce and not d.cross_entropy_factor > 0:
        raise UserError("--distillation_config.on_policy_ce keeps the CE on on-policy steps, which "
                        "--distillation_config.cross_entropy_factor 0 turns off: raise cross_entropy_factor or drop "
                        "on_policy_ce")
    if d.teacher_cache is not None:
        raise UserError("--distillation_config.lmbda > 0 trains on the student's own answers, which a teacher cache "
                        "(written for the data set's answers) holds no rows for: drop --distillation_config."
                        "teacher_cache (on-policy needs the live teacher) or set lmbda 0")
    if d.distil_factor == 0:
        raise UserError("--distillation_config.lmbda > 0 samples answers for the distillation term, which "
                        "--distillation_config.distil_factor 0 turns off (and the CE is skipped on sampled answers): "
                        "raise distil_factor or set lmbda 0")
    if t.encoder_decoder or d.encoder_decoder:
        raise UserError("--distillation_config.lmbda > 0 needs a causal student and teacher (an encoder-decoder's "
                        "sampled answers are not supported yet): set lmbda 0")


LIVE_TEACHER_FLAGS = ("enable_fsdp", "pure_bf16", "mixed_precision", "use_fp16", "use_fast_kernels",
                      "sharding_strategy", "fsdp_cpu_offload", "trust_remote_code", "tokenizer_name", "encoder_decoder")


def validate_teacher_cache(run: RunConfig, spelled: dict) -> None:
    """A cached teacher has no weights: no hidden-state or feature term, no flag about running it."""
    d = run.distillation
    if d.teacher_cache is None:
        return
    if d.distill_eos:
        raise UserError("--distillation_config.distill_eos ends the teacher's answers with its EOS, whose rows a "
                        "teacher cache was not written with: drop one of the two")
    if d.projected_continuation:
        raise UserError("--distillation_config.projected_continuation reads the teacher's row before each group's "
                        "token, which a teacher cache does not serve: drop one of the two")
    for name in ("hidden_weight", "feature_weight"):
        if getattr(d, name) > 0:
            raise UserError(f"--distillation_config.{name} needs the teacher's hidden states, which a teacher cache "
                            "does not hold: drop --distillation_config.teacher_cache (train with the live teacher) "
                            f"or the {name}")
    for name in LIVE_TEACHER_FLAGS:
        if f"distillation_config.{name}" in spelled:
            raise UserError(f"{spelled[f'distillation_config.{name}']} has no effect with "
                            "--distillation_config.teacher_cache (the teacher is not loaded; its tokenizer and "
                            "kind come from the cache): remove it")


# --------------------------------------------------------------------------------------------- plan
@dataclass(frozen=True)
class RunPlan:
    """What the configuration resolves to for this student and teacher (derived, never stored back)."""

    spec: LossSpec  # the logit term, resolved and validated once (`auto` resolved; name "none": no logit term)
    distil_factor: float  # its weight (the loss's default when --distillation_config.distil_factor is unset)
    same_tokenizer: bool  # the two tokenizers have the same vocabulary (token strings and ids)
    intermediate_terms: bool  # a hidden-state or feature term is on
    student_attention: Optional[str]  # attn_implementation of the student
    text_groups: bool = False  # the data pipeline aligns answers by text (the logit term or hidden_alignment text)
    distill_eos: bool = False  # the teacher's answers end with its EOS, paired with the student's (distill_eos)
    continuation: bool = False  # group starts carry the previous group's continuation node (projected_continuation)

    @property
    def uses_teacher(self) -> bool:
        return self.spec.distills or self.intermediate_terms


def refuse_other_families_flags(given: dict, loss) -> None:
    """A loss family's detail flag (ULD's uld_top_k, MultiLevelOT's sinkhorn_reg, ...) given while the run's
    loss is of another family would have no effect: refuse it, naming the loss that reads it."""
    from llm_recipes.losses.table import LOSSES

    readers: dict = {}
    for row in LOSSES.values():
        for name in row.family.reads:
            families = readers.setdefault(name, [])
            families += [] if row.family.name in families else [row.family.name]
    for name, families in readers.items():
        if f"distillation_config.{name}" in given and name not in loss.family.reads:
            raise UserError(f"--distillation_config.{name} has no effect with --distillation_config.loss {loss.name} "
                            f"(only the {' / '.join(families)} losses read it): remove it or choose such a loss")


def resolve_plan(run: RunConfig, student_tokenizer, teacher_tokenizer, cache=None) -> RunPlan:
    """The run's plan once its tokenizers are loaded (teacher_tokenizer None without --distillation; `cache`:
    the teacher cache's metadata): the one place the loss is resolved and its values checked."""
    t, d = run.train, run.distillation
    attention = "sdpa" if t.use_fast_kernels else t.attn_implementation
    same = not t.distillation or student_tokenizer.get_vocab() == teacher_tokenizer.get_vocab()
    sizes = dict(student_vocab_size=len(student_tokenizer),
                 teacher_vocab_size=len(teacher_tokenizer if teacher_tokenizer is not None else student_tokenizer),
                 same_tokenizer=same, student_encoder_decoder=t.encoder_decoder,
                 teacher_encoder_decoder=d.encoder_decoder, chunk_size=t.logits_chunk_size, cache=cache)
    if not t.distillation:
        return RunPlan(LossSpec.from_config(d, name=SFT_ONLY, **sizes), 0.0, True, False, attention)
    intermediate = d.hidden_weight > 0 or d.feature_weight > 0
    if intermediate and not same and d.hidden_alignment == "none":
        raise UserError("hidden-state and feature distillation compare the two models position by position, but "
                        "the student and teacher tokenizers differ: set --distillation_config.hidden_alignment text "
                        "(the first tokens of text-aligned groups) or answer_index (the i-th answer tokens, as ULD)")
    spec = LossSpec.from_config(d, **sizes)
    refuse_other_families_flags(run.given, spec.loss)
    factor = d.distil_factor if d.distil_factor is not None else spec.loss.distil_factor
    if factor == 0:  # no logit term: the plain CE (the named loss was still checked)
        spec = LossSpec.from_config(d, name=SFT_ONLY, **sizes)
    text_groups = (spec.distills and spec.alignment == "text") or (intermediate and d.hidden_alignment == "text")
    continuation = spec.distills and spec.family.continues_groups(spec.options)
    return RunPlan(spec, factor, same, intermediate, attention, text_groups, distills_eos(d), continuation)
