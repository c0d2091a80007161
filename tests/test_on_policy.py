"""On-policy distillation (llm_recipes/on_policy.py): sampling, the rebuilt batch, its terms, bad answers, the
flags, resume; on the shipped tiny pair (the student with its own tokenizer, and the one with the teacher's)."""
import json
import math
import os

import pytest
import torch
from safetensors.torch import load_file

from configs.paths import TINY_ASSETS
from llm_recipes import objective, on_policy
from llm_recipes.config import parse_flags
from llm_recipes.data import move
from llm_recipes.errors import UserError
from llm_recipes.finetuning import epoch_micro_batches, setup, train, train_step

STUDENT, SAME = str(TINY_ASSETS / "student_pretrained"), str(TINY_ASSETS / "student_same_pretrained")


def flags(out, **extra) -> dict:
    return {"distillation": True, "model_name": STUDENT, "output_dir": str(out), "batch_size_training": 4,
            "distillation_config.lmbda": 1.0, "distillation_config.on_policy_max_new_tokens": 12,
            "max_eval_step": 2, "lr": 1e-3, "scheduler": "constant", **extra}


@pytest.fixture(scope="module")
def student():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(STUDENT).eval(), AutoTokenizer.from_pretrained(STUDENT)


def prompts(tokenizer, n=6):
    texts = [f"Context: person {i} lives in oslo. Question: where does person {i} live? Answer:" for i in range(n)]
    return [[tokenizer.bos_token_id] + tokenizer(t, add_special_tokens=False)["input_ids"][: 8 + 3 * i]
            for i, t in enumerate(texts)]  # ragged: left padding matters


# ---------------------------------------------------------------------------------------------- sampling
def test_sampling_is_deterministic_with_a_seed_and_ends_at_eos(student):
    model, tokenizer = student
    eos = on_policy.eos_ids(model, tokenizer)
    settings = on_policy.Sampling(1.0, 12, 1.0, 1.0)

    def draw(seed):
        torch.manual_seed(seed)
        return on_policy.sample_answers(model, prompts(tokenizer), settings, eos, tokenizer.pad_token_id,
                                        torch.device("cpu"))

    first, again, other = draw(0), draw(0), draw(1)
    assert first == again and first != other
    for answer in first:
        assert 1 <= len(answer) <= 12 and (answer[-1] in eos or len(answer) == 12)
        assert all(token not in eos for token in answer[:-1])  # cut at its first EOS


def test_a_cold_sampler_gives_the_greedy_answers_of_generate(student):
    """Temperature -> 0 is argmax: the sampler's left padding and positions give generate's greedy tokens."""
    model, tokenizer = student
    eos = on_policy.eos_ids(model, tokenizer)
    batch = prompts(tokenizer)
    sampled = on_policy.sample_answers(model, batch, on_policy.Sampling(1.0, 10, 1e-4, 1.0), eos,
                                       tokenizer.pad_token_id, torch.device("cpu"))
    for prompt, answer in zip(batch, sampled):  # one prompt at a time: no padding at all
        greedy = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                do_sample=False, max_new_tokens=10, pad_token_id=tokenizer.pad_token_id)[0]
        greedy = greedy[len(prompt):].tolist()
        end = next((i + 1 for i, token in enumerate(greedy) if token in eos), len(greedy))
        assert answer == greedy[:end]


# ----------------------------------------------------------------------------------- the rebuilt batch
LOSSES = [(STUDENT, "projected", {}), (STUDENT, "hybrid", {}), (STUDENT, "uld", {}),
          (STUDENT, "uld", {"distillation_config.alignment": "index"}), (STUDENT, "multilevel_ot", {}),
          (SAME, "kl", {}), (SAME, "jsd", {}), (SAME, "reverse_kl", {}), (SAME, "tvd", {})]


