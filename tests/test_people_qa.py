"""examples/real_pair/people_qa.py: deterministic, disjoint splits whose every answer an independent solver
(regular expressions over the context) gets back; the task's loader and its refusal without data."""
import re
from types import SimpleNamespace

import pytest

from examples.real_pair import people_qa as pq
from llm_recipes.errors import UserError

SIZES = {"train": 600, "validation": 50, "test": 200}
FACTS = [
    ("city", r"(\w+) lives in ([^.]+)\."), ("job", r"(\w+) works as an? ([^.]+)\."),
    ("pet", r"(\w+) owns an? ([^.]+)\."), ("born", r"(\w+) was born in (\w+)\."),
    ("music", r"(\w+) plays the ([^.]+)\."), ("age", r"(\w+) is (\d+) years old\."),
    ("price", r"(\w+) paid (\d+) dollars for an? [^.]+\."),
]
DESCRIPTIONS = [("music", r"the person who plays the (.+)"), ("city", r"the person who lives in (.+)"),
                ("pet", r"the owner of the (.+)"), ("job", r"the (.+)")]
ASKED = {"Where does": "city", "What does": "job", "What pet does": "pet", "In which month was": "born",
         "Which instrument does": "music"}


def solve(context: str, question: str) -> str:
    people = {}
    for attribute, pattern in FACTS:
        for name, value in re.findall(pattern, context):
            people.setdefault(name, {})[attribute] = value
    if m := re.fullmatch(r"How old will (\w+) be in (\d+) years\?", question):
        return str(int(people[m[1]]["age"]) + int(m[2]))
    if m := re.fullmatch(r"How many dollars did (\w+) and (\w+) pay in all\?", question):
        return str(int(people[m[1]]["price"]) + int(people[m[2]]["price"]))
    if m := re.fullmatch(r"Who is older, (\w+) or (\w+)\?", question):
        return max((m[1], m[2]), key=lambda name: int(people[name]["age"]))
    m = re.fullmatch(r"(Where does|What does|What pet does|In which month was|Which instrument does) (.+?) "
                     r"(?:live|work as|own|born|play)\?", question)
    attribute, who = ASKED[m[1]], m[2]
    if who in people:
        return people[who][attribute]
    for by, pattern in DESCRIPTIONS:  # a two-hop question: the one person with that attribute value
        if d := re.fullmatch(pattern, who):
            holders = [name for name, facts in people.items() if facts.get(by) == d[1]]
            if holders:
                assert len(holders) == 1, (question, holders)
                return people[holders[0]][attribute]
    raise AssertionError(f"cannot parse {question!r}")


@pytest.fixture(scope="module")
def splits():
    return pq.generate_splits(SIZES)


def test_splits_are_deterministic_sized_and_disjoint(splits):
    assert pq.generate_splits(SIZES) == splits
    assert {name: len(rows) for name, rows in splits.items()} == SIZES
    contexts = [{row["context"] for row in rows} for rows in splits.values()]
    assert sum(map(len, contexts)) == sum(SIZES.values())  # distinct within and across splits
    assert len({row["id"] for rows in splits.values() for row in rows}) == sum(SIZES.values())


def test_every_answer_is_what_the_context_implies(splits):
    for row in (row for rows in splits.values() for row in rows):
        (answer,), (start,) = row["answers"]["text"], row["answers"]["answer_start"]
        assert solve(row["context"], row["question"]) == answer, row
        if row["kind"] in ("lookup", "two_hop"):
            assert row["context"][start:start + len(answer)] == answer
        else:
            assert start == -1


def test_the_question_mix_and_multi_digit_answers(splits):
    train = splits["train"]
    for kind, share in pq.QUESTION_MIX.items():
        assert abs(sum(row["kind"] == kind for row in train) / len(train) - share) < 0.05, kind
    numbers = [row["answers"]["text"][0] for row in train if row["kind"] == "arithmetic"]
    assert all(n.isdigit() for n in numbers) and sum(len(n) >= 3 for n in numbers) / len(numbers) > 0.4
    assert all(9 <= len(row["context"].split(". ")) <= 20 for row in train)


