"""The teacher cache: what it stores, training from it (equal to the live teacher with the full
vocabulary), a teacher folder without weights, and every stale or mismatched cache refused."""
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import DEVICE, base_flags
from configs.datasets import dataset
from llm_distillation import cache_teacher
from llm_recipes import teacher_cache
from llm_recipes.config import parse_flags
from llm_recipes.finetuning import main, train


def write(tiny, folder: Path, teacher=None, **args) -> dict:
    defaults = dict(model_name=teacher or tiny["teacher"], output_dir=str(folder), topk=10**6, storage="float32",
                    progress=False, shard_examples=16)
    return cache_teacher.write_cache(cache_teacher.CacheArgs(**{**defaults, **args}), dataset(file=tiny["loader"]))


@pytest.fixture(scope="module")
def full_cache(tiny, tmp_path_factory):
    """The tiny teacher's whole distribution at every answer row (K = its vocabulary, float32)."""
    folder = tmp_path_factory.mktemp("cache") / "full"
    write(tiny, folder)
    return folder


def test_rows_keep_the_top_k_and_the_tail_mass():
    torch.manual_seed(0)
    logits = torch.randn(5, 50) * 3
    ids, logprobs, tail = teacher_cache.summarize_rows(logits, 8, 2.0, torch.float32)
    p = torch.softmax(logits / 2.0, -1)
    top = p.topk(8, -1)
    assert torch.equal(ids.long(), top.indices) and torch.allclose(logprobs.exp(), top.values, atol=1e-7)
    assert torch.allclose(tail.exp(), 1 - top.values.sum(-1), atol=1e-6)
    packed = torch.cat([ids.float(), logprobs, tail[:, None]], 1)
    dense = teacher_cache.dense_logits(packed, 50, 8, 2.0)
    q = torch.softmax(dense / 2.0, -1)  # what a loss at the cache's temperature sees
    assert torch.allclose(q.gather(1, ids.long()), top.values, atol=1e-6)
    rest = torch.ones_like(q, dtype=torch.bool).scatter(1, ids.long(), False)
    assert torch.allclose(q[rest].reshape(5, 42), ((1 - top.values.sum(-1)) / 42)[:, None].expand(5, 42), atol=1e-6)
    full_ids, full_lp, full_tail = teacher_cache.summarize_rows(logits, 50, 1.0, torch.float32)
    assert torch.isinf(full_tail).all()  # nothing outside the top K = V
    dense = teacher_cache.dense_logits(torch.cat([full_ids.float(), full_lp, full_tail[:, None]], 1), 50, 50, 1.0)
    assert torch.allclose(torch.softmax(dense / 3.0, -1), torch.softmax(logits / 3.0, -1), atol=1e-6)  # any T


def test_the_cache_folder(tiny, full_cache):
    meta = teacher_cache.read_meta(str(full_cache))
    assert meta.complete and meta.topk == meta.vocab_size and meta.temperature == 1.0
    assert meta.splits["train"]["examples"] == 48 and meta.splits["validation"]["examples"] == 12
    assert len(meta.splits["train"]["shards"]) == 3  # 16 examples per shard
    shard = load_file(str(full_cache / meta.splits["train"]["shards"][0]))
    assert shard["ids"].dtype == torch.int32 and shard["logprobs"].dtype == torch.float32
    assert shard["offsets"].shape == (17,) and shard["hashes"].shape == (16, 16)
    assert (full_cache / "tokenizer.json").exists()


@pytest.mark.parametrize("student, loss", [("student_same", "kl"), ("student", "uld"), ("student", "projected"),
                                           ("student", "hybrid"), ("student", "multilevel_ot")])
