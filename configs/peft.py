from dataclasses import dataclass
from typing import List, Optional

from configs.fields import option


@dataclass(frozen=True)
class lora_config:
    """LoRA adapter for the student (`--use_peft`). Flags: `--lora_config.r 16` etc."""

    r: int = option(8, "rank of the adapter matrices", group="training")
    lora_alpha: int = option(32, "scaling: the update is multiplied by lora_alpha / r", group="training")
    target_modules: Optional[List[str]] = option(None, "None: peft's default for the architecture", group="training")
    lora_dropout: float = option(0.05, "dropout on the adapter's input", group="training")
    bias: str = option("none", "none | all | lora_only: which biases train", group="training")
