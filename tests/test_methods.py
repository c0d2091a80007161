"""The seed methods end to end on tiny models: hidden-state distillation (projections saved, resumed,
synchronised), token and feature selection, encoder-decoder students (T5, BART) with ULD and
MultiLevelOT, generation from their checkpoints, and layer freezing."""
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import base_flags
from llm_recipes import intermediate
from llm_recipes.config import parse_flags
from llm_recipes.errors import UserError
from llm_recipes.finetuning import train
from test_trainer import fails, weights

HIDDEN = {"distillation_config.hidden_weight": 2.0}




def run(tiny, out, **extra):
    return train(parse_flags(base_flags(tiny, out, **extra)))


def records(folder, kind="train"):
    return [r for r in map(json.loads, (Path(folder) / "metrics.jsonl").read_text().splitlines()) if r["type"] == kind]


def projections(folder):
    return load_file(str(Path(folder) / intermediate.PROJECTIONS_FILE))


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


# ---------------------------------------------------------------------------------------- layer maps
def test_layer_maps():
    assert intermediate.proportional_map(2, 4) == [(1, 2), (2, 4)]
    assert intermediate.proportional_map(3, 4) == [(1, 1), (2, 3), (3, 4)]  # 1.33, 2.67, 4
    assert intermediate.proportional_map(4, 2) == [(1, 1), (2, 1), (3, 2), (4, 2)]  # 0.5 rounds up
    resolve = intermediate.resolve_layer_map
    assert resolve("0:0, 2:-1,-1:3", 2, 4, "--m", []) == [(0, 0), (2, 4), (2, 3)]
    assert resolve(["1:2"], 2, 4, "--m", []) == [(1, 2)] and resolve(None, 2, 4, "--m", [(9, 9)]) == [(9, 9)]
    for text, message in (("1-2", "student:teacher layer pairs"), ("3:1", "student layer 3 does not exist"),
                          ("1:-6", "teacher layer -6 does not exist"), ("1:1,1:1", "twice"), (",", "empty")):
        with pytest.raises(UserError, match=message):
            resolve(text, 2, 4, "--m", [])


# ------------------------------------------------------------------------------- teacher attribution
@pytest.fixture(scope="module")
def teacher64():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=12, intermediate_size=24, num_hidden_layers=3,
                                         num_attention_heads=2, num_key_value_heads=1)).double().eval()
    model.requires_grad_(False)
    ids = torch.randint(4, 40, (2, 7))
    labels = torch.full_like(ids, -100)
    labels[0, 3:] = ids[0, 3:]
    labels[1, 4:6] = ids[1, 4:6]
    mask = torch.ones_like(ids)
    mask[1, 6] = 0
    return model, {"input_ids": ids, "attention_mask": mask, "labels": labels}


def answer_log_prob(model, batch, hooks=()):
    """sum over answer rows of log p(target), from the model's own full logits (float64)."""
    handles = [model.model.layers[layer - 1].register_forward_hook(fn) for layer, fn in hooks]
    try:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
    finally:
        for handle in handles:
            handle.remove()
    log_p = torch.log_softmax(out.logits[:, :-1], dim=-1)
    targets = batch["labels"][:, 1:]
    keep = targets != -100
    return log_p[keep].gather(1, targets[keep][:, None]).sum(), out


