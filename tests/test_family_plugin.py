"""The loss-family protocol is the plug-in point: a family defined here, in this file alone, and one row added to
the loss table at run time, train the tiny pair end to end through the trainer's own functions."""
import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import base_flags
from llm_recipes import objective
from llm_recipes.config import parse_flags
from llm_recipes.data import batch_alignment, move
from llm_recipes.finetuning import epoch_micro_batches, setup, train
from llm_recipes.losses import table
from llm_recipes.losses.family import Family
from llm_recipes.losses.pairing import pair_by_groups

TOP = 4


class SortedTopSquares(Family):
    """sum_k (top_k(q)_k - top_k(p)_k)^2 at every pair of text-aligned rows: the simplest kind of family, a
    differentiable per-row value (`row_values`); everything else is the protocol's defaults."""

    name = "sorted top squares"

    def options(self, loss, cfg, cache=None):
        return {"temperature": float(cfg.temperature)}

    def row_values(self, student_logits, teacher_logits, options):
        q = torch.softmax(student_logits / options["temperature"], dim=-1).topk(TOP, dim=-1).values
        p = torch.softmax(teacher_logits / options["temperature"], dim=-1).topk(TOP, dim=-1).values
        return ((q - p) ** 2).sum(dim=-1)

    def describe(self, spec):
        return f" (top {TOP})"


@pytest.fixture
def toy_loss(monkeypatch):
    monkeypatch.setitem(table.LOSSES, "toy", table.Loss("toy", SortedTopSquares(), False, 2.0, "a test's loss"))


def reference_term(state, batch) -> tuple[float, int]:
    """The toy term of one batch written plainly: full logits of both models, the rows that predict the first
    token of each text-aligned group, the formula above summed over them."""
    models_ = state.models
    with torch.no_grad():
        s_logits = models_.student(**{k: batch["student"][k] for k in ("input_ids", "attention_mask")}).logits
        t_logits = models_.teacher(**{k: batch["teacher"][k] for k in ("input_ids", "attention_mask")}).logits
    alignment = batch_alignment(batch)
    pairing = pair_by_groups(batch["student"]["labels"], batch["teacher"]["labels"], alignment["student_groups"],
                             alignment["teacher_groups"])
    rows_s = pairing.student_rows[: pairing.num_paired]
    zs = s_logits.reshape(-1, s_logits.shape[-1])[rows_s][:, : state.plan.spec.student_vocab_size].double()
    zt = t_logits.reshape(-1, t_logits.shape[-1])[pairing.teacher_rows][:, : state.plan.spec.teacher_vocab_size]
    q = torch.softmax(zs, -1).topk(TOP, -1).values
    p = torch.softmax(zt.double(), -1).topk(TOP, -1).values
    return float(((q - p) ** 2).sum()), pairing.num_paired


def test_a_family_defined_in_a_test_trains_the_tiny_pair(tiny, tmp_path, toy_loss, capsys):
    flags = base_flags(tiny, tmp_path / "toy", **{"distillation_config.loss": "toy", "max_train_step": 4,
                                                  "run_validation": False})
    state = setup(parse_flags(flags))
    assert state.plan.spec.name == "toy" and state.plan.spec.alignment == "text" and state.plan.distil_factor == 2.0
    batch = move(next(epoch_micro_batches(state, 0)), state.info.device)
    state.models.student.eval()  # no dropout: the reference's forward is the same computation
    terms = objective.compute_terms(state.objective, state.models, batch, state.info.device)
    expected, units = reference_term(state, batch)
    assert terms.counts.distill == units > 0
    assert float(terms.sums["distill"].detach()) == pytest.approx(expected, rel=1e-5)

    result = train(parse_flags({**flags, "output_dir": str(tmp_path / "trained")}))
    out = capsys.readouterr().out
    assert "loss: 1.0 x CE + 2.0 x toy (top 4); answer tokens paired by text" in out
    lines = [json.loads(line) for line in (tmp_path / "trained" / "metrics.jsonl").read_text().splitlines()]
    distill = [line["distill"] for line in lines if line["type"] == "train"]
    assert result["state"]["global_step"] == 4 and len(distill) == 4 and all(0 < d < 2 for d in distill)

    sft = train(parse_flags({**flags, "output_dir": str(tmp_path / "sft"), "distillation_config.distil_factor": 0}))
    assert sft["state"]["global_step"] == 4
    toy_weights = load_file(str(tmp_path / "trained" / "last" / "model.safetensors"))
    sft_weights = load_file(str(tmp_path / "sft" / "last" / "model.safetensors"))
    assert max((toy_weights[k] - sft_weights[k]).abs().max().item() for k in toy_weights) > 1e-6  # the term trained


def test_an_unknown_loss_still_names_the_table(tiny, tmp_path):
    from llm_recipes.errors import UserError

    with pytest.raises(UserError, match="unknown loss 'toy': --distillation_config.loss must be one of auto, uld"):
        train(parse_flags(base_flags(tiny, tmp_path / "x", **{"distillation_config.loss": "toy"})))
