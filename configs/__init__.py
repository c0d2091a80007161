"""Run configuration: one dataclass per concern, merged with command-line flags by
`llm_recipes.config.parse_flags`.

Names follow llama-recipes and the ULD / MultiLevelOT forks so that their flags keep working:
undotted flags set `train_config`, `--<config>.<field>` (or `--<config>_<field>`) set the others.
"""
from configs.datasets import dataset
from configs.distillation import distillation_config
from configs.fsdp import fsdp_config
from configs.peft import lora_config
from configs.training import train_config
from configs.wandb import wandb_config

__all__ = ["dataset", "distillation_config", "fsdp_config", "lora_config", "train_config", "wandb_config"]
