"""The trainer end to end on tiny models: outputs, resume, normalisation, and every bad input."""
import json
import os
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import base_flags
from llm_recipes.config import parse_flags
from llm_recipes.finetuning import main, train


def run(tiny, out, **extra):
    return train(parse_flags(base_flags(tiny, out, **extra)))


def weights(folder) -> dict:
    return load_file(str(Path(folder) / "model.safetensors"))


def fails(capsys, flags: dict) -> str:
    """Run the CLI entry point; return its stderr after checking it exited with code 2 and one line."""
    capsys.readouterr()  # what the test printed before (model loading bars) is not the command's output
    with pytest.raises(SystemExit) as exit_info:
        main(**flags)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_distillation_run_writes_a_usable_checkpoint(tiny, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result = run(tiny, tmp_path, save_step=5)
    assert result["state"]["global_step"] == 12
    best, last = tmp_path / "best", tmp_path / "last"
    assert last.resolve().name == "step-0000012"
    files = {p.name for p in last.resolve().iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "run_config.json",
            "trainer_state.json", "optimizer.pt", "scheduler.pt", "rng_rank0.pt"} <= files
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))
    assert len(list((tmp_path / "checkpoints").glob("step-*"))) <= 2  # best and last only
    model = AutoModelForCausalLM.from_pretrained(best)
    AutoTokenizer.from_pretrained(best)
    assert model.config.vocab_size > 0
    config = json.loads((tmp_path / "run_config.json").read_text())
    assert config["distillation_config"]["model_name"] == tiny["teacher"]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if r["type"] == "train"]
    eval_records = [r for r in records if r["type"] == "eval"]
    assert len(train_records) == 12 and [r["step"] for r in eval_records] == [5, 10, 12]
    for key in ("loss", "ce", "distill", "lr", "tokens_per_s", "step_s", "peak_memory_gb"):
        assert all(torch.isfinite(torch.tensor(float(r[key]))) for r in train_records), key
    assert all(r["step_s"] > 0 for r in train_records)
    assert abs(train_records[0]["loss"] - (train_records[0]["ce"] + 1.5 * train_records[0]["distill"])) < 1e-4
    for key in ("eval_loss", "eval_ce", "eval_distill", "eval_ppl"):
        assert key in eval_records[-1]
    assert eval_records[-1]["eval_loss"] < eval_records[0]["eval_loss"] + 1.0


def test_save_all_keeps_every_checkpoint(tiny, tmp_path):
    run(tiny, tmp_path, save_step=4, save_all=True)
    names = sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*"))
    assert names == ["step-0000004", "step-0000008", "step-0000012"]


def test_resume_gives_the_same_weights(tiny, tmp_path):
    """N steps straight == N/2 steps, then --resume_from, then N/2 (fp32, dropout on, OneCycle, AdamW)."""
    straight = tmp_path / "straight"
    run(tiny, straight, num_epochs=2, save_step=9, save_all=True, scheduler="onecycle")
    resumed = tmp_path / "resumed"
    run(tiny, resumed, num_epochs=2, save_step=9, save_all=True, scheduler="onecycle",
        resume_from=str(straight / "checkpoints" / "step-0000009"))
    a, b = weights(straight / "last"), weights(resumed / "last")
    assert (straight / "last").resolve().name == (resumed / "last").resolve().name == "step-0000024"
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    first = weights(straight / "checkpoints" / "step-0000009")
    assert max((a[k] - first[k]).abs().max().item() for k in a) > 1e-4  # training did move the weights


@pytest.mark.parametrize("loss", ["uld", "kl"])
def test_accumulation_normalises_by_the_whole_step(tiny, tmp_path, loss):
    """batch 2 x 2 accumulation steps == batch 4: the step's loss is a mean over all its tokens/sequences."""
    common = dict(model_name=tiny["student_same"], optimizer="SGD", lr=0.5, num_epochs=1, run_validation=False,
                  **{"distillation_config.loss": loss})
    run(tiny, tmp_path / "big", batch_size_training=4, **common)
    run(tiny, tmp_path / "accum", batch_size_training=2, gradient_accumulation_steps=2, **common)
    a, b = weights(tmp_path / "big" / "last"), weights(tmp_path / "accum" / "last")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


def test_sft_without_distillation_and_with_distil_factor_zero_agree(tiny, tmp_path):
    plain = parse_flags({"model_name": tiny["student"], "dataset.file": tiny["loader"], "output_dir": str(tmp_path / "a"),
                         "lr": 1e-3, "save_step": 0, "scheduler": "constant"})
    train(plain)
    run(tiny, tmp_path / "b", **{"distillation_config.distil_factor": 0})
    a, b = weights(tmp_path / "a" / "last"), weights(tmp_path / "b" / "last")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6


