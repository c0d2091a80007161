"""Run the teacher once and keep its top-K distributions: training then needs no teacher weights.

    python -m llm_distillation.cache_teacher --model_name meta-llama/Llama-2-7b-chat-hf --output_dir cache/llama2 \
        --topk 32 --dataset.file llm_distillation/datasets/loader/squad.py --bf16
    python finetuning.py --distillation --distillation_config.teacher_cache cache/llama2 ... (same --dataset.*)

The examples are exactly those the trainer builds: the loader file is called for the teacher's
tokenizer with the same `--dataset.*` flags, splits train and validation. Per answer row the cache keeps
the teacher's top-K token ids, their log-probabilities at --temperature and the log of the remaining
mass (llm_recipes/teacher_cache.py has the format). A stopped run continues where it was when the same
command is run again (finished shards are kept); other settings in the same folder are refused.
"""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from configs.datasets import dataset as dataset_config
from llm_recipes import flags, models, teacher_cache
from llm_recipes.errors import UserError
from llm_recipes.flags import option
from llm_recipes.losses.pairing import predicting_rows


@dataclass(frozen=True)
class CacheArgs:
    """Flags of `python -m llm_distillation.cache_teacher` (and `--dataset.*` as for finetuning.py)."""

    model_name: str = option(help="the teacher: hub id, local folder or .gguf file")
    output_dir: str = option(help="the cache folder (resumable)")
    topk: int = option(32, "token ids kept per answer row (the rest of the mass is one number)")
    temperature: float = option(1.0, "the log-probabilities' temperature (the losses' teacher temperature)")
    storage: str = option("float16", "log-probability storage: float16 | bfloat16 | float32 (exact)")
    splits: str = option("train,validation", "the loader's splits to cache (the trainer reads train, validation)")
    tokenizer_name: Optional[str] = option(None, "None: the model's own tokenizer")
    encoder_decoder: bool = option(False, "the teacher is a seq2seq model")
    trust_remote_code: bool = option(False, "run the model repository's own code (only for repositories you trust)")
    bf16: bool = option(False, "load the teacher in bfloat16")
    batch_size: int = option(8, "examples per forward pass")
    rows_per_chunk: int = option(1024, "answer rows whose logits exist at once")
    shard_examples: int = option(4096, "examples per shard file (the unit of resuming)")
    progress: bool = option(True, "tqdm progress bars")


COMMAND = flags.Command(program="python -m llm_distillation.cache_teacher", summary=__doc__.strip().splitlines()[0],
                        sections={"args": CacheArgs, "dataset": dataset_config},
                        set_by="the cache writer for the teacher")


