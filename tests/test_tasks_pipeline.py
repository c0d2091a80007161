"""Teacher-answer generation and the benchmark, end to end on the tiny random models.

Their answers are garbage, so these tests check mechanics: counts, ids, resume, file formats,
first-line cutting, empty-answer dropping, the validation split, scores recomputed from the
predictions, encoder-decoder students and LoRA adapters.
"""
import json
from pathlib import Path

import pytest
import torch

from conftest import qa_rows


# ------------------------------------------------------------------------------------- generation
def test_first_line_and_longest_first():
    from llm_distillation.generation import first_line, longest_first

    assert first_line("  Paris  \nmore text") == "Paris" and first_line("\nParis") == "" and first_line("") == ""
    assert longest_first([[1], [1, 2, 3], [1, 2], [4, 5, 6]]) == [1, 3, 2, 0]  # ties keep their order


def test_stop_on_text_stops_each_row_and_keeps_the_text_before_it(tiny):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llm_distillation.generation import generate_answers

    tokenizer = AutoTokenizer.from_pretrained(tiny["student"])
    model = AutoModelForCausalLM.from_pretrained(tiny["student"])
    prompts = [tokenizer.encode(f"context: {r['context']} question: {r['question']} answer:") for r in qa_rows(6, 3)]
    full = generate_answers(model, tokenizer, prompts, max_new_tokens=12, batch_size=4)
    one_by_one = [generate_answers(model, tokenizer, [p], max_new_tokens=12)[0] for p in prompts]
    assert full == one_by_one  # longest-first batching returns answers in prompt order
    stop = full[0].split()[1]  # a word the random model writes: stands in for "\n"
    stopped = generate_answers(model, tokenizer, prompts, max_new_tokens=12, batch_size=4, stop_strings=[stop])
    assert [s.split(stop)[0] for s in stopped] == [f.split(stop)[0] for f in full]
    assert all(len(s) <= len(f) for s, f in zip(stopped, full)) and len(stopped[0]) < len(full[0])


# ---------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def squad_source(tmp_path_factory):
    """A local copy of data in SQuAD's schema: train (30) and validation (8) JSONL files."""
    folder = tmp_path_factory.mktemp("squad_source")
    for split, rows in {"train": qa_rows(30, 0), "validation": qa_rows(8, 1)}.items():
        with open(folder / f"{split}.jsonl", "w") as handle:
            for r in rows:
                handle.write(json.dumps({"id": r["id"], "title": "places", "context": r["context"],
                                         "question": r["question"],
                                         "answers": {"text": [r["answer"]], "answer_start": [0]}}) + "\n")
    return str(folder)


