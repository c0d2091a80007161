"""Task loaders on fixtures in each source's real schema, through the trainer's own loader path.

Checks the exact prompt text, the label mask (-100 exactly on the prompt), teacher/student pairing,
few-shot selection, training_size, answer_column, held-out splits cut off train, and the error messages.
"""
import json
from pathlib import Path

import datasets
import pytest
from transformers import AutoTokenizer

from conftest import base_flags, qa_rows
from configs import dataset
from llm_distillation import prompts
from llm_distillation.datasets.catalog import task_data
from llm_distillation.datasets import sources, tasks
from llm_recipes import data
from llm_recipes.errors import UserError

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "fixtures" / "tasks"
LOADERS = REPO / "llm_distillation" / "datasets" / "loader"
LLAMA = "meta-llama/Llama-2-7b-chat-hf"
MISTRAL = "mistralai/Mistral-7B-Instruct-v0.2"


@pytest.fixture(scope="module")
def toks(tiny):
    return {"student": AutoTokenizer.from_pretrained(tiny["student"]),  # WordPiece, no chat template
            "teacher": AutoTokenizer.from_pretrained(tiny["teacher"]),  # byte-level BPE, chat template
            "t5": AutoTokenizer.from_pretrained(tiny["student_t5"])}


def write_jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def dolly_minillm(tmp_path_factory):
    """MiniLLM's copy of Dolly: raw.jsonl (dev = its first 1000 rows, train = the rest) and valid.jsonl (test)."""
    folder = tmp_path_factory.mktemp("dolly_minillm")
    raw = [{"instruction": f"Repeat the number {i}.", "input": "" if i % 2 else f"n={i}", "output": f"{i}"}
           for i in range(1003)]
    write_jsonl(folder / "raw.jsonl", raw)
    write_jsonl(folder / "valid.jsonl", [{"instruction": "Name a colour.", "input": "", "output": "Blue"}])
    return str(folder)


def sides(task, toks, split, teacher_name=LLAMA, **config):
    """Both sides of a split through llm_recipes.data (the trainer's path), pairing checked."""
    loader = data.import_loader(str(LOADERS / f"{task}.py"))
    cfg = dataset(file=str(LOADERS / f"{task}.py"), **config)
    student = data.load_split(loader, cfg, toks["student"], split, role="student", model_name="tiny/student",
                              encoder_decoder=False)
    teacher = data.load_split(loader, cfg, toks["teacher"], split, role="teacher", model_name=teacher_name,
                              encoder_decoder=False)
    data.check_pairing(student, teacher, split)
    return student, teacher


def assert_row(row, tokenizer, prompt: str, answer: str, role: str, separator: str):
    """input_ids = BOS + prompt + answer tokens; labels -100 exactly on BOS + prompt."""
    prompt_ids = tasks.encode_prompt(prompt, tokenizer)
    answer_ids = tokenizer(separator + answer, add_special_tokens=False)["input_ids"]
    if role == "student":
        answer_ids = answer_ids + [tokenizer.eos_token_id]
    n = len(prompt_ids)
    assert prompt_ids[0] == tokenizer.bos_token_id and prompt_ids[1] != tokenizer.bos_token_id
    assert row["input_ids"] == prompt_ids + answer_ids
    assert row["labels"] == [-100] * n + answer_ids
    assert row["attention_mask"] == [1] * len(row["input_ids"])


QA_SYSTEM = task_data("squad").prompt.system

