"""Cross-tokenizer alignment: which teacher and student answer tokens cover the same text, and a
projection of the teacher's next-token distribution onto the student's vocabulary.

Pairing the two answers' tokens by index compares predictions of different text as soon as the two
tokenizers split a number, a space or a multi-byte character differently. Everything here works on
bytes instead, from Hugging Face tokenizers only (no model, no GPU), one module per job:

- `tokens`: the UTF-8 bytes each vocabulary entry contributes to running text (`token_bytes`,
  `tokenizer_info`) and the byte span of every token of one answer (`answer_byte_spans`).
- `groups`: minimal groups of consecutive tokens covering the same bytes on both sides (`align_spans`,
  `align_answer`, `answer_groups`).
- `projection_map`: for every teacher token v, sigma(v) = the student's tokenization of v's text, stored
  as a trie over student-token prefixes (`ProjectionMap`, cached per tokenizer pair on disk:
  `load_or_build_map`); `projection_positions`, which says for every student answer token which teacher
  row and which trie node give its target; `shared_token_pairs`, tokens with identical bytes in both
  vocabularies (for the hybrid loss).
- `inspector`: `python -m llm_recipes.alignment --teacher_tokenizer T --student_tokenizer S --text "..."`
  (or `--file data.jsonl --column answers.text` for figures over a data set).

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
from llm_recipes.alignment.groups import (AnswerAlignment, Group, UnalignedAnswer, align_answer, align_spans,
                                          answer_groups)
from llm_recipes.alignment.projection_map import (VIEW_BARE, VIEW_INNER, VIEW_NAMES, VIEW_SPACED, ProjectionMap,
                                                  load_or_build_map, pair_fingerprint, projection_positions,
                                                  shared_token_pairs)
from llm_recipes.alignment.tokens import TokenizerInfo, answer_byte_spans, token_bytes, tokenizer_info

__all__ = ["AnswerAlignment", "Group", "ProjectionMap", "TokenizerInfo", "UnalignedAnswer", "VIEW_BARE", "VIEW_INNER",
           "VIEW_NAMES", "VIEW_SPACED", "align_answer", "align_spans", "answer_byte_spans", "answer_groups",
           "load_or_build_map", "pair_fingerprint", "projection_positions", "shared_token_pairs", "token_bytes",
           "tokenizer_info"]
