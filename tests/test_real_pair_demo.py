"""The real-pair demo's pieces that need no real model: the smaller student cut from a decoder's layers
(examples/real_pair/smaller_student.py), the demo's rows, data and report without same-tokenizer rows
(examples/real_pair/demo.py). The demo itself runs the project's command lines on the converted models
(scripts/real_pair_demo.sh --quick)."""
import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from examples.real_pair import demo, smaller_student
from examples import harness
from llm_recipes.errors import UserError


def test_evenly_spaced_layers_keep_both_ends():
    assert smaller_student.evenly_spaced(30, 10) == [0, 3, 6, 10, 13, 16, 19, 23, 26, 29]
    assert smaller_student.evenly_spaced(4, 2) == [0, 3]
    assert smaller_student.evenly_spaced(5, 5) == [0, 1, 2, 3, 4]
    assert smaller_student.evenly_spaced(5, 1) == [4]
    for bad in (0, 6):
        with pytest.raises(UserError, match="--layers must be between 1 and the model's 5 layers"):
            smaller_student.evenly_spaced(5, bad)


def _llama(layers: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def test_the_cut_model_is_the_model_built_from_the_kept_layers():
    big = _llama(4)
    reference = _llama(2)  # the same weights, layers 0 and 3 only, copied by hand
    state = {k: v for k, v in big.state_dict().items() if ".layers." not in k}
    for new, old in enumerate([0, 3]):
        prefix = f"model.layers.{old}."
        state.update({f"model.layers.{new}." + k[len(prefix):]: v for k, v in big.state_dict().items()
                      if k.startswith(prefix)})
    reference.load_state_dict(state)
    cut = smaller_student.keep_layers(big, [0, 3])
    assert cut.config.num_hidden_layers == 2 and [layer.self_attn.layer_idx for layer in cut.model.layers] == [0, 1]
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        assert torch.equal(cut(ids).logits, reference(ids).logits)
        # the KV cache is indexed by layer_idx: cached decoding must give the uncached logits
        full = cut(ids).logits[:, -1]
        prefix = cut(ids[:, :-1], use_cache=True)
        step = cut(ids[:, -1:], past_key_values=prefix.past_key_values, use_cache=True).logits[:, -1]
    assert torch.allclose(step, full, atol=1e-5)


def test_the_cut_is_saved_with_tokenizer_and_a_record(tiny, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "cut"
    args = smaller_student.SmallerStudentArgs(model_name=tiny["student"], layers=1, output_dir=str(out))
    smaller_student.make_smaller_student(args)
    record = json.loads((out / "smaller_student.json").read_text())
    source = AutoModelForCausalLM.from_pretrained(tiny["student"])
    assert record["of_layers"] == source.config.num_hidden_layers and record["kept_layers"] == [record["of_layers"] - 1]
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 1 and record["parameters"] == sum(p.numel() for p in model.parameters())
    assert (out / "model.safetensors").is_file() and (out / "tokenizer_config.json").is_file()
    smaller_student.make_smaller_student(args)  # made already: reused
    assert "already made" in capsys.readouterr().out


def test_rows_are_the_issues_and_read_the_teacher_cache():
    by_name = {row.name: row for row in demo.ROWS}
    assert list(by_name) == ["SFT", "ULD index 1.5", "projected"]
    assert by_name["SFT"].flags == {"distillation_config.distil_factor": 0}
    assert by_name["ULD index 1.5"].flags["distillation_config.alignment"] == "index"
    for name in ("ULD index 1.5", "projected"):
        assert by_name[name].flags["distillation_config.teacher_cache"] == "CACHE"
        assert by_name[name].flags["dataset.few_shot"] == 0  # the prompt the teacher was fine-tuned on
    assert by_name["projected"].alignment == "text" == by_name["projected"].flags["distillation_config.alignment"]


def test_quick_data_is_people_qa_cut_to_a_few_examples(tmp_path):
    folder = demo.write_data(tmp_path, quick=True)
    counts = {split: len((folder / f"{split}.jsonl").read_text().splitlines()) for split in ("train", "validation",
                                                                                             "test")}
    assert counts == {"train": demo.QUICK["train"], "validation": demo.QUICK["validation"], "test": demo.QUICK["test"]}
    row = json.loads((folder / "test.jsonl").read_text().splitlines()[0])
    assert row["title"] == "people_qa" and row["kind"] in ("lookup", "two_hop", "arithmetic", "comparison")


def test_without_the_converted_models_the_demo_says_what_to_run(tmp_path, capsys):
    with pytest.raises(SystemExit):
        demo.main(cache_dir=str(tmp_path), output_dir=str(tmp_path / "out"))
    assert "run bash scripts/real_pair.sh first" in capsys.readouterr().err


def test_the_report_has_no_share_column_without_same_tokenizer_rows(tmp_path):
    f1 = {"SFT": [40.0, 42.0, 44.0], "ULD index 1.5": [20.0, 22.0, 21.0], "projected": [43.0, 44.0, 47.0]}
    rows = [{"name": row.name, "tokenizers": row.tokenizers, "loss": row.loss, "alignment": row.alignment,
             "f1": f1[row.name]} for row in demo.ROWS]
    results = {"seeds": [0, 1, 2], "tables": [{"students": "pretrained", "rows": rows}]}
    details = {"rates": {"pretrained": {row.name: {"lr": 3e-4} for row in demo.ROWS}}}
    lines = {line["name"]: line for line in harness.regime_table(results["tables"][0])}
    assert lines["projected"]["diff"]["diffs"] == [3.0, 2.0, 3.0] and lines["projected"]["share_of_kl_gain"] is None
    text = harness.write_report(results, details, tmp_path)
    assert "| projected | different | 0.0003 | 44.7 | +2.7 [" in text and "share" not in text
    assert json.loads((tmp_path / "results.json").read_text())["tables"][0]["students"] == "pretrained"


def test_f1_by_question_kind_reads_the_benchmark_predictions(tmp_path):
    data, scored = tmp_path / "data", tmp_path / "scored"
    data.mkdir(), scored.mkdir()
    kinds = {"a": "lookup", "b": "arithmetic", "c": "lookup"}
    (data / "test.jsonl").write_text("".join(json.dumps({"id": i, "kind": k}) + "\n" for i, k in kinds.items()))
    f1 = {"a": 100.0, "b": 0.0, "c": 50.0}  # the benchmark writes F1 x100 per prediction
    (scored / "predictions.jsonl").write_text("".join(json.dumps({"id": i, "f1": v}) + "\n" for i, v in f1.items()))
    assert demo.f1_by_kind(scored, data, "test") == {"arithmetic": 0.0, "lookup": 75.0}


def test_scoring_passes_each_benchmark_flag_once(tmp_path, monkeypatch):
    """The demo's options replace the defaults (a flag twice is refused; fire used to keep the first)."""
    from llm_recipes.flags import repeated_flags

    commands = []

    def fake_run(command, log):
        commands.append(command)
        (tmp_path / "scores.json").write_text(json.dumps({"scores": {"f1": 12.5}}))
        return 0.0

    monkeypatch.setattr(harness, "run", fake_run)
    setup = demo.Setup(demo.PLANS["people_qa"], tmp_path, tmp_path, tmp_path, tmp_path, tmp_path, tmp_path, tmp_path,
                       False, 3, 2)
    f1 = demo.benchmark(setup, tmp_path / "model", "test", tmp_path)
    command = commands[0]
    assert f1 == 12.5 and repeated_flags(command) == []
    values = dict(zip(command[3::2], command[4::2]))
    assert values["--max_new_tokens"] == "12" and values["--batch_size"] == "25" and values["--bf16"] == "True"
