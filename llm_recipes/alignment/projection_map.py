"""The projection map: for every teacher token v, sigma(v) = the student's tokenization of v's text,
as a trie over student-token prefixes; which trie node serves each student answer token; the tokens
both vocabularies share; and the on-disk cache of a pair's maps."""
from __future__ import annotations

import copy
import hashlib
import json
import os
import time
from collections import Counter
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from llm_recipes.alignment.tokens import BYTE_TO_CHAR, WHITESPACE, TokenizerInfo, components, tokenizer_info
from llm_recipes.errors import UserError

FORMAT_VERSION = "llm_recipes.alignment/1"
MAP_FILE = "projection_map.safetensors"

# Views of a teacher token's text in the projection map (each has its own trie root):
VIEW_INNER = 0  # the text as it is: a group after the first one
VIEW_SPACED = 1  # b" " + text without leading whitespace: first group, the student's answer starts with a space
VIEW_BARE = 2  # text without leading whitespace: first group, the student's answer starts without one
VIEW_NAMES = ("inner", "spaced_start", "bare_start")


# ------------------------------------------------------------------------------------ student tokenization of text
def _utf8_runs(data: bytes) -> list[tuple[bool, object]]:
    """Split bytes into runs of valid UTF-8 (as str) and of stray bytes (as bytes)."""
    runs: list[tuple[bool, list]] = []
    for ch in data.decode("utf-8", "surrogateescape"):
        stray = 0xDC80 <= ord(ch) <= 0xDCFF
        if runs and runs[-1][0] == (not stray):
            runs[-1][1].append(ch)
        else:
            runs.append((not stray, [ch]))
    return [(True, "".join(chars)) if valid else (False, bytes(ord(c) - 0xDC00 for c in chars))
            for valid, chars in runs]


def _without_prefix_space(spec: dict) -> dict:
    """A tokenizer.json with the prefix-space options off: ByteLevel(add_prefix_space=False),
    Metaspace(prepend_scheme="never"), no Prepend normalizer; no post-processor, padding, truncation."""
    spec = dict(spec)  # the model (vocabulary) is shared, only the parts changed below are copied
    spec["pre_tokenizer"] = copy.deepcopy(spec.get("pre_tokenizer"))
    spec["normalizer"] = copy.deepcopy(spec.get("normalizer"))
    for part in components(spec.get("pre_tokenizer")):
        if part.get("type") == "ByteLevel":
            part["add_prefix_space"] = False
        if part.get("type") == "Metaspace":
            part["prepend_scheme"] = "never"
            if "add_prefix_space" in part:
                part["add_prefix_space"] = False

    def strip_prepend(node):
        if not isinstance(node, dict):
            return node
        if node.get("type") == "Prepend":
            return None
        if node.get("type") == "Sequence" and isinstance(node.get("normalizers"), list):
            kept = [strip_prepend(n) for n in node["normalizers"]]
            node["normalizers"] = [n for n in kept if n is not None]
        return node

    spec["normalizer"] = strip_prepend(spec.get("normalizer"))
    for key in ("post_processor", "padding", "truncation"):
        spec[key] = None
    return spec