# (task, source, split, id of the checked example, its student prompt, its first reference)
CASES = [
    ("squad", "squad", "validation", "sq-v0",
     "Context: The Denver Broncos won Super Bowl 50 against the Carolina Panthers.\n"
     "Question: Which team won Super Bowl 50?\nAnswer:", "Denver Broncos"),
    ("qed", "qed", "validation", "-2013458712345678901",
     "Context: In the episode , Dr. Lexie Grey ( Chyler Leigh ) ultimately dies .\n"
     "Question: who dies at the end of grey's anatomy season 8\nAnswer:", "Dr. Lexie Grey"),
    ("fairytaleqa", "fairytaleqa", "test", "test-0",
     "Context: the princess dropped her golden ball into the well and began to cry .\n"
     "Question: why did the princess cry ?\nAnswer:", "she dropped her golden ball into the well ."),
    ("pubmedqa", "pubmedqa", "test", None,
     None, None),
    ("dialogsum", "dialogsum", "test", "test_0_1",
     "Dialogue: #Person1#: Can I pay by card?\n#Person2#: Yes, we take all cards.\nSummary:",
     "#Person2# tells #Person1# that cards are accepted."),
]


@pytest.mark.parametrize("task,folder,split,example_id,prompt,answer", CASES, ids=[c[0] for c in CASES])
def test_task_loader_on_its_real_schema(toks, task, folder, split, example_id, prompt, answer):
    source = str(FIXTURES / folder)
    examples = tasks.load_examples(task, split, source=source)
    if example_id is None:  # pubmedqa: the test half is a seeded draw; check its first example
        row = examples[0]
        example_id, answer = row["id"], row["answers"][0]
        prompt = f"Medical paper: {row['context']}\nQuestion: {row['question']}\nAnswer:"
        assert " " in row["context"] and row["context"].endswith(".")  # the abstract's sections, joined
    student, teacher = sides(task, toks, split, teacher_name="tiny/teacher", source=source, few_shot=0)
    index = list(student["id"]).index(example_id)
    assert examples[index]["answers"][0] == answer
    assert prompts.build_prompt(task, examples[index], toks["student"]) == prompt
    assert_row(student[index], toks["student"], prompt, answer, "student", " ")
    chat = (f"<s>system: {task_data(task).prompt.system}\n<s>user: {prompt.rsplit(chr(10), 1)[0]}\n<s>assistant:")
    assert_row(teacher[index], toks["teacher"], chat, answer, "teacher", "")
    for split_name in ("train", "validation"):  # what the trainer asks for
        s, t = sides(task, toks, split_name, teacher_name="tiny/teacher", source=source, few_shot=0)
        assert len(s) == len(t) > 0 and list(s["id"]) == list(t["id"])


def test_source_schemas_become_references():
    squad = tasks.load_examples("squad", "validation", source=str(FIXTURES / "squad"))
    assert squad[0]["answers"] == ["Denver Broncos", "The Denver Broncos"]  # duplicates of answers.text dropped
    assert squad[0]["title"] == "Denver"
    qed = tasks.load_examples("qed", "train", source=str(FIXTURES / "qed"))
    assert qed[0] == {"id": "9174646170831578001", "title": "Webbed toes", "question":
                      "what is the medical term for webbed toes", "answers": ["syndactyly"],
                      "context": "Webbed toes is the common name for syndactyly affecting the feet ."}
    fairy = tasks.load_examples("fairytaleqa", "train", source=str(FIXTURES / "fairytaleqa"))
    assert fairy[1]["answers"] == ["he had enough money to buy all the other toys .", "he was full of money ."]
    assert fairy[0]["answers"] == ["it dodged them round the fire and ran out of the door ."]  # empty answer2
    assert fairy[0]["title"] == "the-wee-bannock" and fairy[0]["id"] == "train-0"
    dialog = tasks.load_examples("dialogsum", "test", source=str(FIXTURES / "dialogsum"))
    assert len(dialog) == 2 and [len(a) for a in list(dialog["answers"])] == [3, 3]  # 3 summaries per test dialogue
    assert list(dialog["id"]) == ["test_0_1", "test_1_1"]


