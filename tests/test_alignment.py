"""llm_recipes.alignment: byte spans, minimal groups, the projection trie, the inspector CLI.

Small tokenizers are built here with the `tokenizers` library so that they split the same text
differently: digits ("421" one token vs "4" "2" "1"), leading spaces (prefix space added or not),
CJK/emoji (byte-level byte tokens vs SentencePiece byte fallback vs a whole piece), SentencePiece
markers (Metaspace pre-tokenizer and the Llama-2-style Replace normalizer), WordPiece "##".
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import json  # noqa: E402
import random  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import zlib  # noqa: E402
from collections import Counter  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parent.parent

from llm_recipes import alignment as al  # noqa: E402
from llm_recipes.alignment import inspector  # noqa: E402
from llm_recipes.errors import UserError  # noqa: E402

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
WORDS = ["Paris", "the", "hello", "world", "green", "parrot", "lizard", "421", "7", "night", "nurse", "of", "is"]
ALPHABET = list("abcdefghijklmnopqrstuvwxyzAPW0123456789 ,.!?'-\n") + ["東", "京", "é", "😀", "  "]


def _corpus(extra=()):
    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(8)) for _ in range(200)]
    return lines + ["421 421 421 the 421"] * 40 + list(extra)


def _wrap(tok):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def _byte_level(add_prefix_space: bool, extra=(), vocab_size=330, digits=None):
    """Byte-level BPE; `digits` True/False: numbers split from the space before them, one digit per
    token (Qwen style) or whole (Llama-3 style, " 421" -> "Ġ" "421")."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space)
    if digits is not None:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=digits),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(extra), trainer)
    return _wrap(tok)


def _pieces(words):
    chars = sorted(set("".join(WORDS)) | set("abcdefghijklmnopqrstuvwxyzAPW0123456789,.!?'-"))
    vocab = [(s, 0.0) for s in SPECIALS] + [("\u2581", -4.0)] + [(c, -5.0) for c in chars]
    vocab += [(w, -3.0) for w in words]
    return vocab


