"""Cross-tokenizer alignment: which teacher and student answer tokens cover the same text, and a
projection of the teacher's next-token distribution onto the student's vocabulary.

Pairing the two answers' tokens by index compares predictions of different text as soon as the two
tokenizers split a number, a space or a multi-byte character differently. Everything here works on
bytes instead, from Hugging Face tokenizers only (no model, no GPU):

- `token_bytes(tok)`: the UTF-8 bytes each vocabulary entry contributes to running text.
- `answer_byte_spans(tok, ids)`: the byte span of every token of one answer, and the answer's bytes.
- `align_spans`, `align_answer`, `answer_groups`: minimal groups of consecutive tokens covering the
  same bytes on both sides.
- `ProjectionMap`: for every teacher token v, sigma(v) = the student's tokenization of v's text,
  stored as a trie over student-token prefixes (CSR tensors), and `projection_positions`, which says
  for every student answer token which teacher row and which trie node give its target.
- `shared_token_pairs`: tokens with identical bytes in both vocabularies (for a hybrid loss).
- An inspector: `python -m llm_recipes.alignment --teacher_tokenizer T --student_tokenizer S
  --text "..."` (or `--file data.jsonl --column answers.text` for figures over a data set).

Coordinates. An answer's bytes are the concatenation of its tokens' bytes (special tokens such as EOS
contribute nothing and get no span). The two answers may differ by leading whitespace (the student's
answer is tokenized as " {answer}" + EOS, a chat-prompted teacher's as "{answer}"; a tokenizer may add
a prefix space of its own), so alignment compares *common coordinates*: byte offsets counted after
each side's leading whitespace, capped at the length of the answer without leading and trailing
whitespace (offsets <= 0 lie in the leading whitespace). Whitespace-only leading tokens form groups
of their own (with empty text) where both sides have one ending at the same distance from the text
("Ġ" before "421" in both Llama-3 and Qwen); otherwise they join the first group, which so absorbs
the whitespace difference (student "▁" "Paris" vs teacher "Paris"). Trailing whitespace falls into
the last group. The two answers are aligned when their bytes agree after stripping leading and
trailing whitespace; otherwise `UnalignedAnswer` (a ValueError) is raised, which a data collator
catches and counts. When a side is WordPiece (or "other"), whose decoded text need not reproduce the
original spacing, common coordinates count non-whitespace bytes only and the texts must agree once
all whitespace is removed.

Tokenizer families (`TokenizerInfo.kind`):
- "byte_level" (GPT-2, Llama-3, Qwen, SmolLM2): token strings map back to bytes through the
  byte<->unicode table; a token may hold part of a UTF-8 character, its bytes are then not valid UTF-8.
- "metaspace" (SentencePiece: Metaspace pre-tokenizer, or the Replace(" ", "▁") normalizer/decoder of
  Llama-2/Gemma style): "▁" becomes b" ", byte-fallback pieces "<0xE6>" become their byte.
- "wordpiece": "##x" contributes b"x"; a token without "##" contributes its bare text although in
  running text it usually follows a space (or punctuation, or nothing at the start of the text): the
  whitespace is not in the token, so answer spans of WordPiece tokenizers come from the tokenizer's
  offsets (whitespace before a token is given to that token), not from token bytes.
- "other": bytes of `decode([id])` (approximate; spans again from offsets).
Byte-level and Metaspace token bytes are exact: concatenated they are the (normalized) text, including
the marker space a tokenizer prepends, so answer spans come from them, exact to the byte even inside a
UTF-8 character (a tokenizer's own offsets are character offsets, which partial-byte tokens share).

Limits: a lossy normalizer on one side only (lowercasing, accent stripping) makes the answers
unaligned; so does an unknown token (`<unk>` has no text). Student EOS and other special tokens
belong to no group. sigma (see `StudentTokenizer`) is the student's tokenization of a teacher token's
text out of context; in running text the student may split that text otherwise (BPE merges across
the token's edges: SmolLM2 splits " beek" as "Ġbe" "ek" but " beekeeper" as "Ġbee" "keeper"), so the
projected target can miss the student's actual token: `projection_positions` counts these positions
("inconsistent") and can skip them (`strict=True`).
"""
from __future__ import annotations

import bisect
import copy
import dataclasses
import hashlib
import json
import re
import sys
import time
import weakref
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from llm_recipes.errors import UserError
from llm_recipes.flags import Command, entry_points, option