def test_attribution_is_the_gradient_of_the_answer_log_probability(teacher64):
    model, batch = teacher64
    result = intermediate.teacher_pass(model, batch, False, states=True, attribute=[1, 3], last_layer=3,
                                       attribution="abs", chunk_size=2)
    # reference 1: one full graph from the embeddings (no chunking, no leaf), gradient w.r.t. the states
    recorded = {}

    def record(module, args, output):
        recorded[1] = output

    embeddings = model.get_input_embeddings()(batch["input_ids"]).detach().requires_grad_()
    handle = model.model.layers[0].register_forward_hook(record)
    out = model(inputs_embeds=embeddings, attention_mask=batch["attention_mask"], output_hidden_states=True)
    handle.remove()
    log_p = torch.log_softmax(out.logits[:, :-1], dim=-1)
    targets, keep = batch["labels"][:, 1:], batch["labels"][:, 1:] != -100
    total = log_p[keep].gather(1, targets[keep][:, None]).sum()
    g1, g3 = torch.autograd.grad(total, [recorded[1], out.hidden_states[3]])
    torch.testing.assert_close(result.scores[1], g1.abs().sum(dim=(0, 1)).float(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(result.scores[3], g3.abs().sum(dim=(0, 1)).float(), rtol=1e-5, atol=1e-7)
    signed = intermediate.teacher_pass(model, batch, False, states=True, attribute=[1], last_layer=3,
                                       attribution="signed").scores[1]
    torch.testing.assert_close(signed, g1.sum(dim=(0, 1)).float(), rtol=1e-5, atol=1e-7)
    # reference 2, without autograd: central differences of the signed score (one unit shifted at every
    # position of layer 1); Llama's RMSNorm computes in float32 even for a float64 model, hence eps 1e-3
    eps = 1e-3
    for unit in (0, 5, 11):
        def shift(delta):
            def hook(module, args, output):
                output = output.clone()
                output[..., unit] += delta
                return output
            return answer_log_prob(model, batch, [(1, hook)])[0]
        with torch.no_grad():
            numeric = (shift(eps) - shift(-eps)) / (2 * eps)
        assert abs(float(signed[unit]) - float(numeric)) <= 2e-3 * max(1.0, abs(float(numeric)))
    # nothing of the teacher entered a graph or received a gradient
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())
    assert not result.head_input.requires_grad and not any(h.requires_grad for h in result.states)
    plain = intermediate.teacher_pass(model, batch, False, states=True)
    assert all(torch.equal(a, b) for a, b in zip(plain.states, result.states))


# ------------------------------------------------------------------------- hidden-state distillation
def test_hidden_state_distillation_saves_projections_and_resumes_exactly(tiny, tmp_path):
    """Same tokenizer (d_s 16 -> d_t 32: two projections), with token selection on the KL term;
    6 steps straight == 3 steps, --resume_from, 3 more (student weights and projections)."""
    flags = dict(model_name=tiny["student_same"], save_step=3, max_train_step=6, save_all=True, run_validation=False,
                 **HIDDEN, **{"distillation_config.token_selection": "teacher_entropy"})
    run(tiny, tmp_path / "straight", **flags)
    run(tiny, tmp_path / "resumed", **flags, resume_from=str(tmp_path / "straight" / "checkpoints" / "step-0000003"))
    middle = tmp_path / "straight" / "checkpoints" / "step-0000003"
    a, b = tmp_path / "straight" / "last", tmp_path / "resumed" / "last"
    assert max_difference(weights(a), weights(b)) <= 1e-6
    assert projections(a).keys() == {f"s{i}_t{i}.{p}" for i in (1, 2) for p in ("weight", "bias")}
    assert max_difference(projections(a), projections(b)) <= 1e-6
    assert max_difference(projections(a), projections(middle)) > 1e-4  # the projections do train
    optimizer = torch.load(a.resolve() / "optimizer.pt", weights_only=True)
    assert {"hidden_projections.s1_t1.weight", "model.embed_tokens.weight"} <= set(optimizer["state"])
    first = records(tmp_path / "straight")[0]
    assert first["loss"] == pytest.approx(first["ce"] + 1.5 * first["distill"] + 2.0 * first["hidden"], rel=1e-5)
    assert 0.5 <= first["token_kept"] < 1 and first["hidden"] > 0


def test_hidden_and_token_selection_are_exact_under_gradient_accumulation(tiny, tmp_path):
    """batch 2 x 2 accumulation steps == batch 4: every term is normalised by the step's counts."""
    common = dict(model_name=tiny["student_same"], optimizer="SGD", lr=0.5, run_validation=False, max_train_step=4,
                  **HIDDEN, **{"distillation_config.token_selection": "student_ce",
                               "distillation_config.hidden_distance": "cosine"})
    run(tiny, tmp_path / "big", batch_size_training=4, **common)
    run(tiny, tmp_path / "accum", batch_size_training=2, gradient_accumulation_steps=2, **common)
    big, accum = tmp_path / "big" / "last", tmp_path / "accum" / "last"
    assert max_difference(weights(big), weights(accum)) < 1e-5
    assert max_difference(projections(big), projections(accum)) < 1e-5


def test_feature_selection_and_hidden_states_across_tokenizers(tiny, tmp_path):
    """GPT-NeoX student, Llama teacher (other tokenizer): ULD on the top half of the answer positions by
    divergence, hidden states and feature selection at an inner and the last layer, aligned by answer index."""
    result = run(tiny, tmp_path, max_train_step=4, save_step=2, **HIDDEN, **{
        "distillation_config.loss": "uld", "distillation_config.hidden_alignment": "answer_index",
        "distillation_config.token_selection": "divergence",
        "distillation_config.feature_weight": 0.5, "distillation_config.feature_layer_map": "1:1,-1:-1"})
    train_lines = records(tmp_path)
    for line in train_lines:
        expected = line["ce"] + 1.5 * line["distill"] + 2.0 * line["hidden"] + 0.5 * line["feature"]
        assert line["loss"] == pytest.approx(expected, rel=1e-5)
        assert line["feature_kept"] == 0.5 and 0 < line["feature"] and 0.5 <= line["token_kept"] <= 1
    last = result["eval"]
    assert {"eval_distill", "eval_hidden", "eval_feature"} <= last.keys()
    assert last["eval_loss"] == pytest.approx(last["eval_ce"] + 1.5 * last["eval_distill"]
                                              + 2.0 * last["eval_hidden"] + 0.5 * last["eval_feature"])


def test_hidden_states_only_without_a_logit_term(tiny, tmp_path, capsys):
    run(tiny, tmp_path, model_name=tiny["student_same"], max_train_step=2, run_validation=False, **HIDDEN,
        **{"distillation_config.distil_factor": 0, "distillation_config.hidden_layer_map": "2:1"})
    assert "loss: 1.0 x CE + 2.0 x hidden-state mse" in capsys.readouterr().out
    line = records(tmp_path)[0]
    assert "distill" not in line and line["loss"] == pytest.approx(line["ce"] + 2.0 * line["hidden"], rel=1e-5)


def test_hidden_states_at_every_position_with_identical_inputs(tiny, tmp_path):
    """--hidden_positions all (DistillKit's setting: the same text for both models), embeddings included."""
    from conftest import LOADER_SOURCE

    loader = tmp_path / "same_inputs.py"  # the tiny loader, with the student's tokenization for both roles
    loader.write_text(f"DATA = {tiny['data']!r}\n" + LOADER_SOURCE.replace('dataset_config.role == "teacher"', "False"))
    run(tiny, tmp_path / "out", model_name=tiny["student_same"], max_train_step=2, run_validation=False,
        **{"dataset.file": str(loader), **HIDDEN, "distillation_config.hidden_positions": "all",
           "distillation_config.hidden_distance": "cosine", "distillation_config.hidden_layer_map": "0:0,2:2"})
    assert projections(tmp_path / "out" / "last").keys() == {f"s{i}_t{i}.{p}" for i in (0, 2) for p in ("weight", "bias")}
    line = records(tmp_path / "out")[0]
    assert 0 < line["hidden"] < 2 and line["loss"] == pytest.approx(line["ce"] + 1.5 * line["distill"]
                                                                     + 2.0 * line["hidden"], rel=1e-5)


@pytest.mark.parametrize("case", ["tokenizers_differ", "student_wider", "inputs_differ", "resume_without_hidden"])
def test_intermediate_terms_refuse_what_cannot_pair(tiny, tmp_path, capsys, case):
    flags = base_flags(tiny, tmp_path / "out", max_train_step=1, run_validation=False)
    if case == "tokenizers_differ":
        flags.update(HIDDEN)
        expected = "tokenizers differ: set --distillation_config.hidden_alignment text"
    elif case == "student_wider":  # the teacher as student (d 32), the same-tokenizer student as teacher (d 16)
        flags.update({"model_name": tiny["teacher"], "distillation_config.model_name": tiny["student_same"],
                      "distillation_config.feature_weight": 1.0})
        expected = "the student is wider"
    elif case == "inputs_differ":  # the tiny loader gives the teacher no EOS
        flags.update({"model_name": tiny["student_same"], "distillation_config.hidden_positions": "all", **HIDDEN})
        expected = "inputs must be identical"
    else:
        flags.update({"model_name": tiny["student_same"], **HIDDEN, "save_step": 1})
        train(parse_flags(dict(flags)))
        capsys.readouterr()
        flags = base_flags(tiny, tmp_path / "again", model_name=tiny["student_same"], max_train_step=2,
                           resume_from=str(tmp_path / "out" / "checkpoints" / "step-0000001"))
        expected = "was trained with hidden-state projections"
    assert expected in fails(capsys, flags)


# ----------------------------------------------------------------------------------- flags
@pytest.mark.parametrize("flags, message", [
    ({"distillation_config.hidden_layer_map": "1:1"}, "hidden_layer_map has no effect without"),
    ({"distillation_config.token_selection_ratio": 0.3}, "token_selection_ratio has no effect without"),
    ({"distillation_config.feature_attribution": "signed"}, "feature_attribution has no effect without"),
    ({"distillation_config.hidden_weight": -1}, "hidden_weight must be 0 or more"),
    ({"distillation_config.token_selection": "student_ce", "distillation_config.distil_factor": 0},
     "which --distillation_config.distil_factor 0 turns off"),
    ({"distillation_config.hidden_weight": 1, "distillation_config.hidden_positions": "all",
      "distillation_config.hidden_alignment": "answer_index"}, "use hidden_positions answer"),
    ({"freeze_regex": "lm_head", "use_peft": True}, "--use_peft trains only a LoRA adapter"),
])
def test_method_flags_are_validated(flags, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        parse_flags({"distillation": True, **flags})


def test_loss_values_are_checked_before_any_model_loads(tmp_path):
    """The loss's values are checked once, where the tokenizers resolve `auto` (llm_recipes.config.resolve_plan),
    before any model or data set loads: nothing is written to the output folder."""
    from llm_recipes import preflight

    run = parse_flags({"distillation": True, "distillation_config.token_selection": "entropy",
                       "output_dir": str(tmp_path / "out")})
    with pytest.raises(UserError, match="token_selection must be one of none, teacher_entropy"):
        preflight.check_run(run)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.parametrize("flags, message", [
    ({"distillation_config.uld_top_k": 8},  # the tiny pair's auto loss is projected
     "--distillation_config.uld_top_k has no effect with --distillation_config.loss projected (only the ULD"),
    ({"distillation_config.loss": "uld", "distillation_config.sinkhorn_reg": 0.2},
     "--distillation_config.sinkhorn_reg has no effect with --distillation_config.loss uld (only the MultiLevelOT"),
    ({"distillation_config.loss": "uld", "distillation_config.temperature": 2.0},
     "--distillation_config.temperature has no effect with --distillation_config.loss uld"),
    ({"distillation_config.loss": "uld", "distillation_config.projected_continuation": True},
     "--distillation_config.projected_continuation has no effect with --distillation_config.loss uld (only the "
     "projected"),
    ({"distillation_config.loss": "uld", "distillation_config.distil_factor": 0,
      "distillation_config.hybrid_matched_weight": 0.5},  # SFT baseline: checked against the loss it names
     "--distillation_config.hybrid_matched_weight has no effect with --distillation_config.loss uld"),
])
def test_a_detail_flag_of_another_loss_family_is_refused(tmp_path, flags, message):
    """A family's own flag given while the run's loss belongs to another family would have no effect."""
    from llm_recipes import preflight

    run = parse_flags({"distillation": True, **flags, "output_dir": str(tmp_path / "out")})
    with pytest.raises(UserError, match=re.escape(message)):
        preflight.check_run(run)


@pytest.mark.parametrize("flags", [
    {"distillation_config.loss": "uld", "distillation_config.uld_top_k": 8,
     "distillation_config.teacher_temperature": 2.0},
    {"distillation_config.temperature": 2.0, "distillation_config.projected_divergence": "skew_kl",
     "distillation_config.skew_alpha": 0.2},
    {"f": 1, "distillation_config.sinkhorn_reg": 0.2},
])
def test_detail_flags_of_the_runs_own_loss_family_are_accepted(tmp_path, flags):
    from llm_recipes import preflight

    preflight.check_run(parse_flags({"distillation": True, **flags, "output_dir": str(tmp_path / "out")}))


# ------------------------------------------------------------------------------ encoder-decoder students
@pytest.fixture(scope="module")
def student_bart(tiny):
    """A tiny BART built from its config, with the GPT-NeoX student's tokenizer (decoder starts from EOS)."""
    from transformers import AutoTokenizer, BartConfig, BartForConditionalGeneration

    path = Path(tiny["root"]) / "student_bart"
    if not path.exists():
        tokenizer = AutoTokenizer.from_pretrained(tiny["student"])
        torch.manual_seed(5)
        model = BartForConditionalGeneration(BartConfig(
            vocab_size=len(tokenizer), d_model=16, encoder_layers=1, decoder_layers=1, encoder_ffn_dim=32,
            decoder_ffn_dim=32, encoder_attention_heads=2, decoder_attention_heads=2, max_position_embeddings=128,
            pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.eos_token_id,
            forced_eos_token_id=tokenizer.eos_token_id))
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def student_mt5(tiny):
    """A tiny mT5 (the mT0 family: untied output layer, gated GELU) with the GPT-NeoX student's tokenizer."""
    from transformers import AutoTokenizer, MT5Config, MT5ForConditionalGeneration

    path = Path(tiny["root"]) / "student_mt5"
    if not path.exists():
        tokenizer = AutoTokenizer.from_pretrained(tiny["student"])
        torch.manual_seed(6)
        MT5ForConditionalGeneration(MT5Config(
            vocab_size=len(tokenizer), d_model=16, d_ff=32, d_kv=8, num_layers=1, num_heads=2,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
            decoder_start_token_id=tokenizer.pad_token_id)).save_pretrained(path)
        tokenizer.save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("student, loss", [("t5", "multilevel_ot"), ("mt5", "uld"), ("bart", "uld"),
                                           ("bart", "multilevel_ot")])
def test_encoder_decoder_student_distils_saves_and_generates(tiny, student_bart, student_mt5, tmp_path, student,
                                                              loss):
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from llm_distillation.generation import generate_answers

    extra = {"distillation_config.distil_factor": 1.5} if loss == "multilevel_ot" else {}
    if student == "bart" and loss == "uld":  # and the hidden-state term on the decoder's states
        extra.update({**HIDDEN, "distillation_config.hidden_alignment": "answer_index"})
    name = {"bart": student_bart, "mt5": student_mt5, "t5": tiny["student_t5"]}[student]
    run(tiny, tmp_path, model_name=name, encoder_decoder=True, lr=1e-2, max_train_step=6, save_step=3,
        **{"distillation_config.loss": loss}, **extra)
    evals = records(tmp_path, "eval")
    assert [e["step"] for e in evals] == [3, 6] and evals[-1]["eval_ce"] < evals[0]["eval_ce"]
    assert evals[-1]["eval_distill"] > 0 and ("eval_hidden" in evals[-1]) == ("distillation_config.hidden_weight" in extra)
    model = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "last")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "last")
    prompts = [tokenizer.encode(p) + [tokenizer.eos_token_id] for p in
               ("context: ada lives in oslo. question: where does ada live? answer:", "question: where? answer:")]
    batched = generate_answers(model, tokenizer, prompts, max_new_tokens=4, batch_size=2)
    one_by_one = [generate_answers(model, tokenizer, [p], max_new_tokens=4)[0] for p in prompts]
    assert batched == one_by_one and all(isinstance(a, str) for a in batched)