def _sentencepiece_llama_style():
    """Llama-2 style: Prepend("▁") + Replace(" ", "▁") normalizer, no pre-tokenizer, Unigram with byte
    fallback, digits one per piece, 東 unknown (byte pieces)."""
    from tokenizers import Tokenizer, decoders, models, normalizers

    words = ["\u2581Paris", "\u2581the", "\u2581hel", "lo", "\u2581world", "\u2581gre", "en", "\u2581parrot", "ris",
             "\u2581Pa", "\u2581li", "zard", "\u2581night", "\u2581nur", "se", "\u2581of", "\u2581is"]
    vocab = _pieces(words) + [(f"<0x{b:02X}>", -10.0) for b in range(256)]
    tok = Tokenizer(models.Unigram(vocab, unk_id=3, byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    from tokenizers import AddedToken

    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    return _wrap(tok)


def _sentencepiece_metaspace():
    """Metaspace pre-tokenizer (prepend "first"), Unigram without byte fallback: 東, 京, "421" whole pieces."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    words = ["\u2581Paris", "\u2581the", "\u2581hello", "\u2581wor", "ld", "\u2581green", "\u2581par", "rot",
             "\u2581lizard", "421", "\u2581421", "東", "京", "\u2581東京", "\u2581night", "\u2581nurse", "\u2581of"]
    tok = Tokenizer(models.Unigram(_pieces(words), unk_id=3, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    return _wrap(tok)


def _wordpiece():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordPiece(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(_corpus(["hello, world. Paris!"] * 5),
                            trainers.WordPieceTrainer(vocab_size=120, special_tokens=SPECIALS, show_progress=False))
    return _wrap(tok)


@pytest.fixture(scope="module")
def toks():
    from transformers import AutoTokenizer

    return {
        "bl": _byte_level(False),  # Llama-3 style: no prefix space; 東 = 3 byte tokens; "421" one token
        "bl_cjk": _byte_level(True, extra=["東京 東 京 東京"] * 30, vocab_size=360),  # prefix space; 東 merged
        "num": _byte_level(False, digits=False),  # " 421" -> "Ġ" "421"
        "digit": _byte_level(False, digits=True),  # " 421" -> "Ġ" "4" "2" "1"
        "sp": _sentencepiece_llama_style(),
        "ms": _sentencepiece_metaspace(),
        "wp": _wordpiece(),
        "tiny_t": AutoTokenizer.from_pretrained(REPO / "assets/tiny/teacher"),
        "tiny_s": AutoTokenizer.from_pretrained(REPO / "assets/tiny/student"),
    }


PAIRS = [("bl", "sp"), ("bl", "ms"), ("sp", "ms"), ("bl", "wp"), ("ms", "bl"), ("bl_cjk", "bl"), ("wp", "sp"),
         ("tiny_t", "tiny_s"), ("sp", "bl_cjk")]


def _random_text(rng, n_max=14):
    return "".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, n_max)))


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def _offset_ends(tok, text):
    """Independent token ends (bytes) from the tokenizer's own character offsets, made monotone."""
    enc = tok.backend_tokenizer.encode(text, add_special_tokens=False)
    table = al.token_bytes(tok)
    to_byte = [0]
    for ch in text:
        to_byte.append(to_byte[-1] + len(ch.encode()))
    ends, last = [], 0
    offsets = list(enc.offsets)
    for n, (i, (start, end)) in enumerate(zip(enc.ids, offsets)):
        if table[i] is not None and not table[i].strip() and n + 1 < len(offsets) and offsets[n + 1][0] < end:
            end = start  # a marker-only token ("▁" prepended by Metaspace) claims the next token's character
        last = max(last, to_byte[end])
        ends.append(last)
    return ends


# ------------------------------------------------------------------------------------ token bytes
def test_token_bytes_per_family(toks):
    bl = al.token_bytes(toks["bl"])
    assert bl[toks["bl"].convert_tokens_to_ids("Ġthe")] == b" the"
    assert bl[toks["bl"].eos_token_id] is None
    east = _ids(toks["bl"], "東")
    assert len(east) == 3 and [bl[i] for i in east] == [b"\xe6", b"\x9d", b"\xb1"]
    sp = al.token_bytes(toks["sp"])
    assert sp[toks["sp"].convert_tokens_to_ids("\u2581Paris")] == b" Paris"
    assert sp[toks["sp"].convert_tokens_to_ids("<0xE6>")] == b"\xe6"
    assert sp[toks["sp"].unk_token_id] is None
    wp = al.token_bytes(toks["wp"])
    cont = [t for t in toks["wp"].get_vocab() if t.startswith("##")][0]
    assert wp[toks["wp"].convert_tokens_to_ids(cont)] == cont[2:].encode()
    assert al.tokenizer_info(toks["ms"]).kind == "metaspace" and al.tokenizer_info(toks["sp"]).kind == "metaspace"
    assert al.tokenizer_info(toks["wp"]).kind == "wordpiece" and al.tokenizer_info(toks["tiny_t"]).kind == "byte_level"
    # the exact families' bytes concatenate to the tokenizer's own decoding (bar a prefix space)
    rng = random.Random(1)
    for name in ("bl", "bl_cjk", "sp", "ms", "tiny_t", "tiny_s"):
        tok, table = toks[name], al.token_bytes(toks[name])
        for _ in range(30):
            text = _random_text(rng)
            ids = _ids(tok, text)
            if any(table[i] is None for i in ids):
                continue
            own = b"".join(table[i] for i in ids)
            assert own.lstrip(b" ") == tok.decode(ids).encode().lstrip(b" "), (name, text)


# ------------------------------------------------------------------------------------ spans and groups
def test_answer_byte_spans_partial_characters_and_prefix_space(toks):
    spans, data = al.answer_byte_spans(toks["bl"], _ids(toks["bl"], " 東") + [toks["bl"].eos_token_id])
    assert data == " 東".encode() and spans[-1] is None
    assert [s for s in spans if s] and spans[0][0] == 0 and spans[-2][1] == 4
    assert all(a[1] == b[0] for a, b in zip(spans[:-2], spans[1:-1]))  # contiguous, byte-exact
    spans, data = al.answer_byte_spans(toks["sp"], _ids(toks["sp"], "東"))
    assert data == " 東".encode()  # the prepended marker is a leading space
    assert spans == [(0, 1), (1, 2), (2, 3), (3, 4)]  # ▁ <0xE6> <0x9D> <0xB1>
    spans, data = al.answer_byte_spans(toks["wp"], _ids(toks["wp"], " hello world") + [toks["wp"].eos_token_id])
    assert data == b"hello world" and spans[-1] is None
    assert spans[-2][1] == len(data) and spans[0][0] == 0


def test_answer_groups_student_leading_space_and_eos(toks):
    teacher, student = toks["bl"], toks["sp"]
    t_ids = _ids(teacher, "Paris 421 東")  # a chat-prompted teacher: no leading space, no EOS
    s_ids = _ids(student, " Paris 421 東") + [student.eos_token_id]
    t_groups, s_groups = al.answer_groups(teacher, t_ids, student, s_ids)
    assert s_groups[-1] == -1 and -1 not in s_groups[:-1] and -1 not in t_groups
    assert max(t_groups) == max(s_groups) and sorted(set(t_groups)) == list(range(max(t_groups) + 1))
    assert t_groups == sorted(t_groups) and s_groups[:-1] == sorted(s_groups[:-1])
    a = al.align_answer(teacher, t_ids, student, s_ids)
    texts = [a.text[g.start:g.end] for g in a.groups]
    assert b"".join(texts) == "Paris 421 東".encode()
    digit_group = next(g for g in a.groups if a.text[g.start:g.end].strip() == b"421")
    assert len(digit_group.teacher) == 1 and len(digit_group.student) == 4  # "Ġ421" vs "▁" "4" "2" "1"
    # both sides split 東 into its three bytes: three one-to-one groups of one byte each
    assert texts[-3:] == [b"\xe6", b"\x9d", b"\xb1"]
    assert all(len(g.teacher) == len(g.student) == 1 for g in a.groups[-3:])
    # byte-level with a prefix space vs. Metaspace "first"
    t2 = toks["bl_cjk"]
    t_groups, s_groups = al.answer_groups(t2, _ids(t2, "東京"), toks["ms"], _ids(toks["ms"], " 東京") + [2])
    assert s_groups[-1] == -1 and max(t_groups) == max(s_groups) == 0
    with pytest.raises(al.UnalignedAnswer):
        al.answer_groups(teacher, _ids(teacher, "Paris"), student, _ids(student, " Pari") + [2])


def test_leading_space_tokens_on_both_sides_form_their_own_group(toks):
    teacher, student = toks["num"], toks["digit"]
    t_ids, s_ids = _ids(teacher, " 421"), _ids(student, " 421") + [student.eos_token_id]
    assert teacher.convert_ids_to_tokens(t_ids) == ["Ġ", "421"]
    assert student.convert_ids_to_tokens(s_ids[:-1]) == ["Ġ", "4", "2", "1"]
    a = al.align_answer(teacher, t_ids, student, s_ids)
    assert [(g.teacher, g.student) for g in a.groups] == [((0,), (0,)), ((1,), (1, 2, 3))]
    assert a.groups[0].end == 0 and a.text == b"421"
    pmap = al.ProjectionMap.build(teacher, student)
    counts = Counter()
    t_index, nodes = al.projection_positions(a.teacher_group_of_token, a.student_group_of_token, a.teacher_spans,
                                             a.student_spans, s_ids, pmap, teacher_ids=t_ids, counts=counts)
    assert t_index == [0, 1, 1, 1, -1] and counts["served"] == 4 and counts["consistent"] == 4
    # one-hot teacher on "421": the projected targets are "4", then "2" after "4", then "1" after "4" "2"
    probs = torch.zeros(3, pmap.teacher_vocab_size)
    probs[:, t_ids[1]] = 1.0
    q = pmap.project(probs, nodes[1:4])
    assert q.argmax(dim=1).tolist() == s_ids[1:4] and torch.allclose(q.max(dim=1).values, torch.ones(3))


def test_wordpiece_side_aligns_without_whitespace(toks):
    teacher, student = toks["bl"], toks["wp"]
    t_ids = _ids(teacher, "hello,world 421")
    s_ids = _ids(student, " hello,world 421") + [student.eos_token_id]
    _, s_text = al.answer_byte_spans(student, s_ids)
    assert s_text != b"hello,world 421"  # WordPiece decoding does not give the spacing back
    a = al.align_answer(teacher, t_ids, student, s_ids)
    assert a.whitespace_free and a.text == b"hello,world421"
    assert a.student_group_of_token[-1] == -1 and len(a.groups) >= 3
    for g in a.groups:
        t_text = b"".join(al.token_bytes(teacher)[t_ids[i]] for i in g.teacher).replace(b" ", b"")
        s_text = b"".join(al.token_bytes(student)[s_ids[i]] for i in g.student)
        assert t_text == s_text == a.text[g.start:g.end]


def test_file_figures_through_the_cli(tmp_path, capsys):
    rows = [{"answers": {"text": ["pale green parrot"]}}, {"answers": {"text": ["May", "x"]}}]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert inspector.read_column(data, "answers.text") == ["pale green parrot", "May"]
    flags = inspector.InspectFlags(teacher_tokenizer=str(REPO / "assets/tiny/teacher"),
                            student_tokenizer=str(REPO / "assets/tiny/student"), file=str(data), json=True,
                            map=str(tmp_path / "m.safetensors"))
    inspector.inspect(flags)
    figures = json.loads(capsys.readouterr().out)
    assert figures["examples"] == 2 and figures["served_share_of_text_positions"] == 1.0
    assert figures["student_positions"] == figures["student_text_positions"] + 2  # the two EOS
    inspector.inspect(flags)  # the map saved by the first run is loaded and checked
    assert json.loads(capsys.readouterr().out)["groups"] == figures["groups"]
    with pytest.raises(UserError, match="no column"):
        inspector.read_column(data, "answer")


def test_align_spans_leading_whitespace_is_absorbed():
    # teacher "ĠParis" (0,6) vs student "▁Pa" "ris" (0,3)(3,6) + EOS, teacher lead 1, student lead 1
    groups = al.align_spans([(0, 6)], [(0, 3), (3, 6), None], teacher_lead=1, student_lead=1)
    assert groups == [al.Group((0,), (0, 1), 0, 5)]
    # teacher "Paris" (no space) vs student "▁" "Paris" (a separate marker token)
    groups = al.align_spans([(0, 2), (2, 5)], [(0, 1), (1, 3), (3, 6)], teacher_lead=0, student_lead=1)
    assert groups == [al.Group((0,), (0, 1), 0, 2), al.Group((1,), (2,), 2, 5)]
    with pytest.raises(al.UnalignedAnswer):
        al.align_spans([(0, 4)], [(0, 5)])


def _check_groups(tok_t, tok_s, text, groups):
    data = text.encode()
    assert "".join(g["text"] for g in groups) == text
    assert [i for g in groups for i in g["teacher_ids"]] == _ids(tok_t, text)
    assert [i for g in groups for i in g["student_ids"]] == _ids(tok_s, text)
    # each group's tokens cover exactly its text (checked from token bytes, independent of the spans)
    for side, tok in (("teacher_ids", tok_t), ("student_ids", tok_s)):
        info = al.tokenizer_info(tok)
        for n, g in enumerate(groups):
            pieces = [info.token_bytes[i] for i in g[side]]
            if any(p is None for p in pieces):
                continue
            own, want = b"".join(pieces), g["text"].encode()
            if info.kind == "wordpiece":
                assert own == bytes(b for b in want if b not in b" \t\n\r\x0b\x0c") or not own, (text, g)
            elif n == 0 and own != want:
                assert own.endswith(want) and not own[:len(own) - len(want)].strip(), (text, g)  # a prefix space
            else:
                assert own == want, (text, g)
    # minimality: no position inside a group (at a character boundary) where both sides have a token end
    t_ends, s_ends = _offset_ends(tok_t, text), _offset_ends(tok_s, text)
    start = 0
    for g in groups:
        end = start + len(g["text"].encode())
        inside = {e for e in t_ends if start < e < end} & {e for e in s_ends if start < e < end}
        inside = {e for e in inside if (data[e] & 0xC0) != 0x80}
        assert not inside, (text, g, inside)
        start = end


@pytest.mark.parametrize("pair", PAIRS, ids=["-".join(p) for p in PAIRS])
def test_inspector_invariants_on_random_text(toks, pair):
    tok_t, tok_s = toks[pair[0]], toks[pair[1]]
    rng = random.Random(zlib.crc32("-".join(pair).encode()))
    texts = ["", " ", "421", " Paris 421", "東京 😀 é", "hello  world\n", "  the parrot,"]
    texts += [_random_text(rng, 20) for _ in range(120)]
    for text in texts:
        _check_groups(tok_t, tok_s, text, inspector.text_groups(tok_t, tok_s, text))


def test_minimal_groups_on_digits_and_cjk(toks):
    groups = inspector.text_groups(toks["bl"], toks["sp"], "421")
    assert [g["text"] for g in groups] == ["421"]  # one teacher token, three student ones
    groups = inspector.text_groups(toks["sp"], toks["ms"], " 4212")
    assert [g["text"] for g in groups] == [" 421", "2"]
    groups = inspector.text_groups(toks["bl"], toks["bl_cjk"], "東京")  # both byte-level: cut only between characters
    assert [g["text"] for g in groups] in (["東", "京"], ["東京"])
    assert all(len(g["text"]) >= 1 for g in groups)


# ------------------------------------------------------------------------------------ projection map
_SIGMAS = {}


def _sigmas(pmap):
    """sigma of every teacher token in every view, read once from the map's sigma table."""
    if id(pmap) not in _SIGMAS:
        _SIGMAS[id(pmap)] = [[pmap.sigma(v, view) for v in range(pmap.teacher_vocab_size)] for view in range(3)]
    return _SIGMAS[id(pmap)]


def _brute_pairs(pmap, view, prefix):
    """The pairs of a prefix by definition: every (v, sigma(v)[d]) with sigma(v) extending the prefix."""
    d, prefix = len(prefix), tuple(prefix)
    return sorted((v, seq[d]) for v, seq in enumerate(_sigmas(pmap)[view]) if len(seq) > d and seq[:d] == prefix)


MAP_PAIRS = [("tiny_t", "tiny_s"), ("bl", "sp"), ("bl", "ms"), ("bl", "wp"), ("sp", "bl_cjk"), ("tiny_t", "tiny_t")]


@pytest.fixture(scope="module")
def maps(toks):
    return {p: al.ProjectionMap.build(toks[p[0]], toks[p[1]]) for p in MAP_PAIRS}


@pytest.mark.parametrize("pair", MAP_PAIRS, ids=["-".join(p) for p in MAP_PAIRS])
def test_trie_against_brute_force(toks, maps, pair):
    pmap = maps[pair]
    teacher, student = al.tokenizer_info(toks[pair[0]]), al.tokenizer_info(toks[pair[1]])
    # sigma spells the teacher token's text in student tokens (exact student families)
    for v, data in enumerate(teacher.token_bytes):
        seq = pmap.sigma(v)
        if data is None:
            assert seq == ()
            continue
        if not seq:
            continue
        spelled = b"".join(student.token_bytes[u] for u in seq)
        if student.kind == "wordpiece":
            assert spelled == bytes(b for b in data if b not in b" \t\n\r\x0b\x0c"), (v, data, seq)
        else:
            assert spelled == data, (v, data, seq)
    # every node's pairs are exactly the brute-force pairs of its sequence; non-nodes have none
    prefixes = {(view, seq[:d]) for view, seqs in enumerate(_sigmas(pmap)) for seq in seqs for d in range(len(seq))}
    assert len(prefixes) == pmap.num_nodes
    for view, prefix in prefixes:
        node = pmap.node_of(prefix, view)
        assert node >= 0 and int(pmap.node_depth[node]) == len(prefix)
        t_ids, s_ids = pmap.node_pairs(node)
        assert sorted(zip(t_ids.tolist(), s_ids.tolist())) == _brute_pairs(pmap, view, prefix)
    assert pmap.node_of([student.vocab_size + 5]) == -1
    # the batched slices and the dense reference projection
    nodes = [pmap.node_of(p, view) for view, p in sorted(prefixes)[:25]] + [-1]
    rows, t_ids, s_ids = pmap.pairs(nodes)
    assert (rows[1:] >= rows[:-1]).all() and int((rows == len(nodes) - 1).sum()) == 0
    logits = torch.randn(len(nodes), pmap.teacher_vocab_size + 3, generator=torch.Generator().manual_seed(0),
                         dtype=torch.float64)
    probs = torch.softmax(logits, dim=1)
    q = pmap.project(probs, nodes)
    for r, (view, prefix) in enumerate(sorted(prefixes)[:25]):
        want = torch.zeros(pmap.student_vocab_size, dtype=torch.float64)
        for v, u in _brute_pairs(pmap, view, prefix):
            want[u] += probs[r, v]
        assert torch.allclose(q[r], want / want.sum())
    assert q[-1].abs().sum() == 0


def test_same_tokenizer_projection_is_identity(maps, toks):
    pmap = maps[("tiny_t", "tiny_t")]
    info = al.tokenizer_info(toks["tiny_t"])
    plain = [v for v, b in enumerate(info.token_bytes) if b]
    assert sum(pmap.sigma(v) == (v,) for v in plain) / len(plain) > 0.99


def _reference_positions(a, s_ids, t_ids, pmap):
    """Plain re-statement of projection_positions' rules, with brute-force trie lookups."""
    first_student = next(s for s, g in zip(s_ids, a.student_group_of_token) if g >= 0)
    start = al.VIEW_SPACED if bool(pmap.student_starts_with_space[first_student]) else al.VIEW_BARE
    out = []
    for k, g in enumerate(a.student_group_of_token):
        if g < 0:
            out.append((-1, -1, "special"))
            continue
        t0 = a.teacher_group_of_token.index(g)
        prefix = tuple(s_ids[j] for j in range(k) if a.student_group_of_token[j] == g)
        view = start if g == 0 else al.VIEW_INNER
        if a.student_spans[k][1] > a.teacher_spans[t0][1]:
            out.append((-1, -1, "beyond_first_teacher_token"))
        elif not _brute_pairs(pmap, view, prefix):
            out.append((-1, -1, "prefix_not_in_trie"))
        else:
            out.append((t0, pmap.node_of(prefix, view), "served"))
    return out


@pytest.mark.parametrize("pair", MAP_PAIRS[:5], ids=["-".join(p) for p in MAP_PAIRS[:5]])
def test_projection_positions_against_reference(toks, maps, pair):
    tok_t, tok_s = toks[pair[0]], toks[pair[1]]
    pmap = maps[pair]
    rng = random.Random(7)
    answers = ["Paris", "421", "the green parrot", "東京", "night nurse 7"] + [
        " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 3))) for _ in range(25)]
    checked = 0
    for answer in answers:
        t_ids = _ids(tok_t, answer)  # chat-style teacher: no leading space
        s_ids = _ids(tok_s, " " + answer) + [tok_s.eos_token_id]
        try:
            a = al.align_answer(tok_t, t_ids, tok_s, s_ids)
        except al.UnalignedAnswer:
            continue
        counts = Counter()
        t_index, nodes = al.projection_positions(a.teacher_group_of_token, a.student_group_of_token, a.teacher_spans,
                                                 a.student_spans, s_ids, pmap, teacher_ids=t_ids, counts=counts)
        ref = _reference_positions(a, s_ids, t_ids, pmap)
        assert list(zip(t_index, nodes)) == [(t, n) for t, n, _ in ref], answer
        assert counts["served"] == sum(r == "served" for *_, r in ref)
        assert counts["special"] == 1 and sum(counts[k] for k in ("served", "special", "beyond_first_teacher_token",
                                                                  "prefix_not_in_trie")) == len(s_ids)
        checked += 1
    assert checked >= 20


def test_first_group_views_map_unspaced_teacher_to_spaced_student(toks, maps):
    pmap = maps[("bl", "sp")]
    bl = toks["bl"]
    paris = bl.convert_tokens_to_ids("Paris") if "Paris" in bl.get_vocab() else None
    v = paris if paris is not None else _ids(bl, "Paris")[0]
    spaced = pmap.sigma(v, al.VIEW_SPACED)
    assert spaced and al.token_bytes(toks["sp"])[spaced[0]].startswith(b" ")
    inner = pmap.sigma(v, al.VIEW_INNER)
    assert inner and not al.token_bytes(toks["sp"])[inner[0]].startswith(b" ")  # mid-word: no marker


def test_save_load_round_trip_and_fingerprint(tmp_path, toks, maps):
    pmap = maps[("bl", "sp")]
    path = tmp_path / "map.safetensors"
    pmap.save(path)
    loaded = al.ProjectionMap.load(path, toks["bl"], toks["sp"])
    for name in al.ProjectionMap.TENSORS:
        assert torch.equal(getattr(loaded, name), getattr(pmap, name)), name
    assert loaded.fingerprint == pmap.fingerprint == al.pair_fingerprint(toks["bl"], toks["sp"])
    assert loaded.node_of(pmap.sigma(5)[:1]) == pmap.node_of(pmap.sigma(5)[:1])
    with pytest.raises(UserError, match="built for other tokenizers"):
        al.ProjectionMap.load(path, toks["bl"], toks["ms"])
    with pytest.raises(UserError, match="does not exist"):
        al.ProjectionMap.load(tmp_path / "missing.safetensors")
    # only tensors are stored: torch's safe loader reads the file's tensors as well
    from safetensors.torch import load_file

    assert set(load_file(str(path))) == set(al.ProjectionMap.TENSORS)


def test_shared_token_pairs(toks):
    t_ids, s_ids = al.shared_token_pairs(toks["tiny_t"], toks["tiny_s"])
    tb, sb = al.token_bytes(toks["tiny_t"]), al.token_bytes(toks["tiny_s"])
    assert len(t_ids) == len(s_ids) > 100
    assert all(tb[v] == sb[u] for v, u in zip(t_ids.tolist(), s_ids.tolist()))
    assert len(set(t_ids.tolist())) == len(t_ids) and len(set(s_ids.tolist())) == len(s_ids)


def test_tiny_pair_figures(toks):
    rows = [json.loads(line) for line in (REPO / "assets/tiny/data/validation.jsonl").open()]
    answers = [r["answers"]["text"][0] for r in rows]
    figures = inspector.dataset_figures(toks["tiny_t"], toks["tiny_s"], answers)
    assert figures["unaligned_examples"] == 0 and figures["examples"] == len(answers)
    assert 0.4 < figures["one_to_one_group_share"] < 0.8
    assert figures["largest_group"]["teacher_tokens"] == 1  # every teacher word is one token
    assert figures["served_share_of_text_positions"] == 1.0
    assert figures["sigma_consistent_share_of_served"] == 1.0
    assert figures["skipped"] == {"special": len(answers)}  # only the student's EOS


# ------------------------------------------------------------------------------------ CLI
def _cli(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.run([sys.executable, "-m", "llm_recipes.alignment", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def test_cli_json_through_fire(tmp_path, toks, monkeypatch, capsys):
    toks["bl"].save_pretrained(tmp_path / "bl")
    text = "421 東京, pale green"
    argv = ["--teacher_tokenizer", str(REPO / "assets/tiny/teacher"), "--student_tokenizer", str(tmp_path / "bl"),
            "--text", text, "--json"]
    monkeypatch.setattr(sys, "argv", ["alignment"] + argv)
    inspector.cli()
    out = capsys.readouterr().out
    assert len(out.strip().splitlines()) == 1
    groups = json.loads(out)
    _check_groups(toks["tiny_t"], toks["bl"], text, groups)


@pytest.mark.slow
def test_cli_unknown_flag_is_an_error():
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    result = subprocess.run([sys.executable, "-m", "llm_recipes.alignment", "--teacher_tokenizer", "t",
                             "--student_tokenizer", "s", "--text", "x", "--colour", "red"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: unknown flag --colour")


def test_flag_parsing_keeps_text_verbatim():
    from llm_recipes.flags import parse

    flags = parse(inspector.COMMAND, {"teacher_tokenizer": "t", "student_tokenizer": "s", "text": 421},
                  argv=["--teacher_tokenizer", "t", "--student_tokenizer", "s", "--text", "0421"])["flags"]
    assert flags.text == "0421"
    with pytest.raises(UserError, match="unknown flag --textt"):
        parse(inspector.COMMAND, {"textt": "x"})
    with pytest.raises(UserError, match="exactly one of"):
        inspector.inspect(inspector.InspectFlags(teacher_tokenizer="t", student_tokenizer="s"))


