"""Flags -> configs: every spelling the seeds' users type reaches the right field; nothing is ignored."""
import subprocess
import sys

import pytest

from conftest import REPO
from llm_recipes.config import flag_reference, parse_flags
from llm_recipes.errors import UserError


def test_dotted_and_underscore_forms_reach_the_same_field():
    dotted = parse_flags({"distillation": True, "distillation_config.model_name": "t", "distillation_config.distil_factor": 2})
    underscore = parse_flags({"distillation": True, "distillation_config_model_name": "t",
                              "distillation_config_distil_factor": 2})
    for run in (dotted, underscore):
        assert run.distillation.model_name == "t"
        assert run.distillation.distil_factor == 2.0 and isinstance(run.distillation.distil_factor, float)


def test_undotted_flags_set_train_config_and_llama_recipes_fsdp_names():
    run = parse_flags({"lr": 1e-6, "num_epochs": 5, "save_step": 100, "enable_fsdp": True, "fsdp_cpu_offload": True,
                       "dataset.file": "x.py"})
    assert (run.train.lr, run.train.num_epochs, run.train.save_step) == (1e-6, 5, 100)
    assert run.fsdp.fsdp_cpu_offload is True
    assert run.dataset.file == "x.py"


def test_seed_readme_command_lines_parse():
    uld = {"model_name": "EleutherAI/pythia-410m-deduped", "dataset.file": "datasets/loader/squad.py", "lr": 1e-6,
           "num_epochs": 5, "batch_size_training": 4, "val_batch_size": 4, "output_dir": "out",
           "distillation_config.model_name": "meta-llama/Llama-2-7b-chat-hf", "distillation": True,
           "distillation_config.enable_fsdp": True, "distillation_config.pure_bf16": True,
           "distillation_config.distil_factor": 1.5, "save_step": 100}
    run = parse_flags(uld)
    assert run.distillation.enable_fsdp and run.distillation.pure_bf16 and run.train.save_step == 100
    mlot = {"model_name": "m", "dataset.file": "qed.py", "distillation_config_model_name": "t", "distillation": True,
            "distillation_config_enable_fsdp": True, "distillation_config_pure_bf16": True,
            "distillation_config_distil_factor": 1.5, "save_step": 2000, "f": 2}
    run = parse_flags(mlot)
    assert run.distillation.loss == "multilevel_ot" and run.distillation.multilevel_ot_mode == "greedy"
    assert parse_flags({"distillation": True, "f": 1}).distillation.multilevel_ot_mode == "fast"


@pytest.mark.parametrize("flags, message", [
    ({"distilation": True}, "unknown flag --distilation: did you mean --distillation?"),
    ({"distillation_config.modle_name": "x"}, "did you mean --distillation_config.model_name?"),
    ({"distillation_config_modle_name": "x"}, "did you mean --distillation_config.model_name?"),
    ({"teacher_config.model_name": "x"}, "unknown flag --teacher_config.model_name"),
    ({"lr": "fast"}, "--lr expects a number, got 'fast'"),
    ({"num_epochs": 1.5}, "--num_epochs expects an integer"),
    ({"output_dir": True}, "--output_dir expects a value"),
    ({"distillation": "maybe"}, "--distillation expects true or false"),
    ({"batch_size_training": 0}, "--batch_size_training must be at least 1"),
    ({"f": 3}, "--f expects 1 (MultiLevelOT fast) or 2"),
    ({"distillation_config.distil_factor": 1.0}, "has no effect without --distillation"),
    ({"lora_config.r": 4}, "has no effect without --use_peft"),
    ({"dataset.role": "teacher"}, "set by the trainer"),
    ({"optimizer": "lion"}, "--optimizer lion is not supported"),
    ({"pure_bf16": True, "mixed_precision": True}, "exclude each other"),
    ({"distillation": True, "distillation_config.model_name": "a", "distillation_config_model_name": "b"},
     "set distillation_config.model_name to different values"),
])
def test_bad_flags_are_one_line_errors(flags, message):
    with pytest.raises(UserError) as error:
        parse_flags(flags)
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_flag_reference_lists_every_field_with_its_meaning():
    text = flag_reference(markdown=True)
    for flag in ("`--lr`", "`--distillation_config.distil_factor`", "`--dataset.file`", "`--lora_config.r`",
                 "`--fsdp_config.sharding_strategy`", "--f 1|2"):
        assert flag in text
    assert "`--dataset.role`" not in text
    assert "| `--context_length` | `None` | longer examples are dropped" in text


@pytest.mark.slow  # a fresh interpreter
def test_cli_unknown_flag_exits_nonzero_with_one_line():
    result = subprocess.run([sys.executable, "finetuning.py", "--num_epoch", "2"], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == "error: unknown flag --num_epoch: did you mean --num_epochs?"


def test_the_flag_reference_is_generated_and_up_to_date():
    from scripts import sync_flags

    assert sync_flags.PATH.read_text() == sync_flags.text(), "run python -m scripts.sync_flags"
    assert "| `--distillation_config.loss` | `auto` |" in sync_flags.text()


def test_the_loss_flag_help_names_every_loss_of_the_table():
    """configs/ is plain data (it imports nothing of llm_recipes), so the loss choices in its help are written
    out: they must be the table's."""
    from dataclasses import fields

    from configs import distillation_config
    from llm_recipes.losses import table

    help_text = next(f for f in fields(distillation_config) if f.name == "loss").metadata["help"]
    assert help_text.split(" (auto:")[0] == " | ".join(table.loss_choices())


def test_a_flag_given_twice_is_refused_not_silently_dropped(monkeypatch, capsys):
    """fire keeps one of `--x a --x b` without a word (a script's default before the user's own flag)."""
    from examples.real_pair import people_qa
    from llm_recipes.flags import repeated_flags

    assert repeated_flags(["--lr", "1", "--output-dir=a", "--lr=2", "--output_dir", "b", "x"]) == ["lr", "output_dir"]
    assert repeated_flags(["--lr", "1", "--seed", "2"]) == []
    monkeypatch.setattr(sys, "argv", ["people_qa", "--output_dir", "a", "--output_dir", "b"])
    with pytest.raises(SystemExit) as stopped:
        people_qa.cli()
    assert stopped.value.code == 2
    assert capsys.readouterr().err.strip() == "error: --output_dir given more than once; pass each flag once"