class StudentTokenizer:
    """The student's tokenization of a piece of text out of context (sigma in `ProjectionMap`).

    Context-free means: the text is tokenized as if it continued running text, with no marker space
    added in front. Byte-level BPE and SentencePiece/Metaspace: a copy of the student's tokenizer with
    the prefix-space options off (ByteLevel add_prefix_space=False, Metaspace prepend_scheme="never",
    no Prepend("▁") normalizer), so b"ris" -> "ris" and b" Paris" -> "▁Paris"/"ĠParis". `at_start`
    (the first group of an answer) uses the student's own settings instead, so that the prefix space
    it adds at the start of an answer appears as it does in training data. WordPiece: text that starts
    with a letter or digit, not at the start, continues a word: its first word is matched greedily
    against "##" pieces (longest first, as WordPiece does); everything else is word-initial. Other
    tokenizers: the copy with prefix options off. Bytes that are not valid UTF-8 (part of a character):
    byte-level -> the student's BPE on those bytes; byte fallback -> the "<0xNN>" pieces; otherwise no
    tokenization (None).
    """

    def __init__(self, tokenizer):
        from tokenizers import Tokenizer

        self.info = tokenizer_info(tokenizer)
        real = json.loads(self.info.backend.to_str())  # a fresh copy (faster than deepcopy)
        for key in ("post_processor", "padding", "truncation"):
            real[key] = None
        free = _without_prefix_space(real)
        self.real = Tokenizer.from_str(json.dumps(real))
        # without prefix-space options to turn off (Llama-3, Qwen, Gemma) both are the same tokenizer
        self.free = self.real if free == real else Tokenizer.from_str(json.dumps(free))
        for tok in (self.real, self.free):
            tok.encode_special_tokens = True
        self.vocab = self.info.backend.get_vocab(with_added_tokens=True)
        self.no_text = {i for i in range(self.info.vocab_size) if not self.info.text_id(i)}

    def _stray(self, data: bytes) -> Optional[list[int]]:
        info = self.info
        if info.kind == "byte_level":
            ids = [t.id for t in self.real.model.tokenize("".join(BYTE_TO_CHAR[b] for b in data))]
        elif info.kind == "metaspace" and info.byte_fallback:
            ids = [info.byte_ids.get(b, -1) for b in data]
        else:
            return None
        return ids if ids and all(info.text_id(i) for i in ids) else None

    def _wordpiece_continuation(self, text: str) -> Optional[list[int]]:
        normalizer = self.real.normalizer
        if normalizer is not None:
            text = normalizer.normalize_str(text)
        words = self.real.pre_tokenizer.pre_tokenize_str(text) if self.real.pre_tokenizer else [(text, None)]
        ids: list[int] = []
        for n, (word, _) in enumerate(words):
            if n > 0 or not word[:1].isalnum():
                ids += [t.id for t in self.real.model.tokenize(word)]
                continue
            pos = 0
            while pos < len(word):
                for end in range(len(word), pos, -1):
                    piece = self.vocab.get(self.info.subword_prefix + word[pos:end])
                    if piece is not None:
                        ids.append(piece)
                        pos = end
                        break
                else:
                    return None
        return ids

    def tokenize_many(self, items: Sequence[tuple[bytes, bool]]) -> list[Optional[tuple[int, ...]]]:
        """sigma of each (text bytes, at_start); None where the student cannot represent the text."""
        wordpiece = self.info.kind == "wordpiece"
        same = self.free is self.real
        batch: dict[str, dict[str, Optional[list[int]]]] = {"real": {}, "free": {}}
        plans = []
        for data, at_start in items:
            try:
                runs = [(True, data.decode("utf-8"))]
            except UnicodeDecodeError:
                runs = _utf8_runs(data)
            plan = []
            for n, (valid, run) in enumerate(runs):
                if not valid:
                    plan.append(("stray", run))
                    continue
                start = at_start and n == 0
                if wordpiece and not start and run[:1].isalnum():
                    plan.append(("wordpiece", run))
                    continue
                which = "real" if start or wordpiece or same else "free"
                batch[which][run] = None
                plan.append((which, run))
            plans.append(plan)
        for which, tok in (("real", self.real), ("free", self.free)):
            texts = list(batch[which])
            if texts:
                for text, encoding in zip(texts, tok.encode_batch(texts, add_special_tokens=False)):
                    ids = encoding.ids
                    batch[which][text] = ids if self.no_text.isdisjoint(ids) else None
        out: list[Optional[tuple[int, ...]]] = []
        for plan in plans:
            ids: Optional[list[int]] = []
            for which, run in plan:
                if which == "stray":
                    part = self._stray(run)
                elif which == "wordpiece":
                    part = self._wordpiece_continuation(run)
                    part = part if part is not None and self.no_text.isdisjoint(part) else None
                else:
                    part = batch[which][run]
                if part is None:
                    ids = None
                    break
                ids += part
            out.append(tuple(ids) if ids else None)
        return out

    def tokenize(self, data: bytes, at_start: bool = False) -> Optional[tuple[int, ...]]:
        return self.tokenize_many([(data, at_start)])[0]


