"""Cross-tokenizer losses with text alignment: the projected teacher, the hybrid, ULD and MultiLevelOT
paired by text, against the float64 references of llm_recipes.losses.reference (values and gradients),
on real tokenizations of the shipped tiny pair (BPE teacher, SentencePiece Unigram student)."""
import random
from collections import Counter

import pytest
import torch
from transformers import AutoTokenizer

from conftest import DEVICE
from configs.distillation import distillation_config
from configs.paths import TINY_ASSETS
from llm_recipes import alignment, data
from llm_recipes.config import parse_flags
from llm_recipes.errors import UserError
from llm_recipes.finetuning import train
from llm_recipes.losses import LossSpec, count_units, distillation_terms, reference
from llm_recipes.losses.pairing import IGNORE_INDEX, pair_by_groups
from llm_recipes.losses.family import PairArtifacts
from llm_recipes.losses.label_alignment import align_example, continuation_nodes

RTOL = 1e-6
ANSWERS = ["pale green parrot", "May", "Velmora", "night nurse", "Ostrava Nova", "sky blue sea turtle", "Zeno"]


@pytest.fixture(scope="module")
def pair():
    teacher = AutoTokenizer.from_pretrained(TINY_ASSETS / "teacher")
    student = AutoTokenizer.from_pretrained(TINY_ASSETS / "student")
    return {"teacher": teacher, "student": student, "map": alignment.ProjectionMap.build(teacher, student),
            "shared": alignment.shared_token_pairs(teacher, student)}


def batch_of(pair, answers, seed=0, encoder_decoder=False, end=False):
    """Labels of both sides as the trainer's loaders make them (student " a" + EOS, teacher " a"; `end`: teacher
    " a" + EOS, the two EOS tokens one more group, as with distill_eos), prompts of random and different lengths,
    and the alignment columns of the data pipeline (continuation nodes included)."""
    rng = random.Random(seed)
    rows = {"student": [], "teacher": [], "s_groups": [], "t_groups": [], "nodes": [], "continuations": []}
    student_eos, teacher_eos = pair["student"].eos_token_id, pair["teacher"].eos_token_id
    for answer in answers:
        s_ids = pair["student"](" " + answer, add_special_tokens=False)["input_ids"] + [student_eos]
        t_ids = pair["teacher"](" " + answer, add_special_tokens=False)["input_ids"] + ([teacher_eos] if end else [])
        s_labels = ([] if encoder_decoder else [IGNORE_INDEX] * rng.randint(1, 4)) + s_ids
        t_labels = [IGNORE_INDEX] * rng.randint(1, 5) + t_ids
        counts, shapes = Counter(), Counter()
        s_groups, t_groups, nodes, following = align_example(
            s_labels, t_labels, pair["student"], pair["teacher"], pair["map"], counts, shapes,
            ([student_eos], [teacher_eos]) if end else None, continuation=True)
        for key, value in zip(("student", "teacher", "s_groups", "t_groups", "nodes", "continuations"),
                              (s_labels, t_labels, s_groups, t_groups, nodes, following)):
            rows[key].append(value)
    padded = {key: data.pad(value, IGNORE_INDEX if key in ("student", "teacher") else -1)
              for key, value in rows.items()}
    return padded


def logits_like(labels, vocab, seed, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*labels.shape, vocab, generator=g, dtype=torch.float64) * scale).to(DEVICE)


def spec_for(pair, name, chunk=1024, **config):
    end = ((pair["teacher"].eos_token_id,), pair["student"].eos_token_id)
    return LossSpec.from_config(distillation_config(**config), name=name, student_vocab_size=len(pair["student"]),
                                teacher_vocab_size=len(pair["teacher"]), same_tokenizer=False, chunk_size=chunk,
                                artifacts=PairArtifacts(projection_map=pair["map"], shared_tokens=pair["shared"],
                                                        end_tokens=end))


