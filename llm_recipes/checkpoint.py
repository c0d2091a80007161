"""Checkpoints: an ordinary Hugging Face model folder that also holds what resuming needs.

    step-0000100/
      config.json, generation_config.json, model.safetensors    (save_pretrained; adapter files with LoRA)
      tokenizer files, run_config.json
      trainer_state.json     step, epoch, position in the epoch, best eval loss, what was trained
      optimizer.pt, scheduler.pt, rng_rank{R}.pt                  (loaded with torch.load(weights_only=True))

optimizer.pt is the full (unsharded) state keyed by parameter name, the same for 1 process, DDP and
FSDP (llm_recipes.distributed.optimizer_state_dict).

Writes are atomic: everything goes to a hidden temporary folder that is renamed into place, so a
crash never leaves a half-written checkpoint under a real name. Only the best (by eval loss) and the
last checkpoints are kept unless `--save_all`.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Callable, Optional

import torch

from llm_recipes.errors import UserError

CHECKPOINTS_DIR = "checkpoints"
TRAINER_STATE = "trainer_state.json"
RUN_CONFIG = "run_config.json"


def prepare_output_dir(path: str) -> Path:
    """Create the output folder and prove it is writable now, not after an hour of training."""
    output = Path(path)
    try:
        output.mkdir(parents=True, exist_ok=True)
        probe = output / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as error:
        raise UserError(f"cannot write to --output_dir {path}: {error.strerror or error}; choose a writable folder") from None
    return output


def checkpoint_name(global_step: int) -> str:
    return f"step-{global_step:07d}"


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _noop() -> None:
    return None


def save_checkpoint(output_dir: str, name: str, *, rank: int, model_saver: Callable[[Path], None], tokenizer,
                    run_config_json: str, trainer_state: dict, optimizer_state: Optional[dict],
                    scheduler_state: dict, barrier: Callable[[], None] = _noop) -> Path:
    """Write one checkpoint atomically; every rank calls it (rank 0 writes the shared files)."""
    root = Path(output_dir) / CHECKPOINTS_DIR
    final = root / name
    tmp = root / f".tmp-{name}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    model_saver(tmp)  # every rank takes part (FSDP gathers); only rank 0 writes files
    torch.save(rng_state(), tmp / f"rng_rank{rank}.pt")
    if rank == 0:
        tokenizer.save_pretrained(tmp)
        (tmp / RUN_CONFIG).write_text(run_config_json)
        (tmp / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=2))
        if optimizer_state is not None:
            torch.save(optimizer_state, tmp / "optimizer.pt")
        torch.save(scheduler_state, tmp / "scheduler.pt")
    barrier()
    if rank == 0:
        if final.exists():
            trash = root / f".old-{name}"
            shutil.rmtree(trash, ignore_errors=True)
            os.rename(final, trash)
            shutil.rmtree(trash)
        os.rename(tmp, final)
    barrier()
    return final


def prune(output_dir: str, keep: set[str]) -> None:
    """Delete every checkpoint folder not named in `keep` (rank 0 only)."""
    root = Path(output_dir) / CHECKPOINTS_DIR
    for path in root.glob("step-*"):
        if path.name not in keep:
            shutil.rmtree(path)


def point(output_dir: str, alias: str, target: Optional[str]) -> None:
    """Make output_dir/<alias> (best, last) a relative symlink to checkpoints/<target>, atomically."""
    if target is None:
        return
    link = Path(output_dir) / alias
    tmp = Path(output_dir) / f".{alias}.tmp"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(os.path.join(CHECKPOINTS_DIR, target), tmp)
    os.replace(tmp, link)


def load_resume_state(path: str, rank: int) -> dict:
    """trainer state, optimizer, scheduler and this rank's RNG from a checkpoint folder."""
    folder = Path(path)
    state_file = folder / TRAINER_STATE
    if not state_file.is_file():
        raise UserError(f"--resume_from {path} is not a checkpoint of this trainer (no {TRAINER_STATE})")
    rng_file = folder / f"rng_rank{rank}.pt"
    if not rng_file.is_file():
        raise UserError(f"--resume_from {path} has no RNG state for rank {rank}: resume with the number of "
                        "processes that wrote it")
    optimizer_file = folder / "optimizer.pt"
    optimizer = None
    if optimizer_file.is_file():  # rank 0 reads it and broadcasts (distributed.load_optimizer_state_dict)
        optimizer = torch.load(optimizer_file, weights_only=True) if rank == 0 else {}
    return {
        "trainer_state": json.loads(state_file.read_text()),
        "optimizer": optimizer,
        "scheduler": torch.load(folder / "scheduler.pt", weights_only=True),
        "rng": torch.load(rng_file, weights_only=True),
    }