@pytest.mark.parametrize("model_name, loss, extra", LOSSES)
def test_the_on_policy_term_of_an_answer_equals_the_off_policy_term_of_the_same_text(tmp_path, model_name, loss,
                                                                                     extra):
    """The student 'samples' exactly the data set's answers: the rebuilt batch is the data set's batch, token
    for token (alignment columns included), and every loss gives the same term and units."""
    state = setup(parse_flags(flags(tmp_path, model_name=model_name, **{"distillation_config.loss": loss}, **extra)))
    batch = next(epoch_micro_batches(state, 0))
    sampled = on_policy.answers_of(batch["student"])  # " answer" + EOS, as the student would write it
    rebuilt = state.on_policy.rebuild(batch, sampled, state.pad_ids)
    for side in ("student", "teacher"):
        assert set(rebuilt[side]) == set(batch[side]) - {"cache"}
        for key in rebuilt[side]:
            assert torch.equal(rebuilt[side][key], batch[side][key]), (side, key)
    state.models.student.eval()
    device = state.info.device
    sampled_answers = objective.Answers.SAMPLED
    off = objective.compute_terms(state.objective, state.models, move(batch, device), device, sampled_answers)
    on = objective.compute_terms(state.objective, state.models, move(rebuilt, device), device, sampled_answers)
    assert on.counts == off.counts and on.counts.ce == 0 and on.counts.distill > 0
    assert torch.equal(on.sums["distill"], off.sums["distill"]) and float(on.sums["ce"].detach()) == 0.0


def test_bad_answers_are_counted_and_give_no_nan(tmp_path):
    """An EOS at once, an answer cut at the token limit, and a text the teacher cannot be given (an unknown
    token has no text) give no units and no NaN; each is counted."""
    state = setup(parse_flags(flags(tmp_path)))
    batch = next(epoch_micro_batches(state, 0))
    tokenizer, eos = state.student_tokenizer, state.on_policy.eos
    good = on_policy.answers_of(batch["student"])[3]
    unk = tokenizer.unk_token_id
    sampled = [[eos[0]], tokenizer(" oslo oslo oslo", add_special_tokens=False)["input_ids"][:5],
               tokenizer(" new", add_special_tokens=False)["input_ids"] + [unk] + [eos[0]], good]
    stats = on_policy.Stats()
    rebuilt = on_policy.on_policy_batch(batch, sampled, state.on_policy.tokenizers, state.pad_ids,
                                        same_tokenizer=False, text_groups=True,
                                        projection_map=state.on_policy.projection_map, eos=eos, stats=stats,
                                        end=state.on_policy.end)
    assert (stats.answers, stats.empty, stats.cut, stats.unaligned) == (4, 1, 1, 0)  # <unk> has no text: aligned
    assert stats.tokens == sum(len(s) for s in sampled)
    terms = objective.compute_terms(state.objective, state.models, rebuilt, state.info.device,
                                    objective.Answers.SAMPLED)
    assert math.isfinite(float(terms.sums["distill"].detach())) and terms.counts.distill > 0
    line = stats.line()
    assert (line["sampled_empty"], line["sampled_cut"], line["sampled_unaligned"]) == (1, 1, 0)


def test_a_text_the_teachers_tokenizer_cannot_reproduce_is_counted_unaligned(tiny):
    """A byte-level student writes "é", which the WordPiece teacher of the fixtures only knows as [UNK]: the two
    answers do not spell the same text, so the answer gets no pairs and is counted."""
    from transformers import AutoTokenizer

    from llm_recipes.data import collate

    student, teacher = (AutoTokenizer.from_pretrained(tiny[name]) for name in ("teacher", "student"))
    prompt_s, prompt_t = student("where? answer:")["input_ids"], teacher("where? answer:")["input_ids"]
    batch = {"student": collate([{"input_ids": prompt_s, "labels": [-100] * len(prompt_s),
                                  "attention_mask": [1] * len(prompt_s)}] * 2, student.pad_token_id),
             "teacher": collate([{"input_ids": prompt_t, "labels": [-100] * len(prompt_t),
                                  "attention_mask": [1] * len(prompt_t)}] * 2, teacher.pad_token_id)}
    sampled = [student(" oslo é", add_special_tokens=False)["input_ids"] + [student.eos_token_id],
               student(" oslo", add_special_tokens=False)["input_ids"] + [student.eos_token_id]]
    stats = on_policy.Stats()
    rebuilt = on_policy.on_policy_batch(batch, sampled, (student, teacher), (student.pad_token_id,
                                        teacher.pad_token_id), same_tokenizer=False, text_groups=True,
                                        eos=[student.eos_token_id], stats=stats)
    assert stats.unaligned == 1 and stats.empty == 0
    groups = rebuilt["student"]["alignment_group"]
    assert (groups[0] == -1).all() and (groups[1] >= 0).any()


