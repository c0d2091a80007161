"""people_qa: a synthetic QA task with headroom for real small models (the real-pair demo's task).

    python -m examples.real_pair.people_qa --output_dir ~/.cache/llm-distill/people_qa

tiny_qa is too easy for pretrained models (SmolLM2-135M fine-tuned on its gold answers reaches F1 97).
people_qa keeps its form (a context of facts about made-up people, a question, a short answer; SQuAD's
schema, so every tool of the project reads it) and adds what a 135M model finds hard:

- more people (3 to 5) and facts (3 to 4 each), so a context has 9 to 20 sentences of distractors;
- two-hop questions: "Where does the person who plays the cello live?" (the attribute is unique in the
  context; the answer is another fact of that person);
- arithmetic over stated multi-digit numbers, where tokenizers split digits differently: "How old will
  Ada be in 17 years?", "How much did Ada and Bram pay in all?" (the answer is a number that is not in
  the context: `answer_start` is -1);
- comparisons: "Who is older, Ada or Bram?".

Question mix (QUESTION_MIX): 25% lookup, 30% two-hop, 30% arithmetic, 15% comparison. Everything comes
from one `random.Random` per split: the same seed gives the same rows on any machine, and no context is
shared between splits. Splits: train 3,000, validation 200, test 1,000 (SPLIT_SIZES).

Every row also holds its worked answer (`worked`, the people_qa_worked task): the facts it uses, each hop
named, a sum written out digit by digit with its carries, then the final answer on a line of its own,
"Answer: ...". It is made from the same people, after the row's random draws, so people_qa's rows are the
same with or without it.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from examples.tiny.synthetic_qa import ANIMALS, CITIES, COLORS, INSTRUMENTS, JOBS, MONTHS, NAMES, article
from llm_recipes import flags
from llm_recipes.flags import option

ITEMS = ["bicycle", "sofa", "laptop", "violin case", "rowing boat", "telescope", "lawn mower", "camera", "piano stool"]
SPLIT_SIZES = {"train": 3000, "validation": 200, "test": 1000}
QUESTION_MIX = {"lookup": 0.25, "two_hop": 0.30, "arithmetic": 0.30, "comparison": 0.15}

# attribute: (value sampler, fact template); `{p}` the person, `{v}` the value, `{a}` its article
ATTRIBUTES = {
    "city": (lambda rng: rng.choice(CITIES), "{p} lives in {v}."),
    "job": (lambda rng: rng.choice(JOBS), "{p} works as {a} {v}."),
    "pet": (lambda rng: f"{rng.choice(COLORS)} {rng.choice(ANIMALS)}", "{p} owns {a} {v}."),
    "born": (lambda rng: rng.choice(MONTHS), "{p} was born in {v}."),
    "music": (lambda rng: rng.choice(INSTRUMENTS), "{p} plays the {v}."),
    "age": (lambda rng: str(rng.randint(21, 79)), "{p} is {v} years old."),
    "purchase": (lambda rng: f"{rng.randint(120, 4800)} {rng.choice(ITEMS)}", "{p} paid {price} dollars for a {item}."),
}
LOOKUP = {  # questions about one attribute of a named person
    "city": "Where does {p} live?", "job": "What does {p} work as?", "pet": "What pet does {p} own?",
    "born": "In which month was {p} born?", "music": "Which instrument does {p} play?",
}
DESCRIBE = {  # how a two-hop question names a person by an attribute unique in the context
    "job": "the {v}", "pet": "the owner of the {v}", "music": "the person who plays the {v}",
    "city": "the person who lives in {v}",
}
TWO_HOP = {"city": "Where does {d} live?", "job": "What does {d} work as?", "born": "In which month was {d} born?",
           "music": "Which instrument does {d} play?", "pet": "What pet does {d} own?"}


@dataclass
class Person:
    name: str
    facts: dict  # attribute -> value (the purchase as "price item")


def sentence(person: Person, attribute: str) -> str:
    value = person.facts[attribute]
    if attribute == "purchase":
        price, item = value.split(" ", 1)
        return ATTRIBUTES[attribute][1].format(p=person.name, price=price, item=item)
    return ATTRIBUTES[attribute][1].format(p=person.name, a=article(value), v=value)


def make_people(rng: random.Random) -> list[Person]:
    people = []
    for name in rng.sample(NAMES, rng.randint(3, 5)):
        attributes = rng.sample(list(ATTRIBUTES), rng.randint(3, 4))
        people.append(Person(name, {a: ATTRIBUTES[a][0](rng) for a in attributes}))
    return people


def unique_holders(people: list[Person], attribute: str) -> list[Person]:
    """People whose value of `attribute` no one else in the context shares."""
    values = [p.facts.get(attribute) for p in people]
    return [p for p in people if attribute in p.facts and values.count(p.facts[attribute]) == 1]


FINAL = "Answer:"  # the worked answer's last line: "Answer: <the answer>"


def added(a: int, b: int) -> str:
    """a + b written out by place value, with the carries: "34 + 17: ones 4 + 7 = 11, write 1 carry 1; tens 3 +
    1 + 1 = 5, write 5. So 34 + 17 = 51." """
    places = ["ones", "tens", "hundreds", "thousands", "ten thousands"]
    steps, carry = [], 0
    digits_a, digits_b = str(a)[::-1], str(b)[::-1]
    for i in range(max(len(digits_a), len(digits_b))):
        terms = [int(d[i]) for d in (digits_a, digits_b) if i < len(d)] + ([carry] if carry else [])
        total = sum(terms)
        written = " + ".join(map(str, terms)) + f" = {total}" if len(terms) > 1 else str(total)
        steps.append(f"{places[i]} {written}, write {total % 10}" + (" carry 1" if total >= 10 else ""))
        carry = total // 10
    if carry:
        steps.append(f"{places[len(steps)]} {carry}, write {carry}")
    return f"{a} + {b}: " + "; ".join(steps) + f". So {a} + {b} = {a + b}."


