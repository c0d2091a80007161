from dataclasses import dataclass
from typing import List, Optional

from configs.fields import option


@dataclass(frozen=True)
class wandb_config:
    """Weights & Biases run settings (`--use_wandb`). Flags: `--wandb_config.project X` or `--wandb_project X`."""

    project: str = option("llm-distill-recipes", "W&B project", group="logging")
    entity: Optional[str] = option(None, "W&B team or user; None: your default", group="logging")
    name: Optional[str] = option(None, "run name; None: W&B's", group="logging")
    group: Optional[str] = option(None, "W&B run group", group="logging")
    tags: Optional[List[str]] = option(None, "run tags (a,b)", group="logging")
    notes: Optional[str] = option(None, "run notes", group="logging")
    mode: Optional[str] = option(None, "online | offline | disabled; None: W&B's default", group="logging")
