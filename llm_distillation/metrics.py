"""Benchmark metrics: SQuAD token F1 and exact match, ROUGE, optional BERTScore, all x100.

- F1 / EM follow the official SQuAD evaluation: both texts are normalised (lower case, punctuation
  and the articles a/an/the removed, whitespace collapsed), F1 is the harmonic mean of token
  precision and recall, and a sample's score is the best over its references. Each sample counts
  exactly once (the published benchmark could append two EM entries for one sample). A sample with
  no reference is scored against the empty answer (SQuAD v2's rule): 1 if the prediction normalises
  to nothing, else 0; two empty texts also match in F1.
- ROUGE-1/2/L/Lsum come from Google's `rouge-score` package (its tokenizer: lower case, alphanumeric
  tokens; no stemming, as the published runs used through Hugging Face `evaluate`), F-measure, best
  reference per ROUGE type. Lsum treats newlines as sentence boundaries; no sentence splitter is run,
  so on one-line predictions it differs from ROUGE-L only where a reference spans several lines.
- BERTScore (F1, the best reference, rescaled with the baseline as published) needs the optional
  `bert_score` package and its model: it is computed only when asked for.

Per-sample values and the corpus means are both x100, so a mean of `predictions.jsonl` rows
reproduces `scores.json`.
"""
from __future__ import annotations

import re
import string
from collections import Counter
from typing import Sequence

from llm_recipes.errors import UserError

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = set(string.punctuation)


# ------------------------------------------------------------------------------------ SQuAD F1 / EM
def normalize_answer(text: str) -> str:
    """The official SQuAD normalisation: lower, drop punctuation, drop articles, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def token_f1(prediction: str, reference: str) -> float:
    """Token-overlap F1 in [0, 1] between two normalised texts."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def best_over_references(metric, prediction: str, references: Sequence[str]) -> float:
    return max(metric(prediction, reference) for reference in (list(references) or [""]))


# -------------------------------------------------------------------------------------------- ROUGE
def rouge_scorer():
    from rouge_score import rouge_scorer as rs

    return rs.RougeScorer(list(ROUGE_TYPES), use_stemmer=False)


def rouge_sample(scorer, prediction: str, references: Sequence[str]) -> dict[str, float]:
    """F-measures in [0, 1], each ROUGE type taking its best reference."""
    scores = scorer.score_multi(list(references) or [""], prediction)
    return {name: scores[name].fmeasure for name in ROUGE_TYPES}


# ---------------------------------------------------------------------------------------- BERTScore
def bertscore_f1(predictions: Sequence[str], references: Sequence[Sequence[str]], *, lang: str = "en",
                 batch_size: int = 32) -> list[float]:
    """BERTScore F1 in [0, 1] per sample, best reference, rescaled with the baseline (as published)."""
    try:
        import bert_score
    except ImportError:
        raise UserError("--bertscore needs the bert_score package: pip install bert-score "
                        "(it downloads its scoring model on first use), or drop --bertscore") from None
    refs = [list(r) or [""] for r in references]
    _, _, f1 = bert_score.score(list(predictions), refs, lang=lang, rescale_with_baseline=True,
                                batch_size=batch_size, verbose=False)
    return [float(v) for v in f1]


# ---------------------------------------------------------------------------------------- worked answers
def final_answer(text: str, marker: str) -> str:
    """The answer of a worked answer: what follows `marker` on its last line that starts with it (a text
    without such a line: its last non-empty line)."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith(marker):
            return line[len(marker):].strip()
    return lines[-1] if lines else ""


def worked_part(text: str, marker: str) -> str:
    """The steps of a worked answer: its lines before the final answer's line."""
    lines = text.strip().splitlines()
    last = max((i for i, line in enumerate(lines) if line.strip().startswith(marker)), default=len(lines))
    return "\n".join(lines[:last]).strip()


def score_worked(predictions: Sequence[str], references: Sequence[Sequence[str]], marker: str, *,
                 bertscore: bool = False, progress: bool = True) -> tuple[dict, list[dict]]:
    """`score_predictions` on the final answers (`final_answer`), and `worked_rougeL`: ROUGE-L F of the worked
    steps (`worked_part`), best reference, x100."""
    finals = [final_answer(p, marker) for p in predictions]
    final_refs = [[final_answer(r, marker) for r in refs] for refs in references]
    means, per_sample = score_predictions(finals, final_refs, bertscore=bertscore, progress=progress)
    scorer = rouge_scorer()
    for row, prediction, refs in zip(per_sample, predictions, references):
        scores = scorer.score_multi([worked_part(r, marker) for r in refs] or [""], worked_part(prediction, marker))
        row["worked_rougeL"] = 100.0 * scores["rougeL"].fmeasure
    means["worked_rougeL"] = sum(row["worked_rougeL"] for row in per_sample) / max(len(per_sample), 1)
    return means, per_sample


# ---------------------------------------------------------------------------------------- together
def score_predictions(predictions: Sequence[str], references: Sequence[Sequence[str]], *,
                      bertscore: bool = False, progress: bool = True) -> tuple[dict, list[dict]]:
    """(corpus means, per-sample scores), every value x100.

    Keys: f1, em, rouge1, rouge2, rougeL, rougeLsum (and bertscore when asked for).
    """
    from tqdm.auto import tqdm

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} reference lists")
    scorer = rouge_scorer()
    per_sample = []
    for prediction, refs in tqdm(list(zip(predictions, references)), desc="scoring", unit="sample",
                                 disable=not progress):
        if isinstance(refs, str):
            raise ValueError("references must be one list of strings per sample, got a string")
        row = {"f1": best_over_references(token_f1, prediction, refs),
               "em": best_over_references(exact_match, prediction, refs),
               **rouge_sample(scorer, prediction, refs)}
        per_sample.append({k: 100.0 * v for k, v in row.items()})
    if bertscore:
        for row, value in zip(per_sample, bertscore_f1(predictions, references)):
            row["bertscore"] = 100.0 * value
    keys = list(per_sample[0]) if per_sample else ["f1", "em", *ROUGE_TYPES]
    n = max(len(per_sample), 1)
    means = {key: sum(row[key] for row in per_sample) / n for key in keys}
    return means, per_sample