def worked(lines: list[str], answer: str) -> str:
    return "\n".join(lines + [f"{FINAL} {answer}"])


def ask(rng: random.Random, kind: str, people: list[Person]):
    """(question, answer, the (person, attribute) stating the answer or None, the worked answer) of one kind
    about these people, or None when they do not allow one."""
    if kind == "lookup":
        options = [(p, a) for p in people for a in p.facts if a in LOOKUP]
        if not options:
            return None
        person, attribute = rng.choice(options)
        answer = person.facts[attribute]
        steps = [f"The question is about {person.name}.", f"The fact: {sentence(person, attribute)}"]
        return LOOKUP[attribute].format(p=person.name), answer, (person, attribute), worked(steps, answer)
    if kind == "two_hop":
        options = [(p, by, a) for by in DESCRIBE for p in unique_holders(people, by) for a in p.facts
                   if a in TWO_HOP and a != by]
        if not options:
            return None
        person, by, attribute = rng.choice(options)
        described = DESCRIBE[by].format(v=person.facts[by])
        answer = person.facts[attribute]
        steps = [f"First hop: {sentence(person, by)} So {described} is {person.name}.",
                 f"Second hop: {sentence(person, attribute)}"]
        return TWO_HOP[attribute].format(d=described), answer, (person, attribute), worked(steps, answer)
    if kind == "arithmetic":
        aged = [p for p in people if "age" in p.facts]
        buyers = [p for p in people if "purchase" in p.facts]
        choices = (["age"] if aged else []) + (["sum"] if len(buyers) >= 2 else [])
        if not choices:
            return None
        if rng.choice(choices) == "age":
            person, years = rng.choice(aged), rng.randint(3, 29)
            age = int(person.facts["age"])
            steps = [f"{sentence(person, 'age')} In {years} years: {added(age, years)}"]
            return f"How old will {person.name} be in {years} years?", str(age + years), None, \
                worked(steps, str(age + years))
        a, b = rng.sample(buyers, 2)
        prices = [int(p.facts["purchase"].split()[0]) for p in (a, b)]
        steps = [sentence(a, "purchase"), sentence(b, "purchase"), added(*prices)]
        return f"How many dollars did {a.name} and {b.name} pay in all?", str(sum(prices)), None, \
            worked(steps, str(sum(prices)))
    aged = [p for p in people if "age" in p.facts]  # comparison
    pairs = [(a, b) for a in aged for b in aged if a.name < b.name and a.facts["age"] != b.facts["age"]]
    if not pairs:
        return None
    a, b = rng.choice(pairs)
    older = a if int(a.facts["age"]) > int(b.facts["age"]) else b
    first, second = (a, b) if rng.random() < 0.5 else (b, a)
    younger = b if older is a else a
    steps = [sentence(first, "age"), sentence(second, "age"),
             f"{older.facts['age']} is more than {younger.facts['age']}, so {older.name} is older."]
    return f"Who is older, {first.name} or {second.name}?", older.name, None, worked(steps, older.name)


def make_example(rng: random.Random, example_id: str) -> dict:
    """One SQuAD-style row; `kind` says which sort of question it is."""
    kind = rng.choices(list(QUESTION_MIX), weights=list(QUESTION_MIX.values()))[0]
    while True:
        people = make_people(rng)
        asked = ask(rng, kind, people)
        if asked is not None:
            break
    facts = [(p, a) for p in people for a in p.facts]
    rng.shuffle(facts)
    question, answer, source, worked_answer = asked
    sentences, start, offset = [], -1, 0
    for person, attribute in facts:
        text = sentence(person, attribute)
        if source is not None and (person.name, attribute) == (source[0].name, source[1]):
            start = offset + text.index(answer, len(person.name))
        sentences.append(text)
        offset += len(text) + 1
    context = " ".join(sentences)
    return {"id": example_id, "title": "people_qa", "kind": kind, "context": context, "question": question,
            "answers": {"text": [answer], "answer_start": [start]}, "worked": worked_answer}


def generate_splits(sizes: dict = SPLIT_SIZES, seed: int = 0) -> dict:
    """Every split, in a fixed order, with no context shared between splits."""
    splits, seen = {}, set()
    for split in ("train", "validation", "test"):
        rng, rows = random.Random(f"people_qa/{split}/{seed}"), []
        while len(rows) < sizes.get(split, 0):
            row = make_example(rng, f"{split}-{len(rows):05d}")
            if row["context"] not in seen:
                seen.add(row["context"])
                rows.append(row)
        splits[split] = rows
    return splits


def write_splits(folder: Path, sizes: dict = SPLIT_SIZES) -> Path:
    folder = Path(folder).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    for split, rows in generate_splits(sizes).items():
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


DEFAULT_FOLDER = "~/.cache/llm-distill/people_qa"  # outside the repository, beside the converted real pair


@dataclass(frozen=True)
class PeopleQAArgs:
    """Flags of `python -m examples.real_pair.people_qa`."""

    output_dir: str = option(DEFAULT_FOLDER, "where train.jsonl, validation.jsonl and test.jsonl go")


COMMAND = flags.Command(program="python -m examples.real_pair.people_qa", summary=__doc__.strip().splitlines()[0],
                        sections={"args": PeopleQAArgs})
main, cli = flags.entry_points(COMMAND, lambda parsed: print(f"people_qa: {write_splits(parsed['args'].output_dir)}"))

if __name__ == "__main__":
    cli()