@pytest.fixture(scope="module")
def teacher512(tiny, tmp_path_factory):
    """The tiny teacher's tokenizer (with its chat template) on a Llama with room for few-shot chat prompts."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("teacher512")
    tokenizer = AutoTokenizer.from_pretrained(tiny["teacher"])
    torch.manual_seed(1)
    LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


class Killed(Exception):
    """Stands for the job being killed mid-run."""


class Recorder:
    """Wraps generate_batches: counts the prompts asked for, replaces chosen answers, can stop mid-run."""

    def __init__(self, module, monkeypatch, replace=None, fail_after_batches=None):
        from llm_distillation import generation

        real = generation.generate_batches
        while isinstance(real, Recorder):  # an earlier Recorder of the same test: wrap the real function
            real = real.real
        self.real, self.replace, self.fail_after = real, replace or {}, fail_after_batches
        self.prompts, self.batches = 0, 0
        monkeypatch.setattr(generation, "generate_batches", self)  # what `module` (generate, benchmark) calls

    def __call__(self, model, tokenizer, prompts, **kwargs):
        self.prompts += len(prompts)
        for indices, answers in self.real(model, tokenizer, prompts, **kwargs):
            if self.fail_after is not None and self.batches == self.fail_after:
                raise Killed
            self.batches += 1
            yield indices, [self.replace.get(i, a) for i, a in zip(indices, answers)]


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def gen_args(model, source, output_dir, **extra):
    from llm_distillation.generate import GenerateArgs

    flags = dict(model_name=model, task="squad", split="train", source=source, output_dir=str(output_dir),
                 batch_size=4, max_new_tokens=4, few_shot=1, number_of_examples=12, progress=False)
    flags.update(extra)
    return GenerateArgs(**flags)


# ---------------------------------------------------------------------------------- teacher answers
def test_generate_writes_a_dataset_the_task_loader_reads(teacher512, squad_source, tmp_path, monkeypatch):
    import datasets

    from llm_distillation import generate
    from llm_distillation.datasets.tasks import load_examples

    recorder = Recorder(generate, monkeypatch, replace={0: "  Oslo, Norway \nsecond line", 1: "\nafter a newline",
                                                         2: "   "})
    out = tmp_path / "gen"
    summary = generate.generate(gen_args(teacher512, squad_source, out, val_fraction=0.25))
    # prompt index = example index here (nothing finished before, nothing too long)
    ids = list(load_examples("squad", "train", source=squad_source)["id"])[:12]
    assert recorder.prompts == 12 and recorder.batches == 3
    assert {k: summary[k] for k in ("examples", "answered", "dropped_empty", "kept", "train", "validation")} == \
        {"examples": 12, "answered": 12, "dropped_empty": 2, "kept": 10, "train": 7, "validation": 3}
    assert [r["id"] for r in read_jsonl(out / "progress.jsonl")] != [] and len(read_jsonl(out / "progress.jsonl")) == 12

    saved = datasets.load_from_disk(str(out))
    assert set(saved) == {"train", "validation"}
    kept_ids = list(saved["train"]["id"]) + list(saved["validation"]["id"])
    assert sorted(kept_ids) == sorted(ids[:1] + ids[3:])  # the two empty answers are gone
    rows = {r["id"]: r for r in read_jsonl(out / "generated.jsonl")}
    assert len(rows) == 10 and rows[ids[0]]["answers_generated"] == "Oslo, Norway"  # first line, stripped
    assert {r["split"] for r in rows.values()} == {"train", "validation"}
    assert set(rows[ids[0]]) >= {"id", "title", "context", "question", "answers", "answers_generated"}

    # what the trainer reads with --dataset.source OUT --dataset.answer_column answers_generated
    loaded = load_examples("squad", "train", source=str(out), answer_column="answers_generated")
    assert list(loaded["id"]) == list(saved["train"]["id"])
    assert list(loaded["answers"]) == [[a] for a in saved["train"]["answers_generated"]]
    assert json.loads((out / "run.json").read_text())["few_shot"] == 1


def test_generate_resumes_without_redoing_finished_examples(teacher512, squad_source, tmp_path, monkeypatch):
    from llm_distillation import generate
    from llm_distillation.datasets.tasks import load_examples
    from llm_recipes.errors import UserError

    ids = list(load_examples("squad", "train", source=squad_source)["id"])[:12]
    out = tmp_path / "gen"
    out.mkdir()
    seeded = "".join(json.dumps({"id": i, "answer": f"seeded {i}"}) + "\n" for i in ids[:5])
    (out / "progress.jsonl").write_text(seeded + '{"id": "' + ids[5])  # a line cut off by a kill
    recorder = Recorder(generate, monkeypatch)
    summary = generate.generate(gen_args(teacher512, squad_source, out, val_fraction=0.0))
    assert recorder.prompts == 7 and summary["answered"] == 12
    progress = read_jsonl(out / "progress.jsonl")  # the cut line is gone, the new ones follow
    assert [r["id"] for r in progress[:5]] == ids[:5] and sorted(r["id"] for r in progress) == sorted(ids)
    answers = {r["id"]: r["answers_generated"] for r in read_jsonl(out / "generated.jsonl")}
    assert all(answers[i] == f"seeded {i}" for i in ids[:5])

    # killed after its first batch, then run again: each example is generated exactly once
    out2 = tmp_path / "gen2"
    first = Recorder(generate, monkeypatch, fail_after_batches=1)
    with pytest.raises(Killed):
        generate.generate(gen_args(teacher512, squad_source, out2))
    assert first.prompts == 12 and len(read_jsonl(out2 / "progress.jsonl")) == 4
    second = Recorder(generate, monkeypatch)
    generate.generate(gen_args(teacher512, squad_source, out2))
    assert second.prompts == 8 and sorted(r["id"] for r in read_jsonl(out2 / "progress.jsonl")) == sorted(ids)

    # everything finished: nothing is generated, the splits are rebuilt (another --val_fraction here)
    third = Recorder(generate, monkeypatch)
    summary = generate.generate(gen_args(teacher512, squad_source, out2, val_fraction=0.5))
    assert third.prompts == 0 and summary["validation"] == summary["kept"] - summary["train"] > 0
    with pytest.raises(UserError, match="holds answers generated with few_shot=1, this run asks for 2"):
        generate.generate(gen_args(teacher512, squad_source, out2, few_shot=2))


def test_validation_split_is_seeded_and_disjoint(tmp_path):
    import datasets

    from llm_distillation.generate import write_outputs

    examples = datasets.Dataset.from_list([{"id": f"q{i}", "question": "?", "answers": ["a"]} for i in range(20)])
    finished = {f"q{i}": f"answer {i}" for i in range(20)}

    def validation_ids(seed, name):
        counts = write_outputs(tmp_path / name, examples, finished, "answers_generated", val_fraction=0.1, seed=seed)
        assert (counts["train"], counts["validation"]) == (18, 2)
        split = datasets.load_from_disk(str(tmp_path / name))
        assert not set(split["train"]["id"]) & set(split["validation"]["id"])
        return list(split["validation"]["id"])

    for name in ("a", "b", "c"):
        (tmp_path / name).mkdir()
    assert validation_ids(42, "a") == validation_ids(42, "b") != validation_ids(7, "c")


def test_generate_copies_the_held_out_splits_of_the_task(tiny, squad_source, tmp_path):
    """tiny_qa holds out `test` (cut off train when the source lacks one): the output carries it, so
    training on the output does not lose a tenth of the generated train split to a second cut."""
    import datasets

    from llm_distillation import generate
    from llm_distillation.datasets.tasks import load_examples

    out = tmp_path / "gen"
    summary = generate.generate(gen_args(tiny["student"], squad_source, out, task="tiny_qa", few_shot=0,
                                         number_of_examples=None, val_fraction=0.1))
    saved = datasets.load_from_disk(str(out))
    test = load_examples("tiny_qa", "test", source=squad_source)
    assert set(saved) == {"train", "validation", "test"} and list(saved["test"]["id"]) == list(test["id"])
    assert "answers_generated" not in saved["test"].column_names
    assert len(load_examples("tiny_qa", "train", source=str(out), answer_column="answers_generated")) == \
        summary["train"] == len(saved["train"])


def test_prompts_longer_than_the_model_are_refused_or_skipped(tiny, squad_source, tmp_path):
    from transformers import AutoTokenizer

    from llm_distillation import generate, generation
    from llm_distillation.datasets.tasks import load_examples
    from llm_recipes.errors import UserError

    examples = load_examples("squad", "validation", source=squad_source)
    tokenizer = AutoTokenizer.from_pretrained(tiny["teacher"])
    _, prompts = generation.build_prompts("squad", examples, tokenizer, k=0, pool=None, seed=42, chat=False,
                                         encoder_decoder=False, progress=False)
    lengths = sorted(len(p) for p in prompts)
    budget = 128 - lengths[len(lengths) // 2]  # the tiny teacher has 128 positions: about half fit
    too_long = sum(1 for n in lengths if n + budget > 128)
    assert 0 < too_long < len(lengths)
    flags = dict(split="validation", few_shot=0, chat=False, max_new_tokens=budget, number_of_examples=None,
                 val_fraction=0.0)
    with pytest.raises(UserError, match=f"{too_long} of {len(lengths)} prompts plus --max_new_tokens {budget} exceed"):
        generate.generate(gen_args(tiny["teacher"], squad_source, tmp_path / "a", **flags))
    summary = generate.generate(gen_args(tiny["teacher"], squad_source, tmp_path / "b", skip_too_long=True, **flags))
    assert summary["dropped_too_long"] == too_long and summary["answered"] == len(lengths) - too_long


# --------------------------------------------------------------------------------------------- CLI
@pytest.mark.parametrize("module, flags, message", [
    ("generate", {"model_name": "m", "task": "squad", "output_dir": "o", "bacth_size": 2},
     "unknown flag --bacth_size: did you mean --batch_size?"),
    ("generate", {"model_name": "m", "task": "squad", "output_dir": "o", "from_disk": True},
     "--from_disk is not needed: --source takes a hub id or a local folder"),
    ("generate", {"model_id": "m", "output_dir": "o"}, "--task is required"),
    ("generate", {"model_name": "m", "model_id": "n", "task": "squad", "output_dir": "o"},
     "--model_name and --model_id set model_name to different values"),
    ("generate", {"model_name": "m", "task": "squad", "output_dir": "o", "batch_size": "x"},
     "--batch_size expects an integer"),
    ("benchmark", {"model_name": "m", "task": "squad", "output_dir": "o", "f": 1},
     "--f selects a training method"),
    ("benchmark", {"model_name": "/no/such/model", "task": "squad", "output_dir": "OUT", "source": "SOURCE"},
     "model path /no/such/model does not exist"),
    ("benchmark", {"model_name": "STUDENT", "task": "squad", "output_dir": "OUT", "source": "SOURCE",
                   "split": "nosuch"}, "has no 'nosuch' split"),
    ("benchmark", {"model_name": "STUDENT", "task": "squad", "output_dir": "OUT", "source": "SOURCE",
                   "answer_column": "nope"}, "has no answer column 'nope'"),
])
def test_cli_errors_are_one_line_and_exit_2(tiny, squad_source, tmp_path, capsys, module, flags, message):
    import importlib

    main = importlib.import_module(f"llm_distillation.{module}").main
    swap = {"OUT": str(tmp_path / "out"), "STUDENT": tiny["student"], "SOURCE": squad_source}
    flags = {k: swap.get(v, v) if isinstance(v, str) else v for k, v in flags.items()}
    with pytest.raises(SystemExit) as exit_info:
        main(**flags)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1
    assert message in err


def test_published_flag_names_are_aliases():
    from llm_distillation.benchmark import COMMAND
    from llm_recipes.flags import parse

    args = parse(COMMAND, {"model_id": "m", "task": "qed", "output_path": "o", "number_few_shot": 2,
                           "split_name": "test", "bfloat": True, "model_tokenizer": "t"})["args"]
    assert (args.model_name, args.output_dir, args.few_shot, args.split, args.bf16, args.tokenizer_name) == \
        ("m", "o", 2, "test", True, "t")


# --------------------------------------------------------------------------------------- benchmark
def bench_args(model, source, output_dir, **extra):
    from llm_distillation.benchmark import BenchmarkArgs

    flags = dict(model_name=model, task="squad", source=source, output_dir=str(output_dir), batch_size=3,
                 max_new_tokens=5, progress=False)
    flags.update(extra)
    return BenchmarkArgs(**flags)


def check_scores_match_predictions(out, n):
    from llm_distillation import metrics

    result = json.loads((out / "scores.json").read_text())
    rows = read_jsonl(out / "predictions.jsonl")
    assert result["n"] == len(rows) == n
    means, per_sample = metrics.score_predictions([r["prediction"] for r in rows], [r["references"] for r in rows],
                                                  progress=False)
    assert result["scores"] == pytest.approx(means)
    for row, sample in zip(rows, per_sample):
        assert {k: row[k] for k in sample} == pytest.approx(sample)
    return result, rows


def test_benchmark_causal_student(tiny, squad_source, tmp_path, monkeypatch, capsys):
    from llm_distillation import benchmark
    from llm_distillation.datasets.tasks import load_examples

    examples = load_examples("squad", "validation", source=squad_source)
    gold = examples[0]["answers"][0]
    Recorder(benchmark, monkeypatch, replace={0: f" {gold}\nnext line"})  # the first example answered right
    result = benchmark.benchmark(bench_args(tiny["student"], squad_source, tmp_path))  # split: squad's validation
    result, rows = check_scores_match_predictions(tmp_path, len(examples))
    assert result["split"] == "validation" and result["model"] == tiny["student"]
    assert [r["id"] for r in rows] == list(examples["id"])
    assert rows[0]["prediction"] == gold and rows[0]["f1"] == rows[0]["em"] == 100.0
    assert rows[1]["prompt"].startswith("Context: ") and rows[1]["prompt"].endswith("\nAnswer:")  # plain, 0-shot
    assert [r["references"] for r in rows] == list(examples["answers"])
    assert result["settings"]["few_shot"] == 0 and result["settings"]["chat"] is False
    table = capsys.readouterr().out
    assert "f1" in table and f"{result['scores']['f1']:.2f}" in table


def test_benchmark_encoder_decoder_student(tiny, squad_source, tmp_path):
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from llm_distillation import benchmark
    from llm_distillation.datasets.tasks import encode_prompt
    from llm_distillation.generation import first_line, generate_answers

    benchmark.benchmark(bench_args(tiny["student_t5"], squad_source, tmp_path, number_of_examples=5))
    _, rows = check_scores_match_predictions(tmp_path, 5)
    model = AutoModelForSeq2SeqLM.from_pretrained(tiny["student_t5"])
    tokenizer = AutoTokenizer.from_pretrained(tiny["student_t5"])
    prompt = encode_prompt(rows[0]["prompt"], tokenizer, encoder_decoder=True)
    assert prompt[-1] == tokenizer.eos_token_id  # the encoder input ends with EOS, as in training
    alone = generate_answers(model, tokenizer, [prompt], max_new_tokens=5)[0]
    assert rows[0]["prediction"] == first_line(alone)  # batched (right-padded) = alone


def test_benchmark_lora_adapter_loads_base_and_adapter(tiny, squad_source, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llm_distillation import benchmark, generation

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny["student_same"])
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=64, target_modules=["q_proj", "v_proj"],
                                                 init_lora_weights=False, task_type="CAUSAL_LM"))
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)
    AutoTokenizer.from_pretrained(tiny["student_same"]).save_pretrained(adapter)
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == tiny["student_same"]

    model, _ = generation.load_for_generation(str(adapter))
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny["student_same"]), adapter).eval()
    plain = AutoModelForCausalLM.from_pretrained(tiny["student_same"]).eval()
    ids = torch.tensor([[5, 9, 14, 20, 7]])
    with torch.no_grad():
        got, want, before = (m(input_ids=ids).logits for m in (model, reference, plain))
    assert (got - want).abs().max().item() < 1e-4 and (want - before).abs().max().item() > 1e-3

    benchmark.benchmark(bench_args(str(adapter), squad_source, tmp_path / "bench", number_of_examples=4))
    result, _ = check_scores_match_predictions(tmp_path / "bench", 4)
    assert result["model"] == str(adapter)


def test_dialogsum_generates_summary_generated_and_benchmarks_on_merged_references(tiny, tmp_path):
    """DialogSum in its source schema: the generated column is summary_generated; its test split
    (3 summaries per dialogue, merged into one example) is copied into the output and scored against
    every reference."""
    import datasets

    from llm_distillation import benchmark, generate
    from llm_distillation.datasets.tasks import load_examples

    source = str(Path(__file__).parent / "fixtures" / "tasks" / "dialogsum")
    out = tmp_path / "gen"
    summary = generate.generate(gen_args(tiny["student"], source, out, task="dialogsum", few_shot=0,
                                         number_of_examples=None, max_new_tokens=3))
    assert summary["column"] == "summary_generated"
    saved = datasets.load_from_disk(str(out))
    assert "summary_generated" in saved["train"].column_names and set(saved) == {"train", "validation", "test"}
    loaded = load_examples("dialogsum", "train", source=str(out), answer_column="summary_generated")
    assert len(loaded) == summary["train"]

    benchmark.benchmark(bench_args(tiny["student"], str(out), tmp_path / "bench", task="dialogsum"))  # split: test
    result, rows = check_scores_match_predictions(tmp_path / "bench", len(saved["test"]))
    assert result["split"] == "test" and max(len(r["references"]) for r in rows) == 3
    assert rows[0]["prompt"].startswith("Dialogue: ") and rows[0]["prompt"].endswith("\nSummary:")


def test_generate_train_benchmark_end_to_end(tiny, teacher512, squad_source, tmp_path):
    """The three published steps glued together: teacher answers -> a student distilled on them (the
    SQuAD loader file reading the generated folder) -> its last checkpoint benchmarked."""
    from llm_distillation import benchmark, generate
    from llm_recipes.config import parse_flags
    from llm_recipes.finetuning import train

    generated = tmp_path / "generated"
    generate.generate(gen_args(teacher512, squad_source, generated, number_of_examples=16, val_fraction=0.25))
    run = tmp_path / "run"
    loader = Path(__file__).resolve().parent.parent / "llm_distillation" / "datasets" / "loader" / "squad.py"
    train(parse_flags({"model_name": tiny["student"], "dataset.file": str(loader), "dataset.source": str(generated),
                       "dataset.answer_column": "answers_generated", "output_dir": str(run), "distillation": True,
                       "distillation_config.model_name": teacher512, "lr": 1e-3, "batch_size_training": 4,
                       "val_batch_size": 4, "num_epochs": 1, "save_step": 0, "scheduler": "constant"}))
    benchmark.benchmark(bench_args(str(run / "last"), squad_source, tmp_path / "bench", number_of_examples=4))
    result, _ = check_scores_match_predictions(tmp_path / "bench", 4)
    assert result["model"] == str(run / "last")
