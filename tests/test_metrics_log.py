"""--use_wandb and --use_tensorboard log what metrics.jsonl holds; a missing package is a one-line error.

Neither package is a requirement, so the backends are replaced here by recording stand-ins installed as
the modules the trainer imports (`wandb`, `torch.utils.tensorboard`)."""
import importlib.machinery
import json
import sys
import types

import pytest

from conftest import base_flags
from llm_recipes.config import parse_flags
from llm_recipes.finetuning import main, train


class Recorder:
    def __init__(self):
        self.calls = []


def fake_module(name: str) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, loader=None)
    return module


@pytest.fixture
def backends(monkeypatch):
    """Stand-ins for wandb and TensorBoard's SummaryWriter that record every call."""
    record = Recorder()

    class Run:
        def log(self, scalars, step):
            record.calls.append(("wandb", step, dict(scalars)))

        def finish(self):
            record.calls.append(("wandb_finish",))

    wandb = fake_module("wandb")
    wandb.init = lambda **settings: record.calls.append(("wandb_init", settings)) or Run()

    class SummaryWriter:
        def __init__(self, folder):
            record.calls.append(("tensorboard_dir", folder))

        def add_scalar(self, key, value, step):
            record.calls.append(("tensorboard", step, key, value))

        def flush(self):
            pass

        def close(self):
            record.calls.append(("tensorboard_close",))

    tensorboard = fake_module("torch.utils.tensorboard")
    tensorboard.SummaryWriter = SummaryWriter
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    monkeypatch.setitem(sys.modules, "tensorboard", fake_module("tensorboard"))
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", tensorboard)
    return record


def test_wandb_and_tensorboard_get_the_scalars_of_metrics_jsonl(tiny, tmp_path, backends):
    flags = base_flags(tiny, tmp_path, save_step=5, use_wandb=True, use_tensorboard=True, wandb_project="distil",
                       **{"wandb_config.tags": "a,b"})
    train(parse_flags(flags))
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    expected = {}
    for r in records:
        for key, value in r.items():
            if key not in ("type", "step", "epoch"):
                expected[(r["step"], f"{r['type']}/{key}")] = value
    wandb_logged = {(step, key): value for kind, step, scalars in
                    [c for c in backends.calls if c[0] == "wandb"] for key, value in scalars.items()}
    tensorboard_logged = {(c[1], c[2]): c[3] for c in backends.calls if c[0] == "tensorboard"}
    assert wandb_logged == expected and tensorboard_logged == expected
    keys = {key for _, key in expected}
    assert {"train/loss", "train/ce", "train/distill", "train/lr", "train/tokens_per_s", "train/peak_memory_gb",
            "eval/eval_loss", "eval/eval_ce", "eval/eval_distill"} <= keys
    init = next(c[1] for c in backends.calls if c[0] == "wandb_init")
    assert init["project"] == "distil" and init["tags"] == ["a", "b"] and init["config"]["train_config"]["lr"] == 1e-3
    assert next(c[1] for c in backends.calls if c[0] == "tensorboard_dir") == str(tmp_path / "tensorboard")
    assert ("wandb_finish",) in backends.calls and ("tensorboard_close",) in backends.calls


@pytest.mark.parametrize("flag, package", [("use_wandb", "wandb"), ("use_tensorboard", "tensorboard")])
def test_a_missing_logging_package_is_a_one_line_error(tiny, tmp_path, capsys, monkeypatch, flag, package):
    monkeypatch.setitem(sys.modules, package, None)  # import and find_spec fail as when it is not installed
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(**base_flags(tiny, tmp_path, **{flag: True}))
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [f"error: --{flag} needs the {package} package: pip install {package}"
                     + (" (and wandb login)" if package == "wandb" else "") + ", or drop the flag"]