def test_fairytaleqa_gem_copy(tmp_path):
    gem = {"story_name": "the-frog-king", "content": "the frog brought the ball back .", "answer": "the frog .",
           "question": "who brought the ball back ?", "gem_id": "GEM-FairytaleQA-test-0",
           "target": "who brought the ball back ?", "references": ["who brought the ball back ?"]}
    write_jsonl(tmp_path / "test.jsonl", [gem])
    row = tasks.load_examples("fairytaleqa", "test", source=str(tmp_path))[0]
    assert row == {"id": "GEM-FairytaleQA-test-0", "title": "the-frog-king", "question": "who brought the ball back ?",
                   "context": "the frog brought the ball back .", "answers": ["the frog ."]}


def test_held_out_splits_are_cut_off_train_the_same_way_every_time():
    source = str(FIXTURES / "pubmedqa")  # pqa_labeled: one train split of 8 rows here
    parts = {s: tasks.load_examples("pubmedqa", s, source=source, seed=s == "train" and 7 or 42)["id"][:]
             for s in ("train", "validation", "test")}
    assert [len(parts[s]) for s in ("train", "validation", "test")] == [3, 1, 4]  # test half, 10% of the rest
    everything = parts["train"] + parts["validation"] + parts["test"]
    assert len(set(everything)) == 8
    assert parts["test"] == tasks.load_examples("pubmedqa", "test", source=source, seed=123)["id"][:]


def test_dolly_minillm_split(dolly_minillm, toks):
    validation = tasks.load_examples("dolly", "validation", source=dolly_minillm)
    train = tasks.load_examples("dolly", "train", source=dolly_minillm)
    test = tasks.load_examples("dolly", "test", source=dolly_minillm)
    assert list(validation["id"]) == [f"train-{i}" for i in range(1000)]  # MiniLLM's dev set: raw[:1000]
    assert list(train["id"]) == ["train-1000", "train-1001", "train-1002"]
    assert list(test["answers"]) == [["Blue"]]
    assert train[2] == {"id": "train-1002", "instruction": "Repeat the number 1002.", "input": "n=1002",
                        "answers": ["1002"]}
    with_input = ("Below is an instruction that describes a task, paired with an input that provides further "
                  "context. Write a response that appropriately completes the request.\n\n### Instruction:\n"
                  "Repeat the number 1002.\n\n### Input:\nn=1002\n\n### Response:\n")
    assert prompts.build_prompt("dolly", train[2], toks["student"]) == with_input
    assert prompts.build_prompt("dolly", train[1], toks["student"]) == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nRepeat the number 1001.\n\n### Response:\n")
    student, teacher = sides("dolly", toks, "train", source=dolly_minillm)
    assert_row(student[2], toks["student"], with_input, "1002", "student", "")


def test_dolly_databricks_file(tmp_path):
    rows = [json.loads(line) for line in (FIXTURES / "dolly" / "databricks-dolly-15k.jsonl").read_text().splitlines()]
    big = write_jsonl(tmp_path / "databricks-dolly-15k.jsonl", (rows * 301)[:1503])
    counts = [len(tasks.load_examples("dolly", s, source=str(big))) for s in ("test", "validation", "train")]
    assert counts == [500, 1000, 3]
    first = tasks.load_examples("dolly", "test", source=str(big))[1]
    assert first["input"] == rows[1]["context"] and first["answers"] == [rows[1]["response"]]


def test_teacher_few_shot_and_title_follow_the_table(toks):
    source = str(FIXTURES / "squad")
    _, llama = sides("squad", toks, "validation", teacher_name=LLAMA, source=source)
    _, mistral = sides("squad", toks, "validation", teacher_name=MISTRAL, source=source)
    _, other = sides("squad", toks, "validation", teacher_name="some/other-model", source=source)
    decode = lambda row: toks["teacher"].decode(row["input_ids"])  # noqa: E731
    train_contexts = tasks.load_examples("squad", "train", source=source)["context"][:]
    for rows, shots, title in ((llama, 1, False), (mistral, 3, True), (other, 1, False)):  # other: the task's default
        text = decode(rows[0])
        assert text.count("<s>user:") == shots + 1
        assert sum(c in text for c in train_contexts) == shots
        assert ("Title: Denver\nContext:" in text) is title
    assert prompts.few_shot_count("squad", LLAMA) == 1 and prompts.few_shot_count("qed", "/models/Llama-2-7b-chat") == 5
    assert prompts.few_shot_count("dialogsum", MISTRAL) == 2 and prompts.few_shot_count("squad", "Qwen/Qwen2.5-7B") == 1
    assert prompts.few_shot_count("tiny_qa", "Qwen/Qwen2.5-7B") == 0 and prompts.few_shot_count("dolly", "x") == 0
    assert prompts.few_shot_count("squad", LLAMA, override=0) == 0
    _, forced = sides("squad", toks, "validation", teacher_name=LLAMA, source=source, few_shot=2)
    assert decode(forced[0]).count("<s>user:") == 3