# ------------------------------------------------------------------------------------ projection map
def pair_fingerprint(teacher_tokenizer, student_tokenizer) -> str:
    """sha256 over both tokenizers' definitions (vocabulary, merges/scores, normalizer, pre-tokenizer,
    decoder, special ids; not padding/truncation) and the map's format version."""
    h = hashlib.sha256(FORMAT_VERSION.encode())
    for tok in (teacher_tokenizer, student_tokenizer):
        part = tokenizer_info(tok).fingerprint_part()
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.hexdigest()


def _sigma_source(teacher: TokenizerInfo, v: int) -> Optional[bytes]:
    """The text a teacher token stands for: its bytes; for a WordPiece teacher's word-initial token
    that starts with a letter or digit, b" " + its bytes (it usually follows a space)."""
    data = teacher.token_bytes[v]
    if (data and teacher.kind == "wordpiece" and not teacher.strings[v].startswith(teacher.subword_prefix)
            and data[:1].isalnum()):
        return b" " + data
    return data


def _view_text(data: bytes, view: int) -> Optional[bytes]:
    if view == VIEW_INNER:
        return data
    rest = data.lstrip(WHITESPACE)
    if view == VIEW_SPACED:
        return b" " + rest
    return rest or None


def _offsets(counts: np.ndarray) -> np.ndarray:
    out = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=out[1:])
    return out