def engine_value(spec, zs, s_labels, zt, t_labels, align):
    terms = distillation_terms(spec, zs, s_labels, lambda rows: rows, zt, t_labels, lambda rows: rows,
                               with_ce=False, alignment=align)
    return terms, terms.distill_sum / max(terms.distill_count, 1)


def value_and_grad(fn, z):
    z = z.detach().clone().requires_grad_()
    value = fn(z)
    (grad,) = torch.autograd.grad(value, z)
    return value.detach(), grad


def assert_close(a, b, rtol=RTOL):
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    assert torch.allclose(a, b, rtol=rtol, atol=rtol * max(1.0, float(b.abs().max()))), (a, b)


def alignment_of(b):
    return {"student_groups": b["s_groups"], "teacher_groups": b["t_groups"], "student_nodes": b["nodes"],
            "student_continuations": b["continuations"]}


# ------------------------------------------------------------------------------------------- pairing
@pytest.mark.parametrize("with_nodes", [False, True])
def test_pairing_by_groups_matches_the_reference(pair, with_nodes):
    b = batch_of(pair, ANSWERS, seed=1)
    found = pair_by_groups(b["student"], b["teacher"], b["s_groups"], b["t_groups"],
                           student_nodes=b["nodes"] if with_nodes else None)
    expected_s, expected_t = [], []
    for row, s, t in reference.text_paired(b["student"], b["teacher"], b["s_groups"], b["t_groups"],
                                           student_nodes=b["nodes"] if with_nodes else None):
        expected_s += [row * b["student"].shape[1] + entry[0] for entry in s]
        expected_t += [row * b["teacher"].shape[1] + entry[0] for entry in t]
    assert found.student_rows[: found.num_paired].tolist() == expected_s
    assert found.teacher_rows.tolist() == expected_t
    assert found.ce_count == int((b["student"] != IGNORE_INDEX).sum())  # every answer row stays in CE
    if with_nodes:  # every served token (all but EOS on this pair) has its node; the EOS rows are unpaired
        assert found.num_paired == int((b["nodes"] >= 0).sum()) == found.ce_count - len(ANSWERS)
        assert found.nodes.tolist() == [n for row in b["nodes"].tolist() for n in row if n >= 0]
    else:  # one pair per group
        assert found.num_paired == sum(len(set(g for g in row if g >= 0)) for row in b["s_groups"].tolist())