def test_few_shot_never_contains_the_evaluated_example(toks):
    source = str(FIXTURES / "squad")
    train = tasks.load_examples("squad", "train", source=source)
    _, teacher = sides("squad", toks, "train", source=source, few_shot=len(train) - 1)
    for row, example in zip(teacher, train):
        text = toks["teacher"].decode(row["input_ids"])
        assert text.count(example["context"]) == 1  # only as the request itself
        assert all(other in text for other in list(train["context"]))
    shots = tasks.select_shots(train, 3, seed=1, exclude_id=None)
    assert [s["id"] for s in tasks.select_shots(train, 3, seed=1, exclude_id=None)] == [s["id"] for s in shots]
    excluded = tasks.select_shots(train, 3, seed=1, exclude_id=shots[0]["id"])
    assert [s["id"] for s in excluded] == [s["id"] for s in shots[1:]] + [excluded[2]["id"]]
    assert shots[0]["id"] not in [s["id"] for s in excluded]
    with pytest.raises(UserError, match="only 6 few-shot examples"):
        tasks.select_shots(train, 7, seed=1, exclude_id=None)


def test_training_size_is_a_seeded_fraction_in_source_order(toks):
    source = str(FIXTURES / "squad")
    every = tasks.load_examples("squad", "train", source=source)["id"][:]
    half = tasks.load_examples("squad", "train", source=source, training_size=0.5, seed=3)["id"][:][:]
    assert len(half) == 3 and half == tasks.load_examples("squad", "train", source=source, training_size=0.5,
                                                          seed=3)["id"][:]
    assert half == sorted(half, key=every.index)
    seeds = {tuple(tasks.load_examples("squad", "train", source=source, training_size=0.5, seed=s)["id"][:])
             for s in range(6)}
    assert len(seeds) > 1
    student, teacher = sides("squad", toks, "train", source=source, training_size=0.5, seed=3)
    assert list(student["id"]) == list(teacher["id"]) == half
    student, _ = sides("squad", toks, "validation", source=source, training_size=0.5, seed=3)
    assert len(student) == 3  # only the training split is subsampled
    with pytest.raises(UserError, match="training_size"):
        tasks.load_examples("squad", "train", source=source, training_size=1.5)


@pytest.fixture()
def generated(tmp_path):
    """A teacher-generated data set as the generation step saves it: normalized rows + answers_generated."""
    examples = tasks.load_examples("squad", "validation", source=str(FIXTURES / "squad"))
    rows = [dict(r, answers_generated=f"generated {i}") for i, r in enumerate(examples)]
    folder = tmp_path / "generated"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows),
                          "validation": datasets.Dataset.from_list(rows[:1])}).save_to_disk(str(folder))
    return str(folder)


def test_answer_column_switches_the_labels(toks, generated):
    gold, _ = sides("squad", toks, "train", source=generated)
    chosen, teacher = sides("squad", toks, "train", source=generated, answer_column="answers_generated")
    by_teacher, _ = sides("squad", toks, "train", source=generated, generated_by=LLAMA)
    decode = lambda row: toks["student"].decode([t for t in row["labels"] if t != -100])  # noqa: E731
    assert decode(gold[1]) == "the <unk> <unk> </s>"  # "the Mediterranean Sea" (mostly out of the tiny vocabulary)
    assert decode(chosen[1]) == decode(by_teacher[1]) == "generated <unk> </s>"
    assert toks["teacher"].decode([t for t in teacher[1]["labels"] if t != -100]) == "generated 1"
    assert tasks.load_examples("squad", "train", source=generated, answer_column="answers_generated")[2][
        "answers"] == ["generated 2"]


