"""Faults made to happen for real, and what the trainer must do: refuse in one line, lose nothing.

A folder holding a run, every bad input reported before a model loads, bad data files (file and line),
a real SIGTERM / SIGINT (checkpoint, exit 128 + signal, bit-identical resume, each metrics step once),
a real write error (a file size limit set on the process: the OS refuses the write), and a real NaN
(a teacher with a NaN weight)."""
import dataclasses
import hashlib
import json
import os
import re
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, base_flags
from llm_recipes import checkpoint, interrupt
from llm_recipes.config import parse_flags
from llm_recipes.finetuning import main, train

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def command_line(flags: dict) -> list[str]:
    line = [sys.executable, str(REPO / "finetuning.py")]
    for key, value in flags.items():
        line += [f"--{key}", str(value)]
    return line


def errors(capsys, flags: dict, code: int = 2) -> list[str]:
    """Run the CLI in this process; the `error: ` lines that end its stderr, each on its own line (progress
    bars before them allowed), after checking the exit code."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(**flags)
    assert exit_info.value.code == code
    lines = capsys.readouterr().err.strip().splitlines()
    first = next((i for i, line in enumerate(lines) if line.startswith("error: ")), len(lines))
    assert lines[first:] and all(line.startswith("error: ") for line in lines[first:]), lines
    return lines[first:]


def fingerprint(folder: Path) -> dict:
    """Every file under the folder (symlinks as their targets) and its SHA-256."""
    found = {}
    for path in sorted(folder.rglob("*")):
        if path.is_symlink():
            found[str(path.relative_to(folder))] = os.readlink(path)
        elif path.is_file():
            found[str(path.relative_to(folder))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def metric_steps(folder: Path) -> list[tuple]:
    return [(r["type"], r["step"]) for r in map(json.loads, (folder / "metrics.jsonl").read_text().splitlines())]


def same_weights(a: Path, b: Path) -> bool:
    x, y = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


# ---------------------------------------------------------------------------- 1. a folder holding a run
def test_a_folder_holding_a_run_is_refused_then_resumed_or_overwritten(tiny, tmp_path, capsys):
    out = tmp_path / "out"
    train(parse_flags(base_flags(tiny, out, save_step=5)))
    before = fingerprint(out)
    (line,) = errors(capsys, base_flags(tiny, out, save_step=5))
    assert f"--output_dir {out} holds a previous run" in line
    assert f"--resume_from {out}" in line and "--overwrite_output_dir" in line
    assert fingerprint(out) == before  # nothing deleted, rewritten or appended

    # --resume_from takes the run folder itself: its latest checkpoint (step 12), then a second epoch
    result = train(parse_flags(base_flags(tiny, out, save_step=5, num_epochs=2, resume_from=str(out))))
    assert result["state"]["global_step"] == 24
    steps = [s for kind, s in metric_steps(out) if kind == "train"]
    assert steps == list(range(1, 25))  # each step once

    # --overwrite_output_dir: only now is the earlier run removed
    train(parse_flags(base_flags(tiny, out, max_train_step=3, overwrite_output_dir=True)))
    assert [s for kind, s in metric_steps(out) if kind == "train"] == [1, 2, 3]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000003"]


def test_a_run_that_failed_in_set_up_leaves_the_folder_free(tiny, tmp_path, capsys):
    out = tmp_path / "out"
    errors(capsys, base_flags(tiny, out, **{"distillation_config.model_name": str(tmp_path / "nope")}))
    assert checkpoint.holds_a_run(str(out)) == []
    train(parse_flags(base_flags(tiny, out, max_train_step=2)))  # no --overwrite_output_dir needed


# ---------------------------------------------------------------------------- 2. one pass, every problem
def test_every_input_problem_is_reported_at_once_before_any_model_loads(tiny, tmp_path, capsys, monkeypatch):
    from llm_recipes import models

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the inputs were checked")

    monkeypatch.setattr(models, "load_model", no_loading)
    (tmp_path / "held").mkdir()
    (tmp_path / "held" / "metrics.jsonl").write_text('{"type": "train", "step": 1}\n')
    flags = base_flags(tiny, tmp_path / "held", **{
        "dataset.file": str(tmp_path / "missing_loader.py"),
        "distillation_config.model_name": str(tmp_path / "no_teacher"), "use_tensorboard": True})
    started = time.perf_counter()
    lines = errors(capsys, flags)
    assert time.perf_counter() - started < 20
    text = "\n".join(lines)
    assert len(lines) >= 3, lines
    assert "holds a previous run" in text and "missing_loader.py" in text and "no_teacher" in text
    assert "tensorboard" in text.lower()


@pytest.mark.parametrize("source, message", [
    ("missing_folder", "data source {tmp}/missing_folder does not exist"),
    (None, "the people_qa data is not at {tmp}/people_qa: write it with python -m examples.real_pair.people_qa"),
])
def test_a_missing_data_source_is_refused_before_anything_is_written(tiny, tmp_path, capsys, monkeypatch, source,
                                                                      message):
    """A task's data that is not there stops the run in its input checks: no output folder, no projection map."""
    from llm_distillation.datasets import tasks

    monkeypatch.setitem(tasks.TASK_DATA, "people_qa", dataclasses.replace(
        tasks.TASK_DATA["people_qa"], source=str(tmp_path / "people_qa")))
    flags = {"distillation": True, "output_dir": str(tmp_path / "out"),
             "dataset.file": str(REPO / "llm_distillation/datasets/loader/people_qa.py")}
    if source:
        flags["dataset.source"] = str(tmp_path / source)
    (line,) = errors(capsys, flags)
    assert message.format(tmp=tmp_path) in line
    assert not (tmp_path / "out").exists()


