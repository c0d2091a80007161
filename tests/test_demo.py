"""The paired benchmark's report: paired differences with Student's t intervals, the share of the
same-tokenizer gain, the Markdown table, results.json's format and the PNG (no training here: the
benchmark runs the real command lines, which the other test files cover)."""
import json
import math
import statistics

import pytest

from examples import harness
from examples.tiny import demo
from llm_recipes.errors import UserError

SEEDS = [0, 1, 2, 3, 4]


def _results():
    f1 = {"SFT": [40, 42, 44, 41, 43], "ULD index 1.5": [10, 12, 9, 11, 10], "ULD text": [39, 43, 44, 40, 44],
          "projected": [44, 45, 49, 44, 47], "projected, cached teacher (K 32)": [44, 46, 48, 44, 46],
          "hybrid": [41, 42, 45, 41, 44], "MultiLevelOT fast text": [40, 42, 45, 42, 43],
          "SFT (same tokenizer)": [50, 52, 49, 51, 50], "KL (same tokenizer)": [58, 59, 57, 60, 58]}
    rows = [{"name": row.name, "tokenizers": row.tokenizers, "loss": row.loss, "alignment": row.alignment,
             "f1": [float(v) for v in f1[row.name]]} for row in demo.ROWS]
    return {"seeds": SEEDS, "tables": [{"students": "random", "rows": rows}]}


def _details():
    return {"rates": {"random": {row.name: {"lr": 2e-3, "validation_f1": {2e-3: 1.0}} for row in demo.ROWS}}}


def test_paired_difference_and_its_t_interval():
    diff = harness.paired([44, 45, 49, 44, 47], [40, 42, 44, 41, 43])
    diffs = [4, 3, 5, 3, 4]
    half = 2.776 * statistics.stdev(diffs) / math.sqrt(5)  # t(0.975, 4 dof)
    assert diff["mean"] == pytest.approx(3.8) and diff["diffs"] == diffs
    assert (diff["low"], diff["high"]) == pytest.approx((3.8 - half, 3.8 + half))
    single = harness.paired([5.0], [3.0])
    assert single["mean"] == 2.0 and single["low"] is None


def test_table_pairs_rows_with_their_own_sft_and_shares_the_kl_gain():
    lines = {line["name"]: line for line in harness.regime_table(_results()["tables"][0])}
    kl_gain = statistics.mean([58, 59, 57, 60, 58]) - statistics.mean([50, 52, 49, 51, 50])
    assert lines["SFT"]["diff"] is None and lines["SFT (same tokenizer)"]["diff"] is None
    assert lines["projected"]["diff"]["mean"] == pytest.approx(3.8)
    assert lines["projected"]["share_of_kl_gain"] == pytest.approx(3.8 / kl_gain)
    assert lines["KL (same tokenizer)"]["diff"]["mean"] == pytest.approx(kl_gain)
    assert lines["KL (same tokenizer)"]["share_of_kl_gain"] is None  # it is the gain


def test_no_share_of_a_kl_gain_whose_interval_holds_zero():
    table = _results()["tables"][0]
    for row in table["rows"]:
        if row["name"] == "KL (same tokenizer)":
            row["f1"] = [50.5, 51, 49.5, 52, 50]  # +0.2 over SFT (same tokenizer), the interval across 0
    lines = {line["name"]: line for line in harness.regime_table(table)}
    assert lines["KL (same tokenizer)"]["diff"]["low"] < 0 < lines["KL (same tokenizer)"]["diff"]["high"]
    assert lines["projected"]["diff"]["mean"] == pytest.approx(3.8) and lines["projected"]["share_of_kl_gain"] is None


