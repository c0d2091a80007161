"""What each token of a tokenizer contributes to running text, as bytes, and the byte span of every
token of an answer (the coordinates every alignment works in; llm_recipes.alignment explains them)."""
from __future__ import annotations

import json
import re
import weakref
from typing import Optional, Sequence

from llm_recipes.errors import UserError

WHITESPACE = b" \t\n\r\x0b\x0c"

_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


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


def components(node):
    """Every dict of a normalizer / pre-tokenizer / decoder tree (members of a Sequence included)."""
    if isinstance(node, dict):
        yield node
        for value in node.values():
            if isinstance(value, (dict, list)):
                yield from components(value)
    elif isinstance(node, list):
        for item in node:
            yield from components(item)


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
        parts = [p for key in ("normalizer", "pre_tokenizer", "decoder") for p in components(self.spec.get(key))]
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
def char_to_byte_offsets(text: str) -> list[int]:
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
        offsets = char_to_byte_offsets(text)
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