def test_error_messages(tmp_path, toks):
    bad = write_jsonl(tmp_path / "nq" / "train.jsonl", [{"id": "a", "context": "c", "answers": {"text": ["x"]}}] * 3)
    with pytest.raises(UserError) as missing:
        tasks.load_examples("squad", "train", source=str(bad.parent))
    message = str(missing.value)
    assert "'question'" in message and "columns found: id, context, answers" in message
    assert "--dataset.source" in message
    with pytest.raises(UserError, match="answer column 'answers_generated'.*--dataset.answer_column"):
        tasks.load_examples("squad", "validation", source=str(FIXTURES / "squad"), answer_column="answers_generated")
    with pytest.raises(UserError, match=r"no 'test' split for the squad task; its splits are train, validation"):
        tasks.load_examples("squad", "test", source=str(FIXTURES / "squad"))
    with pytest.raises(UserError, match=r"has no 'test' split; its splits are train, validation"):
        sources.load_source(str(FIXTURES / "squad"), "test")
    with pytest.raises(UserError, match="does not exist"):
        tasks.load_examples("squad", "train", source=str(tmp_path / "nowhere"))
    with pytest.raises(UserError, match="from the Hugging Face Hub.*--dataset.source a local copy"):
        sources.load_source("no-such-owner/no-such-dataset", "train")
    with pytest.raises(UserError, match="unknown task 'squad2'"):
        tasks.load_examples("squad2", "train")
    with pytest.raises(UserError, match="no default data"):
        tasks.load_examples("generic", "train")
    with pytest.raises(UserError) as unknown:
        tasks.load_examples("generic", "train", source=str(FIXTURES / "generic" / "unknown.jsonl"))
    message = str(unknown.value)
    for schema in ("messages", "instruction+output", "instruction+response", "prompt+response", "text"):
        assert schema in message
    assert "columns found: question, label" in message


def test_missing_column_reaches_the_cli_as_one_line(tiny, tmp_path, capsys):
    bad = write_jsonl(tmp_path / "data" / "train.jsonl", [{"id": "a", "title": "t", "context": "c"}])
    write_jsonl(tmp_path / "data" / "validation.jsonl", [{"id": "b", "title": "t", "context": "c"}])
    from llm_recipes.finetuning import main

    with pytest.raises(SystemExit) as exit_info:
        main(**base_flags(tiny, tmp_path / "out", **{"dataset.file": str(LOADERS / "squad.py"),
                                                     "dataset.source": str(bad.parent)}))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: the squad data in") and "'question'" in err[0], err