@pytest.mark.device
# ---------------------------------------------------------------------------------------- projected
@pytest.mark.parametrize("divergence", ["kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("chunk", [3, 1024])
def test_projected_matches_the_reference(pair, divergence, temperature, chunk):
    b = batch_of(pair, ANSWERS, seed=2)
    zs, zt = logits_like(b["student"], len(pair["student"]), 3), logits_like(b["teacher"], len(pair["teacher"]), 4)
    spec = spec_for(pair, "projected", chunk, projected_divergence=divergence, temperature=temperature,
                    jsd_beta=0.3, skew_alpha=0.2)
    kind = {"kl": "forward", "jsd": "jsd", "skew_kl": "skew_forward", "skew_reverse_kl": "skew_reverse",
            "tvd": "tvd"}[divergence]
    ref, g_ref = value_and_grad(lambda z: reference.projected(
        z, b["student"], zt, b["teacher"], b["s_groups"], b["t_groups"], b["nodes"], pair["map"], kind=kind,
        temperature=temperature, beta=0.3, alpha=0.2), zs)
    terms, _ = engine_value(spec, zs, b["student"], zt, b["teacher"], alignment_of(b))
    value, g = value_and_grad(lambda z: engine_value(spec, z, b["student"], zt, b["teacher"], alignment_of(b))[1], zs)
    assert terms.distill_count == int((b["nodes"] >= 0).sum())
    assert_close(value, ref)
    assert_close(g, g_ref)


# Sampled answers stop and break off inside words: "b" is the teacher's "Ġb", which longer teacher tokens extend;
# "bl" is "Ġb" "l" (a group of two teacher tokens)
STOPS = ANSWERS + ["b", "Velm", "sky bl", "pa", "gre", "Ost", "night nur", "b green", "gre parrot", "night nur sea",
                   "bl sea", "go dog", "tast sea"]


@pytest.mark.parametrize("divergence, temperature, chunk", [("kl", 1.0, 1024), ("kl", 2.0, 3), ("jsd", 1.0, 5),
                                                            ("tvd", 0.7, 2)])
@pytest.mark.parametrize("end", [True, False])
def test_projected_continuation_matches_the_reference(pair, divergence, temperature, chunk, end):
    """projected_continuation: every group start after a one-token group that longer teacher tokens extend takes
    the mixed target (float64 reference), values and gradients; small chunks put the row that predicted the group
    before in another chunk than the row it serves."""
    b = batch_of(pair, STOPS, seed=4, end=end)
    assert int((b["continuations"] >= 0).sum()) >= 2
    pairing = pair_by_groups(b["student"], b["teacher"], b["s_groups"], b["t_groups"], student_nodes=b["nodes"],
                             student_continuations=b["continuations"])
    assert pairing.previous_inner_rows.numel() >= 1  # a group of several teacher tokens before a continued one
    zs, zt = logits_like(b["student"], len(pair["student"]), 5), logits_like(b["teacher"], len(pair["teacher"]), 6)
    spec = spec_for(pair, "projected", chunk, projected_divergence=divergence, temperature=temperature,
                    projected_continuation=True, distill_eos=end)
    assert spec.options.continuation and spec.family.continues_groups(spec.options)
    kind = {"kl": "forward", "jsd": "jsd", "tvd": "tvd"}[divergence]
    end_ids = ([pair["teacher"].eos_token_id], pair["student"].eos_token_id) if end else None

    def ref_value(z, continuations):
        return reference.projected(z, b["student"], zt, b["teacher"], b["s_groups"], b["t_groups"], b["nodes"],
                                   pair["map"], kind=kind, temperature=temperature, student_continuations=continuations,
                                   end=end_ids)

    ref, g_ref = value_and_grad(lambda z: ref_value(z, b["continuations"]), zs)
    value, g = value_and_grad(lambda z: engine_value(spec, z, b["student"], zt, b["teacher"], alignment_of(b))[1], zs)
    assert_close(value, ref)
    assert_close(g, g_ref)
    plain = ref_value(zs, None)  # the mix changes the value: the test can fail
    assert abs(float(plain) - float(ref)) > 1e-6


def test_continuation_nodes_hold_exactly_the_longer_teacher_tokens(pair):
    """Brute force over the teacher's vocabulary: a continued token's node pairs every teacher token whose sigma
    (in the previous group's view) strictly extends that group's student tokens, and nothing else."""
    pmap, student, teacher = pair["map"], pair["student"], pair["teacher"]
    checked = 0
    for answer in STOPS:
        s_ids = student(" " + answer, add_special_tokens=False)["input_ids"]
        t_ids = teacher(" " + answer, add_special_tokens=False)["input_ids"]
        found = alignment.align_answer(teacher, t_ids, student, s_ids)
        for k, node in continuation_nodes(found.groups, s_ids, pmap):
            g = next(i for i, group in enumerate(found.groups) if group.student and group.student[0] == k) - 1
            view = alignment.VIEW_INNER if g else pmap.start_view(s_ids[0])
            prefix = tuple(s_ids[i] for i in found.groups[g].student)
            expected = {(v, pmap.sigma(v, view)[len(prefix)]) for v in range(len(teacher))
                        if len(pmap.sigma(v, view)) > len(prefix) and pmap.sigma(v, view)[:len(prefix)] == prefix}
            teacher_ids, student_ids = pmap.node_pairs(node)
            assert set(zip(teacher_ids.tolist(), student_ids.tolist())) == expected and expected
            checked += 1
    assert checked >= 3


def test_a_nan_teacher_row_before_a_continued_token_makes_the_term_nan(pair):
    """The mixed target reads the rows before; NaN there must reach the loss (the trainer then names it), never be
    dropped by the mix. The row predicting the second token of a two-token group serves no target but the mix's
    weight of that group, so only the mix can carry its NaN."""
    b = batch_of(pair, STOPS, seed=4, end=True)
    zs, zt = logits_like(b["student"], len(pair["student"]), 5), logits_like(b["teacher"], len(pair["teacher"]), 6)
    pairing = pair_by_groups(b["student"], b["teacher"], b["s_groups"], b["t_groups"], student_nodes=b["nodes"],
                             student_continuations=b["continuations"])
    row = int(pairing.previous_inner_rows[0])
    assert row not in pairing.teacher_rows.tolist()
    zt.reshape(-1, zt.shape[-1])[row] = float("nan")
    spec = spec_for(pair, "projected", 4, projected_continuation=True, distill_eos=True)
    _, value = engine_value(spec, zs, b["student"], zt, b["teacher"], alignment_of(b))
    assert torch.isnan(value)


def test_continued_target_by_hand(pair):
    """The student wrote "b" and stopped. From the row before, the teacher writes "Ġb" with 0.2 and longer tokens
    that continue past it with 0.8; after "Ġb" it ends (EOS) with certainty. The plain end target is all EOS;
    the continued one gives EOS 0.2 and the longer tokens' next student pieces 0.8."""
    pmap, teacher = pair["map"], pair["teacher"]
    t_b = teacher(" b", add_special_tokens=False)["input_ids"][0]
    node = pmap.node_of(pmap.sigma(t_b, alignment.VIEW_SPACED), alignment.VIEW_SPACED)
    longer_ids, next_pieces = pmap.node_pairs(node)
    assert node >= 0 and longer_ids.numel() >= 2
    previous = torch.zeros(len(teacher), dtype=torch.float64)
    previous[t_b] = 0.2
    previous[longer_ids] = 0.8 / longer_ids.numel()
    student_eos = pair["student"].eos_token_id
    plain = torch.zeros(len(pair["student"]), dtype=torch.float64)
    plain[student_eos] = 1.0
    mixed = reference.continued_target(plain, previous, t_b, node, pmap)
    assert float(mixed.sum()) == pytest.approx(1.0)
    assert float(mixed[student_eos]) == pytest.approx(0.2)
    for u in set(next_pieces.tolist()):
        assert float(mixed[u]) == pytest.approx(0.8 * float((next_pieces == u).sum()) / longer_ids.numel())
    # a group of two teacher tokens whose second one the teacher gives 0.5: the written path weighs 0.2 x 0.5
    mixed = reference.continued_target(plain, previous, t_b, node, pmap, later=0.5)
    assert float(mixed[student_eos]) == pytest.approx(0.1 / 0.9)


def test_projected_target_gives_the_actual_next_token_most_of_the_mass(pair):
    """With a one-hot teacher on the actual next teacher token, the target's mode is the actual student token
    at every served position (sigma is consistent on this pair)."""
    b = batch_of(pair, ANSWERS, seed=3)
    hits = total = 0
    for row, s, t in reference.text_paired(b["student"], b["teacher"], b["s_groups"], b["t_groups"],
                                           student_nodes=b["nodes"]):
        for (_, target, node), (t_row, _) in zip(s, t):
            p = torch.zeros(len(pair["teacher"]), dtype=torch.float64)
            p[int(b["teacher"][row, t_row + 1])] = 1.0
            projected = reference.projected_target(p, node, pair["map"])
            hits += int(projected is not None and int(projected.argmax()) == target)
            total += 1
    assert total > 10 and hits == total

@pytest.mark.device

def test_projected_bf16_and_no_paired_rows(pair):
    b = batch_of(pair, ANSWERS[:3], seed=5)
    zs = logits_like(b["student"], len(pair["student"]), 6).to(torch.bfloat16)
    zt = logits_like(b["teacher"], len(pair["teacher"]), 7).to(torch.bfloat16)
    spec = spec_for(pair, "projected")
    ref = reference.projected(zs.double(), b["student"], zt.double(), b["teacher"], b["s_groups"], b["t_groups"],
                              b["nodes"], pair["map"])
    _, value = engine_value(spec, zs, b["student"], zt, b["teacher"], alignment_of(b))
    assert_close(value, ref, rtol=1e-5)
    none = {key: torch.full_like(v, -1) for key, v in alignment_of(b).items()}
    terms, value = engine_value(spec, zs.float().requires_grad_(), b["student"], zt, b["teacher"], none)
    assert terms.distill_count == 0 and float(value.detach()) == 0.0 and terms.ce_count > 0


@pytest.mark.device
# ------------------------------------------------------------------------------------------- hybrid
@pytest.mark.parametrize("weights", [(None, None), (1.0, 0.5)])
@pytest.mark.parametrize("chunk", [2, 1024])
def test_hybrid_matches_the_reference(pair, weights, chunk):
    b = batch_of(pair, ANSWERS, seed=8)
    zs, zt = logits_like(b["student"], len(pair["student"]), 9), logits_like(b["teacher"], len(pair["teacher"]), 10)
    spec = spec_for(pair, "hybrid", chunk, hybrid_matched_weight=weights[0], hybrid_unmatched_weight=weights[1],
                    temperature=1.5, jsd_beta=0.4)
    ref, g_ref = value_and_grad(lambda z: reference.hybrid(
        z, b["student"], zt, b["teacher"], b["s_groups"], b["t_groups"], pair["shared"][0], pair["shared"][1],
        temperature=1.5, beta=0.4, matched_weight=weights[0], unmatched_weight=weights[1]), zs)
    value, g = value_and_grad(lambda z: engine_value(spec, z, b["student"], zt, b["teacher"], alignment_of(b))[1], zs)
    assert_close(value, ref)
    assert_close(g, g_ref, rtol=1e-5)


@pytest.mark.device
# --------------------------------------------------------------------------- ULD / MultiLevelOT by text
@pytest.mark.parametrize("loss", ["uld", "multilevel_ot"])
def test_uld_and_multilevel_ot_by_text_match_the_reference(pair, loss):
    b = batch_of(pair, ANSWERS, seed=11)
    zs, zt = logits_like(b["student"], len(pair["student"]), 12), logits_like(b["teacher"], len(pair["teacher"]), 13)
    spec = spec_for(pair, loss, chunk=1024, top_k=7)
    groups = (b["s_groups"], b["t_groups"])
    fn = reference.uld if loss == "uld" else lambda *a, **k: reference.multilevel_ot(*a, top_k=7, **k)
    ref, g_ref = value_and_grad(lambda z: fn(z, b["student"], zt, b["teacher"], groups=groups), zs)
    value, g = value_and_grad(lambda z: engine_value(spec, z, b["student"], zt, b["teacher"], alignment_of(b))[1], zs)
    assert spec.alignment == "text"
    assert_close(value, ref)
    assert_close(g, g_ref, rtol=1e-5)
    units = count_units(spec, b["student"], b["teacher"], alignment_of(b))
    assert units == (int((b["student"] != IGNORE_INDEX).sum()), len(ANSWERS))


# --------------------------------------------------------------------------------------- the trainer
@pytest.mark.slow
@pytest.mark.parametrize("loss", ["projected", "hybrid", "uld"])
def test_trainer_distils_across_tokenizers_by_text(tmp_path, capsys, loss):
    flags = {"distillation": True, "distillation_config.loss": loss, "max_train_step": 6, "save_step": 3,
             "output_dir": str(tmp_path), "lr": 1e-3, "val_batch_size": 16, "max_eval_step": 2}
    result = train(parse_flags(flags))
    out = capsys.readouterr().out
    assert "answer tokens paired by text" in out and "text alignment:" in out and "0 examples unaligned" in out
    assert result["state"]["global_step"] == 6 and torch.isfinite(torch.tensor(result["eval"]["eval_distill"]))
    if loss == "projected":  # the pair's map is cached by the tokenizers' content, outside the run's folder
        teacher, student = (AutoTokenizer.from_pretrained(str(TINY_ASSETS / name)) for name in ("teacher", "student"))
        cached = alignment.projection_map.pair_cache_dir(teacher, student) / alignment.projection_map.MAP_FILE
        assert cached.is_file() and "projection map: " in out and str(cached) in out
        assert not (tmp_path / "projection_map.safetensors").exists()
        assert "projection serves 75.6% of the student's answer tokens" in out


def test_projected_resume_gives_the_same_weights(tmp_path):
    from safetensors.torch import load_file

    flags = {"distillation": True, "distillation_config.loss": "projected", "num_epochs": 1, "max_train_step": 8,
             "save_step": 4, "save_all": True, "lr": 1e-3, "run_validation": False, "dataset.training_size": 0.02}
    train(parse_flags({**flags, "output_dir": str(tmp_path / "a")}))
    train(parse_flags({**flags, "output_dir": str(tmp_path / "b"),
                       "resume_from": str(tmp_path / "a" / "checkpoints" / "step-0000004")}))
    a = load_file(str(tmp_path / "a" / "last" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "last" / "model.safetensors"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


@pytest.mark.slow
def test_hidden_states_pair_by_text_across_tokenizers(tmp_path):
    flags = {"distillation": True, "distillation_config.hidden_weight": 1.0,
             "distillation_config.hidden_alignment": "text", "max_train_step": 3, "output_dir": str(tmp_path),
             "run_validation": False}
    result = train(parse_flags(flags))
    assert result["state"]["global_step"] == 3


@pytest.mark.parametrize("flags, message", [
    ({"distillation_config.loss": "projected", "distillation_config.alignment": "index"},
     "needs --distillation_config.alignment text"),
    ({"distillation_config.projected_divergence": "reverse_kl"}, "reverse_kl is infinite"),
    ({"distillation_config.alignment": "byte"}, "--distillation_config.alignment must be one of"),
    ({"distillation_config.hidden_weight": 1.0}, "hidden_alignment text"),
])
def test_refusals(tmp_path, flags, message):
    with pytest.raises(UserError, match=message):
        train(parse_flags({"distillation": True, "output_dir": str(tmp_path), **flags}))


@pytest.mark.device
# ---------------------------------------------------------------------------------------- the public API
@pytest.mark.parametrize("loss", ["projected", "hybrid"])
def test_public_text_losses_equal_the_trainers_chunked_path(pair, loss):
    """projected_loss / hybrid_loss align the answers their label ids spell and give exactly the trainer's value
    and gradient (its data pipeline's alignment columns, its chunked engine)."""
    from llm_recipes.losses import hybrid_loss, projected_loss

    b = batch_of(pair, ANSWERS, seed=3)
    zs = logits_like(b["student"], len(pair["student"]), 5).float()
    zt = logits_like(b["teacher"], len(pair["teacher"]), 6).float()
    spec = spec_for(pair, loss, chunk=4, temperature=2.0, jsd_beta=0.3)
    expected, g_expected = value_and_grad(
        lambda z: engine_value(spec, z, b["student"], zt, b["teacher"], alignment_of(b))[1], zs)
    tokenizers = (pair["student"], pair["teacher"])
    if loss == "projected":
        def public(z):  # the pair's map from the on-disk cache (built on first use)
            return projected_loss(z, b["student"], zt, b["teacher"], tokenizers=tokenizers, temperature=2.0, beta=0.3,
                                  chunk_size=4)
    else:
        def public(z):
            return hybrid_loss(z, b["student"], zt, b["teacher"], tokenizers=tokenizers, temperature=2.0, beta=0.3,
                               chunk_size=4)
    value, grad = value_and_grad(public, zs)
    assert float(expected) > 0 and torch.equal(value, expected) and torch.equal(grad, g_expected)
    with pytest.raises(UserError, match="student and teacher batches differ in size"):
        projected_loss(zs[:2], b["student"][:2], zt, b["teacher"], tokenizers=tokenizers)
