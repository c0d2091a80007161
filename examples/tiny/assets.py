"""The tiny assets shipped in assets/tiny: data, two tokenizers, a trained teacher and two students.

They make the default run (`python finetuning.py --distillation`) and the demo work offline on a
laptop CPU, across tokenizers as the published methods do:

- data/{train,validation,test}.jsonl: the synthetic QA task (`examples/tiny/synthetic_qa.py`), and
  data/test_large.jsonl: 1,000 more held-out examples (the paired benchmark's test split);
- teacher: a small Llama with a byte-level BPE tokenizer, trained with this project's own trainer on
  more generated examples of the task (`write_teacher_data`), so that it answers far better than an
  untrained model;
- student: a smaller GPT-NeoX with a SentencePiece Unigram tokenizer, untrained;
- student_same: a small Llama with the teacher's tokenizer, untrained (same-tokenizer KL);
- student_pretrained, student_same_pretrained: the two students after language modelling on fresh
  contexts (no questions or answers; `pretrain_students`), the paired benchmark's "pretrained" regime.

`python -m examples.tiny.build_assets` is the command line; the demo (`examples/tiny/demo.py`) trains
its teacher with the same flags (`teacher_training_flags`) through finetuning.py.
Data and tokenizers are byte-identical from run to run (`check_reproducible`); weights depend on the
seed and, for the trained teacher, on the torch build.
"""
from __future__ import annotations

import filecmp
import json
import shutil
import string
import tempfile
from pathlib import Path
from typing import Optional

from examples.tiny import synthetic_qa

SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
TEACHER_VOCAB_SIZE = 800  # byte-level BPE; this corpus saturates at 723 (every word one token)
STUDENT_VOCAB_SIZE = 256  # SentencePiece Unigram (this corpus allows at most 268)
SEED = 0

# Model shapes. The teacher must learn the task in a few CPU minutes; the default distillation run
# (one epoch of the train split at batch 4) must take about a minute.
TEACHER_CONFIG = dict(hidden_size=128, intermediate_size=352, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=256)
STUDENT_CONFIG = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                      max_position_embeddings=256, rotary_pct=1.0)  # GPT-NeoX rotates 1/4 of each head by
# default: with 16-dimensional heads the full rotation learnt the task much faster (measured)
STUDENT_SAME_CONFIG = dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=256)
# model folder -> (family, shape, tokenizer it uses)
MODELS = {"teacher": ("llama", TEACHER_CONFIG, "teacher"), "student": ("gpt_neox", STUDENT_CONFIG, "student"),
          "student_same": ("llama", STUDENT_SAME_CONFIG, "teacher")}

# How the teacher is trained (the project's trainer, distillation off), on TEACHER_DATA_SIZE generated
# examples (not shipped) in one epoch. Measured: the relation lookup is learnt by about step 1200; lr
# 1e-3 and 5e-4 learn alike, 3e-3 far slower.
TEACHER_DATA_SIZE = 24000
TEST_LARGE_SIZE = 1000  # the paired benchmark's test split
PRETRAIN_SIZE = 6000  # contexts of the students' language-model pretraining (the "pretrained" regime)
TEACHER_TRAINING = dict(lr=5e-4, num_epochs=1, batch_size_training=16, val_batch_size=32, scheduler="cosine",
                        warmup_steps=100, weight_decay=0.0, save_step=0, seed=SEED)

# The "pretrained" students of the paired benchmark: language modelling on PRETRAIN_SIZE fresh contexts (plain
# text, no questions or answers) with the generic loader, from the untrained student of the same seed.
# Measured on the student (other tokenizer): 3 epochs reach eval CE 0.86 on held-out contexts in 79 s.
PRETRAIN_TRAINING = dict(lr=2e-3, num_epochs=3, batch_size_training=32, val_batch_size=64, scheduler="cosine",
                         warmup_steps=50, weight_decay=0.0, save_step=0, save_optimizer=False)
PRETRAINED = {"student": "student_pretrained", "student_same": "student_same_pretrained"}  # shipped, seed 0


# ------------------------------------------------------------------------------------------- data
def prompt_text(row: dict) -> str:
    """The plain prompt the tiny_qa loader gives both models (no chat template on either tokenizer)."""
    return f"Context: {row['context']}\nQuestion: {row['question']}\nAnswer:"