def test_generic_schemas(toks, tmp_path):
    folder = FIXTURES / "generic"
    pairs = tasks.load_examples("generic", "train", source=str(folder / "prompt_response.jsonl"))
    assert pairs.column_names == ["id", "prompt", "answers"] and len(pairs) == 2  # 1 of 3 held out
    alpaca = tasks.load_examples("generic", "train", source=str(folder / "alpaca.json"))
    assert alpaca[0] == {"id": "train-0", "instruction": "Add the numbers.", "input": "2 and 3", "answers": ["5"]}
    chats = tasks.load_examples("generic", "train", source=str(folder / "messages.jsonl"))
    assert chats[0] == {"id": "train-0", "messages": [{"role": "user", "content": "Hi, what is 2+2?"}],
                        "answers": ["4"]}
    held_out = tasks.load_examples("generic", "validation", source=str(folder / "messages.jsonl"))
    assert len(chats) == 2 and len(held_out) == 1
    longest = next(r for r in list(chats) + list(held_out) if r["answers"] == ["Green"])
    assert [m["content"] for m in longest["messages"]] == ["Name a colour.", "Blue", "Another?"]
    student, teacher = sides("generic", toks, "train", source=str(folder / "messages.jsonl"))
    assert_row(student[0], toks["student"], "user: Hi, what is 2+2?\nassistant:", "4", "student", " ")
    assert_row(teacher[0], toks["teacher"], "<s>user: Hi, what is 2+2?\n<s>assistant:", "4", "teacher", "")
    student, _ = sides("generic", toks, "train", source=str(folder / "prompt_response.jsonl"))
    assert_row(student[0], toks["student"], "Translate to French: cat", "chat", "student", " ")
    # plain text: language modelling on the whole text, labels on every token but BOS
    student, teacher = sides("generic", toks, "train", source=str(folder / "text.jsonl"))
    tok = toks["student"]
    assert student[0]["input_ids"] == [tok.bos_token_id] + tok("ada lives in oslo.", add_special_tokens=False)[
        "input_ids"] + [tok.eos_token_id]
    assert student[0]["labels"] == [-100] + student[0]["input_ids"][1:]
    assert toks["teacher"].decode(teacher[0]["input_ids"]) == "<s>ada lives in oslo."
    broken = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}] * 3)
    with pytest.raises(UserError, match="does not end with an assistant turn"):
        tasks.load_examples("generic", "train", source=str(broken))


def test_sources(tmp_path):
    rows = [{"id": str(i), "text": f"t{i}"} for i in range(4)]
    folder = tmp_path / "dict"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows), "test": datasets.Dataset.from_list(rows[:1])}
                         ).save_to_disk(str(folder))
    assert len(sources.load_source(str(folder), "test")) == 1
    single = tmp_path / "validation"
    datasets.Dataset.from_list(rows).save_to_disk(str(single))
    assert sorted(sources.load_splits(str(single))) == ["validation"]  # a saved Dataset named like a split
    (tmp_path / "csv").mkdir()
    (tmp_path / "csv" / "train.csv").write_text("id,text\n1,a\n2,b\n")
    assert sources.load_source(str(tmp_path / "csv"), "train")["text"][:] == ["a", "b"]
    assert sorted(sources.load_splits(str(FIXTURES / "fairytaleqa"))) == ["test", "train", "valid"]
    assert sorted(tasks._source_splits("fairytaleqa", tasks.TASK_DATA["fairytaleqa"],
                                       str(FIXTURES / "fairytaleqa"))) == ["test", "train", "validation"]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="holds no dataset"):
        sources.load_splits(str(empty))
    (tmp_path / "broken.jsonl").write_text("{not json\n")
    with pytest.raises(UserError, match=r"broken.jsonl:1: not valid JSON"):
        sources.load_splits(str(tmp_path / "broken.jsonl"))
    (tmp_path / "late.jsonl").write_text('{"a": 1}\n\n{"a": 2}\n{"a": 3,}\n')  # blank lines count as lines
    with pytest.raises(UserError, match=r"late.jsonl:4: not valid JSON"):
        sources.load_splits(str(tmp_path / "late.jsonl"))
    (tmp_path / "nothing.jsonl").write_text("\n")
    with pytest.raises(UserError, match=r"nothing.jsonl: no examples"):
        sources.load_splits(str(tmp_path / "nothing.jsonl"))
    assert tasks.task_data("tiny_qa").source == str(REPO / "assets" / "tiny" / "data")