def test_left_padding_changes_bart_encoder_states_right_padding_does_not(student_bart):
    """Why generate_answers right-pads encoder inputs (a benchmark left-padding every model would be wrong)."""
    from transformers import AutoModelForSeq2SeqLM

    from llm_distillation.generation import pad_prompts

    model = AutoModelForSeq2SeqLM.from_pretrained(student_bart).eval()
    prompts, pad = [[5, 6, 7, 8, 2], [9, 2]], model.config.pad_token_id
    with torch.no_grad():
        alone = model.get_encoder()(input_ids=torch.tensor([prompts[1]])).last_hidden_state[0]
        for left, columns in ((False, slice(0, 2)), (True, slice(3, 5))):
            ids, mask = pad_prompts(prompts, pad, left=left)
            states = model.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state[1, columns]
            error = (states - alone).abs().max().item()
            assert (error > 1e-2) if left else (error < 1e-5), (left, error)


# ------------------------------------------------------------------------------------ layer freezing
def test_freezing_by_regex_and_spectrum_yaml(tiny, tmp_path, capsys):
    """Spectrum trains the last block's attention and the head; --freeze_regex then takes the head back."""
    spectrum = tmp_path / "spectrum.yaml"
    spectrum.write_text("unfrozen_parameters:\n- ^lm_head.weight$\n# attention of the last block\n"
                        "- gpt_neox.layers.1.attention\n")
    run(tiny, tmp_path / "out", max_train_step=2, run_validation=False, spectrum_yaml=str(spectrum),
        freeze_regex=["lm_head"])
    before, after = weights(tiny["student"]), weights(tmp_path / "out" / "last")
    trained = {k for k in before if not torch.equal(before[k], after[k])}
    assert trained and all(k.startswith("gpt_neox.layers.1.attention.") for k in trained)
    attention = sum(v.numel() for k, v in before.items() if k.startswith("gpt_neox.layers.1.attention."))
    total = sum(v.numel() for v in before.values())
    assert f"student: {attention:,} trainable of {total:,} parameters" in capsys.readouterr().out


