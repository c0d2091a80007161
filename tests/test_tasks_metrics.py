"""Benchmark metrics against values worked out by hand (the arithmetic is in the comments)."""
import sys
import types

import pytest

from llm_distillation import metrics
from llm_recipes.errors import UserError


@pytest.mark.parametrize("text, expected", [
    ("The  Cat, sat!", "cat sat"),            # lower, punctuation, article, whitespace
    ("An apple a day", "apple day"),
    ("theater and anthem", "theater and anthem"),  # articles only as whole words
    ("  \t", ""),
    ("France's", "frances"),                 # the apostrophe is punctuation
])
def test_squad_normalization(text, expected):
    assert metrics.normalize_answer(text) == expected


def test_token_f1_by_hand():
    # "cat sat on mat" vs "cat on mat": 3 tokens in common, P = 3/4, R = 3/3, F1 = 2*(3/4)/(7/4) = 6/7
    assert metrics.token_f1("the cat sat on the mat", "a cat on a mat") == pytest.approx(6 / 7)
    # "cat cat cat" vs "cat": the counts intersect to 1 cat, P = 1/3, R = 1, F1 = 2*(1/3)/(4/3) = 1/2
    assert metrics.token_f1("the the cat cat cat", "cat") == pytest.approx(0.5)
    assert metrics.token_f1("dog", "cat") == 0.0
    # empty against empty matches (SQuAD v2 rule), empty against text does not
    assert metrics.token_f1("The.", "") == 1.0 and metrics.token_f1("", "cat") == 0.0


def test_best_reference_and_exact_match():
    refs = ["paris", "France's capital Paris"]
    # "paris france" vs "paris": P = 1/2, R = 1, F1 = 2/3;
    # vs "frances capital paris": 1 common, P = 1/2, R = 1/3, F1 = 2*(1/6)/(5/6) = 2/5; best = 2/3
    assert metrics.best_over_references(metrics.token_f1, "Paris France", refs) == pytest.approx(2 / 3)
    assert metrics.best_over_references(metrics.exact_match, "Paris France", refs) == 0.0
    assert metrics.best_over_references(metrics.exact_match, "the Paris.", refs) == 1.0
    # no reference: scored against the empty answer
    assert metrics.best_over_references(metrics.exact_match, "", []) == 1.0
    assert metrics.best_over_references(metrics.token_f1, "something", []) == 0.0


def test_rouge_by_hand():
    scorer = metrics.rouge_scorer()
    # pred "the cat sat" (3 tokens), ref "the cat sat on the mat" (6 tokens)
    # ROUGE-1: 3 unigrams in common, P = 1, R = 1/2, F = 2/3
    # ROUGE-2: pred bigrams {the cat, cat sat} both in the ref's 5, P = 1, R = 2/5, F = 2*(2/5)/(7/5) = 4/7
    # ROUGE-L: LCS "the cat sat" = 3, F = 2/3 (one line: Lsum = L)
    got = metrics.rouge_sample(scorer, "the cat sat", ["the cat sat on the mat"])
    assert got == pytest.approx({"rouge1": 2 / 3, "rouge2": 4 / 7, "rougeL": 2 / 3, "rougeLsum": 2 / 3})
    # Lsum splits the reference at its newline: each reference sentence's LCS with the prediction is whole,
    # 6 of 6 tokens hit, Lsum = 1; ROUGE-L sees one sequence "the cat sat the dog ran" vs
    # "the dog ran the cat sat": LCS 3 of 6, L = 1/2
    got = metrics.rouge_sample(scorer, "the dog ran the cat sat", ["the cat sat\nthe dog ran"])
    assert got["rougeLsum"] == pytest.approx(1.0) and got["rougeL"] == pytest.approx(0.5)
    # best reference per type: "the cat" vs "the cat sat" (R1: P = 1, R = 2/3, F = 4/5) and "a dog" (0)
    got = metrics.rouge_sample(scorer, "the cat", ["a dog", "the cat sat"])
    assert got["rouge1"] == pytest.approx(0.8) and got["rouge2"] == pytest.approx(2 / 3)  # R2: P=1, R=1/2


def test_corpus_scores_are_means_of_samples_x100_each_sample_once():
    predictions = ["no response", "x", "the cat sat"]
    references = [["no response"], ["y"], ["the cat sat on the mat", "a dog"]]
    means, rows = metrics.score_predictions(predictions, references, progress=False)
    # EM per sample 1, 0, 0 -> 33.33 (the published code appended sample 1 twice: (1+1+0+0)/4 = 50)
    assert [r["em"] for r in rows] == [100.0, 0.0, 0.0] and means["em"] == pytest.approx(100 / 3)
    # F1 per sample: 1, 0, and "cat sat" vs "cat sat on mat" P = 1, R = 1/2, F1 = 2/3 -> mean (1 + 0 + 2/3)/3
    assert means["f1"] == pytest.approx(100 * (1 + 2 / 3) / 3)
    assert rows[2]["rouge2"] == pytest.approx(100 * 4 / 7)
    for key in ("f1", "em", "rouge1", "rouge2", "rougeL", "rougeLsum"):
        assert means[key] == pytest.approx(sum(r[key] for r in rows) / 3)
    assert "bertscore" not in means


def test_score_predictions_refuses_mismatched_inputs():
    with pytest.raises(ValueError, match="2 predictions for 1 reference"):
        metrics.score_predictions(["a", "b"], [["a"]], progress=False)
    with pytest.raises(ValueError, match="one list of strings per sample"):
        metrics.score_predictions(["a"], ["a"], progress=False)


def test_bertscore_missing_package_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "bert_score", None)  # import fails as if not installed
    with pytest.raises(UserError, match="needs the bert_score package: pip install bert-score"):
        metrics.score_predictions(["a"], [["a"]], bertscore=True, progress=False)


def test_bertscore_passes_every_reference_and_scales(monkeypatch):
    import torch

    calls = {}

    def fake_score(cands, refs, **kwargs):
        calls.update(cands=cands, refs=refs, **kwargs)
        return torch.zeros(2), torch.zeros(2), torch.tensor([0.5, 0.25])

    monkeypatch.setitem(sys.modules, "bert_score", types.SimpleNamespace(score=fake_score))
    means, rows = metrics.score_predictions(["a", "b"], [["a", "c"], []], bertscore=True, progress=False)
    assert calls["refs"] == [["a", "c"], [""]] and calls["rescale_with_baseline"] and calls["lang"] == "en"
    assert [r["bertscore"] for r in rows] == [50.0, 25.0] and means["bertscore"] == pytest.approx(37.5)


def test_worked_steps_reads_the_fact_and_whether_the_answer_follows_it():
    from benchmarks.worked_steps import shares

    gold = "The question is about Ada.\nThe fact: Ada plays the drums.\nAnswer: drums"
    rows = [{"prediction": gold, "references": [gold]},
            {"prediction": "The question is about Ada.\nThe fact: Ada plays the harp.\nAnswer: harp", "references": [gold]},
            {"prediction": "The question is about Ada.\nThe fact: Ada plays the harp.\nAnswer: piano", "references": [gold]},
            {"prediction": "The quest Ada.\nAnswer: Ada", "references": [gold]}]
    found = shares(rows)
    assert found["both_lines"] == 0.75 and found["fact_right"] == 0.25 and found["answer_right"] == 0.25
    assert found["answer_follows_fact"] == 2 / 3