def test_tokenization_conventions(toks):
    teacher, student, t5 = toks["teacher"], toks["student"], toks["t5"]
    chat = prompts.build_prompt("tiny_qa", {"context": "ada lives in oslo.", "question": "where?", "answers": []},
                                teacher)
    assert chat == "<s>user: Context: ada lives in oslo.\nQuestion: where?\n<s>assistant:"
    ids = tasks.encode_prompt(chat, teacher)
    assert ids[0] == teacher.bos_token_id and ids.count(teacher.bos_token_id) == 2  # the template's own BOS only
    row = tasks.tokenize_example("Answer:", "oslo", student, role="student", encoder_decoder=False)
    answer = student(" oslo", add_special_tokens=False)["input_ids"]
    assert row["labels"] == [-100, -100, -100] + answer + [student.eos_token_id]
    row = tasks.tokenize_example("Answer:", "oslo", teacher, role="teacher", encoder_decoder=False)
    assert row["labels"][-1] != teacher.eos_token_id  # the teacher's answer has no EOS
    row = tasks.tokenize_example("Answer:", "oslo", t5, role="student", encoder_decoder=True)
    assert row["input_ids"] == t5("Answer:", add_special_tokens=False)["input_ids"] + [t5.eos_token_id]
    assert row["labels"] == t5("oslo", add_special_tokens=False)["input_ids"] + [t5.eos_token_id]
    assert row["attention_mask"] == [1] * len(row["input_ids"])
    row = tasks.tokenize_example("Answer:", None, student, role="student", encoder_decoder=False)
    assert set(row["labels"]) == {-100}


def test_a_training_run_with_a_task_loader(tiny, tmp_path):
    """The default demo loader (tiny_qa) on SQuAD-schema data: distillation with the tiny chat teacher."""
    from llm_recipes.finetuning import main

    folder = tmp_path / "data"
    for split, rows in (("train", qa_rows(24, 5)), ("validation", qa_rows(8, 6)), ("test", qa_rows(4, 7))):
        write_jsonl(folder / f"{split}.jsonl", [
            {"id": r["id"], "title": "", "context": r["context"], "question": r["question"],
             "answers": {"text": [r["answer"]], "answer_start": [r["context"].index(r["answer"])]}} for r in rows])
    out = tmp_path / "out"
    # ULD pairs every answer token, so that every step has a teacher term (the projection, auto's choice across
    # tokenizers, serves 1.8% of these toy tokenizers' answer tokens: most batches have none)
    main(**base_flags(tiny, out, **{"dataset.file": str(LOADERS / "tiny_qa.py"), "dataset.source": str(folder),
                                    "distillation_config.loss": "uld"}))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["type"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert all(r["distill"] > 0 for r in records if r["type"] == "train")
    assert json.loads((out / "run_config.json").read_text())["dataset"]["source"] == str(folder)


def test_chat_template_without_a_system_role(tiny):
    """Mistral-style templates reject a system turn: the instruction opens the first user turn instead."""
    tokenizer = AutoTokenizer.from_pretrained(tiny["teacher"])
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
        "[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}")
    shot = {"id": "s", "context": "bo lives in rome.", "question": "where does bo live?", "answers": ["rome"]}
    example = {"id": "e", "context": "ada lives in oslo.", "question": "where does ada live?", "answers": ["oslo"]}
    assert prompts.build_prompt("squad", example, tokenizer, [shot]) == (
        f"[user] {QA_SYSTEM}\n\nContext: bo lives in rome.\nQuestion: where does bo live?\n[assistant] rome\n"
        "[user] Context: ada lives in oslo.\nQuestion: where does ada live?\n[assistant]")
    assert prompts.build_prompt("squad", example, tokenizer, [shot], chat=False) == (
        "Context: bo lives in rome.\nQuestion: where does bo live?\nAnswer: rome\n\n"
        "Context: ada lives in oslo.\nQuestion: where does ada live?\nAnswer:")


def test_an_answer_that_starts_with_a_space_gets_no_second_one(toks):
    rows = tasks.tokenize_examples(["Answer:", "Answer:"], [" Paris", "Paris"], toks["student"], role="student",
                                   encoder_decoder=False)
    texts = [toks["student"].decode([t for t in row["labels"] if t != -100], skip_special_tokens=True) for row in rows]
    assert texts[0] == texts[1]  # " Paris" and "Paris" both become the student's " Paris"
