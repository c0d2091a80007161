"""A synthetic extractive question-answering task, generated from a seed (the tiny demo data set).

Each context states a few facts about two or three made-up people (where they live, their job, their
pet, their birth month, the instrument they play), in random order, the other people's facts being
distractors. The question asks for one fact of one person. In AMBIGUOUS_FRACTION of the examples
another person has a fact of the same kind, so answering needs the name bound to the right fact, not
just the relation found: the easy part (find the relation, copy its value) is learnt by a tiny model
in a few CPU minutes, the binding much later, which leaves students room to differ. Answers are
spans of the context of one to four words, so answer lengths are ragged (what the distillation
losses have to pair across tokenizers).

Rows follow SQuAD's schema, so every SQuAD tool reads them:
    {"id", "title", "context", "question", "answers": {"text": [answer], "answer_start": [offset]}}

Everything comes from one `random.Random(seed)`: the same seed gives the same rows on any machine.
"""
from __future__ import annotations

import random

NAMES = [
    "Ada", "Bram", "Cora", "Dov", "Edda", "Fenn", "Gala", "Hugo", "Ines", "Joss", "Kira", "Lior", "Mara",
    "Nils", "Oona", "Pim", "Rhea", "Sven", "Tova", "Ugo", "Vera", "Wim", "Yara", "Zeno", "Okafor", "Marek",
    "Quill", "Abara", "Stroud", "Nakai", "Ferrand", "Holm",
]
CITIES = [
    "Velmora", "Ostrava Nova", "Port Ishan", "North Karrow", "Lake Tamsin", "Brindle", "Cask Harbor",
    "Easterly", "Fenwick Bay", "Glimmerton", "San Aurel", "Upper Dunmoor", "Quarry", "Mount Ellis",
]
JOBS = [
    "baker", "night nurse", "train driver", "marine biologist", "tax lawyer", "potter", "locksmith",
    "bus driver", "school teacher", "beekeeper", "sound engineer", "florist", "park ranger", "tailor",
]
COLORS = ["red", "black", "white", "pale green", "golden", "grey", "sky blue", "spotted", "brown"]
ANIMALS = ["cat", "parrot", "sea turtle", "rabbit", "dog", "goat", "hamster", "barn owl", "pony", "lizard"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
INSTRUMENTS = ["violin", "piano", "bass guitar", "cello", "drums", "flute", "harp", "trumpet", "banjo", "french horn"]

# relation: (value sampler, fact template, question templates); `{p}` is the person, `{v}` the value.
RELATIONS = {
    "city": (lambda rng: rng.choice(CITIES), "{p} lives in {v}.",
             ["Where does {p} live?", "In which town does {p} live?"]),
    "job": (lambda rng: rng.choice(JOBS), "{p} works as {a} {v}.",
            ["What does {p} work as?", "What is the job of {p}?"]),
    "pet": (lambda rng: f"{rng.choice(COLORS)} {rng.choice(ANIMALS)}", "{p} owns {a} {v}.",
            ["What pet does {p} own?", "Which animal does {p} have?"]),
    "born": (lambda rng: rng.choice(MONTHS), "{p} was born in {v}.",
             ["When was {p} born?", "In which month was {p} born?"]),
    "music": (lambda rng: rng.choice(INSTRUMENTS), "{p} plays the {v}.",
              ["Which instrument does {p} play?", "What does {p} play?"]),
}

AMBIGUOUS_FRACTION = 0.3  # questions whose relation another person in the context has too
SPLIT_SIZES = {"train": 3000, "validation": 200, "test": 200}  # train: the default run is one epoch of it
# Not shipped as task splits: "teacher" (the teacher's own training set), "test_large" (the paired benchmark's
# test split, shipped as data/test_large.jsonl), "pretrain" (contexts only: the students' language-model
# pretraining text). Generated after the shipped three, in this order, so that those stay as they were.
GENERATION_ORDER = ("train", "validation", "test", "teacher", "test_large", "pretrain")
SPLIT_SEEDS = {"train": 1, "validation": 2, "test": 3}


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def make_example(rng: random.Random, example_id: str) -> dict:
    """One SQuAD-style row: a shuffled context of facts about 2-3 people and a question about one fact."""
    people = rng.sample(NAMES, rng.randint(2, 3))
    target, relation = people[0], rng.choice(list(RELATIONS))
    facts = []  # (person, relation, value)
    ambiguous = rng.random() < AMBIGUOUS_FRACTION
    for index, person in enumerate(people):
        relations = rng.sample([r for r in RELATIONS if r != relation], rng.randint(1, 2))
        if index == 0 or (index == 1 and ambiguous):  # the target (and a distractor) have the asked relation
            relations.append(relation)
        for r in relations:
            facts.append((person, r, RELATIONS[r][0](rng)))
    rng.shuffle(facts)

    sentences, answer, answer_start, offset = [], None, None, 0
    for person, r, value in facts:
        template = RELATIONS[r][1]
        sentence = template.format(p=person, a=article(value), v=value)
        if person == target and r == relation:
            answer, answer_start = value, offset + sentence.index(value, len(person))
        sentences.append(sentence)
        offset += len(sentence) + 1
    context = " ".join(sentences)
    question = rng.choice(RELATIONS[relation][2]).format(p=target)
    assert context[answer_start:answer_start + len(answer)] == answer
    return {"id": example_id, "title": "tiny_qa", "context": context, "question": question,
            "answers": {"text": [answer], "answer_start": [answer_start]}}


def generate_split(split: str, size: int, seed: int, exclude_contexts: set[str] = frozenset()) -> list[dict]:
    """`size` rows with distinct contexts, none of them in `exclude_contexts` (the other splits')."""
    rng = random.Random(f"tiny_qa/{split}/{seed}")
    rows, seen = [], set(exclude_contexts)
    while len(rows) < size:
        row = make_example(rng, f"{split}-{len(rows):05d}")
        if row["context"] in seen:
            continue
        seen.add(row["context"])
        rows.append(row)
    return rows


def generate_splits(sizes: dict[str, int] = SPLIT_SIZES, seed: int = 0) -> dict[str, list[dict]]:
    """Every split asked for, generated in a fixed order so no context is shared between splits.

    Besides train/validation/test, "teacher" is a larger training set for the teacher (not shipped:
    the teacher is the model that has seen more data), "test_large" the paired benchmark's test split and
    "pretrain" the students' pretraining contexts, each disjoint from the splits before it.
    """
    splits, used = {}, set()
    for split in GENERATION_ORDER:
        if split in sizes:
            splits[split] = generate_split(split, sizes[split], seed, used)
            used.update(row["context"] for row in splits[split])
    return splits