def test_auto_loss_picks_kl_for_one_tokenizer_and_projected_or_uld_for_two(tiny, tmp_path, capsys):
    run(tiny, tmp_path / "same", model_name=tiny["student_same"], max_train_step=1, run_validation=False)
    assert "+ 1.5 x kl" in capsys.readouterr().out
    run(tiny, tmp_path / "diff", max_train_step=1, run_validation=False)
    assert "+ 1.5 x projected" in capsys.readouterr().out
    run(tiny, tmp_path / "index", max_train_step=1, run_validation=False, **{"distillation_config.alignment": "index"})
    assert "+ 1.5 x uld" in capsys.readouterr().out


def test_freeze_layers_keeps_the_first_layers_fixed(tiny, tmp_path):
    run(tiny, tmp_path, freeze_layers=True, num_freeze_layers=1, max_train_step=3, run_validation=False)
    before, after = weights(tiny["student"]), weights(tmp_path / "last")
    frozen = [k for k in before if ".layers.0." in k]
    trained = [k for k in before if ".layers.1." in k and k.endswith("weight")]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    assert any(not torch.equal(before[k], after[k]) for k in trained)


@pytest.mark.parametrize("optimizer, scheduler", [("SGD", "cosine"), ("Adafactor", "linear"), ("AdamW", "onecycle")])
def test_optimizers_and_schedules_train(tiny, tmp_path, optimizer, scheduler):
    result = run(tiny, tmp_path, optimizer=optimizer, scheduler=scheduler, warmup_ratio=0.25, run_validation=True)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in records if r["type"] == "train"]
    assert result["eval"]["eval_loss"] == result["eval"]["eval_loss"]  # not NaN
    if scheduler == "onecycle":  # from lr / div_factor up to lr, down to lr / (div_factor * final_div_factor)
        assert lrs[0] == pytest.approx(1e-3 / 2) and max(lrs) <= 1e-3 and lrs[-1] < 1e-3 / 2
    else:  # warm-up over the first quarter, then decay towards zero
        assert lrs[0] < lrs[2] and lrs[-1] < max(lrs) / 2