def test_a_tokenizer_longer_than_its_models_embedding_is_refused_up_front(tiny, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    student = tmp_path / "student"
    AutoModelForCausalLM.from_pretrained(tiny["student"]).save_pretrained(student)
    tokenizer = AutoTokenizer.from_pretrained(tiny["student"])
    tokenizer.add_special_tokens({"pad_token": "<|new_pad|>"})  # a pad token added, the embedding not resized
    tokenizer.save_pretrained(student)
    (line,) = errors(capsys, base_flags(tiny, tmp_path / "out", model_name=str(student)))
    assert f"the student model {student} has {len(tokenizer) - 1} embedding rows but its tokenizer has " \
           f"{len(tokenizer)} tokens (pad id {len(tokenizer) - 1})" in line
    assert "resize_token_embeddings" in line


@pytest.mark.slow
def test_a_stray_positional_argument_is_refused_before_anything_loads():
    done = subprocess.run(command_line({"distillation": True}) + ["squad"], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: unexpected argument 'squad': python finetuning.py takes only --flag value pairs (a value belongs "
        "right after its flag)"]


# ---------------------------------------------------------------------------- 3. bad data files
@pytest.mark.parametrize("content, message", [
    ("", "train.jsonl: no examples"),
    ("\n\n", "train.jsonl: no examples"),
    ('{"id": "a", "context": "c", "question": "q", "answers": ["x"]}\n{"id": "b", "context": oops}\n',
     "train.jsonl:2: not valid JSON (Expecting value at column 24)"),
    ('["a list"]\n', "train.jsonl:1: not a JSON object (list): each line is one example"),
])
def test_a_bad_data_file_is_named_with_its_line(tiny, tmp_path, capsys, content, message):
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text(content)
    flags = {"model_name": tiny["student"], "output_dir": str(tmp_path / "out"), "dataset.source": str(data),
             "dataset.file": str(REPO / "llm_distillation" / "datasets" / "loader" / "tiny_qa.py")}
    (line,) = errors(capsys, flags)
    assert line == f"error: {data / message}"


# ---------------------------------------------------------------------------- 4. SIGTERM / SIGINT
def interrupt_run(flags: dict, out: Path, signal_number: int, after_lines: int = 3) -> subprocess.CompletedProcess:
    """Start the trainer, send it a real signal once it has logged `after_lines` steps, wait for it."""
    process = subprocess.Popen(command_line(flags), cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    metrics = out / "metrics.jsonl"
    while time.time() < deadline and process.poll() is None:
        if metrics.exists() and metrics.read_text().count('"train"') >= after_lines:
            process.send_signal(signal_number)
            break
        time.sleep(0.02)
    stdout, stderr = process.communicate(timeout=120)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


@pytest.mark.slow
@pytest.mark.parametrize("signal_number", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_saves_a_checkpoint_and_resume_is_bit_identical(tiny, tmp_path, signal_number):
    common = dict(num_epochs=20, max_train_step=60, scheduler="onecycle")
    out = tmp_path / "stopped"
    done = interrupt_run(base_flags(tiny, out, **common), out, signal_number)
    name = signal.Signals(signal_number).name
    assert done.returncode == 128 + signal_number, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    state = json.loads((out / "last" / "trainer_state.json").read_text())
    step = state["global_step"]
    assert 3 <= step < 60, "the signal came too late to test anything"
    assert last == (f"interrupted: stopped by {name} at step {step}: checkpoint "
                    f"{out / 'checkpoints' / checkpoint.checkpoint_name(step)}; continue with --resume_from {out}")
    assert [s for kind, s in metric_steps(out) if kind == "train"] == list(range(1, step + 1))

    train(parse_flags(base_flags(tiny, out, resume_from=str(out), **common)))
    straight = tmp_path / "straight"
    train(parse_flags(base_flags(tiny, straight, **common)))
    assert same_weights(out / "last", straight / "last")  # bit for bit
    assert metric_steps(out) == metric_steps(straight)  # every step and evaluation once
    losses = [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
              if r["type"] == "train"]
    assert losses == [r["loss"] for r in map(json.loads, (straight / "metrics.jsonl").read_text().splitlines())
                      if r["type"] == "train"]


def test_a_second_signal_exits_at_once(monkeypatch, capsys):
    exits = []
    monkeypatch.setattr(interrupt.os, "_exit", exits.append)
    with interrupt.StopSignals() as signals:
        os.kill(os.getpid(), signal.SIGTERM)
        assert signals.received == signal.SIGTERM and exits == []
        os.kill(os.getpid(), signal.SIGTERM)
        assert exits == [128 + signal.SIGTERM]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the previous handler is back
    assert "SIGTERM again: exiting now without saving" in capsys.readouterr().err


def test_a_killed_save_is_cleaned_up_and_a_replaced_checkpoint_restored(tmp_path):
    root = tmp_path / "checkpoints"
    (root / ".tmp-step-0000009").mkdir(parents=True)
    (root / ".old-step-0000004").mkdir()  # killed between moving step 4 aside and publishing its replacement
    (root / ".old-step-0000004" / "trainer_state.json").write_text("{}")
    (root / "step-0000002").mkdir()
    (root / ".old-step-0000002").mkdir()  # killed after publishing: the old copy is only trash
    removed = checkpoint.remove_stale(str(tmp_path))
    assert sorted(removed) == [".old-step-0000002", ".tmp-step-0000009"]
    assert sorted(p.name for p in root.iterdir()) == ["step-0000002", "step-0000004"]
    assert (root / "step-0000004" / "trainer_state.json").exists()


# ---------------------------------------------------------------------------- 5. a write error
def limit_file_size(limit: int):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write then fails with EFBIG instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


@pytest.mark.slow
def test_a_failed_write_keeps_the_checkpoints_before_it(tiny, tmp_path):
    out = tmp_path / "out"
    train(parse_flags(base_flags(tiny, out, save_step=5)))  # checkpoints of steps 10 (best) and 12 (last)
    before = fingerprint(out / "checkpoints")
    model_bytes = (out / "last" / "model.safetensors").stat().st_size
    limit = model_bytes // 2  # the next model file cannot be written; the metrics and run config still can
    assert max((out / name).stat().st_size for name in ("metrics.jsonl", "run_config.json")) < limit // 2
    flags = base_flags(tiny, out, save_step=5, num_epochs=2, resume_from=str(out))
    done = subprocess.run(command_line(flags), cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300,
                          preexec_fn=limit_file_size(limit))
    assert done.returncode == 2, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    target = out / "checkpoints" / "step-0000015"
    assert last.startswith(f"error: cannot write the checkpoint {target}: ") and "File too large" in last, last
    assert f"continue with --resume_from {out}" in last
    assert fingerprint(out / "checkpoints") == before  # intact, and no temporary folder left
    assert os.readlink(out / "last") == "checkpoints/step-0000012"


# ---------------------------------------------------------------------------- 6. a non-finite loss
def broken_teacher(tiny, folder: Path, rows) -> None:
    """The tiny teacher with NaN in the given rows of its embedding (a broken conversion, say)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny["teacher"])
    with torch.no_grad():
        model.get_input_embeddings().weight[rows] = float("nan")
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny["teacher"]).save_pretrained(folder)


def test_a_nan_names_the_step_and_the_term(tiny, tmp_path, capsys):
    """A teacher token whose embedding is NaN and that the first example lacks: the check at set-up (on the
    first example) passes, the first step whose batch holds the token fails, naming the distillation term."""
    import importlib.util
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    spec = importlib.util.spec_from_file_location("tiny_loader", tiny["loader"])
    loader = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loader)
    split = loader.get_split(SimpleNamespace(encoder_decoder=False, role="teacher"),
                             AutoTokenizer.from_pretrained(tiny["teacher"]), "train")
    first = set(split[0]["input_ids"])
    later = sorted({t for ids in split["input_ids"][1:] for t in ids} - first)
    assert later
    broken_teacher(tiny, tmp_path / "teacher", later)
    flags = base_flags(tiny, tmp_path / "out", **{"distillation_config.model_name": str(tmp_path / "teacher")})
    (line,) = errors(capsys, flags)
    assert re.fullmatch(r"error: the loss is not finite at step \d+ \(epoch 1\): distillation term nan; lower --lr, "
                        r"check the data for empty or broken examples, or try without --pure_bf16", line), line

    broken_teacher(tiny, tmp_path / "all_nan", list(range(5)) + sorted(first))  # fails on the first example
    flags = base_flags(tiny, tmp_path / "out2", **{"distillation_config.model_name": str(tmp_path / "all_nan")})
    (line,) = errors(capsys, flags)
    assert line == ("error: the teacher (LlamaForCausalLM) gives NaN or +inf logits on the first training batch: its "
                    "weights hold NaN or inf (a broken checkpoint or conversion)")