def _gather_slices(offsets: torch.Tensor, nodes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(row of each element, flat index of each element) of the CSR slices of `nodes` (-1: empty)."""
    nodes = nodes.long()
    valid = nodes >= 0
    safe = nodes.clamp(min=0)
    start = offsets[safe]
    count = torch.where(valid, offsets[safe + 1] - start, torch.zeros_like(start))
    rows = torch.repeat_interleave(torch.arange(nodes.numel(), device=nodes.device), count)
    first = count.cumsum(0) - count
    within = torch.arange(rows.numel(), device=nodes.device) - first[rows]
    return rows, start[rows] + within


class ProjectionMap:
    """sigma(v) for every teacher token v, as a trie over the student tokens, in CSR tensors.

    Nodes are sequences of student tokens; each of the three views (`VIEW_INNER`, `VIEW_SPACED`,
    `VIEW_BARE`) has its own root (`roots[view]`). For node n of depth d, the slice
    `node_offsets[n]:node_offsets[n+1]` of `teacher_ids` / `next_student_ids` lists every pair
    (v, sigma(v)[d]) with sigma(v) starting with n's sequence and longer than it. Children:
    `child_offsets[n]:child_offsets[n+1]` of `child_tokens` (sorted) / `child_nodes`. sigma itself:
    `sigma_offsets[view * teacher_vocab_size + v]` .. +1 into `sigma_tokens`.

    Target at a student token s_k with prefix P (the group's student tokens before s_k) at node n:
    q*(u) = sum of p(v) over the pairs (v, u) of n, normalised; p = the teacher's distribution at the
    row that predicts the group's first teacher token (see `projection_positions`). Teacher tokens
    without a sigma (special tokens, partial UTF-8 the student cannot represent) take part nowhere:
    their mass is dropped by the normalisation.
    """

    TENSORS = ("roots", "node_offsets", "teacher_ids", "next_student_ids", "child_offsets", "child_tokens",
               "child_nodes", "node_depth", "sigma_offsets", "sigma_tokens", "student_starts_with_space", "sizes")

    def __init__(self, tensors: dict[str, torch.Tensor], fingerprint: str):
        missing = [k for k in self.TENSORS if k not in tensors]
        if missing:
            raise UserError(f"projection map lacks {', '.join(missing)}: rebuild it")
        for k in self.TENSORS:
            setattr(self, k, tensors[k])
        self.fingerprint = fingerprint
        self.teacher_vocab_size = int(self.sizes[0])
        self.student_vocab_size = int(self.sizes[1])
        self._children: Optional[dict[tuple[int, int], int]] = None

    # -- building
    @classmethod
    def build(cls, teacher_tokenizer, student_tokenizer) -> "ProjectionMap":
        teacher = tokenizer_info(teacher_tokenizer)
        student = tokenizer_info(student_tokenizer)
        sigma_of = StudentTokenizer(student_tokenizer)
        vt = teacher.vocab_size
        items, where = [], []
        for view in range(len(VIEW_NAMES)):
            for v, data in enumerate(teacher.token_bytes):
                text = _view_text(_sigma_source(teacher, v), view) if data else None
                if text:
                    items.append((text, view != VIEW_INNER))
                    where.append((view, v))
        sigmas: list[list[Optional[tuple[int, ...]]]] = [[None] * vt for _ in VIEW_NAMES]
        for (view, v), seq in zip(where, sigma_of.tokenize_many(items)):
            sigmas[view][v] = seq
        return cls.from_sigmas(sigmas, student.vocab_size, student.starts_with_space,
                               pair_fingerprint(teacher_tokenizer, student_tokenizer))

    @classmethod
    def from_sigmas(cls, sigmas: list, student_vocab_size: int, student_starts_with_space: Sequence[bool],
                    fingerprint: str = "") -> "ProjectionMap":
        """The map of given sigma tables (one list per view: for every teacher id its student token ids, or
        None): what `build` makes from two tokenizers, and what a benchmark or a test makes up."""
        vt = len(sigmas[0])

        # nodes in creation order: roots first, then each new prefix as sigmas extend it; a pair
        # (node, v, sigma(v)[depth]) for every proper prefix of every sigma
        roots = list(range(len(VIEW_NAMES)))
        depth, parent, via = [0] * len(roots), [-1] * len(roots), [-1] * len(roots)
        child_of: dict[tuple[int, int], int] = {}
        pair_node, pair_teacher, pair_student = [], [], []
        for view in range(len(VIEW_NAMES)):
            for v, seq in enumerate(sigmas[view]):
                if not seq:
                    continue
                n = roots[view]
                for d, u in enumerate(seq):
                    if d:
                        m = child_of.get((n, seq[d - 1]))
                        if m is None:
                            m = len(depth)
                            child_of[(n, seq[d - 1])] = m
                            depth.append(d)
                            parent.append(n)
                            via.append(seq[d - 1])
                        n = m
                    pair_node.append(n)
                    pair_teacher.append(v)
                    pair_student.append(u)
        num_nodes = len(depth)
        pair_node_a = np.asarray(pair_node, dtype=np.int64)
        order = np.argsort(pair_node_a, kind="stable")  # by node, then by teacher id within a view
        node_offsets = _offsets(np.bincount(pair_node_a, minlength=num_nodes))
        teacher_ids = np.asarray(pair_teacher, dtype=np.int64)[order]
        next_student = np.asarray(pair_student, dtype=np.int64)[order]
        parent_a, via_a = np.asarray(parent, dtype=np.int64), np.asarray(via, dtype=np.int64)
        kids = np.flatnonzero(parent_a >= 0)
        kids = kids[np.lexsort((via_a[kids], parent_a[kids]))]  # by parent, then by token
        child_offsets = _offsets(np.bincount(parent_a[kids], minlength=num_nodes))
        flat = [seq or () for view in sigmas for seq in view]
        sigma_offsets = _offsets(np.asarray([len(seq) for seq in flat], dtype=np.int64))
        sigma_tokens = np.fromiter((u for seq in flat for u in seq), dtype=np.int64, count=int(sigma_offsets[-1]))
        as_tensor = torch.from_numpy
        tensors = {
            "roots": torch.tensor(roots, dtype=torch.long), "node_offsets": as_tensor(node_offsets),
            "teacher_ids": as_tensor(teacher_ids), "next_student_ids": as_tensor(next_student),
            "child_offsets": as_tensor(child_offsets), "child_tokens": as_tensor(via_a[kids]),
            "child_nodes": as_tensor(kids.astype(np.int64)), "node_depth": torch.tensor(depth, dtype=torch.long),
            "sigma_offsets": as_tensor(sigma_offsets), "sigma_tokens": as_tensor(sigma_tokens),
            "student_starts_with_space": torch.tensor(list(student_starts_with_space), dtype=torch.bool),
            "sizes": torch.tensor([vt, student_vocab_size], dtype=torch.long)}
        return cls(tensors, fingerprint)

    # -- storage
    def save(self, path) -> None:
        """safetensors file: the tensors above (ids as int32 on disk: half the size), fingerprint and
        format in its metadata."""
        from safetensors.torch import save_file

        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for k in self.TENSORS:
            t = getattr(self, k).detach().cpu()
            if t.dtype == torch.long:
                if t.numel() and int(t.abs().max()) >= 2 ** 31:
                    raise UserError(f"projection map tensor {k} holds values beyond int32")
                t = t.to(torch.int32)
            tensors[k] = t.contiguous()
        partial = Path(path).with_name(f".{Path(path).name}.{os.getpid()}.partial")  # readers never see half a file
        save_file(tensors, str(partial), metadata={"format": FORMAT_VERSION, "fingerprint": self.fingerprint})
        os.replace(partial, path)

    @classmethod
    def load(cls, path, teacher_tokenizer=None, student_tokenizer=None, *,
             fingerprint: Optional[str] = None) -> "ProjectionMap":
        """Load a saved map; with both tokenizers (or an expected `fingerprint`), refuse a map that was
        built for other tokenizers (UserError)."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise UserError(f"projection map {path} does not exist: build it with ProjectionMap.build(...).save(path)")
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            tensors = {k: t.long() if t.dtype == torch.int32 else t for k, t in tensors.items()}
        except Exception as error:  # noqa: BLE001 - any unreadable file is the user's to fix
            raise UserError(f"projection map {path} is not a readable safetensors file ({error})") from error
        if metadata.get("format") != FORMAT_VERSION:
            raise UserError(f"projection map {path} has format {metadata.get('format')!r}, expected "
                            f"{FORMAT_VERSION!r}: rebuild it")
        if teacher_tokenizer is not None and student_tokenizer is not None:
            fingerprint = pair_fingerprint(teacher_tokenizer, student_tokenizer)
        if fingerprint is not None and metadata.get("fingerprint") != fingerprint:
            raise UserError(f"projection map {path} was built for other tokenizers (fingerprint "
                            f"{str(metadata.get('fingerprint'))[:12]} vs {fingerprint[:12]} for this teacher/student "
                            "pair): rebuild it for these tokenizers")
        return cls(tensors, metadata.get("fingerprint", ""))

    def to(self, device) -> "ProjectionMap":
        """A copy with every tensor on `device` (the loss gathers on the device of its logits)."""
        return ProjectionMap({k: getattr(self, k).to(device) for k in self.TENSORS}, self.fingerprint)

    # -- queries
    @property
    def num_nodes(self) -> int:
        return int(self.node_depth.numel())

    @property
    def num_pairs(self) -> int:
        return int(self.teacher_ids.numel())

    def root(self, view: int = VIEW_INNER) -> int:
        return int(self.roots[view])

    def _child_table(self) -> dict[tuple[int, int], int]:
        if self._children is None:
            table = {}
            offsets = self.child_offsets.tolist()
            tokens, nodes = self.child_tokens.tolist(), self.child_nodes.tolist()
            for n in range(len(offsets) - 1):
                for j in range(offsets[n], offsets[n + 1]):
                    table[(n, tokens[j])] = nodes[j]
            self._children = table
        return self._children

    def child(self, node: int, student_id: int) -> int:
        return -1 if node < 0 else self._child_table().get((int(node), int(student_id)), -1)

    def node_of(self, student_prefix_ids: Sequence[int], view: int = VIEW_INNER) -> int:
        """The trie node of a sequence of student tokens in a view, or -1 if no sigma extends it."""
        n = self.root(view)
        for u in student_prefix_ids:
            n = self.child(n, u)
            if n < 0:
                return -1
        return n

    def sigma(self, teacher_id: int, view: int = VIEW_INNER) -> tuple[int, ...]:
        """The student tokenization of a teacher token in a view (() when it has none)."""
        if not 0 <= teacher_id < self.teacher_vocab_size:
            return ()
        i = view * self.teacher_vocab_size + int(teacher_id)
        return tuple(self.sigma_tokens[int(self.sigma_offsets[i]):int(self.sigma_offsets[i + 1])].tolist())

    def node_pairs(self, node: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(teacher ids, next student ids) of one node."""
        a, b = int(self.node_offsets[node]), int(self.node_offsets[node + 1])
        return self.teacher_ids[a:b], self.next_student_ids[a:b]

    def pairs(self, nodes) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For a batch of nodes [R] (-1: none): (row r in 0..R-1, teacher id, next student id) of every
        pair of every node, flat. A loss gathers p[row, teacher id] and adds it at [row, student id]."""
        nodes = torch.as_tensor(nodes, dtype=torch.long)
        rows, index = _gather_slices(self.node_offsets.to(nodes.device), nodes)
        return rows, self.teacher_ids.to(nodes.device)[index], self.next_student_ids.to(nodes.device)[index]

    def project(self, teacher_probs: torch.Tensor, nodes, *, normalize: bool = True) -> torch.Tensor:
        """Reference projection: teacher_probs [R, >= teacher vocab] at the rows' nodes -> [R, student vocab].
        Rows with node -1 (or no mass) stay zero. Dense: meant for tests and small vocabularies."""
        rows, t_ids, s_ids = self.pairs(torch.as_tensor(nodes, device=teacher_probs.device))
        out = teacher_probs.new_zeros(teacher_probs.shape[0], self.student_vocab_size)
        out.index_put_((rows, s_ids), teacher_probs[rows, t_ids], accumulate=True)
        if normalize:
            total = out.sum(dim=1, keepdim=True)
            out = torch.where(total > 0, out / total.clamp(min=torch.finfo(out.dtype).tiny), out)
        return out

    def start_view(self, student_first_id: int) -> int:
        """The view of an answer's first group: spaced if the student's first answer token starts with
        whitespace, bare otherwise."""
        spaced = (0 <= student_first_id < self.student_vocab_size
                  and bool(self.student_starts_with_space[student_first_id]))
        return VIEW_SPACED if spaced else VIEW_BARE


CACHE_ENV = "LLM_DISTILL_CACHE"  # where per-pair artifacts are kept (default ~/.cache/llm-distill)


def pair_cache_dir(teacher_tokenizer, student_tokenizer) -> Path:
    """The folder of this tokenizer pair's cached artifacts, named by both tokenizers' content (see
    `pair_fingerprint`): any run with the same two tokenizers reads what an earlier run built."""
    root = Path(os.environ.get(CACHE_ENV) or "~/.cache/llm-distill").expanduser()
    return root / "pairs" / pair_fingerprint(teacher_tokenizer, student_tokenizer)[:32]


def load_or_build_map(teacher_tokenizer, student_tokenizer, path=None) -> tuple[ProjectionMap, str]:
    """The pair's projection map from `path` (default: the pair's cache folder) when it was built for these
    tokenizers, else built and saved there (another pair's map is replaced). Returns (map, "loaded from ..." |
    "built in N s, saved to ...")."""
    path = Path(path) if path is not None else pair_cache_dir(teacher_tokenizer, student_tokenizer) / MAP_FILE
    if path.is_file():
        try:
            return ProjectionMap.load(path, teacher_tokenizer, student_tokenizer), f"loaded from {path}"
        except UserError:
            pass  # built for other tokenizers, or unreadable: rebuild
    started = time.perf_counter()
    pmap = ProjectionMap.build(teacher_tokenizer, student_tokenizer)
    pmap.save(path)
    return pmap, f"built in {time.perf_counter() - started:.1f} s, saved to {path}"


SKIP_REASONS = ("special", "beyond_first_teacher_token", "prefix_not_in_trie", "inconsistent")


def projection_positions(teacher_groups: Sequence[int], student_groups: Sequence[int],
                         teacher_spans: Sequence[Optional[tuple[int, int]]],
                         student_spans: Sequence[Optional[tuple[int, int]]], student_ids: Sequence[int],
                         pmap: ProjectionMap, *, teacher_ids: Optional[Sequence[int]] = None,
                         start_view: Optional[int] = None, strict: bool = False,
                         counts: Optional[Counter] = None) -> tuple[list[int], list[int]]:
    """Per student answer token: (index within the teacher answer of its group's first teacher token,
    trie node of its prefix), or (-1, -1) where the projection cannot serve it exactly.

    Groups and spans are those of `align_answer` (spans in common coordinates). The student token s_k
    of group g with prefix P (g's student tokens before s_k) is served when: it has a group (not
    EOS/special: reason "special"); it ends no later than g's first teacher token t0 (else
    "beyond_first_teacher_token": the teacher's one-step distribution at t0's row says nothing about
    text past t0); P is a node of the view's trie (else "prefix_not_in_trie"). The view is VIEW_INNER,
    or for group 0 `start_view` (default `pmap.start_view(first student text token)`).
    With `teacher_ids` (the teacher answer's ids), served positions are also checked for sigma
    consistency: sigma(teacher_ids[t0]) starts with P + [s_k] ("consistent" in counts, else
    "inconsistent"; `strict=True` then skips inconsistent positions). `counts` (a Counter) receives
    "served" and the reasons.
    """
    counts = counts if counts is not None else Counter()
    first_teacher: dict[int, int] = {}
    for j, g in enumerate(teacher_groups):
        if g >= 0 and g not in first_teacher:
            first_teacher[g] = j
    if start_view is None:
        first = next((int(s) for s, g in zip(student_ids, student_groups) if g >= 0), -1)
        start_view = pmap.start_view(first)
    out_t, out_n = [], []
    prefix: list[int] = []
    current = -1
    for k, g in enumerate(student_groups):
        if g < 0 or g not in first_teacher or student_spans[k] is None:
            counts["special"] += 1
            out_t.append(-1)
            out_n.append(-1)
            continue
        if g != current:
            current, prefix = g, []
        t0 = first_teacher[g]
        s_k = int(student_ids[k])
        node, reason = _served_node(pmap, prefix, s_k, student_spans[k], teacher_spans[t0],
                                    start_view if g == 0 else VIEW_INNER,
                                    int(teacher_ids[t0]) if teacher_ids is not None else None, strict, counts)
        prefix.append(s_k)
        if reason is None:
            counts["served"] += 1
            out_t.append(t0)
            out_n.append(node)
        else:
            counts[reason] += 1
            out_t.append(-1)
            out_n.append(-1)
    return out_t, out_n


def _served_node(pmap: ProjectionMap, prefix: list[int], s_k: int, student_span: tuple[int, int],
                 teacher_span: tuple[int, int], view: int, teacher_id: Optional[int], strict: bool,
                 counts: Counter) -> tuple[int, Optional[str]]:
    """(trie node, None) where the projection serves the student token s_k after `prefix` in its group, else
    (-1, the reason); see `projection_positions`."""
    if student_span[1] > teacher_span[1]:
        return -1, "beyond_first_teacher_token"
    node = pmap.node_of(prefix, view)
    if node < 0:
        return -1, "prefix_not_in_trie"
    if teacher_id is not None:
        consistent = pmap.sigma(teacher_id, view)[:len(prefix) + 1] == tuple(prefix) + (s_k,)
        counts["consistent" if consistent else "inconsistent"] += 1
        if strict and not consistent:
            return -1, "inconsistent"
    return node, None


def shared_token_pairs(teacher_tokenizer, student_tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """(teacher ids, student ids), long tensors: tokens whose canonical bytes are identical, one to one
    (the lowest id on either side when bytes repeat), special tokens excluded. WordPiece word-initial
    tokens carry no space (see `token_bytes`), so they match a teacher's unspaced tokens."""
    teacher, student = tokenizer_info(teacher_tokenizer), tokenizer_info(student_tokenizer)
    student_of: dict[bytes, int] = {}
    for u, b in enumerate(student.token_bytes):
        if b:
            student_of.setdefault(b, u)
    t_ids, s_ids, seen = [], [], set()
    for v, b in enumerate(teacher.token_bytes):
        if b and b in student_of and b not in seen:
            seen.add(b)
            t_ids.append(v)
            s_ids.append(student_of[b])
    return torch.tensor(t_ids, dtype=torch.long), torch.tensor(s_ids, dtype=torch.long)


