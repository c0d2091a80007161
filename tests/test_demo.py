"""The demo's report: table values, mean and spread over seeds, the PNG (no training here: the demo
itself runs the real command lines, which the other test files cover)."""
import statistics

from examples.tiny import demo


def _row(model, seed, f1, em=50.0, rouge=60.0, time_s=12.0, memory=0.5, steps=3):
    curve = [{"step": s, "ce": 3.0 - s / 10, "loss": 3.0} for s in range(1, steps + 1)]
    curve.append({"step": steps, "eval_loss": 2.0, "eval_ce": 2.0})
    return {"model": model, "seed": seed, "train_time_s": time_s, "peak_memory_gb": memory, "curve": curve,
            "scores": {"f1": f1, "em": em, "rougeL": rouge}}


def _results(seeds):
    rows = [_row("teacher", 0, 90.0), {**_row("untrained student", 0, 0.0), "train_time_s": None,
                                       "peak_memory_gb": None, "curve": []}]
    rows += [_row("SFT", s, 40.0 + 2 * s) for s in range(seeds)]
    rows += [_row("ULD", s, 45.0 + s) for s in range(seeds)]
    return {"settings": {"seeds": seeds}, "rows": rows}


def test_table_one_seed_shows_plain_values():
    text = demo.table(_results(1))
    lines = text.splitlines()
    assert lines[0].startswith("| model | F1 | EM | ROUGE-L")
    assert "| teacher | 90.0 | 50.0 | 60.0 | 12 | 0.50 |" in lines
    assert "| untrained student | 0.0 | 50.0 | 60.0 | - | - |" in lines
    assert "| ULD | 45.0 |" in text and "±" not in text


def test_table_several_seeds_reports_mean_and_standard_deviation():
    text = demo.table(_results(3))
    sft = [line for line in text.splitlines() if line.startswith("| SFT |")][0]
    mean, spread = statistics.mean([40.0, 42.0, 44.0]), statistics.stdev([40.0, 42.0, 44.0])
    assert f"{mean:.1f} ± {spread:.1f}" in sft  # 42.0 ± 2.0
    assert sft.startswith("| SFT | 42.0 ± 2.0 |")
    assert "3 seed(s), mean ± standard deviation" in text


def test_report_writes_table_json_and_png(tmp_path):
    text = demo.write_report(_results(2), tmp_path)
    assert (tmp_path / "results.md").read_text() == text
    png = (tmp_path / "results.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert (tmp_path / "results.json").exists()


def test_methods_cover_the_issue():
    names = [m.name for m in demo.METHODS]
    assert names == ["SFT", "ULD", "MultiLevelOT fast", "MultiLevelOT greedy", "SFT (same tokenizer)",
                     "KL (same tokenizer)"]
    sft = demo.METHODS[0]
    assert sft.flags == {"distillation_config.distil_factor": 0} and sft.student == "student"
    assert {m.student for m in demo.METHODS if "same" in m.name} == {"student_same"}


def test_report_with_a_given_teacher_has_no_teacher_curve(tmp_path):
    """--teacher PATH: the teacher is not trained, its row has no time, memory or curve."""
    results = _results(1)
    results["rows"][0].update(train_time_s=None, peak_memory_gb=None, curve=[])
    text = demo.write_report(results, tmp_path)
    assert "| teacher | 90.0 | 50.0 | 60.0 | - | - |" in text.splitlines()
    assert (tmp_path / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
