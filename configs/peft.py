from dataclasses import dataclass
from typing import List, Optional


@dataclass
class lora_config:
    """LoRA adapter for the student (`--use_peft`). Flags: `--lora_config.r 16` etc."""

    r: int = 8
    lora_alpha: int = 32
    target_modules: Optional[List[str]] = None  # None: peft's default for the architecture
    lora_dropout: float = 0.05
    bias: str = "none"