@pytest.mark.parametrize("distill_eos", [True, False])
def test_a_step_whose_answers_are_all_empty(tmp_path, monkeypatch, distill_eos):
    """Every answer an EOS at once: with the end of the answer distilled (the default with lmbda > 0) the step
    trains the students' stop against the teacher's (one unit per answer, a finite loss); without it the step has
    no units and is skipped. Neither gives a NaN; the empty answers are counted."""
    state = setup(parse_flags(flags(tmp_path, **{"distillation_config.distill_eos": distill_eos})))
    eos = state.on_policy.eos
    monkeypatch.setattr(on_policy, "sample_answers", lambda model, prompts, *args, **kwargs: [[eos[0]]] * len(prompts))
    if distill_eos:
        metrics = train_step(state, [next(epoch_micro_batches(state, 0))])
        assert math.isfinite(metrics["loss"]) and metrics["loss"] > 0 and "ce" not in metrics
    else:
        with pytest.warns(UserWarning, match="no answer tokens"):
            metrics = train_step(state, [next(epoch_micro_batches(state, 0))])
        assert "loss" not in metrics and metrics["tokens"] == 0
    assert metrics["on_policy"] and state.on_policy.stats.empty == 4


def test_the_end_of_the_answer_is_distilled(tmp_path):
    """distill_eos: the teacher's answers end with its EOS, the two EOS tokens form the last text group, and the
    projected target at the student's EOS row holds the teacher's probability of ending (its EOS column) where
    off it would be left out; with lmbda 0 it is off by default (the seeds' teacher answers, without EOS)."""
    from llm_recipes.data import batch_alignment
    from llm_recipes.losses.projection import projected_target

    off_flags = {k: v for k, v in flags(tmp_path / "off").items() if "on_policy" not in k and "lmbda" not in k}
    plain = setup(parse_flags(off_flags))
    state = setup(parse_flags(flags(tmp_path / "on")))
    assert not plain.plan.distill_eos and state.plan.distill_eos
    off, on = (next(epoch_micro_batches(s, 0)) for s in (plain, state))
    t_eos, s_eos = state.on_policy.tokenizers[1].eos_token_id, state.student_tokenizer.eos_token_id
    for row_off, row_on in zip(off["teacher"]["labels"].tolist(), on["teacher"]["labels"].tolist()):
        answer_off, answer_on = [x for x in row_off if x != -100], [x for x in row_on if x != -100]
        assert answer_on == answer_off + [t_eos] and t_eos not in answer_off
    align = batch_alignment(on)
    for b in range(on["student"]["labels"].shape[0]):
        labels = on["student"]["labels"][b]
        last = int((labels != -100).nonzero().max())
        assert int(labels[last]) == s_eos and int(align["student_groups"][b, last]) >= 0
        assert int(align["student_nodes"][b, last]) >= 0  # served
    projection = state.objective.spec.options.projection
    teacher = torch.zeros(1, projection.teacher_vocab_size)
    teacher[0, t_eos] = 20.0  # a teacher sure the answer ends here
    node = torch.tensor([projection.roots[0]])
    target, served = projected_target(teacher, node, projection, 1.0, projection.student_vocab_size)
    assert bool(served[0]) and float(target[0, s_eos]) > 0.9
    plain_projection = plain.objective.spec.options.projection
    target, _ = projected_target(teacher, node, plain_projection, 1.0, projection.student_vocab_size)
    assert float(target[0, s_eos]) == 0.0


def test_projected_continuation_is_on_with_lmbda_and_reaches_the_data_and_sampled_batches(tmp_path):
    """projected_continuation: off by default with lmbda 0 (no continuation_node column: the old trainer), on with
    lmbda > 0; the data set's batches and the rebuilt sampled ones carry the column, and a sampled answer that
    stops inside a teacher token gets a continuation node at its EOS."""
    off_flags = {k: v for k, v in flags(tmp_path / "off").items() if "on_policy" not in k and "lmbda" not in k}
    plain = setup(parse_flags(off_flags))
    state = setup(parse_flags(flags(tmp_path / "on")))
    assert not plain.plan.continuation and state.plan.continuation and state.on_policy.continuation
    assert "continuation_node" not in next(epoch_micro_batches(plain, 0))["student"]
    batch = next(epoch_micro_batches(state, 0))
    assert "continuation_node" in batch["student"]
    tokenizer, eos = state.student_tokenizer, state.on_policy.eos
    stopped = tokenizer(" b", add_special_tokens=False)["input_ids"] + [eos[0]]  # "Ġb" for the teacher: "Ġbrown", ...
    rebuilt = state.on_policy.rebuild(batch, [stopped] * len(on_policy.answers_of(batch["student"])), state.pad_ids)
    labels, following = rebuilt["student"]["labels"][0], rebuilt["student"]["continuation_node"][0]
    last = int((labels != -100).nonzero().max())
    assert int(labels[last]) in eos and int(following[last]) >= 0
    explicit = setup(parse_flags({**off_flags, "output_dir": str(tmp_path / "explicit"),
                                  "distillation_config.projected_continuation": True}))
    assert explicit.plan.continuation and "continuation_node" in next(epoch_micro_batches(explicit, 0))["student"]