def write_rows(folder: Path, splits: dict[str, list[dict]]) -> None:
    """folder/{split}.jsonl, one SQuAD-schema row per line."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, rows in splits.items():
        with open(folder / f"{split}.jsonl", "w", encoding="utf-8", newline="\n") as stream:
            for row in rows:
                stream.write(json.dumps(row, ensure_ascii=False) + "\n")


def write_data(data_dir: Path, sizes: dict = synthetic_qa.SPLIT_SIZES, seed: int = SEED) -> dict[str, list[dict]]:
    """The shipped splits: data_dir/{train,validation,test,test_large}.jsonl (test_large: the paired benchmark's
    1,000 held-out examples, disjoint from the teacher's training data too)."""
    splits = synthetic_qa.generate_splits({**sizes, "teacher": TEACHER_DATA_SIZE, "test_large": TEST_LARGE_SIZE},
                                          seed)
    shipped = {name: rows for name, rows in splits.items() if name in (*sizes, "test_large")}
    write_rows(data_dir, shipped)
    return shipped


def write_pretrain_data(folder: Path, size: int = PRETRAIN_SIZE, seed: int = SEED) -> Path:
    """folder/train.jsonl: `size` fresh contexts as {"text": context} (no questions, no answers), the students'
    language-model pretraining text; folder/validation.jsonl: 200 more."""
    sizes = {**synthetic_qa.SPLIT_SIZES, "teacher": TEACHER_DATA_SIZE, "test_large": TEST_LARGE_SIZE,
             "pretrain": size + 200}
    contexts = [{"text": row["context"]} for row in synthetic_qa.generate_splits(sizes, seed)["pretrain"]]
    write_rows(folder, {"train": contexts[:size], "validation": contexts[size:]})
    return folder


def write_teacher_data(folder: Path, size: int = TEACHER_DATA_SIZE, seed: int = SEED) -> Path:
    """The teacher's training data: `size` fresh examples as train, the shipped validation and test.

    Disjoint from the shipped splits (same generator, contexts excluded). All three files are
    written so that the task loader uses them as they are instead of cutting held-out splits off train.
    """
    splits = synthetic_qa.generate_splits({**synthetic_qa.SPLIT_SIZES, "teacher": size}, seed)
    write_rows(folder, {"train": splits["teacher"], "validation": splits["validation"], "test": splits["test"]})
    return folder


def read_split(data_dir, split: str) -> list[dict]:
    with open(Path(data_dir) / f"{split}.jsonl", encoding="utf-8") as stream:
        return [json.loads(line) for line in stream]


# ------------------------------------------------------------------------------------- tokenizers
def tokenizer_corpus(rows: list[dict]) -> list[str]:
    """What the tokenizers are trained on: the train split as the models will see it (prompt + answer)."""
    return [f"{prompt_text(row)} {row['answers']['text'][0]}" for row in rows]


def train_tokenizer(kind: str, corpus: list[str], vocab_size: int):
    """A PreTrainedTokenizerFast with pad/bos/eos/unk and no chat template (so prompts stay plain).

    kind "bpe": byte-level BPE with a prefix space (GPT-2/Llama-3 style; a word is the same token
    at the start of an answer as inside the context). kind "unigram": SentencePiece-style Unigram
    over Metaspace pre-tokens (T5/mT0 style). Different algorithms and sizes give different
    segmentations of the same text, which is what cross-tokenizer distillation has to deal with.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [SPECIAL_TOKENS[k] for k in ("pad_token", "bos_token", "eos_token", "unk_token")]
    if kind == "bpe":
        tokenizer = Tokenizer(models.BPE(unk_token=None))
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    elif kind == "unigram":
        tokenizer = Tokenizer(models.Unigram(_sentencepiece_unigram(corpus, vocab_size, specials), unk_id=3))
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="always")
        tokenizer.decoder = decoders.Metaspace(prepend_scheme="always")
        return PreTrainedTokenizerFast(tokenizer_object=tokenizer, **SPECIAL_TOKENS)
    else:
        raise ValueError(f"unknown tokenizer kind {kind!r}: use 'bpe' or 'unigram'")
    tokenizer.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, **SPECIAL_TOKENS)


def _sentencepiece_unigram(corpus: list[str], vocab_size: int, specials: list[str]) -> list[tuple[str, float]]:
    """(piece, log-probability) pairs of a SentencePiece Unigram model trained on `corpus`.

    Digits are single pieces (as in Llama-2's tokenizer), so a number is the same pieces in the
    context and in the answer. SentencePiece rather than the `tokenizers` Unigram trainer: on this
    small corpus the latter gave degenerate vocabularies and, run in parallel, different ones from
    run to run; one SentencePiece thread gives the same model every time. Ids 0-3 are pad, bos,
    eos, unk.
    """
    import io

    import sentencepiece

    alphabet = string.ascii_letters + string.digits + string.punctuation  # every printable character is known
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter([*corpus, alphabet]), model_writer=model, vocab_size=vocab_size, model_type="unigram",
        num_threads=1, character_coverage=1.0, normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=True, split_by_whitespace=True, split_digits=True, byte_fallback=False, minloglevel=2,
        pad_id=0, bos_id=1, eos_id=2, unk_id=3, pad_piece=specials[0], bos_piece=specials[1], eos_piece=specials[2],
        unk_piece=specials[3])
    processor = sentencepiece.SentencePieceProcessor(model_proto=model.getvalue())
    return [(processor.id_to_piece(i), processor.get_score(i)) for i in range(processor.get_piece_size())]


def build_tokenizers(train_rows: list[dict]) -> dict:
    corpus = tokenizer_corpus(train_rows)
    return {"teacher": train_tokenizer("bpe", corpus, TEACHER_VOCAB_SIZE),
            "student": train_tokenizer("unigram", corpus, STUDENT_VOCAB_SIZE)}


# ----------------------------------------------------------------------------------------- models
def _token_ids(tokenizer) -> dict:
    return dict(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id)


def new_model(kind: str, tokenizer, shape: dict, seed: int):
    """An untrained model of the given family, initialised from `seed` (same seed, same weights)."""
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    if kind == "llama":
        return LlamaForCausalLM(LlamaConfig(**shape, **_token_ids(tokenizer)))
    if kind == "gpt_neox":
        return GPTNeoXForCausalLM(GPTNeoXConfig(**shape, **_token_ids(tokenizer)))
    raise ValueError(f"unknown model kind {kind!r}: use 'llama' or 'gpt_neox'")


def save(model, tokenizer, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)


def save_untrained(name: str, tokenizer, folder: Path, seed: int = SEED) -> None:
    """The untrained model `name` of MODELS (teacher, student, student_same), initialised from `seed`."""
    kind, shape, _ = MODELS[name]
    save(new_model(kind, tokenizer, shape, seed), tokenizer, folder)


def save_untrained_models(root: Path, tokenizers: dict, seed: int = SEED) -> None:
    """root/{teacher,student,student_same}, untrained, each with its tokenizer."""
    for name, (_, _, tokenizer) in MODELS.items():
        save_untrained(name, tokenizers[tokenizer], root / name, seed)


# ------------------------------------------------------------------------------------ the teacher
def teacher_training_flags(model_dir: str, data_dir: str, output_dir: str, loader: Optional[str] = None,
                           **overrides) -> dict:
    """finetuning.py flags that train the model at `model_dir` on the tiny_qa data at `data_dir`.

    The model sits in the trainer's student slot (distillation off), so its answers end with EOS and
    it learns to stop. The demo runs the same flags through the command line.
    """
    from configs.paths import TINY_QA_LOADER

    return {"model_name": str(model_dir), "dataset.file": loader or TINY_QA_LOADER, "dataset.source": str(data_dir),
            "output_dir": str(output_dir), "save_optimizer": False, **TEACHER_TRAINING, **overrides}


def train_teacher(model_dir: str, data_dir: str, output_dir: str, loader: Optional[str] = None, **overrides) -> dict:
    """Train in this process (see teacher_training_flags); returns the trainer's result, the model is at
    output_dir/best."""
    from llm_recipes.config import parse_flags
    from llm_recipes.finetuning import train

    return train(parse_flags(teacher_training_flags(model_dir, data_dir, output_dir, loader, **overrides)))


def pretraining_flags(model_dir: str, corpus_dir: str, output_dir: str, seed: int = SEED) -> dict:
    """finetuning.py flags that pretrain the student at `model_dir` on the contexts of `corpus_dir`
    (write_pretrain_data) with the generic loader (plain text: every token is a label)."""
    from configs.paths import REPO_ROOT

    return {"model_name": str(model_dir), "dataset.file": str(REPO_ROOT / "llm_distillation" / "datasets" / "loader"
                                                             / "generic.py"),
            "dataset.source": str(corpus_dir), "output_dir": str(output_dir), "seed": seed, **PRETRAIN_TRAINING}


def pretrain_students(root: Path, work: Path) -> dict:
    """root/student_pretrained and root/student_same_pretrained (seed 0); returns their eval results."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llm_recipes.config import parse_flags
    from llm_recipes.finetuning import train

    corpus = write_pretrain_data(work / "pretrain-data")
    results = {}
    for student, pretrained in PRETRAINED.items():
        run = work / f"pretrain-{student}"
        results[pretrained] = train(parse_flags(pretraining_flags(str(root / student), str(corpus), str(run))))["eval"]
        save(AutoModelForCausalLM.from_pretrained(run / "best"), AutoTokenizer.from_pretrained(root / student),
             root / pretrained)
    return results


# ------------------------------------------------------------------------------------- scoring
def answer_scores(model_dir: str, rows: list[dict], max_new_tokens: int = 12, batch_size: int = 32) -> dict:
    """Greedy 0-shot answers of a saved causal model on SQuAD-style rows: F1 and EM x100 (first line).

    A quick in-process check for the build and the tests; `python -m llm_distillation.benchmark` is
    the full benchmark. Prompts are encoded as the trainer's loader encodes them (`encode_prompt`).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llm_distillation.datasets.tasks import encode_prompt
    from llm_distillation.metrics import best_over_references, exact_match, token_f1
    from llm_distillation.generation import first_line, generate_answers

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    prompts = [encode_prompt(prompt_text(row), tokenizer) for row in rows]
    answers = generate_answers(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    answers = [first_line(a) for a in answers]
    references = [row["answers"]["text"] for row in rows]
    f1 = [best_over_references(token_f1, a, refs) for a, refs in zip(answers, references)]
    em = [best_over_references(exact_match, a, refs) for a, refs in zip(answers, references)]
    return {"f1": 100 * sum(f1) / len(f1), "exact_match": 100 * sum(em) / len(em), "examples": len(rows),
            "samples": [{"question": r["question"], "reference": r["answers"]["text"][0], "prediction": a}
                        for r, a in list(zip(rows, answers))[:5]]}


# ------------------------------------------------------------------------------------- building
def build_data_and_tokenizers(root: Path) -> dict:
    """The deterministic part: data files and the two tokenizers (written to their model folders)."""
    splits = write_data(root / "data")
    tokenizers = build_tokenizers(splits["train"])
    for name, (_, _, tokenizer) in MODELS.items():
        tokenizers[tokenizer].save_pretrained(root / name)
    return {"splits": splits, "tokenizers": tokenizers}


def deterministic_files(root: Path) -> list[str]:
    """Relative paths of the files that must come out byte-identical from every build."""
    names = [f"data/{split}.jsonl" for split in ("train", "validation", "test", "test_large")]
    for folder in MODELS:
        names += sorted(str(p.relative_to(root)) for p in (root / folder).glob("tokenizer*"))
    return names


def check_reproducible(root: Path) -> list[str]:
    """Rebuild data and tokenizers in a temporary folder; return the shipped files that differ."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp)
        build_data_and_tokenizers(fresh)
        expected = deterministic_files(fresh)
        return [name for name in expected
                if not (root / name).is_file() or not filecmp.cmp(root / name, fresh / name, shallow=False)]


def folder_size_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file()) / 2**20


def build(root: Path, loader: Optional[str] = None, work_dir: Optional[Path] = None, **teacher_overrides) -> dict:
    """Everything in assets/tiny: data, tokenizers, the three models (the teacher trained); returns figures."""
    built = build_data_and_tokenizers(root)
    tokenizers, splits = built["tokenizers"], built["splits"]
    save_untrained_models(root, tokenizers)

    work = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="tiny-teacher-"))
    try:
        teacher_data = write_teacher_data(work / "data")
        result = train_teacher(str(root / "teacher"), str(teacher_data), str(work / "run"), loader,
                               **teacher_overrides)
        from transformers import AutoModelForCausalLM

        trained = AutoModelForCausalLM.from_pretrained(work / "run" / "best")
        save(trained, tokenizers["teacher"], root / "teacher")
        pretraining = pretrain_students(root, work)
    finally:
        if not work_dir:
            shutil.rmtree(work, ignore_errors=True)
    figures = {"teacher_eval": result["eval"], "pretraining_eval": pretraining, "sizes_mb": {}}
    figures["teacher_test"] = answer_scores(str(root / "teacher"), splits["test"])
    figures["student_test"] = answer_scores(str(root / "student"), splits["test"])
    figures["student_same_test"] = answer_scores(str(root / "student_same"), splits["test"])
    for folder in ("data", "teacher", "student", "student_same", *PRETRAINED.values()):
        figures["sizes_mb"][folder] = round(folder_size_mb(root / folder), 2)
    return figures