def test_training_from_the_full_cache_equals_the_live_teacher(tiny, tmp_path, full_cache, student, loss):
    common = {"model_name": tiny[student], "distillation_config.loss": loss, "max_train_step": 4,
              "optimizer": "SGD", "lr": 0.5}
    live = train(parse_flags(base_flags(tiny, tmp_path / "live", **common)))
    cached = train(parse_flags(base_flags(tiny, tmp_path / "cached", **common,
                                          **{"distillation_config.teacher_cache": str(full_cache)})))
    a = load_file(str(tmp_path / "live" / "last" / "model.safetensors"))
    b = load_file(str(tmp_path / "cached" / "last" / "model.safetensors"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5
    losses = [[json.loads(line)["loss"] for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()
               if '"train"' in line] for name in ("live", "cached")]
    assert all(abs(x - y) <= 1e-5 * max(1.0, abs(x)) for x, y in zip(*losses)) and len(losses[0]) == 4
    assert abs(live["eval"]["eval_distill"] - cached["eval"]["eval_distill"]) <= 1e-5
    assert max((a[k] - load_file(str(Path(tiny[student]) / "model.safetensors"))[k]).abs().max().item()
               for k in a) > 1e-3  # it trained


def test_a_teacher_folder_with_only_a_tokenizer_is_enough_and_resume_works(tiny, tmp_path, capsys):
    teacher = tmp_path / "teacher"
    shutil.copytree(tiny["teacher"], teacher)
    write(tiny, tmp_path / "cache", teacher=str(teacher), topk=16, storage="float16")
    for name in ("model.safetensors", "config.json", "generation_config.json"):
        (teacher / name).unlink()
    flags = base_flags(tiny, tmp_path / "run", save_step=3, save_all=True, max_train_step=6, **{
        "distillation_config.model_name": str(teacher), "distillation_config.teacher_cache": str(tmp_path / "cache")})
    train(parse_flags(flags))
    assert "the teacher model is not loaded" in capsys.readouterr().out
    straight = load_file(str(tmp_path / "run" / "last" / "model.safetensors"))
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step-0000006")
    (tmp_path / "run" / "last").unlink()
    train(parse_flags({**flags, "resume_from": str(tmp_path / "run" / "checkpoints" / "step-0000003")}))
    resumed = load_file(str(tmp_path / "run" / "last" / "model.safetensors"))
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_the_writer_continues_a_stopped_run(tiny, tmp_path, monkeypatch, full_cache):
    original, calls = teacher_cache.ShardWriter.write, []

    def stop_after_two(self, *args):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(self.name)
        return original(self, *args)

    monkeypatch.setattr(teacher_cache.ShardWriter, "write", stop_after_two)
    with pytest.raises(KeyboardInterrupt):
        write(tiny, tmp_path / "cache")
    assert not teacher_cache.read_meta(str(tmp_path / "cache")).complete
    monkeypatch.setattr(teacher_cache.ShardWriter, "write", original)
    written = []
    monkeypatch.setattr(teacher_cache.ShardWriter, "write", lambda self, *a: written.append(self.name) or
                        original(self, *a))
    write(tiny, tmp_path / "cache")
    assert written == ["train-00002", "validation-00000"]  # the two finished shards were kept
    for path in full_cache.glob("*.safetensors"):
        assert (tmp_path / "cache" / path.name).read_bytes() == path.read_bytes()


STALE_LOADER = '''
import importlib.util
spec = importlib.util.spec_from_file_location("base", {base!r})
base = importlib.util.module_from_spec(spec)
spec.loader.exec_module(base)

def get_split(dataset_config, tokenizer, split):
    data = base.get_split(dataset_config, tokenizer, split)
    if dataset_config.role != "teacher" or split != "train":
        return data
    labels = [list(row) for row in data["labels"]]
    labels[5][-1] = (labels[5][-1] + 1) % len(tokenizer)  # example 5's answer changed since the cache was written
    return data.remove_columns("labels").add_column("labels", labels)
'''


@pytest.mark.parametrize("case", ["stale", "incomplete", "temperature", "hidden", "live_flag", "other_teacher",
                                  "not_a_cache"])
def test_a_cache_that_does_not_fit_is_refused_in_one_line(tiny, tmp_path, capsys, full_cache, case):
    cache = tmp_path / "cache"
    shutil.copytree(full_cache, cache)
    flags = base_flags(tiny, tmp_path / "run", **{"distillation_config.teacher_cache": str(cache)})
    expected = {
        "stale": f"the teacher cache {cache} has no rows for train example 5 (teacher answer",
        "incomplete": f"the teacher cache {cache} is incomplete (its writer stopped)",
        "temperature": "--distillation_config.teacher_temperature is 2.0 but the teacher cache",
        "hidden": "--distillation_config.hidden_weight needs the teacher's hidden states",
        "live_flag": "--distillation_config.pure_bf16 has no effect with --distillation_config.teacher_cache",
        "other_teacher": f"was written for the teacher {tiny['teacher']}, not",
        "not_a_cache": "is not a teacher cache (no cache.json)",
    }[case]
    if case == "stale":
        loader = tmp_path / "stale.py"
        loader.write_text(STALE_LOADER.format(base=tiny["loader"]))
        flags["dataset.file"] = str(loader)
    elif case == "incomplete":
        meta = json.loads((cache / "cache.json").read_text())
        (cache / "cache.json").write_text(json.dumps({**meta, "complete": False}))
    elif case == "temperature":
        flags.update({"distillation_config.loss": "uld", "distillation_config.teacher_temperature": 2.0})
    elif case == "hidden":
        flags["distillation_config.hidden_weight"] = 1.0
    elif case == "live_flag":
        flags["distillation_config.pure_bf16"] = True
    elif case == "other_teacher":
        flags["distillation_config.model_name"] = tiny["student_same"]
    elif case == "not_a_cache":
        flags["distillation_config.teacher_cache"] = str(tmp_path)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(**flags)
    assert exit_info.value.code == 2
    lines = [line for line in capsys.readouterr().err.strip().splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and expected in lines[0], lines


def test_the_bytes_per_row(tiny, tmp_path):
    summary = write(tiny, tmp_path / "k8", topk=8, storage="float16")
    # ids 8 x 4 + log-probs 8 x 2 + tail 4 = 52 bytes per row, plus per example an offset and a hash
    assert 52 <= summary["bytes_per_row"] <= 52 + 24 * 60 / summary["answer_rows"] + 2000 / summary["answer_rows"]
    assert math.isclose(summary["bytes"], sum(p.stat().st_size for p in (tmp_path / "k8").glob("*.safetensors")))


def test_generate_caches_the_teachers_own_answers(tmp_path):
    """--save_teacher_topk: the answers and their cache in one pass of the loaded teacher; a run with the
    printed flags trains from it."""
    from configs.paths import TINY_QA_LOADER, TINY_STUDENT, TINY_TEACHER
    from llm_distillation import generate

    out = tmp_path / "answers"
    generate.main(model_name=TINY_TEACHER, task="tiny_qa", split="train", number_of_examples=24, output_dir=str(out),
                  max_new_tokens=16, batch_size=12, save_teacher_topk=16, progress=False)
    meta = teacher_cache.read_meta(str(out / "teacher_cache"))
    assert meta.complete and meta.topk == 16 and set(meta.splits) == {"train", "validation"}
    result = train(parse_flags({"model_name": TINY_STUDENT, "dataset.file": TINY_QA_LOADER,
                                "dataset.source": str(out), "dataset.answer_column": "answers_generated",
                                "distillation": True, "distillation_config.teacher_cache": str(out / "teacher_cache"),
                                "output_dir": str(tmp_path / "run"), "max_train_step": 2, "batch_size_training": 4}))
    assert result["state"]["global_step"] == 2 and math.isfinite(result["eval"]["eval_distill"])


@pytest.mark.device
@pytest.mark.parametrize("loss", ["kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd"])
def test_a_cached_divergence_is_the_divergence_of_the_top_k_plus_one_bucket(loss):
    """Through the loss engine: from a top-K cache, every KL-family divergence equals (value and gradient)
    the float64 divergence between teacher and student coarsened to the teacher's top-K ids plus one bucket
    for the rest (the student-shaped tail makes the ratio constant inside the bucket)."""
    from configs import distillation_config
    from llm_recipes.losses import LossSpec, distillation_terms, table
    from llm_recipes.losses.reference import divergence_of

    torch.manual_seed(0)
    n, vocab, k, temperature = 6, 40, 5, 2.0
    teacher = (torch.randn(n, vocab, dtype=torch.float64) * 3).to(DEVICE)
    student = (teacher + torch.randn(n, vocab, dtype=torch.float64).to(DEVICE)).requires_grad_(True)
    ids, logprobs, tail = teacher_cache.summarize_rows(teacher, k, temperature, torch.float32)
    packed = torch.cat([ids.float(), logprobs, tail[:, None]], 1)
    labels = torch.full((1, n + 1), -100)
    labels[0, 1:] = torch.randint(0, vocab, (n,))
    spec = LossSpec.from_config(distillation_config(loss=loss, temperature=temperature), name=loss,
                                student_vocab_size=vocab, teacher_vocab_size=vocab, same_tokenizer=True)
    hidden = torch.cat([student, student.new_zeros(1, vocab)])[None]
    terms = distillation_terms(spec, hidden, labels, lambda rows: rows,
                               torch.cat([packed, packed.new_zeros(1, 2 * k + 1)])[None], labels,
                               teacher_cache.CachedHead(vocab, k, temperature), with_ce=False)
    (grad,) = torch.autograd.grad(terms.distill_sum, student)

    def coarse(probs):  # [n, V] -> [n, K + 1]: the teacher's top-K ids, then everything else
        top = probs.gather(1, ids.long())
        return torch.cat([top, 1 - top.sum(1, keepdim=True)], 1)

    z = student.detach().clone().requires_grad_(True)
    p = coarse(torch.softmax(teacher / temperature, -1))
    q = coarse(torch.softmax(z / temperature, -1))
    kind = table.LOSSES[loss].divergence
    reference = divergence_of(p, q, kind).sum() * temperature**2
    (reference_grad,) = torch.autograd.grad(reference, z)
    value, reference = float(terms.distill_sum.detach()), float(reference.detach())
    assert abs(value - reference) <= 1e-5 * abs(reference)
    assert torch.allclose(grad, reference_grad, atol=1e-6, rtol=1e-4)