def check_args(args: CacheArgs) -> None:
    if args.topk < 1:
        raise UserError(f"--topk must be a positive integer, got {args.topk}")
    if not args.temperature > 0:
        raise UserError(f"--temperature must be > 0, got {args.temperature}")
    if args.storage not in teacher_cache.STORAGE_DTYPES:
        raise UserError(f"--storage must be one of {', '.join(teacher_cache.STORAGE_DTYPES)}, got {args.storage!r}")
    for name in ("batch_size", "rows_per_chunk", "shard_examples"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be a positive integer, got {getattr(args, name)}")


def settings_of(args: CacheArgs, tokenizer, dataset, max_positions) -> teacher_cache.CacheMeta:
    return teacher_cache.CacheMeta(
        teacher=args.model_name, tokenizer_fingerprint=teacher_cache.tokenizer_fingerprint(tokenizer),
        vocab_size=len(tokenizer), topk=min(args.topk, len(tokenizer)), temperature=float(args.temperature),
        storage=args.storage, encoder_decoder=args.encoder_decoder, max_positions=max_positions, complete=False,
        splits={}, dataset={k: v for k, v in dataclasses.asdict(dataset).items()
                            if k not in ("role", "model_name", "encoder_decoder")})


def open_folder(output: Path, settings: teacher_cache.CacheMeta) -> teacher_cache.CacheMeta:
    """The folder's metadata: a new one, or the earlier run's when its settings are the same (resume)."""
    path = output / teacher_cache.META_FILE
    if path.exists():
        previous = teacher_cache.read_meta(str(output))
        for key in ("teacher", "tokenizer_fingerprint", "topk", "temperature", "storage", "encoder_decoder",
                    "dataset"):
            if getattr(previous, key) != getattr(settings, key):
                raise UserError(f"--output_dir {output} holds a teacher cache written with {key}="
                                f"{getattr(previous, key)!r}, this run asks for {getattr(settings, key)!r}: use the "
                                "same settings to continue it, or a new --output_dir")
        return dataclasses.replace(previous, complete=False)
    return settings


def write_meta(output: Path, meta: teacher_cache.CacheMeta) -> None:
    tmp = output / f".{teacher_cache.META_FILE}.tmp"
    tmp.write_text(meta.to_json() + "\n")
    tmp.replace(output / teacher_cache.META_FILE)


@torch.no_grad()
def example_rows(model, batch: list[dict], args: CacheArgs, vocab_size: int, pad_id: int, device) -> list:
    """(hash, ids, logprobs, tail) of every example of a batch: logits only at its answer rows."""
    from llm_recipes import data

    collated = data.move({"t": data.collate(batch, pad_id)}, device)["t"]
    hidden = models.forward_hidden(model, collated, args.encoder_decoder)
    head = models.output_head(model)
    mask, _ = predicting_rows(collated["labels"], args.encoder_decoder)
    rows = hidden[mask]
    storage = teacher_cache.STORAGE_DTYPES[args.storage]
    k = min(args.topk, vocab_size)
    parts = [teacher_cache.summarize_rows(head(rows[i:i + args.rows_per_chunk])[:, :vocab_size], k,
                                          args.temperature, storage)
             for i in range(0, rows.shape[0], args.rows_per_chunk)]
    ids, logprobs, tail = (torch.cat([p[j] for p in parts]) if parts else None for j in range(3))
    out, start = [], 0
    for example, count in zip(batch, mask.sum(dim=1).tolist()):
        key = teacher_cache.example_hash(example["input_ids"], example["labels"])
        if ids is None:
            out.append((key, torch.zeros(0, k, dtype=torch.int32), torch.zeros(0, k, dtype=storage), torch.zeros(0)))
        else:
            out.append((key, ids[start:start + count], logprobs[start:start + count], tail[start:start + count]))
        start += count
    return out


def cache_split(model, tokenizer, loader, dataset, split: str, args: CacheArgs, meta, output: Path, device) -> dict:
    """Write (or finish) one split's shards; returns {"examples": n, "shards": [...], "rows": r, "too_long": d}."""
    from tqdm.auto import tqdm

    from llm_recipes import data

    rows = data.load_split(loader, dataset, tokenizer, split, role="teacher", model_name=args.model_name,
                           encoder_decoder=args.encoder_decoder)
    stats = data.summarize(rows, "teacher", split, args.encoder_decoder)
    keep = [i for i, n in enumerate(stats["length"]) if meta.max_positions is None or n <= meta.max_positions]
    examples = rows.select_columns([c for c in data.REQUIRED_COLUMNS if c in rows.column_names]).select(keep)
    examples = examples.with_format("python")
    done = meta.splits.get(split, {}).get("shards", [])
    shards = [name for name in done if (output / name).exists()]
    first = len(shards) * args.shard_examples
    bar = tqdm(total=len(examples), initial=min(first, len(examples)), desc=f"caching {split}",
               disable=not args.progress)
    pad_id = tokenizer.pad_token_id
    answer_rows = meta.splits.get(split, {}).get("rows", 0) if shards else 0
    for shard_start in range(first, len(examples), args.shard_examples):
        writer = teacher_cache.ShardWriter(output, f"{split}-{shard_start // args.shard_examples:05d}")
        shard_end = min(shard_start + args.shard_examples, len(examples))
        for start in range(shard_start, shard_end, args.batch_size):
            batch = [examples[i] for i in range(start, min(start + args.batch_size, shard_end))]
            for key, ids, logprobs, tail in example_rows(model, batch, args, len(tokenizer), pad_id, device):
                writer.add(key, ids, logprobs, tail)
                answer_rows += ids.shape[0]
            bar.update(len(batch))
        shards.append(writer.write(meta.topk, teacher_cache.STORAGE_DTYPES[args.storage]))
        meta.splits[split] = {"examples": len(examples), "shards": list(shards), "rows": answer_rows,
                              "too_long": len(rows) - len(keep)}
        write_meta(output, meta)  # a stopped run continues after this shard
    bar.close()
    meta.splits[split] = {"examples": len(examples), "shards": shards, "rows": answer_rows,
                          "too_long": len(rows) - len(keep)}
    return meta.splits[split]


def write_cache(args: CacheArgs, dataset, model=None, tokenizer=None) -> dict:
    """The whole cache (the teacher loaded here unless given, e.g. by `generate`); returns its summary."""
    from llm_recipes import data
    from llm_recipes.checkpoint import prepare_output_dir

    check_args(args)
    started = time.perf_counter()
    output = prepare_output_dir(args.output_dir)
    if tokenizer is None:
        tokenizer = models.load_tokenizer(args.tokenizer_name or args.model_name,
                                          trust_remote_code=args.trust_remote_code, what="teacher tokenizer")
    teacher_cache.check_ids_fit(len(tokenizer))
    loader = data.import_loader(dataset.file)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if model is None:
        model = models.load_model(args.model_name, encoder_decoder=args.encoder_decoder,
                                  dtype=torch.bfloat16 if args.bf16 else torch.float32,
                                  trust_remote_code=args.trust_remote_code, what="teacher model")
    model.to(device).eval()
    meta = open_folder(output, settings_of(args, tokenizer, dataset, models.max_positions(model.config)))
    write_meta(output, meta)
    tokenizer.save_pretrained(output)
    summary = {}
    for split in [s.strip() for s in args.splits.split(",") if s.strip()]:
        summary[split] = cache_split(model, tokenizer, loader, dataset, split, args, meta, output, device)
    meta.complete = True
    write_meta(output, meta)
    size = sum(p.stat().st_size for p in output.glob("*.safetensors"))
    rows = sum(split["rows"] for split in summary.values())
    result = {"splits": summary, "bytes": size, "answer_rows": rows, "bytes_per_row": size / max(rows, 1),
              "seconds": time.perf_counter() - started}
    print(f"teacher cache: {output} ({rows:,} answer rows, {size / 2**20:.1f} MiB, {result['bytes_per_row']:.0f} "
          f"bytes per row, K {meta.topk}, {meta.storage}; {result['seconds']:.1f} s)")
    (output / "summary.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def run(parsed: flags.Parsed) -> None:
    write_cache(parsed["args"], parsed["dataset"])


main, cli = flags.entry_points(COMMAND, run)

if __name__ == "__main__":
    cli()
