"""Metrics as JSON lines (one object per line, always), and the same scalars for TensorBoard and
Weights & Biases when asked (`--use_tensorboard`, `--use_wandb`: optional packages, checked before the
run starts)."""
from __future__ import annotations

import importlib.util
import json
import resource
import sys
from pathlib import Path
from typing import Optional

import torch

from llm_recipes.errors import UserError

TENSORBOARD_DIR = "tensorboard"


def peak_memory_gb(device: torch.device) -> float:
    """Peak accelerator memory allocated by torch, or the process's peak resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / (2**30 if sys.platform == "darwin" else 2**20)


def missing_backends(use_wandb: bool, use_tensorboard: bool) -> list[str]:
    """One line per requested logging backend whose package is not installed."""
    problems = []
    if use_wandb and importlib.util.find_spec("wandb") is None:
        problems.append("--use_wandb needs the wandb package: pip install wandb (and wandb login), or drop the flag")
    if use_tensorboard and importlib.util.find_spec("tensorboard") is None:
        problems.append("--use_tensorboard needs the tensorboard package: pip install tensorboard, or drop the flag")
    return problems


def truncate(path: Path, last_step: int) -> int:
    """Keep the lines of steps <= last_step (a resumed run writes the later ones again); returns how many
    lines were dropped."""
    path = Path(path)
    if not path.exists():
        return 0
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    kept = [line for line in lines if json.loads(line).get("step", 0) <= last_step]
    path.write_text("".join(line + "\n" for line in kept))
    return len(lines) - len(kept)


class MetricsLog:
    """metrics.jsonl, plus TensorBoard / W&B scalars named `<train|eval>/<key>` at x = the optimizer step."""

    def __init__(self, path: Path, enabled: bool = True, tensorboard_dir: Optional[Path] = None,
                 wandb_settings: Optional[dict] = None):
        self.path, self.enabled = Path(path), enabled
        self.tensorboard = self.wandb = None
        if not enabled:
            return
        if tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(tensorboard_dir))
        if wandb_settings is not None:
            import wandb

            self.wandb = wandb.init(**wandb_settings)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        try:
            with self.path.open("a") as stream:
                stream.write(json.dumps(record) + "\n")
        except OSError as error:
            raise UserError(f"cannot write {self.path}: {error.strerror or error}; free space or fix the folder, then "
                            "continue with --resume_from") from None
        scalars = {f"{record.get('type', 'train')}/{key}": value for key, value in record.items()
                   if key not in ("type", "step", "epoch") and isinstance(value, (int, float))}
        if self.tensorboard is not None:
            for key, value in scalars.items():
                self.tensorboard.add_scalar(key, value, record.get("step", 0))
            self.tensorboard.flush()
        if self.wandb is not None:
            self.wandb.log(scalars, step=record.get("step", 0))

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()