def test_overlong_examples_are_filtered_jointly_and_counted(tiny, tmp_path, capsys):
    from transformers import AutoTokenizer

    from llm_recipes.data import import_loader, load_split
    from configs import dataset

    tokenizer = AutoTokenizer.from_pretrained(tiny["student"])
    rows = load_split(import_loader(tiny["loader"]), dataset(), tokenizer, "train", role="student", model_name="s",
                      encoder_decoder=False)
    lengths = sorted(len(r) for r in rows["input_ids"])
    run(tiny, tmp_path, context_length=lengths[len(lengths) // 2], max_train_step=1, run_validation=False)
    out = capsys.readouterr().out
    line = next(l for l in out.splitlines() if l.startswith("train:"))
    kept, dropped = int(line.split()[1]), int(line.split("(")[1].split()[0])
    assert dropped > 0 and kept + dropped == 48


ALL_MASKED_LOADER = '''
import datasets
def get_split(dataset_config, tokenizer, split):
    rows = {"id": [], "input_ids": [], "labels": [], "attention_mask": []}
    for i in range(8):
        ids = tokenizer.encode("context: ada lives in oslo. answer: oslo")
        answer = i % 4 == 0  # two examples of eight have an answer
        labels = [-100] * (len(ids) - 2) + (ids[-2:] if answer else [-100, -100])
        rows["id"].append(i); rows["input_ids"].append(ids); rows["labels"].append(labels)
        rows["attention_mask"].append([1] * len(ids))
    return datasets.Dataset.from_dict(rows)
'''


def test_batches_without_answer_tokens_are_skipped_with_a_warning(tiny, tmp_path):
    loader = tmp_path / "masked.py"
    loader.write_text(ALL_MASKED_LOADER)
    with pytest.warns(UserWarning, match="labels are -100"):
        result = run(tiny, tmp_path / "out", **{"dataset.file": str(loader)}, batch_size_training=1,
                     val_batch_size=1)
    assert result["state"]["global_step"] == 8
    assert result["eval"]["eval_loss"] == result["eval"]["eval_loss"]


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


MISPAIRED_LOADER = '''
import datasets
def get_split(dataset_config, tokenizer, split):
    ids = list(range(6)) if dataset_config.role == "student" else [0, 1, 2, 4, 3, 5]
    rows = [tokenizer.encode("ada lives in oslo")] * 6
    return datasets.Dataset.from_dict({"id": ids, "input_ids": rows, "labels": rows,
                                       "attention_mask": [[1] * len(r) for r in rows]})
'''
SHORT_TEACHER_LOADER = MISPAIRED_LOADER.replace(
    '[0, 1, 2, 4, 3, 5]', '[0, 1, 2, 3, 4]').replace('* 6\n', '* len(ids)\n')
EMPTY_LOADER = '''
import datasets
def get_split(dataset_config, tokenizer, split):
    return datasets.Dataset.from_dict({"input_ids": [], "labels": [], "attention_mask": []})
'''


@pytest.mark.parametrize("case", ["missing_loader", "broken_loader", "no_get_split", "loader_raises", "no_model",
                                  "same_tokenizer_loss", "empty", "batch_size_0", "unwritable", "mispaired",
                                  "counts_differ", "missing_column", "unknown_flag", "offline_hub_id"])
def test_bad_input_is_a_one_line_error(tiny, tmp_path, capsys, case):
    flags = base_flags(tiny, tmp_path / "out")
    expected = {
        "missing_loader": "dataset loader file",
        "broken_loader": "failed to import: SyntaxError line 2",
        "no_get_split": "defines no get_split",
        "loader_raises": "failed in get_split(split='train') for the student: KeyError (line 3)",
        "no_model": "student model path",
        "same_tokenizer_loss": "needs the same tokenizer",
        "empty": "is empty",
        "batch_size_0": "--batch_size_training must be at least 1",
        "unwritable": "cannot write to --output_dir",
        "mispaired": "do not pair up: example 3 is id 3 for the student and id 4 for the teacher",
        "counts_differ": "do not pair up: 5 teacher examples vs 6 student examples",
        "missing_column": "has no attention_mask column",
        "unknown_flag": "unknown flag --save_steps: did you mean --save_step?",
        "offline_hub_id": "not a local folder nor in the Hugging Face cache",
    }[case]
    if case == "missing_loader":
        flags["dataset.file"] = str(tmp_path / "nope.py")
    elif case == "broken_loader":
        flags["dataset.file"] = write(tmp_path, "broken.py", "def get_split(c, t, s):\n    return [\n")
    elif case == "no_get_split":
        flags["dataset.file"] = write(tmp_path, "noget.py", "def load(c, t, s):\n    return None\n")
    elif case == "loader_raises":
        flags["dataset.file"] = write(tmp_path, "raises.py", "def get_split(c, t, s):\n    row = {}\n    return row['x']\n")
    elif case == "no_model":
        flags["model_name"] = str(tmp_path / "no-such-model")
    elif case == "same_tokenizer_loss":
        flags["distillation_config.loss"] = "reverse_kl"
    elif case == "empty":
        flags["dataset.file"] = write(tmp_path, "empty.py", EMPTY_LOADER)
    elif case == "batch_size_0":
        flags["batch_size_training"] = 0
    elif case == "unwritable":
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(stat.S_IRUSR | stat.S_IXUSR)
        flags["output_dir"] = str(locked / "out")
        if os.access(locked, os.W_OK):  # running as root: permissions do not bind, use a file in the way
            blocker = tmp_path / "file"
            blocker.write_text("")
            flags["output_dir"] = str(blocker / "out")
    elif case == "mispaired":
        flags["dataset.file"] = write(tmp_path, "mispaired.py", MISPAIRED_LOADER)
    elif case == "counts_differ":
        flags["dataset.file"] = write(tmp_path, "short.py", SHORT_TEACHER_LOADER)
    elif case == "missing_column":
        flags["dataset.file"] = write(tmp_path, "nomask.py", EMPTY_LOADER.replace(', "attention_mask": []', ""))
    elif case == "unknown_flag":
        flags["save_steps"] = 10
    elif case == "offline_hub_id":
        flags["distillation_config.model_name"] = "some-org/not-downloaded-model"
    assert expected in fails(capsys, flags)


@pytest.mark.parametrize("precision", [{"pure_bf16": True}, {"mixed_precision": True},
                                       {"distillation_config.pure_bf16": True}])
def test_bf16_modes_train_without_nan(tiny, tmp_path, precision):
    result = run(tiny, tmp_path, max_train_step=4, **precision)
    assert 0 < result["eval"]["eval_loss"] < 100
    saved = weights(tmp_path / "last")
    expected = torch.bfloat16 if precision.get("pure_bf16") else torch.float32
    assert {t.dtype for t in saved.values()} == {expected}


def test_encoder_decoder_student_distils_from_a_causal_teacher(tiny, tmp_path):
    result = run(tiny, tmp_path, model_name=tiny["student_t5"], encoder_decoder=True, lr=3e-3, num_epochs=2)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["type"] == "eval"]
    assert evals[-1]["eval_ce"] < evals[0]["eval_ce"]
    assert result["eval"]["eval_distill"] > 0


def test_missing_pad_token_falls_back_to_eos(tiny, tmp_path):
    from transformers import AutoTokenizer

    from llm_recipes.models import load_tokenizer

    folder = tmp_path / "nopad"
    tokenizer = AutoTokenizer.from_pretrained(tiny["student"])
    tokenizer.pad_token = None
    tokenizer.save_pretrained(folder)
    loaded = load_tokenizer(str(folder))
    assert loaded.pad_token == loaded.eos_token and loaded.padding_side == "right"