def test_freezing_semantics_and_refusals(tiny, tmp_path, capsys):
    from transformers import AutoConfig, AutoModelForCausalLM

    from llm_recipes.freezing import apply_freezing
    from llm_recipes.models import freeze_first_layers

    def trainable(**flags):
        model = AutoModelForCausalLM.from_pretrained(tiny["student_same"])
        if flags.pop("freeze_layers", False):
            freeze_first_layers(model, 1)
        apply_freezing(model, **flags)
        return {n for n, p in model.named_parameters() if p.requires_grad}

    everything = trainable()
    assert trainable(unfreeze_regex=[r"layers\.\d\.mlp"]) == {n for n in everything if ".mlp." in n}
    assert trainable(unfreeze_regex=["mlp", "norm"], freeze_regex=["down_proj"], freeze_layers=True) == {
        n for n in everything if ("mlp" in n or "norm" in n) and "down_proj" not in n and ".layers.0." not in n}
    config = AutoConfig.from_pretrained(tiny["student_same"])
    config.tie_word_embeddings = True
    model = AutoModelForCausalLM.from_config(config)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    apply_freezing(model, freeze_regex=["lm_head"])  # a tied head freezes the embeddings it shares
    assert not model.model.embed_tokens.weight.requires_grad
    with pytest.raises(UserError, match="pattern 'lm_haed' matches no parameter"):
        apply_freezing(model, unfreeze_regex=["lm_haed"])
    flags = base_flags(tiny, tmp_path / "bad", spectrum_yaml=str(tmp_path / "missing.yaml"))
    assert "does not exist" in fails(capsys, flags)
    (tmp_path / "other.yaml").write_text("unfrozen_parameters:\n- ^model.layers.0.mlp\n")
    flags = base_flags(tiny, tmp_path / "bad", spectrum_yaml=str(tmp_path / "other.yaml"))
    assert "matches no parameter of the student" in fails(capsys, flags)
