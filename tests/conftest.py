"""Shared fixtures: tiny tokenizers, models and a loader file, built in a temporary folder.

Everything is offline and small enough that the whole suite stays fast on 2 CPU cores.
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import json  # noqa: E402
import random  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

# Every tensor in the tests is tiny: intra-op threads only add synchronisation (on a busy 2-core
# machine a small index_add_ took 80 ms with 2 threads and 8 us with 1).
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parent.parent
# The device of the tests marked `device` (the losses against their float64 references, the engine, the cached
# terms): cpu here; the GPU check (benchmarks/gpu_check.py) runs them with LLM_DISTILL_TEST_DEVICE=cuda.
DEVICE = torch.device(os.environ.get("LLM_DISTILL_TEST_DEVICE", "cpu"))

NAMES = ["ada", "bo", "cy", "dee", "eli", "fay", "gus", "hal"]
CITIES = ["oslo", "rome", "lima", "new york", "bern", "rio de janeiro"]  # ragged answer lengths


def qa_rows(n: int, seed: int):
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        name, city = rng.choice(NAMES), rng.choice(CITIES)
        other = rng.choice([x for x in NAMES if x != name])
        context = f"{name} lives in {city}. {other} lives in {rng.choice(CITIES)}."
        rows.append({"id": f"ex{seed}-{i}", "context": context, "question": f"where does {name} live?",
                     "answer": city})
    return rows


def _train_tokenizer(kind: str, corpus: list[str], path: Path, chat: bool):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    if kind == "bpe":
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    else:
        tok = Tokenizer(models.WordPiece(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        tok.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(vocab_size=120, special_tokens=specials)
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")
    if chat:
        fast.chat_template = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                              "{% if add_generation_prompt %}<s>assistant:{% endif %}")
    fast.save_pretrained(path)
    return fast


LOADER_SOURCE = '''
import json, datasets

def get_split(dataset_config, tokenizer, split):
    rows = [json.loads(l) for l in open(DATA + "/" + split + ".jsonl")]
    out = {"id": [], "input_ids": [], "labels": [], "attention_mask": []}
    for r in rows:
        prompt = f"context: {r['context']} question: {r['question']} answer:"
        if dataset_config.encoder_decoder:
            p = tokenizer.encode(prompt) + [tokenizer.eos_token_id]
            a = tokenizer.encode(r["answer"]) + [tokenizer.eos_token_id]
            out["id"].append(r["id"])
            out["input_ids"].append(p)
            out["labels"].append(a)
            out["attention_mask"].append([1] * len(p))
            continue
        if dataset_config.role == "teacher":
            p, a = tokenizer.encode(prompt), tokenizer.encode(" " + r["answer"])
        else:
            p = tokenizer.encode(prompt)
            a = tokenizer.encode(" " + r["answer"]) + [tokenizer.eos_token_id]
        out["id"].append(r["id"])
        out["input_ids"].append(p + a)
        out["labels"].append([-100] * len(p) + a)
        out["attention_mask"].append([1] * (len(p) + len(a)))
    return datasets.Dataset.from_dict(out)
'''


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """Paths of a tiny teacher, two students (other tokenizer / same tokenizer) and a loader file."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("tiny")
    data_dir = root / "data"
    data_dir.mkdir()
    splits = {"train": qa_rows(48, 0), "validation": qa_rows(12, 1)}
    for split, rows in splits.items():
        (data_dir / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    corpus = [f"context: {r['context']} question: {r['question']} answer: {r['answer']}"
              for rows in splits.values() for r in rows] * 3
    torch.manual_seed(0)
    paths = {}
    teacher_tok = _train_tokenizer("bpe", corpus, root / "teacher", chat=True)
    teacher = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(teacher_tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        bos_token_id=teacher_tok.bos_token_id, eos_token_id=teacher_tok.eos_token_id,
        pad_token_id=teacher_tok.pad_token_id))
    teacher.save_pretrained(root / "teacher")
    paths["teacher"] = str(root / "teacher")

    student_tok = _train_tokenizer("wordpiece", corpus, root / "student", chat=False)
    student = GPTNeoXForCausalLM(GPTNeoXConfig(
        vocab_size=len(student_tok), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=128, hidden_dropout=0.1, attention_dropout=0.1,
        bos_token_id=student_tok.bos_token_id,
        eos_token_id=student_tok.eos_token_id, pad_token_id=student_tok.pad_token_id))
    student.save_pretrained(root / "student")
    paths["student"] = str(root / "student")

    from transformers import T5Config, T5ForConditionalGeneration

    t5 = T5ForConditionalGeneration(T5Config(
        vocab_size=len(student_tok), d_model=16, d_ff=32, d_kv=8, num_layers=1, num_heads=2,
        pad_token_id=student_tok.pad_token_id, eos_token_id=student_tok.eos_token_id,
        decoder_start_token_id=student_tok.pad_token_id))
    t5.save_pretrained(root / "student_t5")
    student_tok.save_pretrained(root / "student_t5")
    paths["student_t5"] = str(root / "student_t5")

    same_tok = _train_tokenizer("bpe", corpus, root / "student_same", chat=False)
    same = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(same_tok), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
        bos_token_id=same_tok.bos_token_id, eos_token_id=same_tok.eos_token_id, pad_token_id=same_tok.pad_token_id))
    same.save_pretrained(root / "student_same")
    paths["student_same"] = str(root / "student_same")

    loader = root / "loader.py"
    loader.write_text(f"DATA = {str(data_dir)!r}\n" + LOADER_SOURCE)
    paths["loader"] = str(loader)
    paths["data"] = str(data_dir)
    paths["root"] = str(root)
    return paths


def base_flags(tiny: dict, output_dir, **extra) -> dict:
    """Flags of a short, fast distillation run on the tiny fixtures (as fire would pass them)."""
    flags = {"model_name": tiny["student"], "dataset.file": tiny["loader"], "output_dir": str(output_dir),
             "distillation": True, "distillation_config.model_name": tiny["teacher"], "lr": 1e-3,
             "batch_size_training": 4, "val_batch_size": 4, "num_epochs": 1, "save_step": 0, "scheduler": "constant"}
    flags.update(extra)
    return flags
