"""Checkpoints: an ordinary Hugging Face model folder that also holds what resuming needs.

    step-0000100/
      config.json, generation_config.json, model.safetensors    (save_pretrained; adapter files with LoRA)
      tokenizer files, run_config.json
      trainer_state.json     step, epoch, position in the epoch, best eval loss, what was trained
      optimizer.pt, scheduler.pt, rng_rank{R}.pt                  (loaded with torch.load(weights_only=True))

optimizer.pt is the full (unsharded) state keyed by parameter name, the same for 1 process, DDP and
FSDP (llm_recipes.distributed.optimizer_state_dict).

Writes are atomic: everything goes to a hidden temporary folder, flushed to the disk and renamed into
place, so a crash or a full disk never leaves a half-written checkpoint under a real name (a killed
save's leftovers are removed at the next start). Only the best (by eval loss) and the last
checkpoints are kept unless `--save_all`. A folder that holds a run is never reused silently:
`claim_output_dir` refuses it unless the run is continued (--resume_from) or --overwrite_output_dir.
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
        raise UserError(f"cannot write to --output_dir {path}: {error.strerror or error}; "
                        "choose a writable folder") from None
    return output


def checkpoint_name(global_step: int) -> str:
    return f"step-{global_step:07d}"


def checkpoint_step(name: str) -> int:
    """The optimizer step of a checkpoint folder's name (`checkpoint_name`'s inverse)."""
    return int(name.rsplit("-", 1)[-1])


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


def _alone(failed: bool) -> bool:
    return failed


def _io_failure(error: BaseException) -> Optional[str]:
    """A readable reason when `error` is a failed write (a full disk, a file size limit, a read-only folder,
    safetensors' own I/O error), else None (a bug: re-raised as it is)."""
    if isinstance(error, OSError):
        where = f" ({error.filename})" if getattr(error, "filename", None) else ""
        return f"{error.strerror or error}{where}"
    text = " ".join(str(error).split())
    if any(sign in text for sign in ("IoError", "No space left", "File too large", "file write failed")):
        return text[:300]
    return None


def fsync_tree(folder: Path) -> None:
    """Flush every file of a folder and the folder itself to the disk (before the rename that publishes it)."""
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            descriptor = os.open(path, os.O_RDONLY)
            try:
                os.fsync(descriptor)
            finally:
                os.close(descriptor)
    fsync_dir(folder)


def fsync_dir(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _write_files(tmp: Path, rank: int, model_saver, tokenizer, run_config_json: str, trainer_state: dict,
                 optimizer_state: Optional[dict], scheduler_state: dict) -> None:
    model_saver(tmp)  # every rank takes part (FSDP gathers); only rank 0 writes files
    torch.save(rng_state(), tmp / f"rng_rank{rank}.pt")
    if rank == 0:
        tokenizer.save_pretrained(tmp)
        (tmp / RUN_CONFIG).write_text(run_config_json)
        (tmp / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=2))
        if optimizer_state is not None:
            torch.save(optimizer_state, tmp / "optimizer.pt")
        torch.save(scheduler_state, tmp / "scheduler.pt")


def _publish(tmp: Path, final: Path) -> None:
    """fsync the new checkpoint, then rename it into place (replacing a checkpoint of the same name)."""
    fsync_tree(tmp)
    if final.exists():
        trash = final.parent / f".old-{final.name}"
        shutil.rmtree(trash, ignore_errors=True)
        os.rename(final, trash)
        shutil.rmtree(trash)
    os.rename(tmp, final)
    fsync_dir(final.parent)


def save_checkpoint(output_dir: str, name: str, *, rank: int, model_saver: Callable[[Path], None], tokenizer,
                    run_config_json: str, trainer_state: dict, optimizer_state: Optional[dict],
                    scheduler_state: dict, agree: Callable[[bool], bool] = _alone) -> Path:
    """Write one checkpoint atomically; every rank calls it (rank 0 writes the shared files).

    Everything goes to a hidden temporary folder, flushed to the disk, then renamed into place: a crash
    or a failed write (a full disk) never leaves a half-written checkpoint under a real name, and the
    checkpoints already written stay intact. A write error becomes one line naming the path and the
    error; `agree(failed) -> any rank failed` keeps all ranks together (a collective under torchrun)."""
    root = Path(output_dir) / CHECKPOINTS_DIR
    final, tmp = root / name, root / f".tmp-{name}"
    steps = [lambda: (shutil.rmtree(tmp, ignore_errors=True), tmp.mkdir(parents=True)) if rank == 0 else None,
             lambda: _write_files(tmp, rank, model_saver, tokenizer, run_config_json, trainer_state, optimizer_state,
                                  scheduler_state),
             lambda: _publish(tmp, final) if rank == 0 else None]
    for step in steps:
        reason = None
        try:
            step()
        except Exception as error:  # noqa: BLE001 - I/O errors become one line; anything else is re-raised
            reason = _io_failure(error)
            if reason is None:
                raise
        if agree(reason is not None):
            if rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            raise UserError(f"cannot write the checkpoint {final}: {reason or 'another process failed to write it'}; "
                            "the checkpoints written before it are intact: free space (or fix the folder) and "
                            f"continue with --resume_from {output_dir}")
    return final


def remove_stale(output_dir: str) -> list[str]:
    """At start (rank 0): delete the temporary folders a killed save left behind; returns their names. A
    checkpoint being replaced (`.old-NAME`) whose replacement was never published is renamed back."""
    root = Path(output_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    for old in root.glob(".old-*"):
        final = root / old.name[len(".old-"):]
        if not final.exists():
            os.rename(old, final)
    stale = [path for pattern in (".tmp-*", ".old-*") for path in root.glob(pattern)]
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return [path.name for path in stale]


# ------------------------------------------------------------------------------------------ the run folder
RUN_FILES = (CHECKPOINTS_DIR, "best", "last", "metrics.jsonl", RUN_CONFIG, "tensorboard")
RESULTS = (CHECKPOINTS_DIR, "best", "last", "metrics.jsonl", "tensorboard")  # what a run that failed in set-up lacks


def holds_a_run(output_dir: str) -> list[str]:
    """The results of an earlier run in the folder (checkpoints, metrics), if any. A run config alone (a run
    that stopped before its first step) is not a result: the next run may take the folder."""
    folder = Path(output_dir)
    found = []
    for name in RESULTS:
        path = folder / name
        pattern = "step-*" if name == CHECKPOINTS_DIR else "*"
        if path.is_symlink() or (path.is_file() and path.stat().st_size > 0) or \
                (path.is_dir() and any(path.glob(pattern))):
            found.append(name)
    return found


def saved_checkpoints(folder: Path) -> list[Path]:
    """A run folder's complete checkpoints (those with a trainer state), oldest first."""
    found = sorted((folder / CHECKPOINTS_DIR).glob("step-*")) if (folder / CHECKPOINTS_DIR).is_dir() else []
    return [c for c in found if (c / TRAINER_STATE).is_file()]


def latest_checkpoint(path: str) -> Path:
    """--resume_from's checkpoint: the folder itself when it is one, else a run folder's last checkpoint."""
    folder = Path(path).expanduser()
    if (folder / TRAINER_STATE).is_file():
        return folder
    candidates = saved_checkpoints(folder)
    if not candidates:
        raise UserError(f"--resume_from {path} is neither a checkpoint of this trainer nor a run folder holding one "
                        f"(no {TRAINER_STATE}): pass the run's --output_dir or one of its checkpoints/step-*")
    return candidates[-1]


def claim_output_dir(output_dir: str, resume: Optional[Path], overwrite: bool) -> None:
    """Refuse to write into a folder that holds another run, unless continuing it or told to start over."""
    found = holds_a_run(output_dir)
    if not found or overwrite:
        return
    output = Path(output_dir).resolve()
    if resume is not None and output in resume.resolve().parents:
        return
    raise UserError(f"--output_dir {output_dir} holds a previous run ({', '.join(found)}): continue it with "
                    f"--resume_from {output_dir}, or start over with --overwrite_output_dir (which deletes its "
                    "checkpoints and metrics)")


def clear_run(output_dir: str) -> None:
    """--overwrite_output_dir: remove an earlier run's files (rank 0 only)."""
    folder = Path(output_dir)
    for name in RUN_FILES:
        path = folder / name
        if path.is_symlink() or path.is_file():
            path.unlink()
        elif path.is_dir():
            shutil.rmtree(path)


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
