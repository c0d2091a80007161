"""The shipped tiny assets (assets/tiny): they load offline, differ where they must, and are reproducible."""
import os
import json

import pytest

from configs.paths import REPO_ROOT as REPO, TINY_ASSETS
from examples.tiny import assets as tiny_assets
from examples.tiny import synthetic_qa

SPLITS = ("train", "validation", "test")


def _rows(split):
    return tiny_assets.read_split(TINY_ASSETS / "data", split)


def _check_squad_row(row):
    assert set(row) == {"id", "title", "context", "question", "answers"}
    texts, starts = row["answers"]["text"], row["answers"]["answer_start"]
    assert len(texts) == len(starts) == 1
    assert row["context"][starts[0]:starts[0] + len(texts[0])] == texts[0]


def test_generator_is_deterministic_and_writes_squad_rows():
    sizes = {"train": 50, "validation": 10, "test": 10}
    first, second = synthetic_qa.generate_splits(sizes, seed=3), synthetic_qa.generate_splits(sizes, seed=3)
    assert first == second
    assert synthetic_qa.generate_splits(sizes, seed=4) != first
    for split, rows in first.items():
        assert len(rows) == sizes[split]
        for row in rows:
            _check_squad_row(row)
            name = row["question"].rstrip("?").split()
            assert any(word in row["context"].split() for word in name)  # the person asked about is in the context
    contexts = [{r["context"] for r in rows} for rows in first.values()]
    assert not (contexts[0] & contexts[1]) and not (contexts[0] & contexts[2]) and not (contexts[1] & contexts[2])


def test_some_questions_need_the_name_to_pick_the_fact():
    """In a fraction of the contexts another person has a fact of the asked kind: relation lookup alone fails."""
    rows = synthetic_qa.generate_splits({"train": 400}, seed=0)["train"]
    # " lives in ", " works as ", ...: the words between a fact's person and its value
    markers = [spec[1].split("{p}")[1].split("{a}")[0].split("{v}")[0] for spec in synthetic_qa.RELATIONS.values()]
    ambiguous = 0
    for row in rows:
        start = row["answers"]["answer_start"][0]
        sentence = row["context"][:start].rsplit(".", 1)[-1]  # the target fact up to its value
        marker = next(m for m in markers if m in sentence)
        ambiguous += row["context"].count(marker) > 1
    assert abs(ambiguous / len(rows) - synthetic_qa.AMBIGUOUS_FRACTION) < 0.07


def test_shipped_data_is_what_the_generator_gives():
    expected = synthetic_qa.generate_splits(synthetic_qa.SPLIT_SIZES, seed=tiny_assets.SEED)
    for split in SPLITS:
        rows = _rows(split)
        assert rows == json.loads(json.dumps(expected[split]))
        assert len({r["id"] for r in rows}) == len(rows)
        for row in rows:
            _check_squad_row(row)


def test_shipped_tokenizers_are_reproducible():
    assert tiny_assets.check_reproducible(TINY_ASSETS) == []


def test_shipped_models_load_offline_with_different_tokenizers():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = {}
    for name in ("teacher", "student", "student_same"):
        folder = TINY_ASSETS / name
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
        assert model.config.vocab_size == len(tokenizer)
        assert (tokenizer.pad_token, tokenizer.bos_token, tokenizer.eos_token, tokenizer.unk_token) == \
            ("<pad>", "<s>", "</s>", "<unk>")
        assert not getattr(tokenizer, "chat_template", None)  # plain prompts
        ids = torch.tensor([[tokenizer.bos_token_id] + tokenizer.encode("Context: Ada lives in Velmora.")])
        assert torch.isfinite(model(input_ids=ids).logits).all()
        loaded[name] = (tokenizer, model)
    teacher_vocab = loaded["teacher"][0].get_vocab()
    assert loaded["student"][0].get_vocab() != teacher_vocab
    assert len(loaded["student"][0]) != len(teacher_vocab)
    assert loaded["student_same"][0].get_vocab() == teacher_vocab
    assert type(loaded["teacher"][1]).__name__ == "LlamaForCausalLM"
    assert type(loaded["student"][1]).__name__ == "GPTNeoXForCausalLM"
    text = " pale green parrot"
    assert loaded["student"][0].tokenize(text) != loaded["teacher"][0].tokenize(text)


@pytest.mark.parametrize("name, low, high", [("teacher", 50.0, 100.0), ("student", 0.0, 10.0)])
def test_the_teacher_answers_and_the_untrained_student_does_not(name, low, high):
    scores = tiny_assets.answer_scores(str(TINY_ASSETS / name), _rows("test")[:40], max_new_tokens=8)
    assert low <= scores["f1"] <= high


def test_the_untrained_students_are_the_seeded_initialisation():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for name, kind, shape in (("student", "gpt_neox", tiny_assets.STUDENT_CONFIG),
                              ("student_same", "llama", tiny_assets.STUDENT_SAME_CONFIG)):
        folder = TINY_ASSETS / name
        fresh = tiny_assets.new_model(kind, AutoTokenizer.from_pretrained(folder), shape, tiny_assets.SEED)
        shipped = AutoModelForCausalLM.from_pretrained(folder).state_dict()
        for key, value in fresh.state_dict().items():
            assert torch.equal(value, shipped[key]), f"{name}: {key}"


@pytest.mark.slow  # the whole default run
def test_embedded_default_run_distills_the_shipped_teacher(tmp_path):
    """`python finetuning.py --distillation` with no model or data flags: the shipped pair, the projected
    teacher (auto across tokenizers), offline; 40 steps here (the full default run is 750 steps, about half a minute)."""
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "finetuning.py", "--distillation", "--output_dir", str(tmp_path / "out"),
                           "--max_train_step", "40"], cwd=REPO, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "loss: 1.0 x CE + 1.5 x projected" in done.stdout
    assert "model saved to" in done.stdout and "eval loss" in done.stdout
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval_loss" in r]
    assert evals and evals[-1]["eval_distill"] > 0
    assert (tmp_path / "out" / "last" / "model.safetensors").exists()


def test_teacher_data_is_fresh_and_keeps_the_held_out_splits(tmp_path):
    folder = tiny_assets.write_teacher_data(tmp_path, size=300)
    rows = {split: tiny_assets.read_split(folder, split) for split in SPLITS}
    assert len(rows["train"]) == 300
    assert rows["validation"] == _rows("validation") and rows["test"] == _rows("test")
    shipped = {r["context"] for split in SPLITS for r in _rows(split)}
    assert not shipped & {r["context"] for r in rows["train"]}
    for row in rows["train"]:
        _check_squad_row(row)
    flags = tiny_assets.teacher_training_flags("M", str(folder), "OUT")
    assert flags["dataset.source"] == str(folder) and flags["model_name"] == "M"
    assert flags["dataset.file"].endswith("llm_distillation/datasets/loader/tiny_qa.py")
    assert "distillation" not in flags  # the teacher trains alone, in the student slot