def test_the_loader_builds_prompts_and_names_the_command_without_data(tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    from configs import dataset
    from configs.paths import TINY_TEACHER
    from llm_distillation.datasets import tasks
    from llm_recipes import data

    loader = data.import_loader("llm_distillation/datasets/loader/people_qa.py")
    tokenizer = AutoTokenizer.from_pretrained(TINY_TEACHER)
    missing = tmp_path / "missing"
    monkeypatch.setitem(tasks.TASK_DATA, "people_qa", tasks.TaskData(**{**tasks.TASK_DATA["people_qa"].__dict__,
                                                                          "source": str(missing)}))
    config = SimpleNamespace(**{**dataset().__dict__, "encoder_decoder": False, "role": "teacher",
                                "model_name": "gemma-3-270m"})
    with pytest.raises(UserError, match="python -m examples.real_pair.people_qa"):
        loader.get_split(config, tokenizer, "validation")
    folder = pq.write_splits(tmp_path / "data", {"train": 30, "validation": 5, "test": 5})
    config.source = str(folder)
    teacher = loader.get_split(config, tokenizer, "validation")
    student = loader.get_split(SimpleNamespace(**{**config.__dict__, "role": "student"}), tokenizer, "validation")
    assert len(teacher) == len(student) == 5
    teacher_prompt = tokenizer.decode(teacher[0]["input_ids"])
    student_prompt = tokenizer.decode(student[0]["input_ids"])
    assert teacher_prompt.count("Question:") == 4 and student_prompt.count("Question:") == 1  # 3 shots, 0 shots


# ------------------------------------------------------------------------------------------- worked answers
def check_sums(text: str) -> None:
    """Every written sum of a worked answer, digit by digit: each place's terms add up, the written digit and the
    carry follow, and the stated total is the sum."""
    for a, b, steps, total in re.findall(r"(\d+) \+ (\d+): (.+?)\. So \1 \+ \2 = (\d+)\.", text):
        assert int(a) + int(b) == int(total), text
        carry = 0
        for step in steps.split("; "):
            m = re.fullmatch(r"[a-z ]+? ((?:\d+ \+ )*\d+)(?: = (\d+))?, write (\d)( carry 1)?", step)
            assert m, step
            terms = [int(x) for x in m[1].split(" + ")]
            place = sum(terms)
            assert (m[2] is None or int(m[2]) == place) and int(m[3]) == place % 10 and bool(m[4]) == (place >= 10)
            assert carry == 0 or terms[-1] == carry, step
            carry = place // 10


def test_every_worked_answer_states_its_facts_and_ends_with_the_answer(splits):
    """The worked answer's final line is the row's answer, every fact it quotes is a sentence of the context,
    every sum is right digit by digit, and a two-hop answer names both hops."""
    for row in (row for rows in splits.values() for row in rows):
        lines = row["worked"].split("\n")
        assert lines[-1] == f"{pq.FINAL} {row['answers']['text'][0]}"
        for fact in re.findall(r"(?:The fact: |hop: )([^.]+\.)", row["worked"]):
            assert fact in row["context"], (fact, row)
        check_sums(row["worked"])
        if row["kind"] == "two_hop":
            assert lines[0].startswith("First hop:") and lines[1].startswith("Second hop:")
        if row["kind"] == "arithmetic":
            assert "write" in row["worked"]


def test_worked_answers_are_long_enough_for_on_policy_training(splits):
    """At least 20 student tokens on average (here the tiny student's tokenizer; SmolLM2: 51, docs/tasks.md)."""
    from transformers import AutoTokenizer

    from configs.paths import TINY_ASSETS

    tokenizer = AutoTokenizer.from_pretrained(TINY_ASSETS / "student")
    lengths = [len(tokenizer(" " + row["worked"], add_special_tokens=False)["input_ids"]) + 1
               for row in splits["train"]]
    assert sum(lengths) / len(lengths) >= 20


def test_the_worked_task_trains_on_the_steps_and_scores_the_final_line(tmp_path):
    from transformers import AutoTokenizer

    from configs import dataset
    from configs.paths import TINY_STUDENT
    from llm_distillation import metrics
    from llm_distillation.generation import kept_answer
    from llm_recipes import data

    folder = pq.write_splits(tmp_path / "data", {"train": 30, "validation": 5, "test": 5})
    loader = data.import_loader("llm_distillation/datasets/loader/people_qa_worked.py")
    tokenizer = AutoTokenizer.from_pretrained(TINY_STUDENT)
    config = SimpleNamespace(**{**dataset().__dict__, "encoder_decoder": False, "role": "student",
                                "model_name": TINY_STUDENT, "source": str(folder)})
    example = loader.get_split(config, tokenizer, "validation")[0]
    answer = tokenizer.decode([t for t in example["labels"] if t != -100], skip_special_tokens=True)
    assert "Answer:" in answer and answer.count("\n") >= 1
    assert tokenizer.decode(example["input_ids"], skip_special_tokens=True).rstrip().endswith(answer.rstrip())
    worked = "Bo is 34 years old.\nAnswer: 34"
    assert kept_answer(worked + "\nContext: more text", "Answer:") == worked
    assert kept_answer("no final line\nat all", "Answer:") == "no final line\nat all"
    assert metrics.final_answer(worked, "Answer:") == "34" and metrics.worked_part(worked, "Answer:") == \
        "Bo is 34 years old."
    means, rows = metrics.score_worked([worked, "Bo is 35 years old.\nAnswer: 35"], [[worked], [worked]], "Answer:",
                                       progress=False)
    assert [r["em"] for r in rows] == [100.0, 0.0] and rows[0]["worked_rougeL"] == 100.0
    assert 0 < rows[1]["worked_rougeL"] < 100 and means["f1"] == 50.0
