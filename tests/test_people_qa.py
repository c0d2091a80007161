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
