"""Command-line flags -> the run's dataclass configs.

`fire` hands `main(**kwargs)` every `--flag value` as a keyword. The llama-recipes forks silently
ignored anything they did not recognise; here every flag must land somewhere:

* `--lr 1e-6`                           -> train_config.lr (undotted flags set the train config; the
                                           llama-recipes FSDP names such as `--fsdp_cpu_offload` set
                                           fsdp_config when train_config has no such field)
* `--distillation_config.model_name X`  -> distillation_config.model_name
* `--distillation_config_model_name X`  -> the same (the MultiLevelOT README's spelling)
* `--f 1|2`                             -> MultiLevelOT fast / greedy (the MultiLevelOT fork's flag)

Anything else is a `UserError` naming the flag and the nearest valid one. Values are checked and
converted against the dataclass field types.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from dataclasses import dataclass, field, fields
from typing import Any

from configs import dataset, distillation_config, fsdp_config, lora_config, train_config
from llm_recipes.errors import UserError

CONFIG_CLASSES = {
    "train_config": train_config,
    "distillation_config": distillation_config,
    "fsdp_config": fsdp_config,
    "lora_config": lora_config,
    "dataset": dataset,
}
# Fields of the dataset config that the trainer fills in before each get_split call.
TRAINER_SET_DATASET_FIELDS = {"role", "model_name", "encoder_decoder"}
MULTILEVEL_OT_MODES = {1: "fast", 2: "greedy"}
OPTIMIZERS = ("adamw", "sgd", "adafactor")
SCHEDULERS = ("onecycle", "cosine", "linear", "constant")


@dataclass
class RunConfig:
    """All configs of one run, plus the flags the user actually gave (for provenance)."""

    train: train_config = field(default_factory=train_config)
    distillation: distillation_config = field(default_factory=distillation_config)
    fsdp: fsdp_config = field(default_factory=fsdp_config)
    lora: lora_config = field(default_factory=lora_config)
    dataset: dataset = field(default_factory=dataset)
    given: dict = field(default_factory=dict)

    def section(self, config_name: str):
        return {
            "train_config": self.train,
            "distillation_config": self.distillation,
            "fsdp_config": self.fsdp,
            "lora_config": self.lora,
            "dataset": self.dataset,
        }[config_name]

    def to_dict(self) -> dict:
        out = {name: dataclasses.asdict(self.section(name)) for name in CONFIG_CLASSES}
        out["flags_given"] = self.given
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str)


def valid_flag_names() -> list[str]:
    names = [f.name for f in fields(train_config)]
    for config_name, cls in CONFIG_CLASSES.items():
        if config_name == "train_config":
            continue
        names += [f"{config_name}.{f.name}" for f in fields(cls) if not _trainer_set(config_name, f.name)]
    return names + ["f"]


def _trainer_set(config_name: str, name: str) -> bool:
    return config_name == "dataset" and name in TRAINER_SET_DATASET_FIELDS


def _unknown(flag: str) -> UserError:
    match = difflib.get_close_matches(flag, valid_flag_names(), n=1, cutoff=0.6)
    hint = f"did you mean --{match[0]}?" if match else "run `python finetuning.py --help` for the list"
    return UserError(f"unknown flag --{flag}: {hint}")


def _field_names(config_name: str) -> set[str]:
    return {f.name for f in fields(CONFIG_CLASSES[config_name])}


def resolve_flag(flag: str) -> tuple[str, str]:
    """Map a flag name to (config name, field name), or raise a UserError."""
    flag = flag.replace("-", "_")
    if "." in flag:
        config_name, _, name = flag.partition(".")
        if config_name not in CONFIG_CLASSES:
            raise _unknown(flag)
        if name not in _field_names(config_name):
            raise _unknown(flag)
        if _trainer_set(config_name, name):
            raise UserError(f"--{flag} is set by the trainer for each model, not by a flag: remove it")
        return config_name, name
    for config_name in CONFIG_CLASSES:
        prefix = config_name + "_"
        if config_name != "train_config" and flag.startswith(prefix):
            name = flag[len(prefix):]
            if name in _field_names(config_name) and not _trainer_set(config_name, name):
                return config_name, name
            raise _unknown(f"{config_name}.{name}")
    if flag in _field_names("train_config"):
        return "train_config", flag
    if flag in _field_names("fsdp_config"):
        return "fsdp_config", flag
    raise _unknown(flag)


def coerce_value(flag: str, value: Any, annotation: Any) -> Any:
    """Convert a fire-parsed value to the field's type, or raise a UserError naming the flag."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() == "none"):
            return None
        return coerce_value(flag, value, inner[0])
    if origin in (list, typing.List):
        items = value
        if isinstance(value, str):
            items = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(items, (list, tuple)):
            raise UserError(f"--{flag} expects a list such as a,b or [a,b], got {value!r}")
        return [coerce_value(flag, v, args[0] if args else str) for v in items]
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise UserError(f"--{flag} expects true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, bool):
            raise UserError(f"--{flag} expects an integer value, got no value")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise UserError(f"--{flag} expects an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, bool):
            raise UserError(f"--{flag} expects a number, got no value")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise UserError(f"--{flag} expects a number, got {value!r}")
    if annotation is str:
        if isinstance(value, bool):
            raise UserError(f"--{flag} expects a value, e.g. --{flag} VALUE")
        if isinstance(value, (int, float)):
            return str(value)
        if isinstance(value, str):
            return value
        raise UserError(f"--{flag} expects a string, got {value!r}")
    return value


def _field_type(config_name: str, name: str):
    return typing.get_type_hints(CONFIG_CLASSES[config_name])[name]


def parse_flags(kwargs: dict) -> RunConfig:
    """Build the run's configs from fire's keyword arguments and validate them."""
    run = RunConfig()
    seen: dict[tuple[str, str], str] = {}
    for flag, value in kwargs.items():
        if flag == "f":
            mode = coerce_value("f", value, int)
            if mode not in MULTILEVEL_OT_MODES:
                raise UserError(f"--f expects 1 (MultiLevelOT fast) or 2 (MultiLevelOT greedy), got {value!r}")
            for name, v in (("loss", "multilevel_ot"), ("multilevel_ot_mode", MULTILEVEL_OT_MODES[mode])):
                _set(run, seen, "distillation_config", name, v, f"--f {mode}")
            continue
        config_name, name = resolve_flag(flag)
        coerced = coerce_value(flag, value, _field_type(config_name, name))
        _set(run, seen, config_name, name, coerced, f"--{flag}")
    run.given = {f"{c}.{n}" if c != "train_config" else n: getattr(run.section(c), n) for (c, n) in seen}
    validate(run, seen)
    return run


def _set(run: RunConfig, seen: dict, config_name: str, name: str, value: Any, spelled: str) -> None:
    key = (config_name, name)
    if key in seen and getattr(run.section(config_name), name) != value:
        raise UserError(f"{seen[key]} and {spelled} set {config_name}.{name} to different values: keep one")
    if not hasattr(run.section(config_name), name):
        raise UserError(f"{spelled} needs distillation_config.{name}, which this version does not have")
    seen[key] = spelled
    setattr(run.section(config_name), name, value)


def validate(run: RunConfig, seen: dict) -> None:
    """Cross-field checks: reject values that cannot work and flags that would have no effect."""
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
    if not 0 <= t.warmup_ratio < 1:
        raise UserError(f"--warmup_ratio must be in [0, 1), got {t.warmup_ratio}")
    if t.context_length is not None and t.context_length < 2:
        raise UserError(f"--context_length must be at least 2, got {t.context_length}")
    if t.optimizer.lower() not in OPTIMIZERS:
        raise UserError(f"--optimizer {t.optimizer} is not supported: use AdamW, SGD or Adafactor")
    if t.scheduler.lower() not in SCHEDULERS:
        raise UserError(f"--scheduler {t.scheduler} is not supported: use one of {', '.join(SCHEDULERS)}")
    if t.batching_strategy != "padding":
        raise UserError(f"--batching_strategy {t.batching_strategy} is not supported: distillation pairs "
                        "examples across two tokenizers, which packing would break; use padding")
    if t.peft_method != "lora":
        raise UserError(f"--peft_method {t.peft_method} is not supported: use lora")
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

    given_sections = {c for (c, _) in seen}
    if "distillation_config" in given_sections and not t.distillation:
        flags = sorted(v for (c, _), v in seen.items() if c == "distillation_config")
        raise UserError(f"{flags[0]} has no effect without --distillation: add --distillation or remove it")
    if "lora_config" in given_sections and not t.use_peft:
        flags = sorted(v for (c, _), v in seen.items() if c == "lora_config")
        raise UserError(f"{flags[0]} has no effect without --use_peft: add --use_peft or remove it")
    if "fsdp_config" in given_sections and not t.enable_fsdp:
        flags = sorted(v for (c, _), v in seen.items() if c == "fsdp_config")
        raise UserError(f"{flags[0]} has no effect without --enable_fsdp: add --enable_fsdp or remove it")
    if ("train_config", "num_freeze_layers") in seen and not t.freeze_layers:
        raise UserError("--num_freeze_layers has no effect without --freeze_layers: add --freeze_layers")
    if t.quantization or d.quantization:
        raise UserError("--quantization is not supported by this trainer: use --pure_bf16 (student) and "
                        "--distillation_config.pure_bf16 (teacher) to halve memory, or LoRA (--use_peft)")
    validate_sharding(run, seen)
    validate_methods(run, seen)
    if t.use_fast_kernels and t.attn_implementation not in (None, "sdpa"):
        raise UserError("--use_fast_kernels means attn_implementation=sdpa: drop one of the two flags")
    if t.use_fast_kernels:
        t.attn_implementation = "sdpa"


def validate_sharding(run: RunConfig, seen: dict) -> None:
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
    teacher_sharding = sorted(v for (c, name), v in seen.items() if c == "distillation_config"
                              and name in ("sharding_strategy", "fsdp_cpu_offload"))
    if teacher_sharding and not d.enable_fsdp:
        raise UserError(f"{teacher_sharding[0]} has no effect without --distillation_config.enable_fsdp: add it "
                        "or remove the flag")
    if t.low_cpu_fsdp or d.low_cpu_fsdp:
        raise UserError("--low_cpu_fsdp is not supported: every process loads the full weights before sharding "
                        "them; remove the flag")
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
}


def validate_methods(run: RunConfig, seen: dict) -> None:
    """Hidden-state, selective and freezing flags: valid values, and no detail flag of a method that is off."""
    from llm_recipes.losses.hidden import HIDDEN_ALIGNMENTS, HIDDEN_DISTANCES, HIDDEN_POSITIONS
    from llm_recipes.losses.selection import FEATURE_ATTRIBUTIONS, TOKEN_SELECTIONS

    t, d = run.train, run.distillation
    choices_of = {"token_selection": TOKEN_SELECTIONS, "hidden_distance": HIDDEN_DISTANCES,
                  "hidden_positions": HIDDEN_POSITIONS, "hidden_alignment": HIDDEN_ALIGNMENTS,
                  "feature_attribution": FEATURE_ATTRIBUTIONS}
    for name, choices in choices_of.items():
        if getattr(d, name) not in choices:
            raise UserError(f"--distillation_config.{name} must be one of {', '.join(choices)}, got {getattr(d, name)!r}")
    for name in ("hidden_weight", "feature_weight", "feature_offdiag_weight"):
        if not getattr(d, name) >= 0:
            raise UserError(f"--distillation_config.{name} must be 0 or more, got {getattr(d, name)}")
    if not 0 < d.token_selection_ratio <= 1:
        raise UserError(f"--distillation_config.token_selection_ratio must be in (0, 1], got {d.token_selection_ratio}")
    for name, (switch, is_on) in METHOD_SWITCHES.items():
        if ("distillation_config", name) in seen and not is_on(d):
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
    freezing = [f"--{name}" for name in ("freeze_regex", "unfreeze_regex", "spectrum_yaml") if getattr(t, name)]
    if freezing and t.use_peft:
        raise UserError(f"{freezing[0]} chooses which student weights train, but --use_peft trains only a LoRA "
                        "adapter: drop one of the two")


def field_comments(cls) -> dict[str, str]:
    """The `# comment` written after each field in configs/*.py: the single source of the flag docs."""
    import inspect
    import re

    comments = {}
    for line in inspect.getsource(cls).splitlines():
        match = re.match(r"\s+(\w+)\s*:[^#]*?(?:#\s*(.*))?$", line)
        if match and match.group(1) in {f.name for f in fields(cls)}:
            comments[match.group(1)] = (match.group(2) or "").strip()
    return comments


def flag_reference(markdown: bool = False) -> str:
    """Every flag with its default and meaning, for --help and the README."""
    lines = []
    for config_name, cls in CONFIG_CLASSES.items():
        comments = field_comments(cls)
        title = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        lines += ["", f"### {config_name}" if markdown else f"{config_name}: {title}"]
        if markdown:
            lines += ["", title, "", "| flag | default | meaning |", "| --- | --- | --- |"]
        for f in fields(cls):
            if _trainer_set(config_name, f.name):
                continue
            flag = f"--{f.name}" if config_name == "train_config" else f"--{config_name}.{f.name}"
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            default = _display_default(default)
            if markdown:
                lines.append(f"| `{flag}` | `{default}` | {comments.get(f.name, '')} |")
            else:
                lines.append(f"  {flag:<45} {str(default):<14} {comments.get(f.name, '')}")
    alias = "--f 1|2: MultiLevelOT fast (1) or greedy (2); sets distillation_config.loss=multilevel_ot"
    lines += ["", f"Alias: `{alias}`" if markdown else alias]
    return "\n".join(lines).lstrip("\n")


def _display_default(value: Any) -> str:
    from configs.paths import REPO_ROOT

    text = str(value)
    return text.replace(str(REPO_ROOT) + "/", "") if isinstance(value, str) else text


if __name__ == "__main__":
    import sys

    print(flag_reference(markdown="--markdown" in sys.argv[1:]))