def test_projected_continuation_is_refused_with_a_teacher_cache(tmp_path):
    given = {k: v for k, v in flags(tmp_path).items() if "on_policy" not in k and "lmbda" not in k}
    with pytest.raises(UserError, match="projected_continuation reads the teacher's row before each group's token"):
        parse_flags({**given, "distillation_config.projected_continuation": True,
                     "distillation_config.teacher_cache": "somewhere"})


# ------------------------------------------------------------------------------------------- training
def test_an_on_policy_run_logs_its_answers_and_resumes_bit_for_bit(tmp_path, capsys):
    common = flags(tmp_path, **{"distillation_config.lmbda": 0.5, "max_train_step": 8, "save_step": 4,
                                "save_all": True, "run_validation": False})
    train(parse_flags({**common, "output_dir": str(tmp_path / "a")}))
    assert "on-policy with probability 0.5" in capsys.readouterr().out
    train(parse_flags({**common, "output_dir": str(tmp_path / "b"),
                       "resume_from": str(tmp_path / "a" / "checkpoints" / "step-0000004")}))
    a, b = (load_file(str(tmp_path / x / "last" / "model.safetensors")) for x in ("a", "b"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    lines = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    train_lines = [line for line in lines if line["type"] == "train"]
    pattern = [line["on_policy"] for line in train_lines]
    assert 0 < sum(pattern) < len(pattern)  # both kinds of steps at lmbda 0.5
    for line in train_lines:
        if line["on_policy"]:
            assert "ce" not in line and 1 <= line["sampled_tokens"] <= 12 and "sampled_one_to_one" in line
            assert 0 <= line["sampled_continued"] <= 1  # the projected teacher: projected_continuation is on
        else:
            assert "ce" in line and "sampled_tokens" not in line
    resumed = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [line["on_policy"] for line in resumed if line["type"] == "train"] == pattern[4:]


def test_on_policy_start_keeps_the_first_steps_off_policy(tmp_path, capsys):
    train(parse_flags(flags(tmp_path, max_train_step=5, run_validation=False,
                            **{"distillation_config.on_policy_start": 0.5})))
    assert "on-policy with probability 1 from step 4 (the steps before train on" in capsys.readouterr().out
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [line["on_policy"] for line in lines if line["type"] == "train"] == [0.0, 0.0, 0.0, 1.0, 1.0]


def test_best_of_a_run_that_starts_on_policy_later_is_an_on_policy_checkpoint(tmp_path, capsys, monkeypatch):
    """best/ is the lowest eval loss on the data set's answers, which the off-policy steps train and the on-policy
    ones do not: without the rule, the demos' then-on-policy runs handed back an off-policy checkpoint as best.
    The eval loss is made lowest at step 2 (off-policy), then lowest among the later ones at step 5."""
    from llm_recipes import finetuning

    losses = {1: 3.0, 2: 1.0, 3: 2.0, 4: 2.5, 5: 1.5, 6: 2.2}
    monkeypatch.setattr(finetuning, "evaluate", lambda state: {
        "eval_ce": 1.0, "eval_ppl": 2.7, "eval_loss": losses[state.progress.global_step]})
    common = flags(tmp_path, max_train_step=6, save_step=1, save_all=True,
                   **{"distillation_config.on_policy_start": 0.5})
    train(parse_flags({**common, "output_dir": str(tmp_path / "a")}))
    assert "best/ is chosen among the evaluations from then on" in capsys.readouterr().out
    assert os.readlink(tmp_path / "a" / "best") == os.path.join("checkpoints", "step-0000005")

    # a checkpoint whose saved best is off-policy (saved before the rule, or under another on_policy_start):
    # resuming from it drops that best
    state_file = tmp_path / "a" / "checkpoints" / "step-0000004" / "trainer_state.json"
    saved = json.loads(state_file.read_text())
    state_file.write_text(json.dumps({**saved, "best_eval_loss": 0.0, "best_checkpoint": "step-0000002"}))
    train(parse_flags({**common, "output_dir": str(tmp_path / "b"),
                       "resume_from": str(tmp_path / "a" / "checkpoints" / "step-0000004")}))
    assert os.readlink(tmp_path / "b" / "best") == os.path.join("checkpoints", "step-0000005")


def test_best_candidate_follows_the_first_on_policy_step():
    from types import SimpleNamespace

    from llm_recipes.finetuning import best_candidate

    def at(step, first_step=None):
        sampling = None if first_step is None else SimpleNamespace(sampling=SimpleNamespace(first_step=first_step))
        return SimpleNamespace(on_policy=sampling, progress=SimpleNamespace(global_step=step))

    assert best_candidate(at(1)) and best_candidate(at(1, 0))
    assert not best_candidate(at(3, 3)) and best_candidate(at(4, 3))


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)`")  # the optimizer step is replaced
def test_on_policy_ce_adds_the_data_sets_ce_to_the_on_policy_gradient(tmp_path, monkeypatch):
    """--on_policy_ce: an on-policy step's gradient is the distillation term's on the sampled answers (as without
    the flag) plus cross_entropy_factor x the mean CE of the data set's answers to the same prompts, over the
    step's two micro-batches; the CE here is a plain float64 one from the model's logits. The teacher runs on
    the sampled answers only."""
    from llm_recipes import finetuning

    answers = {}  # a fixed 'sample' per micro-batch: the data set's answers in reverse row order, cut at 2 tokens
    monkeypatch.setattr(finetuning, "sample_answers", lambda state, batches: [state.on_policy.rebuild(
        b, answers.setdefault(i, [a[:2] for a in on_policy.answers_of(b["student"])[::-1]]), state.pad_ids)
        for i, b in enumerate(batches)])
    teacher_passes = []
    teacher_forward = objective.teacher_forward
    monkeypatch.setattr(objective, "teacher_forward", lambda *args: teacher_passes.append(1) or teacher_forward(*args))

    def step_gradient(**extra):
        state = setup(parse_flags(flags(tmp_path / str(len(extra)), gradient_accumulation_steps=2, **{
            "distillation_config.loss": "projected", "distillation_config.cross_entropy_factor": 0.3, **extra})))
        state.models.student.eval()  # no dropout: the three gradients see one function
        batches = epoch_micro_batches(state, 0)
        step = [next(batches), next(batches)]
        found = {}
        monkeypatch.setattr(finetuning, "optimizer_step", lambda state, where: found.update(
            {n: p.grad.clone() for n, p in state.models.student.named_parameters() if p.grad is not None}))
        return state, step, train_step(state, step), found

    state, step, metrics, with_ce = step_gradient(**{"distillation_config.on_policy_ce": True})
    assert len(teacher_passes) == 2  # one per sampled micro-batch, none for the data set's answers
    _, _, alone, without = step_gradient()
    assert metrics["on_policy"] and "ce" in metrics and "ce" not in alone
    assert not metrics["without_ce"] and alone["without_ce"]
    assert metrics["distill"] == pytest.approx(alone["distill"], rel=1e-6)
    assert metrics["loss"] == pytest.approx(0.3 * metrics["ce"] + state.objective.weights["distill"] * metrics["distill"],
                                            rel=1e-5)
    sampled_labels = sum(len(a) for answer in answers.values() for a in answer)
    assert sampled_labels < sum(len(a) for b in step for a in on_policy.answers_of(b["student"]))  # other units

    model = state.models.student_inner
    model.zero_grad(set_to_none=True)
    ce_sum, tokens = 0.0, 0
    for batch in step:
        side = batch["student"]
        logits = model(input_ids=side["input_ids"], attention_mask=side["attention_mask"]).logits[:, :-1]
        labels = side["labels"][:, 1:]
        ce_sum = ce_sum + torch.nn.functional.cross_entropy(
            logits.double().flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
        tokens += int((labels != -100).sum())
    (ce_sum / tokens).backward()
    assert metrics["ce"] == pytest.approx(float(ce_sum.detach()) / tokens, rel=1e-5)
    assert with_ce.keys() == without.keys()
    for name, parameter in model.named_parameters():
        expected = without[name] + 0.3 * parameter.grad
        assert torch.allclose(with_ce[name], expected, rtol=1e-4, atol=1e-7), name
    assert any(not torch.allclose(with_ce[n], without[n], rtol=1e-3, atol=1e-6) for n in without)  # the CE counts


def test_every_step_of_an_on_policy_ce_run_logs_its_ce(tmp_path):
    train(parse_flags(flags(tmp_path, max_train_step=6, run_validation=False, **{
        "distillation_config.lmbda": 0.5, "distillation_config.on_policy_ce": True})))
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_lines = [line for line in lines if line["type"] == "train"]
    assert 0 < sum(line["on_policy"] for line in train_lines) < len(train_lines)
    assert all(math.isfinite(line["ce"]) and line["ce"] > 0 for line in train_lines)


def test_on_policy_with_lora_and_gradient_accumulation(tmp_path):
    result = train(parse_flags(flags(tmp_path, model_name=SAME, use_peft=True, gradient_accumulation_steps=2,
                                     max_train_step=3, run_validation=False, **{"lora_config.r": 4})))
    assert result["state"]["global_step"] == 3
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(line["on_policy"] == 1.0 and math.isfinite(line["distill"]) for line in lines if line["type"] == "train")


@pytest.mark.parametrize("extra, message", [
    ({"distillation_config.lmbda": 1.5}, "lmbda is a probability: it must be in [0, 1]"),
    ({"distillation_config.lmbda": 0.0, "distillation_config.on_policy_top_p": 0.9},
     "has no effect without --distillation_config.lmbda > 0"),
    ({"distillation_config.on_policy_temperature": 0.0}, "on_policy_temperature must be > 0"),
    ({"distillation_config.on_policy_start": 1.0}, "on_policy_start is a share of the run's steps"),
    ({"distillation_config.lmbda": 0.0, "distillation_config.on_policy_start": 0.5},
     "has no effect without --distillation_config.lmbda > 0"),
    ({"distillation_config.distil_factor": 0}, "which --distillation_config.distil_factor 0 turns off"),
    ({"distillation_config.lmbda": 0.0, "distillation_config.on_policy_ce": True},
     "has no effect without --distillation_config.lmbda > 0"),
    ({"distillation_config.on_policy_ce": True, "distillation_config.cross_entropy_factor": 0},
     "which --distillation_config.cross_entropy_factor 0 turns off"),
    ({"distillation_config.teacher_cache": "somewhere"}, "on-policy needs the live teacher"),
    ({"encoder_decoder": True}, "needs a causal student and teacher"),
])
def test_bad_on_policy_flags_are_refused_in_one_line(tmp_path, extra, message):
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("]", r"\]")) as error:
        parse_flags(flags(tmp_path, **extra))
    assert "\n" not in str(error.value)


def test_the_on_policy_targets_benchmark_reads_the_trainers_own_targets(tmp_path):
    from benchmarks import on_policy_targets
    from llm_recipes.losses import kl, projection, token_terms

    train(parse_flags(flags(tmp_path, max_train_step=2, run_validation=False)))
    result = on_policy_targets.measure(tmp_path, "last", batches=1)
    assert result["data eos"]["tokens"] == 4  # one EOS unit per answer of the batch (distill_eos is on at lmbda 1)
    assert result["data eos"]["target"] == pytest.approx(result["data eos"]["target_eos"])
    for key in ("sampled text", "data text", "data eos"):
        assert result[key]["tokens"] > 0 and all(0 <= result[key][k] <= 1
                                                  for k in ("target", "student", "student_top", "target_top"))
        assert 0 < result[key]["kl"] < math.inf  # two steps do not make the student its teacher
    assert 0 <= result["sampled_f1"] <= 100 and 0 <= result["sampled_cut"] <= 1 and result["sampled_tokens"] >= 1
    assert projection.token_terms_sum is token_terms.token_terms_sum is kl.token_terms_sum  # the wrap is undone


def test_the_on_policy_targets_benchmark_reads_an_sft_run_through_the_term_it_is_given(tmp_path):
    from benchmarks import on_policy_targets

    sft = {**flags(tmp_path, max_train_step=1, run_validation=False), "distillation_config.lmbda": 0.0,
           "distillation_config.distil_factor": 0.0}
    sft.pop("distillation_config.on_policy_max_new_tokens")
    train(parse_flags(sft))
    with pytest.raises(UserError, match="distil_factor 0 turns off"):
        on_policy_targets.measure(tmp_path, "last", batches=1)
    term = dict(on_policy_targets.flag_value(item) for item in ["distillation_config.distil_factor=1",
                                                                 "distillation_config.loss=projected"])
    assert term == {"distillation_config.distil_factor": 1, "distillation_config.loss": "projected"}
    result = on_policy_targets.measure(tmp_path, "last", batches=1, overrides=term)
    assert result["data text"]["tokens"] > 0 and result["sampled text"]["tokens"] > 0