FORMAT_VERSION = "llm_recipes.alignment/1"
WHITESPACE = b" \t\n\r\x0b\x0c"

# Views of a teacher token's text in the projection map (each has its own trie root):
VIEW_INNER = 0  # the text as it is: a group after the first one
VIEW_SPACED = 1  # b" " + text without leading whitespace: first group, the student's answer starts with a space
VIEW_BARE = 2  # text without leading whitespace: first group, the student's answer starts without one
VIEW_NAMES = ("inner", "spaced_start", "bare_start")

_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


class UnalignedAnswer(ValueError):
    """The teacher's and the student's answers do not cover the same text (after whitespace at either end)."""


# ------------------------------------------------------------------------------------ tokenizer facts
def _byte_unicode_tables() -> tuple[dict[int, str], dict[str, int]]:
    """Byte-level BPE's reversible byte -> printable character table (printable Latin-1 bytes stand
    for themselves, the other 68 bytes take the characters from U+0100 on, in byte order)."""
    printable = set(range(0x21, 0x7F)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    to_char, shifted = {}, 0
    for b in range(256):
        if b in printable:
            to_char[b] = chr(b)
        else:
            to_char[b] = chr(0x100 + shifted)
            shifted += 1
    return to_char, {c: b for b, c in to_char.items()}


BYTE_TO_CHAR, CHAR_TO_BYTE = _byte_unicode_tables()


def _backend(tokenizer):
    from tokenizers import Tokenizer

    if isinstance(tokenizer, Tokenizer):
        return tokenizer
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise UserError(f"tokenizer {getattr(tokenizer, 'name_or_path', type(tokenizer).__name__)!r} has no "
                        "`tokenizers` backend; cross-tokenizer alignment needs a fast tokenizer (tokenizer.json)")
    return backend


def _components(node):
    """Every dict of a normalizer / pre-tokenizer / decoder tree (members of a Sequence included)."""
    if isinstance(node, dict):
        yield node
        for value in node.values():
            if isinstance(value, (dict, list)):
                yield from _components(value)
    elif isinstance(node, list):
        for item in node:
            yield from _components(item)


def _metaspace_replacement(parts: list[dict]) -> Optional[str]:
    for part in parts:
        kind = part.get("type")
        if kind == "Metaspace":
            return part.get("replacement", "\u2581")
        if kind == "Replace":
            pattern = (part.get("pattern") or {}).get("String")
            content = part.get("content")
            if (pattern, content) == (" ", "\u2581") or (pattern, content) == ("\u2581", " "):
                return "\u2581"
    return None


class TokenizerInfo:
    """What alignment needs to know about one tokenizer; built once per tokenizer (`tokenizer_info`).

    kind: "byte_level" | "metaspace" | "wordpiece" | "other"; token_bytes: see `token_bytes`;
    special: ids of special tokens (no text); exact: token bytes concatenate to the text;
    byte_ids: byte value -> id of the token that is exactly that one byte (byte-fallback pieces,
    byte-level single bytes), used for partial UTF-8 text.
    """

    def __init__(self, tokenizer):
        self.backend = _backend(tokenizer)
        self.spec = json.loads(self.backend.to_str())
        model = self.spec.get("model") or {}
        self.model_type = model.get("type")
        parts = [p for key in ("normalizer", "pre_tokenizer", "decoder") for p in _components(self.spec.get(key))]
        types = {p.get("type") for p in parts}
        vocab = self.backend.get_vocab(with_added_tokens=True)
        self.vocab_size = max(vocab.values()) + 1 if vocab else 0
        self.vocab_count = self.backend.get_vocab_size(with_added_tokens=True)
        added = self.backend.get_added_tokens_decoder()
        special = {i for i, token in added.items() if token.special}
        special |= {i for i in (getattr(tokenizer, "all_special_ids", None) or []) if i is not None}
        self.special = frozenset(i for i in special if 0 <= i < self.vocab_size)
        self.replacement = _metaspace_replacement(parts)
        if "ByteLevel" in types:
            self.kind = "byte_level"
        elif self.replacement is not None:
            self.kind = "metaspace"
        elif self.model_type == "WordPiece":
            self.kind = "wordpiece"
        else:
            self.kind = "other"
        self.byte_fallback = bool(model.get("byte_fallback")) or "ByteFallback" in types
        self.subword_prefix = model.get("continuing_subword_prefix") or "##"
        self.exact = self.kind in ("byte_level", "metaspace")
        strings: list[Optional[str]] = [None] * self.vocab_size
        for string, i in vocab.items():
            strings[i] = string
        self.strings = strings
        added_text = {i for i, token in added.items() if not token.special}
        self.token_bytes: list[Optional[bytes]] = [
            None if s is None or i in self.special else
            s.encode("utf-8") if i in added_text else self._bytes_of(i, s)
            for i, s in enumerate(strings)]
        self.byte_ids: dict[int, int] = {}
        for i, b in enumerate(self.token_bytes):
            if b is not None and len(b) == 1 and b[0] not in self.byte_ids:
                if self.kind == "byte_level" or _BYTE_PIECE.match(strings[i] or ""):
                    self.byte_ids[b[0]] = i
        self.starts_with_space = [b is not None and b[:1] != b"" and b[:1] in WHITESPACE for b in self.token_bytes]

    def _bytes_of(self, i: int, s: str) -> Optional[bytes]:
        if self.kind == "byte_level":
            try:
                return bytes(CHAR_TO_BYTE[c] for c in s)
            except KeyError:  # not a byte-level string (a token added by hand): its own text
                return s.encode("utf-8")
        if self.kind == "metaspace":
            match = _BYTE_PIECE.match(s) if self.byte_fallback else None
            if match:
                return bytes([int(match.group(1), 16)])
            return s.replace(self.replacement, " ").encode("utf-8")
        if self.kind == "wordpiece":
            return (s[len(self.subword_prefix):] if s.startswith(self.subword_prefix) else s).encode("utf-8")
        return self.backend.decode([i], skip_special_tokens=False).encode("utf-8")

    def text_id(self, i: int) -> bool:
        """The id is a token with text (not special, inside the vocabulary)."""
        return 0 <= i < self.vocab_size and self.token_bytes[i] is not None

    def fingerprint_part(self) -> bytes:
        spec = {k: v for k, v in self.spec.items() if k not in ("truncation", "padding")}
        return json.dumps([spec, sorted(self.special)], sort_keys=True, ensure_ascii=True).encode()


_INFO_CACHE: dict[int, tuple[object, TokenizerInfo]] = {}


def tokenizer_info(tokenizer) -> TokenizerInfo:
    """The cached `TokenizerInfo` of a tokenizer (transformers fast tokenizer or `tokenizers.Tokenizer`)."""
    if isinstance(tokenizer, TokenizerInfo):
        return tokenizer
    key = id(tokenizer)
    hit = _INFO_CACHE.get(key)
    if hit is not None:
        ref, info = hit
        alive = ref() if isinstance(ref, weakref.ref) else ref
        if alive is tokenizer and info.vocab_count == _backend(tokenizer).get_vocab_size(with_added_tokens=True):
            return info
    info = TokenizerInfo(tokenizer)
    try:
        ref = weakref.ref(tokenizer, lambda _r, k=key: _INFO_CACHE.pop(k, None))
    except TypeError:  # a Rust object without weak references: keep it alive with its info
        ref = tokenizer
    _INFO_CACHE[key] = (ref, info)
    return info


def token_bytes(tokenizer) -> list[Optional[bytes]]:
    """For every vocabulary id, the exact bytes the token contributes to running text; None for
    special tokens (and ids missing from the vocabulary).

    Byte-level BPE: through the byte<->unicode table (b"\\xe6" for a token holding the first byte of
    東); SentencePiece/Metaspace: "▁" -> b" ", "<0xE6>" -> b"\\xe6"; WordPiece: "##ris" -> b"ris" and
    "paris" -> b"paris" (the space that usually precedes a word-initial token is NOT included: it
    depends on context, so WordPiece answer spans come from offsets); other models: decode([id]).
    """
    return list(tokenizer_info(tokenizer).token_bytes)


# ------------------------------------------------------------------------------------ answer spans
def _char_to_byte_offsets(text: str) -> list[int]:
    out = [0]
    for ch in text:
        out.append(out[-1] + len(ch.encode("utf-8", "surrogatepass")))
    return out


def _ends_to_contiguous(ends: list[int]) -> list[tuple[int, int]]:
    spans, previous = [], 0
    for end in ends:
        end = max(end, previous)
        spans.append((previous, end))
        previous = end
    return spans


def answer_byte_spans(tokenizer, ids: Sequence[int]) -> tuple[list[Optional[tuple[int, int]]], bytes]:
    """(span of every token of one answer, the answer's bytes); spans are [start, end) byte offsets
    into the answer's bytes, None for special tokens (EOS, BOS, pad, unk).

    Byte-level and Metaspace tokenizers: spans are the cumulative token bytes (exact inside UTF-8
    characters; the first token's marker space is a leading b" "). Other tokenizers: the text is
    `decode(ids)`; if encoding it again gives back `ids`, spans come from the tokenizer's offsets,
    made contiguous (whitespace the tokens skip is given to the following token); otherwise from
    decoding growing prefixes (a token that ends inside a UTF-8 character then ends where that
    character starts).
    """
    info = tokenizer_info(tokenizer)
    ids = [int(i) for i in ids]
    text_ids = [i for i in ids if info.text_id(i)]
    positions = [k for k, i in enumerate(ids) if info.text_id(i)]
    spans: list[Optional[tuple[int, int]]] = [None] * len(ids)
    if info.exact:
        pos = 0
        for k in positions:
            b = info.token_bytes[ids[k]]
            spans[k] = (pos, pos + len(b))
            pos += len(b)
        return spans, b"".join(info.token_bytes[i] for i in text_ids)
    text = info.backend.decode(text_ids, skip_special_tokens=False)
    data = text.encode("utf-8", "surrogatepass")
    encoding = info.backend.encode(text, add_special_tokens=False)
    if list(encoding.ids) == text_ids:
        offsets = _char_to_byte_offsets(text)
        ends = [offsets[min(end, len(text))] for _, end in encoding.offsets]
    else:
        ends = []
        for n in range(1, len(text_ids) + 1):
            prefix = info.backend.decode(text_ids[:n], skip_special_tokens=False).encode("utf-8", "surrogatepass")
            common = 0
            limit = min(len(prefix), len(data))
            while common < limit and prefix[common] == data[common]:
                common += 1
            while 0 < common < len(data) and (data[common] & 0xC0) == 0x80:  # not inside a character
                common -= 1
            ends.append(common)
    for k, span in zip(positions, _ends_to_contiguous(ends)):
        spans[k] = span
    return spans, data


# ------------------------------------------------------------------------------------ grouping
@dataclass(frozen=True)
class Group:
    """Consecutive tokens of both sides that cover the same bytes [start, end) (common coordinates).

    `teacher` / `student`: indices of the tokens (into the answer's ids) in the group.
    """

    teacher: tuple[int, ...]
    student: tuple[int, ...]
    start: int
    end: int


def _group_by_ends(teacher_ends: list[Optional[int]], student_ends: list[Optional[int]], length: int,
                   cut_ok=None, leading_group: bool = False) -> tuple[list[Group], list[int], list[int]]:
    """Groups from token end offsets in one coordinate system, all within [0, length].

    `leading_group`: ends <= 0 (whitespace-only tokens before the text, in common coordinates) are
    boundaries too where both sides have one; otherwise tokens ending at or before 0 join group 0."""
    t_group = [-1] * len(teacher_ends)
    s_group = [-1] * len(student_ends)
    if length <= 0:
        return [], t_group, s_group
    common = {e for e in teacher_ends if e is not None and (leading_group or e > 0) and e < length}
    common &= {e for e in student_ends if e is not None and (leading_group or e > 0) and e < length}
    if cut_ok is not None:
        common = {e for e in common if e <= 0 or cut_ok(e)}
    bounds = sorted(common) + [length]
    members: list[tuple[list[int], list[int]]] = [([], []) for _ in bounds]
    for side, (ends, out) in enumerate(((teacher_ends, t_group), (student_ends, s_group))):
        for k, e in enumerate(ends):
            if e is None:
                continue
            g = bisect.bisect_left(bounds, e)
            out[k] = g
            members[g][side].append(k)
    groups, start = [], min(0, bounds[0])
    for g, end in enumerate(bounds):
        groups.append(Group(tuple(members[g][0]), tuple(members[g][1]), start, end))
        start = end
    return groups, t_group, s_group


def _common_ends(spans: Sequence[Optional[tuple[int, int]]], lead: int):
    return [None if span is None else span[1] - lead for span in spans]


def align_spans(teacher_spans: Sequence[Optional[tuple[int, int]]], student_spans: Sequence[Optional[tuple[int, int]]],
                *, teacher_lead: int = 0, student_lead: int = 0, length: Optional[int] = None) -> list[Group]:
    """The minimal groups of consecutive tokens covering the same bytes.

    Offsets are compared in common coordinates: `span - lead` of each side (lead = that side's leading
    whitespace, in bytes; offsets <= 0 lie in the leading whitespace), capped at `length`. A group ends
    exactly where both sides have a token ending at the same offset, so no group can be split further;
    whitespace-only leading tokens thus form groups of their own where both sides have one ending at
    the same distance from the text, and otherwise join the first group; tokens ending at `length` or beyond (trailing
    whitespace) the last; None spans (special tokens) join no group. Without `length` both sides must
    end at the same offset, else `UnalignedAnswer`.
    """
    t_ends = _common_ends(teacher_spans, teacher_lead)
    s_ends = _common_ends(student_spans, student_lead)
    if length is None:
        t_len = max((e for e in t_ends if e is not None), default=0)
        s_len = max((e for e in s_ends if e is not None), default=0)
        if t_len != s_len:
            raise UnalignedAnswer(f"the teacher's tokens cover {t_len} bytes, the student's {s_len}")
        length = t_len
    t_ends = [None if e is None else min(e, length) for e in t_ends]
    s_ends = [None if e is None else min(e, length) for e in s_ends]
    return _group_by_ends(t_ends, s_ends, length, leading_group=True)[0]


def _lead(data: bytes) -> int:
    return len(data) - len(data.lstrip(WHITESPACE))


@dataclass
class AnswerAlignment:
    """One aligned answer pair. Spans are in common coordinates (see `align_answer`); `text` is the
    shared answer bytes in those coordinates (no leading or trailing whitespace; no whitespace at all
    when `whitespace_free`)."""

    groups: list[Group]
    teacher_group_of_token: list[int]
    student_group_of_token: list[int]
    teacher_spans: list[Optional[tuple[int, int]]]
    student_spans: list[Optional[tuple[int, int]]]
    text: bytes
    whitespace_free: bool = False


def _non_whitespace_counts(data: bytes) -> list[int]:
    counts = [0]
    for b in data:
        counts.append(counts[-1] + (b not in WHITESPACE))
    return counts


def align_answer(teacher_tokenizer, teacher_answer_ids: Sequence[int], student_tokenizer,
                 student_answer_ids: Sequence[int]) -> AnswerAlignment:
    """Align one answer pair; raises `UnalignedAnswer` when the two do not cover the same text.

    Both sides byte-level/Metaspace: common coordinates are byte offsets after each side's leading
    whitespace, and the texts must agree byte for byte apart from whitespace at either end. If a side
    is WordPiece (or another tokenizer whose tokens do not carry their whitespace, so its decoded text
    need not reproduce the original spacing: "a,b" decodes as "a, b"), coordinates count non-whitespace
    bytes only (`whitespace_free`) and the texts must agree once all whitespace is removed.
    """
    t_spans, t_data = answer_byte_spans(teacher_tokenizer, teacher_answer_ids)
    s_spans, s_data = answer_byte_spans(student_tokenizer, student_answer_ids)
    whitespace_free = not (tokenizer_info(teacher_tokenizer).exact and tokenizer_info(student_tokenizer).exact)
    if whitespace_free:
        t_map, s_map = _non_whitespace_counts(t_data), _non_whitespace_counts(s_data)
        core = bytes(b for b in t_data if b not in WHITESPACE)
        other = bytes(b for b in s_data if b not in WHITESPACE)
    else:
        t_lead, s_lead = _lead(t_data), _lead(s_data)
        core, other = t_data[t_lead:].rstrip(WHITESPACE), s_data[s_lead:].rstrip(WHITESPACE)
        t_map = [min(i - t_lead, len(core)) for i in range(len(t_data) + 1)]
        s_map = [min(i - s_lead, len(core)) for i in range(len(s_data) + 1)]
    if core != other:
        raise UnalignedAnswer(f"teacher answer {t_data!r} and student answer {s_data!r} differ")
    t_common = [None if sp is None else (t_map[sp[0]], t_map[sp[1]]) for sp in t_spans]
    s_common = [None if sp is None else (s_map[sp[0]], s_map[sp[1]]) for sp in s_spans]
    groups, t_group, s_group = _group_by_ends([None if sp is None else sp[1] for sp in t_common],
                                              [None if sp is None else sp[1] for sp in s_common], len(core),
                                              leading_group=True)
    return AnswerAlignment(groups, t_group, s_group, t_common, s_common, core, whitespace_free)


def answer_groups(teacher_tokenizer, teacher_answer_ids: Sequence[int], student_tokenizer,
                  student_answer_ids: Sequence[int]) -> tuple[list[int], list[int]]:
    """(group of every teacher answer token, group of every student answer token); -1 = no group
    (EOS and other special tokens). Both sides have the same groups 0..G-1, in text order.

    Raises `UnalignedAnswer` (a ValueError) when the answers' texts differ after whitespace at either
    end (for example an `<unk>` on one side, or a lowercasing normalizer): catch it and count it.
    """
    alignment = align_answer(teacher_tokenizer, teacher_answer_ids, student_tokenizer, student_answer_ids)
    return alignment.teacher_group_of_token, alignment.student_group_of_token


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
    for part in _components(spec.get("pre_tokenizer")):
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
        save_file(tensors, str(path), metadata={"format": FORMAT_VERSION, "fingerprint": self.fingerprint})

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


def load_or_build_map(teacher_tokenizer, student_tokenizer, path) -> tuple[ProjectionMap, str]:
    """The pair's projection map from `path` when it was built for these tokenizers, else built and saved
    there (a cache: another pair's map is replaced). Returns (map, "loaded" | "built in N s")."""
    path = Path(path)
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
        node, reason = -1, None
        if student_spans[k][1] > teacher_spans[t0][1]:
            reason = "beyond_first_teacher_token"
        else:
            node = pmap.node_of(prefix, start_view if g == 0 else VIEW_INNER)
            if node < 0:
                reason = "prefix_not_in_trie"
            elif teacher_ids is not None:
                seq = pmap.sigma(int(teacher_ids[t0]), start_view if g == 0 else VIEW_INNER)
                consistent = seq[:len(prefix) + 1] == tuple(prefix) + (s_k,)
                counts["consistent" if consistent else "inconsistent"] += 1
                if strict and not consistent:
                    reason = "inconsistent"
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


# ------------------------------------------------------------------------------------ inspector
def _text_spans(info: TokenizerInfo, text: str, data: bytes) -> tuple[list[int], list[int]]:
    """(ids, end offset of every token in `data` = text.encode()), the tokenizer's own tokenization."""
    encoding = info.backend.encode(text, add_special_tokens=False)
    ids = list(encoding.ids)
    offsets = _char_to_byte_offsets(text)
    if info.exact:
        # token bytes, and for tokens without bytes (unk, an added special token typed in the text) the
        # input bytes of their offsets; the tokens' own prefix space (if any) is then a leading extra
        n = len(text)
        pieces = [info.token_bytes[i] if info.text_id(i) else data[offsets[min(a, n)]:offsets[min(b, n)]]
                  for i, (a, b) in zip(ids, encoding.offsets)]
        own = b"".join(pieces)
        extra = len(own) - len(data)
        if own == data or (extra > 0 and own.endswith(data) and not own[:extra].strip(WHITESPACE)):
            ends, pos = [], -max(extra, 0)
            for piece in pieces:
                pos += len(piece)
                ends.append(max(pos, 0))
            return ids, ends
    ends, previous = [], 0
    for _, end in encoding.offsets:
        previous = max(previous, offsets[min(end, len(text))])
        ends.append(previous)
    return ids, ends


def text_groups(teacher_tokenizer, student_tokenizer, text: str) -> list[dict]:
    """The inspector's groups of one text: [{"text", "teacher_ids", "student_ids"}], where the texts
    concatenate to `text`, the ids to each tokenizer's tokenization of `text` without special tokens,
    each group's tokens cover exactly its text and no group splits into two that do. Boundaries fall
    on character boundaries (two byte-level tokenizers that both split a character stay in one group)."""
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise UserError(f"the text is not valid Unicode ({error})") from error
    teacher, student = tokenizer_info(teacher_tokenizer), tokenizer_info(student_tokenizer)
    t_ids, t_ends = _text_spans(teacher, text, data)
    s_ids, s_ends = _text_spans(student, text, data)
    length = len(data)
    groups, _, _ = _group_by_ends([min(e, length) for e in t_ends], [min(e, length) for e in s_ends], length,
                                  cut_ok=lambda b: (data[b] & 0xC0) != 0x80)
    return [{"text": data[g.start:g.end].decode("utf-8"), "teacher_ids": [t_ids[i] for i in g.teacher],
             "student_ids": [s_ids[i] for i in g.student]} for g in groups]


def _dotted(row: dict, column: str):
    value = row
    for key in column.split("."):
        if isinstance(value, list):
            value = value[0] if value else None
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    if isinstance(value, list):
        value = value[0] if value else None
    return value


def read_column(path, column: str, limit: int = 0) -> list[str]:
    """The `column` (dotted path; the first item of a list) of every row of a .jsonl file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--file {path} does not exist")
    out = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise UserError(f"{path}:{n} is not JSON ({error.msg})") from error
            value = _dotted(row, column)
            if value is None:
                raise UserError(f"{path}:{n} has no column {column!r}")
            out.append(str(value))
            if limit and len(out) >= limit:
                break
    return out


def dataset_figures(teacher_tokenizer, student_tokenizer, answers: Sequence[str], *, teacher_separator: str = " ",
                    student_separator: str = " ", pmap: Optional[ProjectionMap] = None) -> dict:
    """Alignment and projection figures over answers tokenized as the trainer does (causal models):
    teacher `separator + answer` without EOS, student `separator + answer` + EOS."""
    teacher, student = tokenizer_info(teacher_tokenizer), tokenizer_info(student_tokenizer)
    eos = getattr(student_tokenizer, "eos_token_id", None)
    build_seconds = 0.0
    if pmap is None:
        started = time.perf_counter()
        pmap = ProjectionMap.build(teacher_tokenizer, student_tokenizer)
        build_seconds = time.perf_counter() - started
    t_all = [list(e.ids) for e in teacher.backend.encode_batch([teacher_separator + a for a in answers],
                                                               add_special_tokens=False)]
    s_all = [list(e.ids) + ([eos] if eos is not None else [])
             for e in student.backend.encode_batch([student_separator + a for a in answers], add_special_tokens=False)]
    counts: Counter = Counter()
    sizes: Counter = Counter()
    unaligned, largest, groups = 0, (0, 0), 0
    positions = text_positions = 0
    started = time.perf_counter()
    for t_ids, s_ids in zip(t_all, s_all):
        positions += len(s_ids)
        try:
            a = align_answer(teacher, t_ids, student, s_ids)
        except UnalignedAnswer:
            unaligned += 1
            counts["unaligned"] += len(s_ids)
            continue
        text_positions += sum(1 for g in a.student_group_of_token if g >= 0)
        for g in a.groups:
            shape = (len(g.teacher), len(g.student))
            sizes[shape] += 1
            groups += 1
            if sum(shape) > sum(largest):
                largest = shape
        projection_positions(a.teacher_group_of_token, a.student_group_of_token, a.teacher_spans, a.student_spans,
                             s_ids, pmap, teacher_ids=t_ids, counts=counts)
    align_seconds = time.perf_counter() - started
    served = counts["served"]
    return {
        "examples": len(answers), "unaligned_examples": unaligned, "groups": groups,
        "one_to_one_group_share": round(sizes[(1, 1)] / groups, 4) if groups else None,
        "largest_group": {"teacher_tokens": largest[0], "student_tokens": largest[1]},
        "most_common_group_shapes": {f"{t}:{s}": n for (t, s), n in sizes.most_common(6)},
        "student_positions": positions, "student_text_positions": text_positions,
        "served_share": round(served / positions, 4) if positions else None,
        "served_share_of_text_positions": round(served / text_positions, 4) if text_positions else None,
        "sigma_consistent_share_of_served": round(counts["consistent"] / served, 4) if served else None,
        "skipped": {k: counts[k] for k in ("special", "beyond_first_teacher_token", "prefix_not_in_trie", "unaligned")
                    if counts[k]},
        "map": {"nodes": pmap.num_nodes, "pairs": pmap.num_pairs, "build_seconds": round(build_seconds, 3)},
        "align_and_position_seconds_per_1000": round(align_seconds / max(len(answers), 1) * 1000, 3),
    }


def _token_label(info: TokenizerInfo, i: int) -> str:
    return info.strings[i] if 0 <= i < info.vocab_size and info.strings[i] is not None else f"<{i}>"


def format_groups(teacher_tokenizer, student_tokenizer, groups: list[dict]) -> str:
    """The inspector's side-by-side table."""
    teacher, student = tokenizer_info(teacher_tokenizer), tokenizer_info(student_tokenizer)
    def labels(info, ids):
        return " ".join(json.dumps(_token_label(info, i), ensure_ascii=False)[1:-1] for i in ids)

    rows = [("text", "teacher", "student")]
    for g in groups:
        rows.append((json.dumps(g["text"], ensure_ascii=False), labels(teacher, g["teacher_ids"]),
                     labels(student, g["student_ids"])))
    widths = [max(len(r[c]) for r in rows) for c in range(3)]
    lines = [" | ".join(r[c].ljust(widths[c]) for c in range(3)).rstrip() for r in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    one = sum(1 for g in groups if len(g["teacher_ids"]) == 1 and len(g["student_ids"]) == 1)
    n_teacher = sum(len(g["teacher_ids"]) for g in groups)
    n_student = sum(len(g["student_ids"]) for g in groups)
    lines.append(f"{len(groups)} groups, {one} one-to-one; teacher {n_teacher} tokens ({teacher.kind}), "
                 f"student {n_student} tokens ({student.kind})")
    return "\n".join(lines)


@dataclass(frozen=True)
class InspectFlags:
    """Flags of `python -m llm_recipes.alignment`."""

    teacher_tokenizer: str = option("", "a tokenizer folder (or tokenizer.json)")
    student_tokenizer: str = option("", "a tokenizer folder (or tokenizer.json)")
    text: Optional[str] = option(None, "show the groups of this text (--json: one JSON list of {text, teacher_ids, "
                                       "student_ids})")
    file: Optional[str] = option(None, "or: figures over the answers of a .jsonl file (1:1 groups, largest group, "
                                       "positions the projection serves)")
    column: str = option("answers.text", "--file: dotted path of the answer in each row (a list gives its first item)")
    json: bool = option(False, "machine-readable output")
    teacher_separator: str = option(" ", "--file: what precedes the answer on the teacher's side (plain prompt: \" \", "
                                         "chat prompt: \"\")")
    student_separator: str = option(" ", "--file: what precedes the answer on the student's side")
    limit: int = option(0, "--file: the first N rows only (0: all)")
    map: Optional[str] = option(None, "--file: a saved projection map (built and saved there if missing)")


COMMAND = Command(program="python -m llm_recipes.alignment", sections={"flags": InspectFlags},
                  summary="Shows how two tokenizers' tokens group by the text they cover (minimal groups of "
                          "consecutive tokens), or figures over a data set.")


def _load_tokenizer(path: str):
    if not path:
        raise UserError("--teacher_tokenizer and --student_tokenizer are required (tokenizer folders)")
    p = Path(path)
    try:
        if p.is_file() and p.suffix == ".json":
            from tokenizers import Tokenizer

            return Tokenizer.from_file(str(p))
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path)
    except Exception as error:  # noqa: BLE001 - shown to the user as one line
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UserError(f"cannot load tokenizer {path!r}: {first_line}") from error


def inspect(flags: InspectFlags) -> None:
    if flags.limit < 0:
        raise UserError(f"--limit must be a whole number >= 0, got {flags.limit}")
    if (flags.text is None) == (flags.file is None):
        raise UserError("give exactly one of --text or --file")
    teacher = _load_tokenizer(flags.teacher_tokenizer)
    student = _load_tokenizer(flags.student_tokenizer)
    if flags.text is not None:
        groups = text_groups(teacher, student, flags.text)
        print(json.dumps(groups, ensure_ascii=False) if flags.json else format_groups(teacher, student, groups))
        return
    answers = read_column(flags.file, flags.column, flags.limit)
    pmap = None
    if flags.map:
        if Path(flags.map).exists():
            pmap = ProjectionMap.load(flags.map, teacher, student)
        else:
            pmap = ProjectionMap.build(teacher, student)
            pmap.save(flags.map)
    figures = dataset_figures(teacher, student, answers, teacher_separator=flags.teacher_separator,
                              student_separator=flags.student_separator, pmap=pmap)
    figures = {"file": str(flags.file), "column": flags.column, **figures}
    if flags.json:
        print(json.dumps(figures))
        return
    for key, value in figures.items():
        print(f"{key}: {json.dumps(value, ensure_ascii=False) if isinstance(value, dict) else value}")


main, cli = entry_points(COMMAND, lambda parsed: inspect(parsed["flags"]))

if __name__ == "__main__":
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    cli()
