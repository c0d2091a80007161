"""A cache of the teacher's distributions at the answer positions: training without the teacher's weights.

The teacher runs once (`python -m llm_distillation.cache_teacher`) over exactly the examples the
trainer builds (the loader file called for the teacher's tokenizer), and for every row that predicts an
answer token keeps its top-K token ids, their log-probabilities at the cache's temperature, and the log
of the probability mass outside them. Training with `--distillation_config.teacher_cache DIR` then
feeds the losses a dense teacher distribution rebuilt from those rows (`dense_logits`): the top-K
log-probabilities where they are, the tail mass spread like the student's own tail (the KL family) or
evenly over the other ids (across tokenizers); the forward KL at temperature 1 reads the rows directly
(llm_recipes/losses/cached_terms.py). With K = the vocabulary it is the teacher's distribution itself (to
the storage precision: float32 is exact).

The folder:
  cache.json                       what the rows depend on: the teacher, its tokenizer's fingerprint and
                                   length, K, the temperature, the storage type, whether it is complete, and
                                   per split its shard files and example count
  tokenizer files                  the teacher's tokenizer
  <split>-<n>.safetensors          one shard: ids [R, K] int32, logprobs [R, K] float16/bfloat16/float32,
                                   tail [R] float32 (log of the mass outside the top K; -inf when none),
                                   offsets [E + 1] int64 (the rows of example e are offsets[e]:offsets[e+1]),
                                   hashes [E, 16] uint8 (`example_hash`)

Examples are found by their hash: SHA-256 of the teacher's input ids and labels, so that a change of
prompt, answer, tokenizer or few-shot choice is a miss, reported with the first example that misses.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from llm_recipes.errors import UserError
from llm_recipes.losses.pairing import predicting_rows

FORMAT = 1
META_FILE = "cache.json"
STORAGE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
HASH_BYTES = 16


def example_hash(input_ids, labels) -> bytes:
    """The cache key of one teacher example: its token ids and labels (so also its tokenizer's ids)."""
    digest = hashlib.sha256()
    digest.update(torch.as_tensor(list(input_ids), dtype=torch.int64).numpy().tobytes())
    digest.update(b"|")
    digest.update(torch.as_tensor(list(labels), dtype=torch.int64).numpy().tobytes())
    return digest.digest()[:HASH_BYTES]


def tokenizer_fingerprint(tokenizer) -> str:
    """SHA-256 of the tokenizer's vocabulary (token -> id): two tokenizers with the same ids agree."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()


# ------------------------------------------------------------------------------------------- writing
@torch.no_grad()
def summarize_rows(logits: torch.Tensor, k: int, temperature: float, storage: torch.dtype):
    """(ids [R, K] int32, logprobs [R, K] storage, tail [R] float32) of logit rows [R, V] (V = the
    tokenizer's length), at `temperature`."""
    logprobs = torch.log_softmax(logits.float() / temperature, dim=-1)
    top, ids = logprobs.topk(min(k, logprobs.shape[-1]), dim=-1)
    if top.shape[-1] == logprobs.shape[-1]:
        tail = torch.full(top.shape[:1], -math.inf)
    else:  # log(1 - sum(top)), computed as the log-sum-exp of the rest for precision
        rest = logprobs.scatter(-1, ids, -math.inf)
        tail = torch.logsumexp(rest, dim=-1)
    return ids.to(torch.int32), top.to(storage), tail.float()


@dataclass
class ShardWriter:
    """Collects the rows of consecutive examples and writes them as one shard, atomically."""

    folder: Path
    name: str
    ids: list = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    tail: list = field(default_factory=list)
    offsets: list = field(default_factory=lambda: [0])
    hashes: list = field(default_factory=list)

    def add(self, key: bytes, ids: torch.Tensor, logprobs: torch.Tensor, tail: torch.Tensor) -> None:
        self.ids.append(ids.cpu())
        self.logprobs.append(logprobs.cpu())
        self.tail.append(tail.cpu())
        self.offsets.append(self.offsets[-1] + ids.shape[0])
        self.hashes.append(torch.frombuffer(bytearray(key), dtype=torch.uint8))

    def __len__(self) -> int:
        return len(self.hashes)

    def write(self, k: int, storage: torch.dtype) -> str:
        from safetensors.torch import save_file

        def cat(parts, shape, dtype):
            return torch.cat(parts) if parts else torch.zeros(shape, dtype=dtype)

        tensors = {"ids": cat(self.ids, (0, k), torch.int32), "logprobs": cat(self.logprobs, (0, k), storage),
                   "tail": cat(self.tail, (0,), torch.float32),
                   "offsets": torch.tensor(self.offsets, dtype=torch.int64),
                   "hashes": torch.stack(self.hashes) if self.hashes else torch.zeros(0, HASH_BYTES, dtype=torch.uint8)}
        final = self.folder / f"{self.name}.safetensors"
        tmp = self.folder / f".{self.name}.safetensors.tmp"
        save_file({k_: v.contiguous() for k_, v in tensors.items()}, str(tmp))
        os.chmod(tmp, 0o644)
        with open(tmp, "rb") as stream:
            os.fsync(stream.fileno())
        os.replace(tmp, final)
        return final.name


# ------------------------------------------------------------------------------------------- reading
@dataclass
class CacheMeta:
    teacher: str
    tokenizer_fingerprint: str
    vocab_size: int
    topk: int
    temperature: float
    storage: str
    encoder_decoder: bool
    max_positions: Optional[int]
    complete: bool
    splits: dict  # split -> {"examples": int, "shards": [file names], "rows": int, "too_long": int}
    dataset: dict = field(default_factory=dict)  # the --dataset.* flags the examples were built with
    format: int = FORMAT

    def to_json(self) -> str:
        return json.dumps(self.__dict__, indent=1)


def read_meta(folder: str) -> CacheMeta:
    path = Path(folder) / META_FILE
    if not path.is_file():
        raise UserError(f"--distillation_config.teacher_cache {folder} is not a teacher cache (no {META_FILE}): "
                        "write one with python -m llm_distillation.cache_teacher")
    values = json.loads(path.read_text())
    if values.get("format") != FORMAT:
        raise UserError(f"the teacher cache {folder} has format {values.get('format')}, this trainer reads "
                        f"{FORMAT}: write it again with this version")
    return CacheMeta(**values)


class TeacherCache:
    """Rows of the cached examples of one split, found by example hash (shards memory-mapped, read lazily:
    each process reads only the rows of its own batches)."""

    def __init__(self, folder: str, split: str):
        from safetensors import safe_open

        self.folder, self.split = Path(folder), split
        self.meta = read_meta(folder)
        if not self.meta.complete:
            raise UserError(f"the teacher cache {folder} is incomplete (its writer stopped): run the same "
                            "cache_teacher command again to finish it")
        if split not in self.meta.splits:
            raise UserError(f"the teacher cache {folder} has no {split} split (it has "
                            f"{', '.join(self.meta.splits) or 'none'}): write it with --splits {split}")
        self.shards = [safe_open(str(self.folder / name), framework="pt") for name in self.meta.splits[split]["shards"]]
        self.offsets = [shard.get_tensor("offsets") for shard in self.shards]
        self.index: dict[bytes, tuple[int, int]] = {}
        for s, shard in enumerate(self.shards):
            for e, key in enumerate(shard.get_tensor("hashes")):
                self.index.setdefault(bytes(key.tolist()), (s, e))
        self.k = self.meta.topk

    def locate(self, input_ids, labels) -> Optional[tuple[int, int]]:
        return self.index.get(example_hash(input_ids, labels))

    def rows(self, where: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ids [R, K] long, logprobs [R, K] float32, tail [R] float32) of one located example."""
        s, e = where
        start, end = int(self.offsets[s][e]), int(self.offsets[s][e + 1])
        shard = self.shards[s]
        return (shard.get_slice("ids")[start:end].long(), shard.get_slice("logprobs")[start:end].float(),
                shard.get_slice("tail")[start:end].float())

    def packed(self, where: tuple[int, int]) -> torch.Tensor:
        """One example's rows packed as float32 [R, 2K + 1]: ids (exact as floats below 2^24), log-probs, tail."""
        ids, logprobs, tail = self.rows(where)
        return torch.cat([ids.float(), logprobs, tail[:, None]], dim=1)


def check_ids_fit(vocab_size: int) -> None:
    if vocab_size >= 2**24:
        raise UserError(f"a teacher vocabulary of {vocab_size} ids does not fit the cache's float32 packing "
                        "(2^24 ids at most)")


def dense_logits(packed: torch.Tensor, vocab_size: int, k: int, temperature: float,
                 student_logits: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Teacher logits [n, V] (float32) rebuilt from packed cache rows [n, 2K + 1], such that softmax(logits / T)
    is the cached top-K probabilities where they are and the tail mass (the rest) spread over the other ids:
    - given the student's logits over the same vocabulary: in proportion to the student's own probabilities
      there. Every divergence of the KL family then computes exactly the divergence between the two
      distributions coarsened to the top-K ids plus one tail bucket, with its exact gradient (within the
      tail the ratio of the two distributions is constant);
    - else evenly over the other V - K ids (measured closer to the live value than renormalising the top K
      for the projected loss on the tiny pair: benchmarks/RESULTS.md).
    The losses apply their temperature T (the cache's) to these logits."""
    ids = packed[:, :k].long()
    logprobs = packed[:, k:2 * k]
    rest_mass = packed[:, 2 * k]
    rest = vocab_size - k
    if rest == 0:
        out = torch.full((packed.shape[0], vocab_size), -math.inf, device=packed.device)
    elif student_logits is not None:
        log_q = torch.log_softmax(student_logits.detach().float() / temperature, dim=-1)
        log_q_tail = torch.logsumexp(log_q.scatter(1, ids, -math.inf), dim=-1)
        out = log_q + (rest_mass - log_q_tail)[:, None]
    else:
        out = (rest_mass - math.log(rest))[:, None].expand(-1, vocab_size).clone()
    out.scatter_(1, ids, logprobs)
    return out.mul_(temperature)


@dataclass(frozen=True)
class CachedHead:
    """The teacher's "output layer" when its rows come from the cache: packed rows -> teacher logits. The loss
    engine passes the student's logits for same-vocabulary divergences (`dense_logits`'s student-shaped tail)."""

    vocab_size: int
    k: int
    temperature: float
    takes_student = True
    sparse_forward_kl = True  # the engine may compute the forward KL from the rows (losses/cached_terms.py)

    def __call__(self, packed: torch.Tensor, student_logits: Optional[torch.Tensor] = None) -> torch.Tensor:
        return dense_logits(packed, self.vocab_size, self.k, self.temperature, student_logits)


def scatter_rows(example_rows: list[Optional[torch.Tensor]], labels: torch.Tensor, encoder_decoder: bool,
                 width: int) -> torch.Tensor:
    """The batch's packed cache rows at the rows that predict answer tokens: [B, S, width] float32 (zeros
    elsewhere), indexed like the teacher's hidden states."""
    mask, _ = predicting_rows(labels, encoder_decoder)
    out = torch.zeros(*labels.shape, width)
    for b, rows in enumerate(example_rows):
        positions = mask[b].nonzero().flatten()
        if rows is None:
            continue
        if rows.shape[0] != positions.numel():
            raise UserError(f"the teacher cache holds {rows.shape[0]} answer rows for an example whose teacher "
                            f"answer has {positions.numel()}: the cache is stale, write it again")
        out[b, positions] = rows
    return out