def test_markdown_and_files(tmp_path):
    text = harness.write_report(_results(), _details(), tmp_path)
    assert (tmp_path / "results.md").read_text() == text
    assert "| projected | different | 0.002 | 45.8 | +3.8 [" in text and "| 48% |" in text
    assert "5 seed(s)" in text
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results) == {"seeds", "tables"} and results["seeds"] == SEEDS
    row = results["tables"][0]["rows"][0]
    assert set(row) == {"name", "tokenizers", "loss", "alignment", "f1"} and len(row["f1"]) == len(SEEDS)
    png = (tmp_path / "results.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_rows_cover_the_issue():
    names = [row.name for row in demo.ROWS]
    assert names == ["SFT", "ULD index 1.5", "ULD text", "projected", "projected, cached teacher (K 32)", "hybrid",
                     "MultiLevelOT fast text", "SFT (same tokenizer)", "KL (same tokenizer)"]
    by_name = {row.name: row for row in demo.ROWS}
    assert by_name["ULD index 1.5"].flags["distillation_config.alignment"] == "index"
    assert by_name["SFT"].flags == {"distillation_config.distil_factor": 0}
    assert {row.student for row in demo.ROWS if "same" in row.name} == {"student_same"}
    assert len({row.slug for row in demo.ROWS}) == len(demo.ROWS)


def test_bad_flags_are_refused(capsys):
    with pytest.raises(SystemExit):
        demo.main(regimes="warm")
    assert "--regimes must be a comma-separated subset of random, pretrained" in capsys.readouterr().err


def test_the_uld_study_measures_the_gradient_uld_really_has():
    """examples/tiny/uld_study.py's sorted-L1 gradient is the library's ULD gradient at one position, and
    it raises the student's top token whenever the teacher is more confident, right or wrong."""
    import torch

    from examples.tiny import uld_study
    from llm_recipes.losses import uld_loss

    torch.manual_seed(0)
    z_s, z_t = torch.randn(7, dtype=torch.float64), torch.randn(5, dtype=torch.float64) * 4
    ours = uld_study.sorted_l1_gradient(z_s, z_t)
    student = z_s.clone().reshape(1, 1, 7).requires_grad_(True)
    labels = torch.tensor([[-100, 3]])  # one answer position: the logits at index 0 predict label 3
    logits = torch.cat([student, torch.zeros(1, 1, 7, dtype=torch.float64)], 1)
    teacher = torch.cat([z_t.reshape(1, 1, 5), torch.zeros(1, 1, 5, dtype=torch.float64)], 1)
    uld_loss(logits, labels, teacher, torch.tensor([[-100, 2]]), skip_student_eos=False).backward()
    assert torch.allclose(ours, student.grad.reshape(7), atol=1e-12)
    top = int(z_s.argmax())
    assert torch.softmax(z_t, -1).max() > torch.softmax(z_s, -1).max() and -ours[top] > 0  # raised, right or wrong


def test_the_row_sets_and_the_rate_seed():
    """--rows picks a set or names (SFT rows always kept); the on-policy control table has both tokenizers' SFT,
    off-policy and on-policy rows; every slug (its runs' folder) is unique; a rate seed among the test seeds is
    refused before anything runs."""
    on_policy = [row.name for row in demo.selected_rows("on_policy")]
    assert on_policy == ["SFT", "projected", "SFT (same tokenizer)", "KL (same tokenizer)", "projected on-policy 0.5",
                         "projected on-policy 1.0", "KL on-policy 0.5 (same tokenizer)",
                         "KL on-policy 1.0 (same tokenizer)", "projected then on-policy 1.0",
                         "projected on-policy 1.0 + CE"]
    assert [row.name for row in demo.selected_rows("hybrid")] == ["SFT", "hybrid", "SFT (same tokenizer)"]
    assert len({row.slug for row in demo.ALL_ROWS}) == len(demo.ALL_ROWS)
    then = {row.name: row for row in demo.ALL_ROWS}["projected then on-policy 1.0"]
    assert then.flags["distillation_config.lmbda"] == 1.0 and then.flags["distillation_config.on_policy_start"] == 0.5
    assert demo.ALL_ROWS[-1].flags["distillation_config.on_policy_ce"] is True
    with pytest.raises(UserError, match="unknown row nope"):
        demo.selected_rows("nope")
    with pytest.raises(UserError, match="--rate_seed 3 is one of the test seeds"):
        demo.run_demo(demo.DemoArgs(seeds=5, rate_seed=3))


def test_on_policy_rows_are_scored_with_their_final_weights(tmp_path):
    """`best` is the lowest eval loss on the data set's answers, which picked the checkpoint before the first
    on-policy step in every run with on_policy_start: on-policy rows are scored with `last`, in their own folder."""
    rows = {row.name: row for row in demo.ALL_ROWS}
    on, off = rows["projected then on-policy 1.0"], rows["projected"]
    assert on.on_policy and not off.on_policy
    assert on.scored(tmp_path, "test") == (tmp_path / "last", tmp_path / "test-last")
    assert off.scored(tmp_path, "validation") == (tmp_path / "best", tmp_path / "validation")


def test_a_stopped_run_is_not_finished(tmp_path):
    """A run stopped by SIGTERM points best/ at the checkpoint it saved: only the trainer's "done:" line in its log
    makes it finished (its scores were of half-trained weights in the first tables)."""
    (tmp_path / "best").mkdir()
    (tmp_path / "best" / "config.json").write_text("{}")
    assert harness.finished(tmp_path)  # no log: a run made elsewhere
    (tmp_path / "log.txt").write_text("epoch 1/1:  44%\ninterrupted: stopped by SIGTERM at step 24: checkpoint ...\n")
    assert not harness.finished(tmp_path)
    (tmp_path / "log.txt").write_text("...\ndone: 54 optimizer steps\nmodel saved to ...\n")
    assert harness.finished(tmp_path)
    assert not harness.finished(tmp_path / "missing")



def test_a_stopped_run_without_optimizer_state_starts_over(tmp_path, monkeypatch):
    """The demos save no optimizer state, so a stopped run cannot resume: it starts over, its stale scores gone."""
    commands = []
    monkeypatch.setattr(harness, "run", lambda command, log: commands.append(command))
    step = tmp_path / "checkpoints" / "step-0000024"
    step.mkdir(parents=True)
    (step / "trainer_state.json").write_text("{}")
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "scores.json").write_text("{}")
    harness.finetune({"lr": 1e-3}, tmp_path, tmp_path / "log.txt")
    assert "--overwrite_output_dir" in commands[-1] and "--resume_from" not in commands[-1]
    assert not (tmp_path / "test").exists()
    (step / "optimizer.pt").write_bytes(b"")
    harness.finetune({"lr": 1e-3}, tmp_path, tmp_path / "log.txt")
    assert "--resume_from" in commands[-1]
